# ruff: noqa  (one-off diagnostic script of this run)
"""cpu_report.py FILE...: per process (worker, harness, broker), CPU cores used over the sampled run (cpumon.sh)."""
import collections
import sys

for path in sys.argv[1:]:
    by = collections.defaultdict(list)
    for line in open(path):
        parts = line.split(None, 3)
        if len(parts) < 3:
            continue
        t, p, j, *a = parts
        if not (p.isdigit() and j.isdigit()):
            continue
        by[(p, (a[0] if a else "").strip())].append((float(t), int(j)))
    out = []
    for (p, a), v in by.items():  # noqa: B007
        if len(v) > 3 and v[-1][1] > v[0][1]:
            cores = (v[-1][1] - v[0][1]) / 100 / (v[-1][0] - v[0][0])
            if cores >= 0.05:
                kind = "worker" if "app.cli run" in a else "harness" if "bench.run" in a else f"java {p}" if "java" in a else a[:40]
                out.append(f"{kind} {cores:.2f} ({round(v[-1][0] - v[0][0])} s)")
    print(path.rsplit("/", 1)[-1], "; ".join(out))
