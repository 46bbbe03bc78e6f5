#!/usr/bin/env bash
# Where a proxy's CPU goes, side by side (not a test; about a minute): the same wrk load
# (HTTP/1.1 keep-alive) through the Weft sidecar, haproxy and nginx, each pinned to core 0,
# wrk and the nginx upstream on core 1. Per request and per contender: user and kernel CPU
# time (utime/stime from /proc), context switches (voluntary and not, summed over threads),
# TCP segments on loopback (nstat, system-wide: the client and upstream are the same for every
# contender, so differences are the proxy's), and syscalls by name (`strace -c -f` on a second,
# shorter run: strace slows the proxy, the counts per request stay exact).
# Results are appended to BENCHMARKS.md.
#
#   apt-get install -y haproxy nginx wrk strace iproute2   # once
#   ./e2e/bench/profile.sh                                 # DURATION=5 CONNS=50 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-5}
CONNS=${CONNS:-50}
. e2e/bench/lib.sh
need "apt-get install -y haproxy nginx wrk strace iproute2" wrk haproxy nginx taskset curl strace nstat
start_upstream 18080
start_proxies 18081 18082 18080
start_weft 18000

# ctxt PID: voluntary and involuntary context switches, summed over the process's threads.
ctxt() {
  cat /proc/"$1"/task/*/status | awk '/^voluntary_ctxt/ {v += $2} /^nonvoluntary_ctxt/ {n += $2} END {print v, n}'
}
# segs: loopback TCP segments in and out so far (system-wide).
segs() { nstat -az TcpInSegs TcpOutSegs | awk '/TcpInSegs|TcpOutSegs/ {s += $2} END {print s}'; }

rows=() syscalls=()
profile() { # name port pid
  local name=$1 port=$2 pid=$3 out reqs u0 s0 u1 s1 v0 n0 v1 n1 g0 g1 trace treqs
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Host: $HOST" "http://127.0.0.1:$port/" >/dev/null
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  read -r v0 n0 < <(ctxt "$pid")
  g0=$(segs)
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Host: $HOST" "http://127.0.0.1:$port/")
  g1=$(segs)
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  read -r v1 n1 < <(ctxt "$pid")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$out" | grep -q "Non-2xx" && { echo "$name: non-2xx responses"; echo "$out"; exit 1; }
  # Syscalls: a shorter run under strace (the proxy slows down; counts per request hold).
  trace="$work/strace.$port"
  strace -c -f -q -o "$trace" -p "$pid" & local st=$!
  sleep 0.5
  treqs=$(taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Host: $HOST" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  kill -INT "$st"; wait "$st" 2>/dev/null || true
  rows+=("$(awk -v n="$name" -v r="$reqs" -v hz="$hz" -v u=$((u1 - u0)) -v s=$((s1 - s0)) \
    -v v=$((v1 - v0)) -v iv=$((n1 - n0)) -v g=$((g1 - g0)) -v d="$DURATION" 'BEGIN {
      printf "| %s | %.0f | %.1f | %.1f | %.1f | %.0f %% | %.3f | %.3f | %.2f |", n, r / d,
        (u + s) / hz / r * 1e6, u / hz / r * 1e6, s / hz / r * 1e6, 100 * s / (u + s), v / r, iv / r, g / r }')")
  # strace -c rows: % time, seconds, usecs/call, calls, [errors], syscall.
  syscalls+=("$(awk -v n="$name" -v r="$treqs" '$4 ~ /^[0-9]+$/ && $NF ~ /^[a-z_0-9]+$/ && $NF != "total" { calls[$NF] = $4 }
      END { line = "| " n " |"; total = 0
        for (s in calls) total += calls[s]
        line = line sprintf(" %.2f |", total / r)
        for (s in calls) if (calls[s] / r >= 0.01) line = line sprintf(" %s %.2f", s, calls[s] / r)
        print line " |" }' "$trace")")
  echo "${rows[-1]}"; echo "${syscalls[-1]}"
}
profile "weft sidecar" 18083 "$weft"
profile haproxy 18081 "$haproxy_pid"
profile "nginx proxy" 18082 "$nginx_worker"

{
  echo
  echo "## Where the CPU goes: user, kernel, switches, segments, syscalls per request — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)."
  echo "Each proxy pinned to core 0; wrk (1 thread, $CONNS connections, ${DURATION}s) and the nginx upstream on core 1. Segments are system-wide loopback TCP segments (client, proxy and upstream) per request."
  echo
  echo "Command: \`DURATION=$DURATION CONNS=$CONNS ./e2e/bench/profile.sh\`"
  echo
  echo "| contender | req/s | CPU µs/req | user µs | kernel µs | kernel share | voluntary switches/req | involuntary/req | TCP segments/req |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "| contender | syscalls/req | by name (≥ 0.01/req) |"
  echo "|---|---|---|"
  printf '%s\n' "${syscalls[@]}"
} | tee -a BENCHMARKS.md
