#!/bin/bash
# trace.sh BROKER OUT name:src:variant:rate  (src: traced copy)
BROKER=$1; OUT=$2; shift 2; mkdir -p $OUT
for spec in "$@"; do
  IFS=: read name src v rate <<< "$spec"
  echo "$name $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/loads.txt
  /tmp/dlat/cpumon.sh $OUT/$name.cpu 75 &
  mon=$!
  (cd $src && LATTRACE=$OUT/$name.trace.jsonl PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.run --broker $BROKER \
    --out $OUT/$name --events 60000 --entities 30000 --reps 1 --variants $v --latency-seconds 20 \
    --latency-settle 5 --latency-rate $rate --skip memory,crash,pair,detection,throughput,profile > $OUT/$name.log 2>&1)
  kill $mon 2>/dev/null
done
echo "done $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> $OUT/loads.txt
