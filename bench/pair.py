"""Crash accounting over two workers: one joins and one leaves while the input is being worked through.

Worker A (variant d, exactly_once, the batched runtime) starts alone; once a third of the input is committed,
worker B (same app id, its own data dir and web port) joins the group; once two thirds are, A leaves: SIGTERM
(`leave="stop"`, a clean shutdown) or SIGKILL (`leave="kill"`, its partitions move once the group's session times
out). B works through the rest. Then every input event is
accounted for in the committed outputs as in the one-worker crash phase (`bench.scenarios.account`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.kafka import Progress
from bench.procs import Worker
from bench.scenarios import Context, _cleanup, _committed_outputs, _learn_pace, account
from bench.variants import Variant, free_port


async def _until(progress: Progress, group: str, topic: str, committed: int, workers: list[Worker],
                 timeout: float) -> None:
    """Wait until the group has committed `committed` inputs of `topic` (the workers' pace changes as they warm
    up, so a time learned at the start is no measure of where the input stands), the workers alive."""
    deadline = time.monotonic() + timeout
    while await progress.committed(group, topic) < committed:
        for worker in workers:
            worker.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {committed} inputs committed after {timeout:.0f} s")
        await asyncio.sleep(0.2)


def second_worker(first: Worker) -> Worker:
    """A worker like `first` (same app id, group and config) with its own data dir, web port, directory and log."""
    cwd = first.cwd / "b"
    env = dict(first.env, BYZGUARD_DATA_DIR=str(cwd / "state"), BYZGUARD_WEB_PORT=str(free_port()))
    return Worker(first.name + "-b", list(first.argv), env, cwd, cwd / "worker.log")


async def pair(ctx: Context, variant: Variant, run_id: str, input_topic: str, expected: int, *, leave: str,
               timeout: float) -> dict[str, Any]:
    """Two workers over the input, B joining and A leaving mid-stream; the accounting of every input event."""
    if leave not in ("stop", "kill"):
        raise ValueError(f"leave must be stop or kill, not {leave!r}")
    lnch = ctx.launch(variant, run_id, input_topic)
    await lnch.create_topics(ctx.bootstrap, ctx.partitions)
    first = lnch.worker.start()
    second = second_worker(first)
    started = time.monotonic()
    timeline: list[dict[str, Any]] = []
    error = None

    async def mark(progress: Progress, what: str) -> None:
        timeline.append({"t_s": round(time.monotonic() - started, 1), "event": what,
                         "committed_inputs": await progress.committed(lnch.group, input_topic),
                         "committed_outputs": await _committed_outputs(progress, lnch.outputs)})

    try:
        async with Progress(ctx.bootstrap) as progress:
            pace = await _learn_pace(progress, first, lnch.outputs)
            await mark(progress, f"A alone at {pace:.0f} committed outputs/s")
            await _until(progress, lnch.group, input_topic, expected // 3, [first], timeout)
            if await progress.committed(lnch.group, input_topic) >= expected:
                raise RuntimeError("the input was done before B joined: make the run longer")
            second.start()
            await mark(progress, "B started (joins)")
            await _until(progress, lnch.group, input_topic, 2 * expected // 3, [first, second], timeout)
            if await progress.committed(lnch.group, input_topic) >= expected:
                raise RuntimeError("the input was done before A left: make the run longer")
            await mark(progress, f"A leaves ({'SIGTERM' if leave == 'stop' else 'SIGKILL'})")
            if leave == "kill":
                first.kill()
            else:
                first.stop()
            await mark(progress, "A gone")
            deadline = time.monotonic() + timeout
            while await progress.committed(lnch.group, input_topic) < expected:
                second.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not done {timeout:.0f} s after A left")
                await asyncio.sleep(1.0)
            await mark(progress, "B done")
            await asyncio.sleep(2.0)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        first.stop()
        second.stop()
    elapsed = time.monotonic() - started
    accounting = await account(ctx, lnch, expected)
    _cleanup(first)
    _cleanup(second)
    return {"variant": variant.key, "run_id": run_id, "command": lnch.command, "input_events": expected,
            "leave": leave, "elapsed_s": round(elapsed, 1), **accounting, "timeline": timeline,
            "logs": [str(first.log_path), str(second.log_path)], "error": error}
