"""Medians, spreads, ratios and targets of a benchmark run, and its Markdown report."""

from __future__ import annotations

import statistics
from typing import Any

from bench.variants import VARIANTS

#: c and d are the product (the batched runtime). p99 targets: at half of the variant's own throughput.
TARGETS = {"c/a": 0.4, "d/c": 0.7, "c_p99_ms": 20.0, "d_p99_ms": 150.0, "rss_mb": 400.0,
           # The runtime prototypes (e, e_eos: shape 1; f: shape 2) against the targets of the guard on a new runtime.
           "e/a": 0.4, "e_eos/e": 0.7, "f/a": 0.4}
#: The ratios a report shows (where both variants ran), numerator over denominator.
RATIOS = (("c", "a"), ("d", "c"), ("a_ck", "a"), ("c", "a_ck"), ("d", "a"), ("c", "b"), ("b", "a"),
          ("c", "c_norules"), ("e", "a"), ("e", "a_ck"),
          ("e_eos", "e"), ("e", "c"), ("f", "a"), ("f", "e"))


def label(key: str) -> str:
    """A variant's label; a run recorded before a variant was removed (cf, df: the faust agent runtime) still
    renders."""
    variant = VARIANTS.get(key)
    return variant.label if variant is not None else f"{key} (a variant since removed)"


def _stats(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0, "values": []}
    med = statistics.median(values)
    return {"median": round(med, 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "spread_pct": round(100 * (max(values) - min(values)) / med, 1) if med else None, "n": len(values),
            "values": [round(v, 2) for v in values]}


def summarise_throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: events/s, CPU per event and peak RSS over the repetitions that completed."""
    out = {}
    for key in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == key and not r.get("error")]
        out[key] = {
            "events_per_s": _stats([r["events_per_s"] for r in mine]),
            "worker_cpu_us_per_event": _stats([r["worker_cpu_us_per_event"] for r in mine]),
            "worker_peak_rss_mb": _stats([r["worker_peak_rss_mb"] for r in mine]),
            "failed_runs": sum(1 for r in runs if r["variant"] == key and r.get("error")),
        }
    return out


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """c/a, c/b and d/c: of the medians, and the range of the per-repetition ratios (same rep = same moment)."""
    by = {(r["variant"], r["rep"]): r["events_per_s"] for r in runs if not r.get("error") and r["events_per_s"]}
    out = {}
    for num, den in RATIOS:
        nums = [v for (k, _), v in by.items() if k == num]
        dens = [v for (k, _), v in by.items() if k == den]
        if not nums or not dens:
            continue
        per_rep = [by[(num, rep)] / by[(den, rep)] for (k, rep) in by if k == num and (den, rep) in by]
        out[f"{num}/{den}"] = {"of_medians": round(statistics.median(nums) / statistics.median(dens), 3),
                               "per_rep": [round(x, 3) for x in per_rep],
                               "target": TARGETS.get(f"{num}/{den}")}
    return out


def half_of_c(results: dict[str, Any]) -> float | None:
    """50% of c's median throughput: the paced load of the latency runs of variants without a throughput."""
    return half_of(results, "c")


def half_of(results: dict[str, Any], key: str) -> float | None:
    """50% of `key`'s median throughput in this run (None without one): its paced load in the latency phase."""
    summary = results.get("throughput", {}).get("summary", {})
    median = summary.get(key, {}).get("events_per_s", {}).get("median")
    return median / 2 if median else None


def summarise_latency(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == key and not r.get("error")]
        out[key] = {q: _stats([r[q] for r in mine]) for q in ("p50_ms", "p99_ms", "p999_ms", "max_ms")}
        out[key]["samples"] = sum(r["samples"] for r in mine)
        out[key]["failed_runs"] = sum(1 for r in runs if r["variant"] == key and r.get("error"))
    return out


def _fmt(stats: dict[str, Any] | None, unit: str = "") -> str:
    if not stats or stats.get("median") is None:
        return "—"
    if stats["n"] == 1:
        return f"{stats['median']:,.0f}{unit}" if stats["median"] >= 100 else f"{stats['median']}{unit}"
    med = f"{stats['median']:,.0f}" if stats["median"] >= 100 else f"{stats['median']}"
    return f"{med}{unit} ({stats['min']:,.1f}-{stats['max']:,.1f})"


def _record_sizes(mem: dict[str, Any]) -> str:
    """The memory run's state record sizes, for runs that measured them."""
    by_ids = mem.get("state_record_bytes_by_ids")
    if not by_ids:
        return ""
    sizes = ", ".join(f"{size} B with {ids} id{'s' if str(ids) != '1' else ''}" for ids, size in by_ids.items())
    return (f" The restored records held {mem['restored_ids_per_entity']} recent id(s) each, "
            f"{mem['restored_record_mean_bytes']} B on average; an entity's state record is {sizes}.")


def markdown(results: dict[str, Any]) -> str:
    """The report: environment, input, throughput and latency side by side, ratios vs targets, memory."""
    env = results["environment"]
    inp = results.get("input", {})
    lines = [
        f"# byzguard benchmark — {results['started_at']} → {results.get('finished_at', '(unfinished)')}",
        "",
        f"Machine: {env['cpus']} CPUs, {env['memory_mb']} MB, {env['host']}; Python {env['python']}, "
        f"Kafka {env['kafka']} ({env['broker']}), faust-streaming {env['faust-streaming']}, "
        f"aiokafka {env['aiokafka']}, rocksdict {env['rocksdict']}, cel-python {env['cel-python']}; "
        f"git {env['git_head']}.",
        f"Load average (1/5/15 min) at start {results['loadavg_start']}, at end {results.get('loadavg_end')}: the "
        "machine is shared, see each run's host figures in bench.json.",
        f"Command: `python -m bench.run {' '.join(results['argv'])}`.",
        "",
        f"Input: {inp.get('events'):,} {inp.get('mode')} CloudEvents over {inp.get('entities'):,} entities and "
        f"{inp.get('partitions')} partitions, pre-produced once into one topic before timing"
        + (f" (steady state: after {inp['untimed_history_events']:,} earlier events, {inp['history_per_entity']} per "
           "entity, that every run processes first and that are not timed)" if inp.get("history_per_entity") else "")
        + "; value "
        f"{inp.get('mean_value_bytes')} B + headers {inp.get('mean_header_bytes')} B on average; "
        f"{inp.get('integrity')}; checks: {inp.get('checks')}. Each run reads it with a fresh consumer group "
        "/ app id and fresh output topics.",
        "",
    ]
    tput = results.get("throughput", {}).get("summary", {})
    lat = results.get("latency", {}).get("summary", {})
    if tput or lat:
        rates = results.get("latency", {}).get("rates") or {}
        rate = results.get("latency", {}).get("rate")
        paced = (", ".join(f"{k} {r:,.0f}" for k, r in rates.items()) + " events/s (50% of each variant's own "
                 "median throughput)") if rates else f"{rate or 0:,.0f} events/s (50% of c's median throughput)"
        settle = results.get("latency", {}).get("settle_s")
        lines += [
            "## Throughput and latency",
            "",
            "Throughput: output records / (last - first output record timestamp), the timestamps being the broker's "
            "append times (output topics use LogAppendTime), i.e. from the first event through to the last "
            "output acknowledged. Latency: send → arrival on the verified topic (read_committed for exactly_once) "
            f"under a paced load of {paced}"
            + (f", after {settle:g} s of the same load that the percentiles leave out" if settle else "")
            + f"; the bench's paced producer and reader: {results.get('latency', {}).get('client', 'aiokafka')}"
            if rate or rates else
            "Throughput: output records / (last - first output append time, broker clock).",
            "Median over repetitions, (min-max) in brackets.",
            "",
            "| variant | events/s | worker CPU µs/event | peak RSS MB | p50 ms | p99 ms | p99.9 ms | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key in dict.fromkeys([*tput, *lat]):
            t = tput.get(key, {})
            la = lat.get(key, {})
            # Repetitions per variant: of the throughput runs, or of the latency runs in a latency-only run.
            runs = t.get("events_per_s", {}).get("n", 0) or la.get("p99_ms", {}).get("n", 0) or 0
            failed = t.get("failed_runs", 0) + la.get("failed_runs", 0)
            lines.append(
                f"| **{key}** {label(key)} | {_fmt(t.get('events_per_s'))} | "
                f"{_fmt(t.get('worker_cpu_us_per_event'))} | {_fmt(t.get('worker_peak_rss_mb'))} | "
                f"{_fmt(la.get('p50_ms'))} | {_fmt(la.get('p99_ms'))} | {_fmt(la.get('p999_ms'))} | "
                f"{runs}{f' ({failed} failed)' if failed else ''} |")
        lines.append("")
    rat = results.get("ratios", {})
    if rat:
        lines += ["## Ratios and targets", "", "| ratio | of medians | per repetition | target | met |",
                  "|---|---:|---|---:|---|"]
        for name, r in rat.items():
            target = r.get("target")
            met = "—" if target is None else ("yes" if r["of_medians"] >= target else "**no**")
            lines.append(f"| {name} | {r['of_medians']} | {', '.join(map(str, r['per_rep']))} | "
                         f"{target if target is not None else '—'} | {met} |")
        for key in ("c", "d"):
            p99 = lat.get(key, {}).get("p99_ms", {}).get("median")
            target = TARGETS[f"{key}_p99_ms"]
            if p99 is not None:
                lines.append(f"| {key} p99 at half its throughput (ms) | {p99} | | ≤ {target:.0f} | "
                             f"{'yes' if p99 <= target else '**no**'} |")
        mem = results.get("memory")
        if mem and mem.get("rss_all_entities_mb"):
            worst = max(x for x in (mem.get("rss_all_entities_mb"), mem.get("rss_settled_mb"), mem.get("peak_rss_mb"))
                        if x)
            lines.append(f"| worker peak RSS with {mem['entities']:,} entities (MB) | {worst} | | ≤ "
                         f"{TARGETS['rss_mb']:.0f} | {'yes' if worst <= TARGETS['rss_mb'] else '**no**'} |")
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += ["## Memory", "",
                  f"{mem['entities']:,} distinct entities in the state of `{mem['variant']}` "
                  f"({label(mem['variant'])}): {mem['restored_entities']:,} restored from the state "
                  f"changelog at start (as a restarted worker loads them; recovery took "
                  f"{mem['restore_to_first_output_s']} s), then {mem['processed_entities']:,} more by verifying one "
                  f"event each. Worker RSS: {mem['rss_after_restore_mb']} MB after the restore, "
                  f"{mem['rss_all_entities_mb']} MB with all entities, {mem['rss_settled_mb']} MB after settling, "
                  f"peak {mem['peak_rss_mb']} MB; RocksDB state on disk {mem['state_on_disk_mb']} MB."
                  + _record_sizes(mem)
                  + (f" ERROR: {mem['error']}" if mem.get("error") else ""), ""]
    crash = results.get("crash")
    if crash:
        lines += ["## Crash accounting (exactly_once)", "",
                  f"`{crash['variant']}` over the same {crash['input_events']:,} events, SIGKILLed "
                  f"{crash['kills']} times at random moments and restarted at once (on an empty data dir after kill k "
                  f"when k is a multiple of {crash['wipe_every']}); outputs read back read_committed and matched by "
                  "the input sequence number.", "",
                  "| lost | duplicated (events) | extra copies | wrongly quarantined | recovery s (median / max) | "
                  "elapsed s |", "|---:|---:|---:|---:|---|---:|",
                  f"| {crash['lost']} | {crash['duplicated']} | {crash['duplicate_records']} | "
                  f"{crash['wrongly_quarantined']} {crash['quarantine_codes'] or ''} | "
                  f"{(crash['recovery_s'] or {}).get('median')} / {(crash['recovery_s'] or {}).get('max')} | "
                  f"{crash['elapsed_s']} |", ""]
        if crash.get("error"):
            lines += [f"ERROR: {crash['error']}", ""]
        same = crash.get("recovery_same_dir_s")
        if same:
            lines += [f"On the same data dir ({same['n']} restarts): SIGKILL to the next routed record median "
                      f"{same['median']} s, max {same['max']} s.", ""]
        lines += ["Recovery = SIGKILL until a read_committed reader sees a new output. Per kill: " +
                  ", ".join(f"{r['kill']}{'w' if r['wiped_state'] else ''}: {r['recovery_s']} s"
                            for r in crash["recoveries"]) + " (w = wiped data dir).", ""]
    two = results.get("pair")
    if two:
        lines += ["## Two workers, one joining and one leaving (exactly_once)", "",
                  f"`{two['variant']}`: worker A alone, B (same app id, own data dir) joins after a third of the "
                  f"input's expected time, A leaves ({'SIGTERM' if two['leave'] == 'stop' else 'SIGKILL'}) after two "
                  f"thirds; {two['input_events']:,} events, outputs read back read_committed.", "",
                  "| lost | duplicated (events) | extra copies | wrongly quarantined | elapsed s |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {two['lost']} | {two['duplicated']} | {two['duplicate_records']} | "
                  f"{two['wrongly_quarantined']} {two['quarantine_codes'] or ''} | {two['elapsed_s']} |", "",
                  "Timeline: " + "; ".join(f"{m['t_s']} s {m['event']} (inputs committed {m['committed_inputs']})"
                                            for m in two["timeline"]) + ".", ""]
        if two.get("error"):
            lines += [f"ERROR: {two['error']}", ""]
    det = results.get("detection")
    if det:
        lines += ["## Detection quality (fault injector)", "",
                  f"`{det['command']}` ({det['events']:,} events, each fault class at {det['rate_per_class']:.0%}; "
                  f"{det['elapsed_s']} s, exit {det['exit_code']}).", ""]
        rep = det.get("report")
        if rep:
            fates = ("caught", "passed", "other_code", "missed", "false_positive", "unaccounted")
            # "caught": judged as the class expects, with one of its expected codes (clean: passed untouched).
            lines += ["| class | expect | codes seen | sent | caught right | " + " | ".join(
                f.replace("_", " ") for f in fates) + " |", "|---|---|---|---:|---:|" + "---:|" * len(fates)]
            for name, row in rep["classes"].items():
                counts = " | ".join(str(row["fates"].get(f, 0)) for f in fates)
                right = row["fates"].get("passed" if row["expect"] == "pass" else "caught", 0)
                share = f"{100 * right / row['sent']:.1f}%" if row["sent"] else "—"
                codes = ", ".join(f"{c} {n}" for c, n in row.get("codes_seen", {}).items()) or "—"
                lines.append(f"| {name} | {row['expect']} | {codes} | {row['sent']} | {share} | {counts} |")
            lines += ["", f"False positives {rep['false_positives']}, unaccounted {rep['unaccounted']}, outputs "
                      f"matching no label {rep['extra_outputs']}.", ""]
        if det.get("error"):
            lines += [f"ERROR: {det['error'][:2000]}", ""]
    if results.get("profile"):
        lines += ["## Profile", "", "py-spy samples (idle included) by layer; details in profile-samples.md and "
                  "the analysis in bench/results/profile.md.", ""]
        for prof in results["profile"]:
            if prof.get("error"):
                lines.append(f"- {prof['variant']}: {prof['error']}")
                continue
            top = "; ".join(f"{cat} {busy}%" for cat, _, _, busy in prof["summary"]["categories"][:7] if busy)
            lines.append(f"- **{prof['variant']}** (worker process at {prof['worker_cpu_share']} CPU while sampled), "
                         f"share of busy samples: {top}")
        lines.append("")
    for inc in results.get("incidents", []):
        lines += [f"Incident: run {inc['run_id']} lost its worker to a SIGKILL the bench did not send (the machine is "
                  "shared); it was run again and is not counted.", ""]
    if results.get("throughput", {}).get("runs") or results.get("latency", {}).get("runs"):
        lines += ["## Runs", "", "Every run with its load (1-min load average at start/end, machine busy cores, CPU "
                  "cores used by other processes) and the exact command.", "",
                  "| run | result | load 1m | busy cores | others' cores | command |", "|---|---|---|---:|---:|---|"]
        for r in results.get("throughput", {}).get("runs", []):
            h = r["host"]
            res = f"{r['events_per_s']} ev/s, {r['output_events']} out"
            res += f", ERROR {r['error']}" if r["error"] else ""
            lines.append(f"| {r['run_id']} | {res} | {h['loadavg_start'][0]}/{h['loadavg_end'][0]} | "
                         f"{h['machine_busy_cores']} | {h['other_cpu_cores']} | `{r['command']}` |")
        for r in results.get("latency", {}).get("runs", []):
            h = r["host"]
            res = (f"p50 {r['p50_ms']} p99 {r['p99_ms']} p99.9 {r['p999_ms']} ms, {r['samples']} samples at "
                   f"{r['rate_achieved']}/s"
                   + (f", bench {r['client']} {r['harness_cpu_us_per_event']} µs CPU/event"
                      if r.get("harness_cpu_us_per_event") is not None else "")
                   + (f", ERROR {r['error']}" if r["error"] else ""))
            lines.append(f"| {r['run_id']} | {res} | {h['loadavg_start'][0]}/{h['loadavg_end'][0]} | "
                         f"{h['machine_busy_cores']} | {h['other_cpu_cores']} | `{r['command']}` |")
        lines.append("")
    return "\n".join(lines)
