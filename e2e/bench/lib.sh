# Shared by the benchmark scripts (sourced, not run): a work directory and background
# processes that are stopped (last started first) and removed on exit, an nginx upstream, and
# the CPU time of a process.

work=$(mktemp -d)
pids=()
cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start_upstream PORT: an nginx answering 200 "upstream" on 127.0.0.1:PORT, on core 1.
start_upstream() {
  cat > "$work/upstream.conf" <<CONF
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$1; keepalive_requests 10000000; location / { return 200 "upstream\n"; } } }
CONF
  taskset -c 1 nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
}

# ticks PID: utime+stime of a process, in clock ticks (hz of them a second).
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# start_proxies HAPROXY_PORT NGINX_PORT UPSTREAM_PORT: haproxy and nginx as HTTP/1.1 keep-alive
# reverse proxies to the upstream, one worker each, pinned to core 0 (the proxy's core).
start_proxies() {
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
  bind 127.0.0.1:$1
  default_backend b
backend b
  server s1 127.0.0.1:$3
CONF
  taskset -c 0 haproxy -f "$work/haproxy.cfg" & pids+=($!)
  cat > "$work/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $work/px.pid; error_log $work/px.err;
events { worker_connections 4096; }
http { access_log off;
  upstream up { server 127.0.0.1:$3; keepalive 128; }
  server { listen 127.0.0.1:$2; keepalive_requests 10000000;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  taskset -c 0 nginx -c "$work/proxy.conf" -p "$work" & pids+=($!)
}
