#!/bin/bash
# 5 interleaved pairs of bench.core: base (8f1cae1) then after (HEAD of s11-core); run under flock -x
out=/tmp/core/runs2
for i in 1 2 3 4 5; do
  echo "pair $i start $(date +%T) load $(cat /proc/loadavg)" >> $out/loads.txt
  (cd /tmp/core/base && PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.core --label main-8f1cae1 --json-out $out/run-before-$i.json > $out/before-$i.log 2>&1)
  (cd /tmp/core/after2 && PYTHONPATH=$PWD /work/main/.venv/bin/python -m bench.core --label $1 --json-out $out/run-after-$i.json > $out/after-$i.log 2>&1)
  echo "pair $i end   $(date +%T) load $(cat /proc/loadavg)" >> $out/loads.txt
done
