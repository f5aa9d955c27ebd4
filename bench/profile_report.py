"""Where the time goes: py-spy's folded stacks (`--format raw --idle`) summarised by category and function."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

# First match from the innermost frame outwards wins, so the most specific layer gets the sample.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("idle: event loop waiting (select/epoll)",
     re.compile(r"(^|\.)(select|poll) \((selectors|asyncio/base_events)")),
    ("CEL rules (celpy/lark interpreter)", re.compile(r"\((celpy|lark)/|byzguard/rules/")),
    ("byzguard core: decode, integrity, checks, state codec, headers", re.compile(r"\(byzguard/")),
    ("RocksDB table get/set (faust store + rocksdict)", re.compile(r"faust/stores/|faust/tables/")),
    ("prometheus metrics", re.compile(r"prometheus_client/")),
    ("verify agent body (agents/verify.py)", re.compile(r"agents/verify\.py")),
    ("faust send path (topic.send, producer buffer)", re.compile(
        r"faust/topics\.py|faust/channels\.py.*(send|publish)|faust/transport/producer\.py")),
    ("aiokafka producer (batching, sender)", re.compile(r"aiokafka/producer/")),
    ("aiokafka consumer (fetcher, records, coordinator)", re.compile(r"aiokafka/consumer/|aiokafka/record/")),
    ("aiokafka client/connection/protocol", re.compile(r"aiokafka/(conn|client|protocol)")),
    ("faust stream & consumer machinery (per-event iteration, acks, offsets)", re.compile(
        r"faust/(streams|channels|events|agents|transport)/?|faust/(streams|channels|events)\.py")),
    ("mode / faust services (timers, supervisors)", re.compile(r"mode/|faust/")),
    ("asyncio event loop (callbacks, tasks)", re.compile(r"asyncio/")),
)

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(:\d+)?\)$")


def _short(frame: str) -> str:
    """`func (path/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/", "/tmp/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def _thread_of(frames: list[str]) -> str:
    if any("WorkerThread.run (mode/threads.py)" in f or "ServiceThread" in f for f in frames):
        return "faust consumer thread (mode ServiceThread: fetching)"
    if any(f.startswith("Thread.run (") for f in frames):
        return "other thread"
    return "main thread (event loop: agents, producer)"


def summarise(folded: Path, *, top: int = 25) -> dict[str, Any]:
    """Samples per thread and category and the hottest functions (self and inclusive) of a py-spy raw output."""
    by_category: Counter[str] = Counter()
    by_thread: Counter[str] = Counter()
    idle_by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # py-spy --threads puts "thread (tid): name" first; keep the Python frames only.
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += count
        thread = _thread_of(frames)
        by_thread[thread] += count
        category = "other"
        for frame in reversed(frames):
            hit = next((name for name, pattern in CATEGORIES if pattern.search(frame)), None)
            if hit is not None:
                category = hit
                break
        if category.startswith("idle"):
            idle_by_thread[thread] += count
        by_category[category] += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    busy = total - sum(c for k, c in by_category.items() if k.startswith("idle"))
    return {
        "samples": total,
        "busy_samples": busy,
        "threads": [(k, c, round(100 * idle_by_thread[k] / c, 1)) for k, c in by_thread.most_common()],
        "categories": [(k, c, round(100 * c / total, 1) if total else 0.0,
                        round(100 * c / busy, 1) if busy and not k.startswith("idle") else None)
                       for k, c in by_category.most_common()],
        "top_self": [(k, c, round(100 * c / total, 1)) for k, c in self_time.most_common(top)
                     if "(selectors.py)" not in k],
        "top_inclusive": [(k, c, round(100 * c / total, 1)) for k, c in inclusive.most_common(top * 3)
                          if not k.startswith(("<module>", "run (", "_run_once", "run_forever", "run_until_complete",
                                               "execute_from_commandline", "_execute_from_commandline", "_run_code",
                                               "_run_module_as_main", "main (", "Thread.", "WorkerThread.",
                                               "ServiceThread.", "BaseEventLoop.", "Handle._run", "Worker."))
                          and "(selectors.py)" not in k][:top],
    }


def markdown(name: str, summary: dict[str, Any]) -> str:
    """A profile summary as Markdown tables."""
    lines = [f"### {name}", "", f"{summary['samples']} samples at 200 Hz per thread, {summary['busy_samples']} of them "
             "busy (not waiting in select/epoll).", "", "| thread | samples | % idle |", "|---|---:|---:|"]
    lines += [f"| {k} | {c} | {idle} |" for k, c, idle in summary["threads"]]
    lines += ["", "| where (innermost matching layer) | samples | % of all | % of busy |", "|---|---:|---:|---:|"]
    for cat, count, pct, busy_pct in summary["categories"]:
        lines.append(f"| {cat} | {count} | {pct} | {busy_pct if busy_pct is not None else '—'} |")
    lines += ["", "Hottest functions by self time:", "", "| function | samples | % |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {c} | {p} |" for k, c, p in summary["top_self"][:15]]
    lines += ["", "Hottest functions inclusive (frames on the stack):", "", "| function | samples | % |",
              "|---|---:|---:|"]
    lines += [f"| `{k}` | {c} | {p} |" for k, c, p in summary["top_inclusive"][:20]]
    return "\n".join(lines) + "\n"
