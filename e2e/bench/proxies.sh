#!/usr/bin/env bash
# Side-by-side HTTP/1.1 keep-alive proxy benchmark on loopback (not a test; ~2 minutes):
# the same wrk load straight to an nginx upstream, then through the Weft sidecar (explicit
# mode), haproxy and nginx as reverse proxies. Each proxy runs pinned to core 0 with one
# worker; wrk and the upstream share core 1. Measured per contender: requests/s, wrk's latency
# percentiles (at saturation; wrk does not correct coordinated omission), the proxy's CPU time
# per request (utime+stime from /proc before/after, LAB.md's method) and its RSS.
# Results are appended to BENCHMARKS.md.
#
#   apt-get install -y haproxy nginx wrk     # once
#   ./e2e/bench/proxies.sh                   # DURATION=10 CONNS=50 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
. e2e/bench/lib.sh
need "apt-get install -y haproxy nginx wrk" wrk haproxy nginx taskset curl
start_upstream 18080
start_proxies 18081 18082 18080
start_weft 18000

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

results=()
measure() { # name port pid
  local name=$1 port=$2 pid=$3 before after out reqs rps p50 p90 p99 cpu rss
  # warm-up
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Host: $HOST" "http://127.0.0.1:$port/" >/dev/null
  before=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Host: $HOST" "http://127.0.0.1:$port/")
  after=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  echo "$out" | grep -q "Non-2xx" && { echo "$name: non-2xx responses; not a valid run"; echo "$out"; exit 1; }
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p90=$(echo "$out" | awk '$1=="90%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  if [ "$pid" = - ]; then cpu="-"; rss="-"; else
    cpu=$(awk -v d=$((after - before)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.1f", d / hz / n * 1e6}')
    rss="$(( $(rss_kib "$pid") / 1024 )) MiB"
  fi
  echo "$name: $rps req/s, p50 $p50, p90 $p90, p99 $p99, CPU $cpu µs/request, RSS $rss"
  results+=("| $name | $rps | $p50 | $p90 | $p99 | $cpu | $rss |")
}
weft_idle_rss=$(( $(rss_kib "$weft") / 1024 ))
measure direct 18080 -
measure "weft sidecar" 18083 "$weft"
measure haproxy 18081 "$haproxy_pid"
measure "nginx proxy" 18082 "$nginx_worker"

{
  echo
  echo "## Sidecar vs direct, haproxy, nginx (HTTP/1.1 keep-alive) — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)."
  echo "Each proxy pinned to core 0 (one worker/thread); wrk (1 thread, $CONNS connections, ${DURATION}s) and the nginx upstream on core 1."
  echo
  echo "Command: \`DURATION=$DURATION CONNS=$CONNS ./e2e/bench/proxies.sh\`"
  echo
  echo "| contender | req/s | p50 | p90 | p99 | proxy CPU µs/request | proxy RSS under load |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  echo "Weft sidecar RSS idle (config loaded): ${weft_idle_rss} MiB. Latencies are wrk's at saturation (closed loop, no coordinated-omission correction); the fixed-rate latency run (oha, latency-corrected) is e2e/bench/latency.sh."
} | tee -a BENCHMARKS.md
