#!/usr/bin/env bash
# User-space instructions per request, side by side (not a test; about two minutes): the Weft
# sidecar, haproxy and nginx, each run under valgrind's callgrind with instrumentation switched
# on only while h2load sends a fixed number of HTTP/1.1 keep-alive requests through it. Unlike
# CPU time on a shared machine (±20 % between runs here), an instruction count repeats to within
# 0.1 %, so it tells a real cut from drift; it counts user space only (the kernel's share per
# request is about equal for the three: see profile.sh in BENCHMARKS.md). Instructions are not
# cycles: cache misses and atomics cost more than they count. Appends a table to BENCHMARKS.md.
#
#   apt-get install -y valgrind haproxy nginx nghttp2-client curl   # once
#   ./e2e/bench/instructions.sh               # REQUESTS=5000 by default
#   WEFT_SIDECAR=/tmp/weft-before ./e2e/bench/instructions.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS=${REQUESTS:-5000}
. e2e/bench/lib.sh
need "apt-get install -y valgrind haproxy nginx nghttp2-client curl" valgrind callgrind_control callgrind_annotate h2load haproxy nginx curl
start_upstream 18080   # BASE (18000) + 80: what start_control_plane routes to

# under_callgrind NAME PORT HOST CMD...: starts CMD under callgrind (instrumentation off), waits
# for PORT to answer, warms up, counts REQUESTS requests, prints "NAME instructions/request".
rows=()
under_callgrind() {
  local name=$1 port=$2 host=$3 pid out total f
  shift 3
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.${name// /_}.%p" "$@" \
    >"$work/$name.out" 2>&1 & pid=$!; pids+=("$pid")
  for _ in $(seq 600); do
    curl -fs -o /dev/null -H "Host: $host" "http://127.0.0.1:$port/" 2>/dev/null && break
    sleep 0.1
  done
  h2load --h1 -n 500 -c 10 -H ":authority: $host" "http://127.0.0.1:$port/" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  out=$(h2load --h1 -n "$REQUESTS" -c 10 -H ":authority: $host" "http://127.0.0.1:$port/")
  callgrind_control -i off "$pid" >/dev/null
  echo "$out" | grep -q "status codes: $REQUESTS 2xx" || { echo "$name: not every response was 2xx"; echo "$out"; exit 1; }
  callgrind_control -d "$pid" >/dev/null
  # The dump is FILE.PID.1 (FILE.PID itself is written at exit, from instrumentation off).
  f="$work/cg.${name// /_}.$pid.1"
  for _ in $(seq 100); do [ -s "$f" ] && break; sleep 0.1; done
  sleep 1
  total=$(callgrind_annotate --auto=no "$f" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  kill "$pid" 2>/dev/null || true
  rows+=("| $name | $((total / REQUESTS)) |")
  echo "${rows[-1]}"
}

# The Weft sidecar: the control plane as start_weft starts it (upstream BASE+80), the sidecar under callgrind.
b=18000
start_control_plane $b
under_callgrind "weft sidecar" $((b + 83)) "$HOST" "${WEFT_SIDECAR:-target/release/weft-sidecar}" run \
  --plaintext-xds --xds-addr 127.0.0.1:$((b + 90)) --outbound-addr 127.0.0.1:$((b + 83)) \
  --inbound-addr 127.0.0.1:$((b + 84)) --admin-addr 127.0.0.1:$((b + 85)) --log warn

haproxy_cfg 18081 18080
under_callgrind haproxy 18081 "$HOST" haproxy -f "$work/haproxy.cfg"

# nginx as one process (no master), so the process under callgrind is the one proxying.
cat > "$work/proxy.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off;
  upstream up { server 127.0.0.1:18080; keepalive 128; }
  server { listen 127.0.0.1:18082; keepalive_requests 10000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
under_callgrind "nginx proxy" 18082 "$HOST" nginx -c "$work/proxy.conf" -p "$work"

{
  echo
  echo "## User-space instructions per request (callgrind) — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "$(haproxy -v | head -1); $(nginx -v 2>&1); $(valgrind --version)."
  echo "h2load --h1, 10 keep-alive connections, $REQUESTS requests counted after 500 of warm-up; each proxy one thread/worker."
  echo
  echo "Command: \`REQUESTS=$REQUESTS ./e2e/bench/instructions.sh\`"
  echo
  echo "| contender | instructions/request (user space) |"
  echo "|---|---|"
  printf '%s\n' "${rows[@]}"
} >> BENCHMARKS.md
echo "appended to BENCHMARKS.md"
