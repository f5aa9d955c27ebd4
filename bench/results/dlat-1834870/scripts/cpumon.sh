#!/bin/bash
# cpumon.sh OUT SECONDS: every 2 s, CPU jiffies of every python/java process (pid, comm, utime+stime, args)
OUT=$1; END=$(( $(date +%s) + $2 ))
while [ $(date +%s) -lt $END ]; do
  t=$(date +%s.%N)
  for p in $(pgrep -f 'python|java'); do
    [ -r /proc/$p/stat ] || continue
    read -r -a f < /proc/$p/stat 2>/dev/null || continue
    a=$(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | cut -c1-90)
    echo "$t $p $((f[13]+f[14])) $a"
  done >> $OUT
  sleep 2
done
