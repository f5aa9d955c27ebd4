# ruff: noqa  (one-off diagnostic script of this run)
"""rec_report.py TRACE: per record (send timestamp of each record in a traced batch), where its time to the commit
goes; and per transaction, the gaps between the requests (ms p50 / p90 / p99)."""
import json
import sys
from collections import defaultdict


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(-(-q / 100 * len(v) // 1)) - 1))] if v else float("nan")


rs = [json.loads(l) for l in open(sys.argv[1])]
fl = [r for r in rs if "launch" in r and "committed" in r]
hi = max(r["launch"] for r in fl)
lo = hi - 20
parts = defaultdict(list)
nrec = []
for f in fl:
    if not lo <= f["launch"] <= hi:
        continue
    nrec.append(sum(len(s["ts"]) for s in f["sub"] or []))
    for s in f["sub"] or []:
        for ts in s["ts"]:
            t = ts / 1000
            parts["1 send->fetched"].append(s["get"] - t)
            parts["2 fetched->processing start"].append(s["start"] - s["get"])
            parts["3 processing (batch start->end)"].append(s["end"] - s["start"])
            parts["4 end->finished"].append(s["finished"] - s["end"])
            parts["5 finished->launch (wait prev txn)"].append(f["launch"] - s["finished"])
            parts["6 launch->committed"].append(f["committed"] - f["launch"])
            parts["7 committed->stored"].append(f.get("stored", f["committed"]) - f["committed"])
            parts["send->committed"].append(f["committed"] - t)
print(f"{len(nrec)} transactions; records per transaction p50/p90/p99 {pct(nrec,50)}/{pct(nrec,90)}/{pct(nrec,99)}, "
      f"mean {sum(nrec)/max(1,len(nrec)):.1f}")
print(f"{'per record':40}{'p50':>8}{'p90':>8}{'p99':>8}")
for k in sorted(parts):
    v = parts[k]
    print(f"{k:40}" + "".join(f"{pct(v, q) * 1000:8.1f}" for q in (50, 90, 99)))
# per transaction request gaps
rq = defaultdict(list)
for r in rs:
    if "rq" in r and r.get("tid"):
        part = int(r["tid"].rsplit("-", 1)[1]); route = r["tid"].rsplit("-", 2)[1]
        rq[(route, part)].append(r)
g = defaultdict(list)
for f in fl:
    if not lo <= f["launch"] <= hi:
        continue
    mine = sorted((r for r in rq.get(tuple(f["key"]), []) if f["fly"] <= r["t0"] <= f["committed"]), key=lambda r: r["t0"])
    k = defaultdict(list)
    for r in mine:
        k[r["rq"]].append(r)
    if not all(x in k for x in ("AddPartitionsToTxn", "SendProduceReq", "AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn")):
        continue
    ap, pr, ao, to, et = (k[x] for x in ("AddPartitionsToTxn", "SendProduceReq", "AddOffsetsToTxn", "TxnOffsetCommit", "EndTxn"))
    g["a fly->AP sent"].append(ap[0]["t0"] - f["fly"])
    g["b AP (all tries)"].append(ap[-1]["t1"] - ap[0]["t0"])
    g["c AP ans->produce sent"].append(pr[0]["t0"] - ap[-1]["t1"])
    g["d produce"].append(max(r["t1"] for r in pr) - pr[0]["t0"])
    handed = f.get("handed", f["out"])  # B: the answer's callback handed the offsets over; A: deliver returned
    g["e produce ans->offsets handed"].append(handed - max(r["t1"] for r in pr))
    g["f offsets handed->AO sent"].append(ao[0]["t0"] - handed)
    g["g AO"].append(ao[-1]["t1"] - ao[0]["t0"])
    g["h AO ans->TO sent"].append(to[0]["t0"] - ao[-1]["t1"])
    g["i TO"].append(to[-1]["t1"] - to[0]["t0"])
    g["j TO ans->EndTxn sent"].append(et[0]["t0"] - to[-1]["t1"])
    g["k EndTxn"].append(et[-1]["t1"] - et[0]["t0"])
    g["l EndTxn ans->committed (task)"].append(f["committed"] - et[-1]["t1"])
    g["m fly->committed"].append(f["committed"] - f["fly"])
    g["n launch->fly"].append(f["fly"] - f["launch"])
    g["produce requests"].append(len(pr) / 1000)
print(f"{'per transaction':40}{'p50':>8}{'p90':>8}{'p99':>8}")
for x in sorted(g):
    v = g[x]
    print(f"{x:40}" + "".join(f"{pct(v, q) * 1000:8.1f}" for q in (50, 90, 99)))
lags = [r["ms"] for r in rs if "lag" in r and lo <= r["lag"] <= hi]
slow = [r for r in rs if "slow" in r and lo <= r["slow"] <= hi]
print(f"loop lags >=4 ms in the window: {len(lags)}, p50 {pct(lags,50)} max {max(lags, default=0)}; slow callbacks >=3 ms: {len(slow)}, total {sum(r['ms'] for r in slow):.0f} ms")
