"""The benchmark's topic cleanup on the real broker: a finished run's topics go, every other topic stays; a phase
that fails (an exception, a cancellation) leaves neither topics nor workers behind."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.kafka import create_topics, delete_topics, listed_topics
from tests.conftest import claim_topics


async def test_delete_topics_deletes_the_prefixed_topics_and_no_other(kafka_bootstrap: str) -> None:
    """Every topic starting with the run's prefix is deleted; a topic whose name only shares its start is kept."""
    base = claim_topics(kafka_bootstrap, f"bench-del-{uuid.uuid4().hex[:8]}")
    run, other = f"{base}-t-r1-", f"{base}-t-r10-out"
    mine = [f"{run}out", f"{run}verified", f"{run}state-changelog"]
    await create_topics(kafka_bootstrap, [*mine, other], 1)

    deleted = await delete_topics(kafka_bootstrap, [run])

    assert sorted(deleted) == sorted(mine)
    for _ in range(50):
        left = {t for t in await listed_topics(kafka_bootstrap) if t.startswith(base)}
        if left == {other}:
            break
        await asyncio.sleep(0.1)
    assert left == {other}


def test_keep_topics_is_off_by_default() -> None:
    """The bench deletes its topics unless told --keep-topics."""
    from bench.run import parse_args

    assert parse_args([]).keep_topics is False
    assert parse_args(["--keep-topics"]).keep_topics is True


# --------------------------------------------------------------------------- a phase that fails

def _memory_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    """The bench's memory phase alone, small: 200 entities restored from the state changelog, 100 verified."""
    from bench.run import parse_args

    return parse_args(["--memory-entities", "300", "--memory-processed", "100", "--no-snapshot",
                       "--skip", "crash,pair,detection,throughput,latency,profile", "--out", str(tmp_path / "out"),
                       *extra])


def _processes_under(folder: Path) -> list[int]:
    """Pids of the live processes whose working directory is in `folder` (the bench's workers run in their run's
    directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = Path(os.readlink(proc / "cwd"))
            except OSError:
                continue
            if cwd == folder or folder in cwd.parents:
                pids.append(int(proc.name))
    return pids


async def _left(bootstrap: str, prefixes: tuple[str, ...]) -> set[str]:
    """The topics of `prefixes` still listed after the deletion has had up to 10 s to show."""
    left: set[str] = set()
    for _ in range(100):
        left = {t for t in await listed_topics(bootstrap) if t.startswith(prefixes)}
        if not left:
            break
        await asyncio.sleep(0.1)
    return left


@pytest.fixture
def bench_stamp(kafka_bootstrap: str) -> Iterator[str]:
    """A unique stamp for one bench run (in every topic name of it and in its directory), its topics claimed; its
    directory (.cache/bench/<stamp>) is removed afterwards."""
    from bench.procs import REPO

    stamp = f"test{uuid.uuid4().hex[:8]}"
    for phase in ("mem-", "m-"):  # the memory phase's input and its worker's topics
        claim_topics(kafka_bootstrap, phase + stamp)
    yield stamp
    shutil.rmtree(REPO / ".cache" / "bench" / stamp, ignore_errors=True)


async def test_a_phase_that_raises_leaves_no_topics_behind(kafka_bootstrap: str, bench_stamp: str,
                                                            tmp_path: Path) -> None:
    """The memory phase runs its worker over its topics, then fails to write its results (--out is a file): the
    exception reaches the caller, and the phase's topics are gone all the same."""
    from bench.procs import REPO
    from bench.run import bench

    args = _memory_args(tmp_path)
    args.out.write_text("a file where the results directory should be")

    with pytest.raises(OSError):
        await bench(args, kafka_bootstrap, None, "external", stamp=bench_stamp)

    assert (REPO / ".cache" / "bench" / bench_stamp / f"m-{bench_stamp}-c_norules" / "worker.log").exists(), \
        "the phase failed before its worker ran: the test tests nothing"
    assert await _left(kafka_bootstrap, (f"mem-{bench_stamp}", f"m-{bench_stamp}")) == set()
    assert _processes_under(REPO / ".cache" / "bench" / bench_stamp) == []


async def test_a_phase_cancelled_stops_its_worker_and_leaves_no_topics_behind(kafka_bootstrap: str, bench_stamp: str,
                                                                             tmp_path: Path) -> None:
    """Ctrl-C (the run's task cancelled) while the memory phase's worker runs: the worker is stopped and the
    phase's topics are deleted."""
    from bench.procs import REPO
    from bench.run import bench

    workdir = REPO / ".cache" / "bench" / bench_stamp
    run = asyncio.create_task(bench(_memory_args(tmp_path), kafka_bootstrap, None, "external", stamp=bench_stamp))
    for _ in range(600):
        if _processes_under(workdir / f"m-{bench_stamp}-c_norules") or run.done():
            break
        await asyncio.sleep(0.1)
    assert not run.done(), f"the run ended before its worker started: {run.result()}"
    assert {t for t in await listed_topics(kafka_bootstrap) if t.startswith(f"m-{bench_stamp}")}, \
        "the worker runs without its topics?"

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert await _left(kafka_bootstrap, (f"mem-{bench_stamp}", f"m-{bench_stamp}")) == set()
    assert _processes_under(workdir) == []
