#!/usr/bin/env bash
# HTTP/2 side by side (not a test; about a minute): h2load (HTTP/2 with prior knowledge, 50
# connections, 10 streams each) straight to the nginx upstream, then through the Weft sidecar
# (explicit mode), haproxy and nginx, each taking HTTP/2 from the client and speaking HTTP/1.1
# keep-alive to the upstream. Each proxy pinned to core 0; h2load and the upstream on core 1.
# Measured: requests/s at saturation and the proxy's CPU time per request. Appended to
# BENCHMARKS.md.
#
#   apt-get install -y haproxy nginx nghttp2-client   # once (run.sh does it)
#   ./e2e/bench/h2.sh                                 # REQUESTS=200000 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS=${REQUESTS:-200000}
HOST=echo.default.svc.cluster.local
for tool in h2load haproxy nginx taskset curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y haproxy nginx nghttp2-client"; exit 1; }
done
cargo build --release -q -p weft-sidecar -p weft-control-plane

. e2e/bench/lib.sh
# The upstream speaks HTTP/1.1 to the proxies, and HTTP/2 on 18786 for the direct run.
start_upstream 18780 18786
start_proxies 18781 18782 18780 h2
start_weft 18700

results=()
measure() { # name port pid
  local name=$1 port=$2 pid=$3 before after out rps ok cpu
  taskset -c 1 h2load -n 20000 -c 50 -m 10 -t 1 -H ":authority: $HOST" "http://127.0.0.1:$port/" >/dev/null
  before=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  out=$(taskset -c 1 h2load -n "$REQUESTS" -c 50 -m 10 -t 1 -H ":authority: $HOST" "http://127.0.0.1:$port/")
  after=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  rps=$(echo "$out" | awk '/^finished in/ {printf "%.0f", $4}')
  ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
  cpu=$( [ "$pid" = - ] && echo - || awk -v d=$((after - before)) -v hz="$hz" -v n="$ok" 'BEGIN {printf "%.1f", d / hz / n * 1e6}')
  echo "$name: $rps req/s, $ok 2xx, CPU $cpu µs/request"
  results+=("| $name | $rps | $ok of $REQUESTS | $cpu |")
}
measure direct 18786 -
measure "weft sidecar" 18783 "$weft"
measure haproxy 18781 "$haproxy_pid"
measure "nginx proxy" 18782 "$nginx_worker"
{
  echo
  echo "## HTTP/2 (prior knowledge) from the client, HTTP/1.1 upstream — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(h2load --version | head -1)."
  echo "h2load (1 thread, 50 connections × 10 streams, $REQUESTS requests) and the upstream on core 1; each proxy pinned to core 0."
  echo
  echo "Command: \`REQUESTS=$REQUESTS ./e2e/bench/h2.sh\` (part of \`./e2e/bench/run.sh\`)"
  echo
  echo "| contender | req/s | 2xx | proxy CPU µs/request |"
  echo "|---|---|---|---|"
  printf '%s\n' "${results[@]}"
} | tee -a BENCHMARKS.md
