# Shared by the benchmark scripts (sourced, not run): a work directory and background
# processes that are stopped (last started first) and removed on exit, an nginx upstream, and
# the CPU time of a process.

work=$(mktemp -d)
# The Service host start_weft's world serves.
HOST=echo.default.svc.cluster.local
pids=()
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# need HINT TOOL...: stops with HINT unless every TOOL is installed, then builds the release
# sidecar and control plane that the benchmarks run.
need() {
  local hint=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "missing $tool: $hint"; exit 1; }
  done
  cargo build --release -q -p weft-sidecar -p weft-control-plane
}

# start_upstream PORT [H2C_PORT]: an nginx answering 200 "upstream" on 127.0.0.1:PORT (and with
# HTTP/2 prior knowledge on H2C_PORT, for direct HTTP/2 runs), on core 1.
start_upstream() {
  local h2c=""
  [ -n "${2:-}" ] && h2c="server { listen 127.0.0.1:$2 http2; keepalive_requests 10000000; location / { return 200 \"upstream\n\"; } }"
  cat > "$work/upstream.conf" <<CONF
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$1; keepalive_requests 10000000; location / { return 200 "upstream\n"; } }
  $h2c }
CONF
  taskset -c 1 nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
}

# ticks PID: utime+stime of a process, in clock ticks (hz of them a second).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# haproxy_cfg PORT UPSTREAM_PORT [BIND_OPTIONS]: writes $work/haproxy.cfg, one thread,
# HTTP keep-alive, 127.0.0.1:PORT to 127.0.0.1:UPSTREAM_PORT.
haproxy_cfg() {
  local bind_opt=${3:-}
  cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend f
  bind 127.0.0.1:$1$bind_opt
  default_backend b
backend b
  server s1 127.0.0.1:$2
CONF
}

# start_proxies HAPROXY_PORT NGINX_PORT UPSTREAM_PORT [h2]: haproxy and nginx as reverse
# proxies to the upstream (HTTP/1.1 keep-alive; with `h2` they take HTTP/2 with prior knowledge
# from clients), one worker each, pinned to core 0 (the proxy's core). Sets haproxy_pid and
# nginx_worker.
start_proxies() {
  local bind_opt="" listen_opt=""
  if [ "${4:-}" = h2 ]; then bind_opt=" proto h2"; listen_opt=" http2"; fi
  haproxy_cfg "$1" "$3" "$bind_opt"
  taskset -c 0 haproxy -f "$work/haproxy.cfg" & pids+=($!)
  cat > "$work/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off;
  upstream up { server 127.0.0.1:$3; keepalive 128; }
  server { listen 127.0.0.1:$2$listen_opt; keepalive_requests 10000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  taskset -c 0 nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)
  for _ in $(seq 50); do [ -s "$work/px.pid" ] && pgrep -P "$(cat "$work/px.pid")" >/dev/null && break; sleep 0.1; done
  nginx_worker=$(pgrep -P "$(cat "$work/px.pid")" | head -1)
  haproxy_pid=$(pgrep -f "haproxy -f $work/haproxy.cfg" | tail -1)
}

# start_control_plane BASE: a control plane (file source: Service echo -> 127.0.0.1:BASE+80,
# the upstream) on core 1; plaintext xDS BASE+90, metrics BASE+91, TLS BASE+92.
start_control_plane() {
  local b=$1
  mkdir -p "$work/world"
  cat > "$work/world/world.yaml" <<YAML
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo, namespace: default, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: $((b + 80))}]
endpoints: [{addresses: ["127.0.0.1"]}]
YAML
  taskset -c 1 target/release/weft-control-plane --source-dir "$work/world" \
    --xds-plaintext-addr 127.0.0.1:$((b + 90)) --metrics-addr 127.0.0.1:$((b + 91)) \
    --grpc-addr 127.0.0.1:$((b + 92)) --log warn >/dev/null & pids+=($!)
}

# start_weft BASE: start_control_plane BASE and a Weft sidecar ($WEFT_SIDECAR, else the release
# build) on core 0 — outbound BASE+83, inbound BASE+84, admin BASE+85. Waits until the sidecar
# routes; sets weft (its pid).
start_weft() {
  local b=$1
  start_control_plane "$b"
  taskset -c 0 "${WEFT_SIDECAR:-target/release/weft-sidecar}" run --plaintext-xds --xds-addr 127.0.0.1:$((b + 90)) \
    --outbound-addr 127.0.0.1:$((b + 83)) --inbound-addr 127.0.0.1:$((b + 84)) \
    --admin-addr 127.0.0.1:$((b + 85)) --log warn >/dev/null & weft=$!; pids+=($weft)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$((b + 85))/ready" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs -H "Host: echo.default.svc.cluster.local" "http://127.0.0.1:$((b + 83))/" | grep -q upstream \
    || { echo "weft sidecar does not route"; exit 1; }
  sleep 0.5
}
