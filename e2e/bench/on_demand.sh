#!/usr/bin/env bash
# On-demand discovery (issue #22; not a test; a few minutes): a mesh of SERVICES Services of
# ENDPOINTS endpoints each, from the file source through a real control plane over ADS, and
# side by side two sidecars of it: one discovering config on demand (the default) and one
# holding every Service's (`--discovery all`). Measured: each sidecar's RSS after calling
# CALLED Services; then, on the on-demand sidecar, the first request to each of FIRST Services
# it has not subscribed to yet against a second request to the same (now subscribed) one, p50
# and p99, over one keep-alive connection. The called Services' endpoints are an nginx on
# 127.0.0.1-10; every other endpoint is on 198.18.0.0/15 and never contacted. Results are
# appended to BENCHMARKS.md.
#
#   ./e2e/bench/on_demand.sh      # SERVICES=10000 ENDPOINTS=10 CALLED=10 FIRST=300
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVICES=${SERVICES:-10000}
ENDPOINTS=${ENDPOINTS:-10}
CALLED=${CALLED:-10}
FIRST=${FIRST:-300}
. e2e/bench/lib.sh
need "apt-get install -y nginx curl" nginx curl python3

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
split_kib() { awk '/RssAnon/ {a=$2} /RssFile/ {f=$2} END {print a "/" f}' "/proc/$1/status"; }
mib() { echo "$(($1 / 1024)).$(( ($1 % 1024) * 10 / 1024 ))"; }
gauge() { # gauge ADMIN_PORT METRIC: a gauge's value (0 when absent)
  curl -fs "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2; f=1} END {if (!f) print 0}'
}

# The upstream: one nginx listening on the ten live endpoint addresses.
listens=""
for i in $(seq 1 10); do listens="$listens listen 127.0.0.$i:18080;"; done
cat > "$work/upstream.conf" <<CONF
worker_processes 1; daemon off; pid $work/up.pid; error_log $work/up.err;
events { worker_connections 4096; }
http { access_log off; server { $listens keepalive_requests 10000000; location / { return 200 "upstream\n"; } } }
CONF
taskset -c 1 nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)

live=$((CALLED + FIRST))
mkdir -p "$work/world"
python3 - "$work/world" "$SERVICES" "$ENDPOINTS" "$live" <<'PY'
import sys
folder, services, endpoints, live = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
docs = []
for i in range(services):
    addrs = []
    for j in range(endpoints):
        if i < live:
            ip = f"127.0.0.{j % 10 + 1}"
        else:
            n = i * endpoints + j + 1
            ip = f"198.{18 + n // 65536 % 2}.{n // 256 % 256}.{n % 256}"
        addrs.append(f'{{addresses: ["{ip}"]}}')
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: default}}
spec: {{clusterIP: 198.19.{i // 256 % 256}.{i % 256}, ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}, namespace: default, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
ports: [{{name: http, port: 18080}}]
endpoints: [{", ".join(addrs)}]""")
for k in range(0, len(docs), 100):
    with open(f"{folder}/svc-{k // 100:05}.yaml", "w") as f:
        f.write("\n---\n".join(docs[k:k + 100]) + "\n")
PY
taskset -c 1 target/release/weft-control-plane --source-dir "$work/world" \
  --xds-plaintext-addr 127.0.0.1:19090 --metrics-addr 127.0.0.1:19091 \
  --grpc-addr 127.0.0.1:19092 --log warn >/dev/null & cp=$!; pids+=($cp)

# sidecar MODE BASE: a sidecar on core 0; outbound BASE+3, admin BASE+5.
sidecar() {
  taskset -c 0 target/release/weft-sidecar run --plaintext-xds --xds-addr 127.0.0.1:19090 \
    --discovery "$1" --node-id "$1.default" --no-ipv6 \
    --outbound-addr 127.0.0.1:$(($2 + 3)) --inbound-addr 127.0.0.1:$(($2 + 4)) \
    --admin-addr 127.0.0.1:$(($2 + 5)) --log warn >/dev/null &
}
sidecar on-demand 19100; od=$!; pids+=($od)
sidecar all 19200; all=$!; pids+=($all)
for _ in $(seq 600); do
  [ "$(gauge 19105 weft_proxy_discovery_directory_services)" -ge "$SERVICES" ] \
    && [ "$(gauge 19205 'weft_xds_resources{type="endpoint"}')" -ge "$SERVICES" ] && break
  sleep 0.5
done
[ "$(gauge 19205 'weft_xds_resources{type="endpoint"}')" -ge "$SERVICES" ] \
  || { echo "the all-config sidecar never held $SERVICES assignments"; exit 1; }

# call PORT FIRST N: one request to each of svc-FIRST.. svc-(FIRST+N-1), must be 200.
call() {
  for i in $(seq "$2" $(($2 + $3 - 1))); do
    curl -fs -H "Host: svc-$i" "http://127.0.0.1:$1/" | grep -q upstream || { echo "svc-$i failed via $1"; exit 1; }
  done
}
call 19103 0 "$CALLED"
call 19203 0 "$CALLED"
sleep 3 # the allocator's purge after the last swap (memory::Debounce)
od_rss=$(rss_kib "$od"); od_split=$(split_kib "$od")
all_rss=$(rss_kib "$all"); all_split=$(split_kib "$all")
cp_rss=$(rss_kib "$cp")
subs=$(gauge 19105 'weft_proxy_discovery_subscriptions{why="request"}')

# First request to a service not subscribed yet vs the next request to it, one connection.
lat=$(python3 - "$CALLED" "$FIRST" <<'PY'
import http.client, sys, time
start, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", 19103)
first, again = [], []
def get(host):
    t = time.perf_counter()
    conn.request("GET", "/", headers={"Host": host})
    r = conn.getresponse(); r.read()
    if r.status != 200:
        raise SystemExit(f"{host}: {r.status}")
    return (time.perf_counter() - t) * 1000
for i in range(start, start + n):
    first.append(get(f"svc-{i}"))
    again.append(get(f"svc-{i}"))
def q(v, p):
    v = sorted(v); return v[round((len(v) - 1) * p)]
print(f"{q(first, .5):.2f} {q(first, .99):.2f} {q(again, .5):.2f} {q(again, .99):.2f}")
PY
)
read -r f50 f99 a50 a99 <<<"$lat"
added=$(python3 -c "print(f'{$f99 - $a99:.2f}')")

{
  echo
  echo "## On-demand discovery — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`SERVICES=$SERVICES ENDPOINTS=$ENDPOINTS CALLED=$CALLED FIRST=$FIRST ./e2e/bench/on_demand.sh\`"
  echo
  echo "Mesh: $SERVICES Services × $ENDPOINTS endpoints ($((SERVICES * ENDPOINTS)) endpoints), one control plane (RSS $(mib "$cp_rss") MiB with both sidecars)."
  echo
  echo "| sidecar | holds | RSS after calling $CALLED Services | anonymous / file-backed |"
  echo "|---|---|---|---|"
  echo "| \`--discovery on-demand\` | directory of $SERVICES + $subs subscribed | $(mib "$od_rss") MiB | $(mib "${od_split%/*}") / $(mib "${od_split#*/}") MiB |"
  echo "| \`--discovery all\` | $SERVICES clusters | $(mib "$all_rss") MiB | $(mib "${all_split%/*}") / $(mib "${all_split#*/}") MiB |"
  echo
  echo "| request through the on-demand sidecar ($FIRST Services, loopback, keep-alive) | p50 | p99 |"
  echo "|---|---|---|"
  echo "| first request to a Service not subscribed yet | $f50 ms | $f99 ms |"
  echo "| the next request to it (subscribed) | $a50 ms | $a99 ms |"
  echo
  echo "The first request adds $added ms at p99 (goal ≤ 5 ms)."
} | tee -a BENCHMARKS.md
