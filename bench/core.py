"""The core's hot path, CPU only: what `Guard.process` costs per event, stage by stage, without a broker.

Run with `python -m bench.core` from the repository root. Events are built as bench/events.py builds them
(structured mode, HMAC-SHA256, about 490 bytes), the state table is RocksDB (rocksdict, raw mode, as the
worker's faust store; `--state dict` for a plain dict) and the rules are the `price.updated` rules of the
shipped byzguard.yaml. Two cases:

- fresh: the entity has one remembered id (its first event was verified; this is its second);
- steady: the entity has a full history (`idempotency.ids_per_entity`, 32, recent ids).

Every figure is the median of `--reps` (5) timings of the process's CPU time over `--entities` events
(each of another entity), in µs per event. Stages: the steps of the clean path (engine.verify_clean, which
decides every event of these runs), run on the very inputs `Guard.process` sees:

  decode       envelope.decode of the record
  integrity    the HMAC over the bound form decode built, by the source's key, compared to the checksum
  state decode EntityState.from_bytes of the entity's record
  checks       verify_clean's tests: authorization, idempotency (find), version, vector clock, Lamport, time
  rules        the shipped rules' generated function (RuleSet.plan), with the last-known-good parsed
  state build  the entity's next state, built as verify_clean builds it (new_entries + EntityState)
  encode       EntityState.to_bytes of it
  headers      the verified record's headers
  total        Guard.process, state read from the table (glue: total minus the stages)
  batch        the same events as the batched runtime processes them: Guard.process_batch per BATCH (64)
               records (passes over the batch: decode, MAC, reads, decisions, writes and headers); for code
               without process_batch, Guard.prepare per BATCH records and Guard.process of each with its own
               (timed interleaved with total, rep by rep; absent for code without Guard.prepare)
  batch by record  Guard.prepare per BATCH records and Guard.process of each (the batch row before
               process_batch; only for code that has process_batch)

run_case checks that verify_clean decides each event and that the state built here is the one Guard.process
writes, so the rows keep mapping onto what a clean event runs.

`--out DIR` writes core.json and core.md into DIR/core-<git>/; `--before FILE` (a core.json of an earlier
run) adds its figures side by side.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from hmac import compare_digest
from pathlib import Path
from typing import Any

import orjson

from bench import events as bench_events
from byzguard import engine
from byzguard.clocks import Order
from byzguard.config import GuardConfig, load
from byzguard.envelope import Envelope, decode
from byzguard.guard import ENTITIES, LAMPORTS, Guard, RecordIn, StateReader
from byzguard.integrity import HMAC_SHA256, hmac_sha256
from byzguard.routing import verified_headers
from byzguard.rules import RuleSet
from byzguard.state import EntityState, new_entries
from byzguard.verdict import Code, Severity

REPO = Path(__file__).resolve().parent.parent
AT = 1_780_000_000.0
NOW = AT + 1.0
STAGES = ("decode", "integrity", "state decode", "checks", "rules", "state build", "encode", "headers")
# Whether RuleSet.evaluate takes from_orjson, as the engine passes it (older code, measured with --label for a
# before run, has no such keyword: its values were checked either way).
FROM_ORJSON = "from_orjson" in inspect.signature(RuleSet.evaluate).parameters


def _evaluate(rules: RuleSet) -> Callable[[Any, Any], list[Any]]:
    """rules.evaluate(data, last) as the engine calls it for rules that do not read `event`."""
    attributes = engine._NO_ATTRIBUTES
    if FROM_ORJSON:
        def evaluate(data: Any, last: Any) -> list[Any]:
            return rules.evaluate(data, last, now=NOW, event=attributes, from_orjson=True)
    else:
        def evaluate(data: Any, last: Any) -> list[Any]:
            return rules.evaluate(data, last, now=NOW, event=attributes)
    return evaluate
CASES = {"fresh": 1, "steady": 32}
#: Records per Guard.prepare call in the batch row: the batched runtime's app.runtime.loop.PREPARED_RECORDS.
BATCH = 64
HAS_PREPARE = hasattr(Guard, "prepare")
HAS_BATCH = hasattr(Guard, "process_batch")


def clean_state(env: Envelope, entity: EntityState, limits: Any) -> EntityState:
    """The entity's next state after a clean event, as the tail of engine.verify_clean builds it (run_case checks
    it against what Guard.process writes)."""
    version, vclock = env.version, env.vclock
    last_version = entity.version
    if last_version is not None and (version is None or last_version > version):
        version = last_version
    if vclock is None:
        vclock = entity.vclock
    content_hash = env.content_hash
    entries = new_entries(entity.entries, env.id, content_hash, NOW, env.version, now=NOW, window=limits.id_window,
                          keep=limits.ids_per_entity, old_version=last_version, new_version=version)
    return EntityState(version, vclock, content_hash, env.covered, env.type, NOW, env.time, entries)


def git_rev() -> str:
    """The short commit of the checkout, with -dirty when it has uncommitted changes to tracked files."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    rev = run("rev-parse", "--short", "HEAD") or "unknown"
    return rev + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


class _Tables:
    """Named state tables: RocksDB (rocksdict, raw mode) or dicts."""

    def __init__(self, kind: str, root: Path) -> None:
        self.tables: dict[str, Any] = {}
        for name in (ENTITIES, LAMPORTS, "causal"):
            if kind == "rocksdb":
                from rocksdict import Options, Rdict
                self.tables[name] = Rdict(str(root / name), Options(raw_mode=True))
            else:
                self.tables[name] = {}

    def apply(self, writes: Mapping[tuple[str, bytes], bytes | None]) -> None:
        for (table, key), value in writes.items():
            if value is None:
                self.tables[table].pop(key, None) if isinstance(self.tables[table], dict) else \
                    self.tables[table].delete(key)
            else:
                self.tables[table][key] = value

    def close(self) -> None:
        for table in self.tables.values():
            if not isinstance(table, dict):
                table.close()


def _config(tmp: Path) -> GuardConfig:
    path = bench_events.write_config(tmp / "core.yaml", repo=REPO, input_topic="in", verified="out",
                                     quarantine="q", partitions=1)
    return load(path, environ=bench_events.secret_env())


def _timed(*fns: Callable[[], object], reps: int, count: int) -> list[float]:
    """For each fn (which handles `count` events), the median of `reps` CPU timings in µs per event; with several,
    their timings interleave (first, second, first, ...), so they meet the same load."""
    for fn in fns:
        fn()  # warm up
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, samples, strict=True):
            gc.collect()
            start = time.process_time()
            fn()
            out.append((time.process_time() - start) / count * 1e6)
    return [statistics.median(out) for out in samples]


def run_case(ids: int, entities: int, reps: int, state_kind: str) -> dict[str, Any]:
    """Every stage's µs per event, for entities whose state remembers `ids` ids."""
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmpdir:
        tmp = Path(tmpdir)
        config = _config(tmp)
        route = config.routes[0]
        guard = Guard(config)
        tables = _Tables(state_kind, tmp)
        state: Mapping[str, StateReader] = tables.tables
        stamped = list(bench_events.events((ids + 1) * entities, entities, at=AT))
        records = [RecordIn(s.key, s.value, s.headers, "in", 0, i, AT) for i, s in enumerate(stamped)]
        for record in records[: ids * entities]:  # the history: `ids` verified events per entity
            tables.apply(guard.process(record, route, state, now=NOW).writes)
        todo = records[ids * entities:]
        policy = route.policy_for(bench_events.EVENT_TYPE)
        keyring, limits = config.keyring, guard.limits
        envs: list[Envelope] = []
        for r in todo:
            env = decode(r.key, r.value, r.headers, default_type=route.default_type)
            assert isinstance(env, Envelope), env
            envs.append(env)
        raws = [state[ENTITIES].get(env.subject.encode()) for env in envs]
        assert all(raws)
        entity_states = [EntityState.from_bytes(raw) for raw in raws if raw is not None]
        assert len(entity_states[0].recent) == min(ids, limits.ids_per_entity)
        rules = policy.rules
        pairs = list(zip(envs, entity_states, strict=True))
        # The writers' Lamport marks as Guard._one reads them (the bench's events carry no producer instance).
        marks = []
        for env in envs:
            raw = state[LAMPORTS].get(env.source.encode())
            marks.append(int(raw) if raw else None)
        advanced = [clean_state(env, entity, limits) for env, entity in pairs]
        decisions = [guard.process(r, route, state, now=NOW) for r in todo]
        for result, env, entity, mark, built in zip(decisions, envs, entity_states, marks, advanced, strict=True):
            assert result.first.decision.outcome.value == "verified", result.first.decision
            # The clean path decides it (what the stages time), and builds the state the stages build.
            assert engine.verify_clean(env, policy, entity, mark, keyring, NOW, limits, AT, None) is not None
            assert result.writes[(ENTITIES, env.subject.encode())] == built.to_bytes()

        def stage_decode() -> None:
            for r in todo:
                decode(r.key, r.value, r.headers, default_type=route.default_type)

        def stage_integrity() -> None:
            # verify_clean's common case: a MAC over the bound form decode built, by the source's own key.
            for env in envs:
                checksum = env.checksum
                key = keyring.get(checksum.key_id)
                if key is None or key.source != env.source \
                        or not compare_digest(hmac_sha256(key.secret, env.bound), checksum.value.lower()):
                    raise AssertionError("the bench's events must pass the clean path's integrity check")

        def stage_state_decode() -> None:
            for raw in raws:
                EntityState.from_bytes(raw)  # type: ignore[arg-type]

        find_ids = policy.severity.get(Code.ID_DUPLICATE, Severity.REJECT) is not Severity.OFF
        after = Order.AFTER

        def stage_checks() -> None:
            # verify_clean's tests, in its order; each holds for a clean event (else the full checks would run).
            sources, key_ids, window = policy.sources, policy.key_ids, limits.id_window
            max_age, max_skew = policy.max_age, policy.max_skew
            for (env, entity), mark in zip(pairs, marks, strict=True):
                ok = policy.listed and env.refused is None and (sources is None or env.source in sources)
                if key_ids is not None:
                    checksum = env.checksum
                    ok = ok and checksum is not None and checksum.algorithm == HMAC_SHA256 \
                        and checksum.key_id in key_ids
                ok = ok and not (find_ids and entity.find(env.id, NOW, window) is not None)
                version, vclock, lamport, at = env.version, env.vclock, env.lamport, env.time
                ok = ok and (version is None or entity.version is None or version == entity.version + 1)
                ok = ok and (vclock is None or entity.vclock is None or vclock.compare(entity.vclock) is after)
                ok = ok and (lamport is None or mark is None or lamport > mark)
                if at is not None:
                    ok = ok and (max_age is None or NOW - at <= max_age) and (max_skew is None or at - AT <= max_skew)
                if not ok:
                    raise AssertionError("the bench's events must pass the clean path's checks")

        plan = rules.plan
        generated, uses_last = (plan[0], plan[1]) if plan is not None else (None, True)
        evaluate = _evaluate(rules)

        def stage_rules() -> None:
            # verify_clean calls the generated function ([] when every rule holds); RuleSet.evaluate if there is none.
            for env, entity in pairs:
                last = entity.last_good_data() if uses_last else None
                found = generated(env.data(), last, NOW, True) if generated is not None else evaluate(env.data(), last)
                if found:
                    raise AssertionError(f"the bench's events must satisfy the rules: {found}")

        def stage_build() -> None:
            for env, entity in pairs:
                clean_state(env, entity, limits)

        def stage_encode() -> None:
            for entity in advanced:
                entity.to_bytes()

        def stage_headers() -> None:
            for r in todo:
                verified_headers(r.headers, engine.Outcome.VERIFIED, (), route.name, NOW)

        def total() -> None:
            for r in todo:
                guard.process(r, route, state, now=NOW)

        def by_record() -> None:
            for at in range(0, len(todo), BATCH):
                chunk = todo[at:at + BATCH]
                for r, prepared in zip(chunk, guard.prepare(chunk, route), strict=True):
                    guard.process(r, route, state, now=NOW, prepared=prepared)

        def passes() -> None:
            for at in range(0, len(todo), BATCH):
                guard.process_batch(todo[at:at + BATCH], route, state, NOW)

        batch = passes if HAS_BATCH else by_record

        if HAS_PREPARE:
            prepared = guard.prepare(todo, route)
            batched = [guard.process(r, route, state, now=NOW, prepared=p) for r, p in zip(todo, prepared, strict=True)]
            assert [(b.writes, b.first.decision) for b in batched] == [(d.writes, d.first.decision) for d in decisions]
        if HAS_BATCH:
            # The batch reads what the records before it wrote (here: their writers' Lamport marks, which only rise).
            grouped = [r for at in range(0, len(todo), BATCH)
                       for r in guard.process_batch(todo[at:at + BATCH], route, state, NOW)]
            assert [(b.writes, b.first.decision) for b in grouped] == [(d.writes, d.first.decision) for d in decisions]

        timings = {
            "decode": stage_decode, "integrity": stage_integrity, "state decode": stage_state_decode,
            "checks": stage_checks, "rules": stage_rules, "state build": stage_build, "encode": stage_encode,
            "headers": stage_headers,
        }
        us = {name: _timed(fn, reps=reps, count=len(todo))[0] for name, fn in timings.items()}
        if HAS_BATCH:  # total, batch and batch by record, rep by rep (A B C A B C): they meet the same load
            us["total"], us["batch"], us["batch by record"] = _timed(total, batch, by_record, reps=reps,
                                                                     count=len(todo))
        elif HAS_PREPARE:  # total and batch, rep by rep (A B A B): the two figures meet the same load
            us["total"], us["batch"] = _timed(total, batch, reps=reps, count=len(todo))
        else:
            us["total"] = _timed(total, reps=reps, count=len(todo))[0]
        us["glue"] = us["total"] - sum(us[name] for name in STAGES)
        record_bytes = [len(raw) for raw in raws if raw is not None]
        written = [len(d.writes[(ENTITIES, e.subject.encode())] or b"") for d, e in zip(decisions, envs, strict=True)]
        tables.close()
        return {
            "ids": len(entity_states[0].recent), "events": len(todo), "us": us,
            "event_bytes": statistics.median(len(r.value or b"") for r in todo),
            "state_record_read_bytes": statistics.median(record_bytes),
            "state_record_written_bytes": statistics.median(written),
        }


def rules_only(reps: int, count: int = 2000) -> float:
    """µs per evaluation of the four shipped price rules alone (data and last-known-good already parsed)."""
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmpdir:
        config = _config(Path(tmpdir))
    rules = config.routes[0].policy_for(bench_events.EVENT_TYPE).rules
    # Parsed by orjson, as the engine hands them over (the event's data and the stored last-known-good).
    data = [orjson.loads(orjson.dumps(bench_events.price_data(i, 2, AT))) for i in range(count)]
    last = [orjson.loads(orjson.dumps(bench_events.price_data(i, 1, AT))) for i in range(count)]
    pairs = list(zip(data, last, strict=True))

    evaluate = _evaluate(rules)

    def run() -> None:
        for d, lst in pairs:
            evaluate(d, lst)
    assert not evaluate(data[0], last[0])
    return _timed(run, reps=reps, count=count)[0]


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result whose every figure is the median of that figure over `runs` (of the same code)."""
    first = runs[0]
    if len(runs) == 1:
        return first
    merged = {**first, "runs": len(runs), "cases": {}}
    merged["rules_only_us"] = statistics.median(r["rules_only_us"] for r in runs)
    for case, figures in first["cases"].items():
        merged["cases"][case] = {
            **figures, "us": {stage: statistics.median(r["cases"][case]["us"][stage] for r in runs)
                              for stage in figures["us"] if all(stage in r["cases"][case]["us"] for r in runs)}}
    return merged


def markdown(result: dict[str, Any], before: dict[str, Any] | None) -> str:
    """The result as a Markdown table (with an earlier run's figures beside it, when given)."""
    runs = f"; medians of {result['runs']} such runs, interleaved with the before runs" if "runs" in result else ""
    lines = [f"# bench.core at {result['git']}", "",
             f"`python -m bench.core` ({result['state']} state, {result['entities']} entities, median of "
             f"{result['reps']} CPU-time timings{runs}, µs per event). Python {result['python']}.", ""]
    cases = list(CASES)
    if before is not None:
        lines.append(f"Before: {before['git']}. Columns: before → after for each case.")
        lines.append("")
        head = "| stage | " + " | ".join(f"{c} ({result['cases'][c]['ids']} ids) before | after" for c in cases) + " |"
        lines += [head, "|---" * (1 + 2 * len(cases)) + "|"]
    else:
        lines += ["| stage | " + " | ".join(f"{c} ({result['cases'][c]['ids']} ids)" for c in cases) + " |",
                  "|---" * (1 + len(cases)) + "|"]
    def cell(run: dict[str, Any], case: str, stage: str) -> str:
        value = run["cases"][case]["us"].get(stage)
        return "" if value is None else f"{value:.1f}"
    for stage in (*STAGES, "glue", "total", "batch", "batch by record"):
        if all(stage not in run["cases"][case]["us"] for run in (result, before) if run is not None for case in cases):
            continue
        cells = []
        for case in cases:
            if before is not None:
                cells.append(cell(before, case, stage))
            cells.append(cell(result, case, stage))
        name = f"**{stage}** (Guard.process)" if stage == "total" else \
            f"**batch** (Guard.process_batch per {BATCH}; before it: prepare + process)" if stage == "batch" else \
            f"batch by record (prepare per {BATCH} + process each)" if stage == "batch by record" else stage
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, label in (("state_record_written_bytes", "state record written (B)"),
                       ("event_bytes", "event (B)")):
        cells = []
        for case in cases:
            if before is not None:
                cells.append(f"{before['cases'][case][key]:.0f}")
            cells.append(f"{result['cases'][case][key]:.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    rules_line = f"Four shipped price rules alone (RuleSet.evaluate): {result['rules_only_us']:.2f} µs"
    if before is not None:
        rules_line += f" (before: {before['rules_only_us']:.2f} µs)"
    lines += [rules_line + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run both cases and print (and optionally write) the JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entities", type=int, default=2000, help="events (entities) per timing (default 2000)")
    parser.add_argument("--reps", type=int, default=5, help="timings per figure, the median kept (default 5)")
    parser.add_argument("--state", choices=("rocksdb", "dict"), default="rocksdb")
    parser.add_argument("--out", type=Path, help="write core.json and core.md into OUT/core-<git>/")
    parser.add_argument("--before", type=Path, nargs="+",
                        help="core.json file(s) of an earlier run, shown side by side (several: their medians)")
    parser.add_argument("--runs", type=Path, nargs="+",
                        help="instead of measuring, report the medians of these core.json files (runs of this "
                        "code interleaved with runs of --before on a busy machine)")
    parser.add_argument("--label", help="name the measured code so (default: the git commit)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if args.runs:
        result = median_of([orjson.loads(path.read_bytes()) for path in args.runs])
    else:
        result = {
            "git": args.label or git_rev(), "state": args.state, "entities": args.entities, "reps": args.reps,
            "python": sys.version.split()[0],
            "cases": {name: run_case(ids, args.entities, args.reps, args.state) for name, ids in CASES.items()},
            "rules_only_us": rules_only(args.reps),
        }
    if args.json_out:
        args.json_out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    before = median_of([orjson.loads(path.read_bytes()) for path in args.before]) if args.before else None
    text = markdown(result, before)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(text)
    if args.out:
        out = args.out / f"core-{result['git']}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "core.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        if before is not None:
            (out / "before.json").write_bytes(orjson.dumps(before, option=orjson.OPT_INDENT_2))
        for i, path in enumerate(args.runs or []):
            (out / f"run-after-{i + 1}.json").write_bytes(path.read_bytes())
        for i, path in enumerate(args.before or []):
            (out / f"run-before-{i + 1}.json").write_bytes(path.read_bytes())
        (out / "core.md").write_text(text)
        print(f"written to {out}")


__all__ = ["Code", "main"]

if __name__ == "__main__":
    main()
