#!/bin/bash
# interleaved latency pairs: pre (723ed24, before pipelining) vs post (1832323)
for round in 1 2; do
  for side in pre post; do
    cd /tmp/lead-$side
    echo "$side r$round $(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)" >> /tmp/lead-ab/loads.txt
    PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.run --broker 127.0.0.1:9092 --out /tmp/lead-ab/$side-r$round \
      --events 20000 --entities 10000 --reps 1 --variants c,d --latency-seconds 20 --latency-settle 3 \
      --latency-rate 1500 --skip memory,crash,pair,detection,throughput,profile > /tmp/lead-ab/$side-r$round.log 2>&1
  done
done
echo done >> /tmp/lead-ab/loads.txt
