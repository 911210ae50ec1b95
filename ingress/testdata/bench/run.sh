#!/bin/bash
# usage: run.sh knit|nginx [rules] [conns] [secs] [strace]
set -u
which=$1; rules=${2:-0}; conns=${3:-64}; secs=${4:-10}; tracing=${5:-}
cd /tmp/kbench
pkill -F backend.pid 2>/dev/null; pkill -F proxy.pid 2>/dev/null; sleep 0.3
nice -n -10 taskset -c 1 nginx -p /tmp/kbench -c /tmp/kbench/backend.conf & BPID=$!
if [ $which = nginx ]; then
  nice -n -10 taskset -c 0 nginx -p /tmp/kbench -c /tmp/kbench/proxy.conf & PPID2=$!
  PORT=18080
else
  KNIT_INGRESS_BENCH_LISTEN=127.0.0.1:18090 KNIT_INGRESS_BENCH_BACKEND=127.0.0.1:18081 KNIT_INGRESS_BENCH_RULES=$rules \
    GOGC=${GOGC:-100} nice -n -10 taskset -c 0 ./ingress.test -test.run TestServeForBenchmark & PPID2=$!
  PORT=18090
fi
for i in $(seq 50); do
  curl -s -o /dev/null -H 'Host: bench.example.com' http://127.0.0.1:$PORT/api/x && break; sleep 0.1
done
URL=http://127.0.0.1:$PORT/api/v1/items?id=42
nice -n -10 taskset -c 1 wrk -t1 -c$conns -d2s -H 'Host: bench.example.com' $URL >/dev/null 2>&1
if [ -n "$tracing" ]; then
  strace -c -f -p $PPID2 -o strace.out & SPID=$!; sleep 0.5
fi
cpu0=$(awk '{print $14+$15}' /proc/$PPID2/stat)
nice -n -10 taskset -c 1 wrk -t1 -c$conns -d${secs}s --latency -H 'Host: bench.example.com' $URL > wrk.out 2>&1
cpu1=$(awk '{print $14+$15}' /proc/$PPID2/stat)
if [ -n "$tracing" ]; then kill -INT $SPID; sleep 0.5; fi
reqs=$(awk '/requests in/{print $1}' wrk.out)
rps=$(awk '/Requests\/sec/{print $2}' wrk.out)
p99=$(awk '$1=="99%"{print $2}' wrk.out)
p50=$(awk '$1=="50%"{print $2}' wrk.out)
errs=$(grep -E "Non-2xx|Socket errors" wrk.out | tr '\n' ' ')
tck=$(getconf CLK_TCK)
usreq=$(echo "scale=2; ($cpu1-$cpu0)*1000000/$tck/($reqs+1)" | bc)
echo "$which rules=$rules c=$conns rps=$rps p50=$p50 p99=$p99 cpu_us_per_req=$usreq reqs=$reqs $errs"
if [ -n "$tracing" ]; then awk -v r=$reqs 'NR>2 && $NF!="total" && $4+0>0 {printf "  %-14s %.2f/req\n", $NF, $4/r}' strace.out | sort -k2 -nr | head -12; fi
kill $PPID2 $BPID 2>/dev/null; wait 2>/dev/null
