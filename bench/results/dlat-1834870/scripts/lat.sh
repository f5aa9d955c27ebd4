#!/bin/bash
# d (and c) latency at a given rate: name:src:variant:rate:extra (extra comma-separated), interleaved ROUNDS times
BROKER=$1; OUT=$2; ROUNDS=$3; shift 3; mkdir -p $OUT
for round in $(seq 1 $ROUNDS); do for spec in "$@"; do
  IFS=: read name src v rate extra <<< "$spec"
  echo "$name r$round $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/loads.txt
  /tmp/dlat/cpumon.sh $OUT/$name-r$round.cpu 60 & mon=$!
  (cd $src && PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.run --broker $BROKER --out $OUT/$name-r$round \
    --events 60000 --entities 30000 --reps 1 --variants $v --latency-seconds 20 --latency-settle 5 \
    --latency-rate $rate ${extra//,/ } --skip memory,crash,pair,detection,throughput,profile > $OUT/$name-r$round.log 2>&1)
  kill $mon 2>/dev/null
  grep -E "^\| \*\*$v\*\*" $OUT/$name-r$round/bench.md | awk -F'|' -v n="$name r$round" '{print n": p50 "$6" p99 "$7" p99.9 "$8}' >> $OUT/summary.txt
done; done
echo "done $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/loads.txt
