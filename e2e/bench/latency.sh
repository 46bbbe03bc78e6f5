#!/usr/bin/env bash
# Added latency at fixed request rates (not a test; about 2 minutes): oha sends 1 000 and then
# 5 000 requests/s (HTTP/1.1 keep-alive, 32 connections, latency-corrected so a stalled
# response does not hide the requests that should have been sent meanwhile — coordinated
# omission) to an nginx upstream directly, then through the Weft sidecar (explicit mode),
# haproxy and nginx as reverse proxies. Each proxy is pinned to core 0; oha and the upstream
# share core 1. Measured per contender and rate: p50/p90/p99/p99.9, the added latency over the
# direct path, and the proxy's CPU per 1000 requests/s (CPU seconds per second of load). Also
# the sidecar's RSS idle, under load, and with 10 000 endpoints in its config. Results go to
# BENCHMARKS.md and e2e/bench/latency.csv (plotted by plot.py into e2e/bench/latency.png).
#
#   ./e2e/bench/run.sh runs it with the others; alone: DURATION=10 ./e2e/bench/latency.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
RATES=${RATES:-"1000 5000"}
. e2e/bench/lib.sh
need "see e2e/bench/run.sh" oha haproxy nginx taskset curl
start_upstream 18380
start_proxies 18381 18382 18380
start_weft 18300
mkdir "$work/big"
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
weft_idle=$(rss_mib "$weft")

csv=e2e/bench/latency.csv
echo "contender,rate,p50_us,p90_us,p99_us,p999_us,cpu_s_per_1k_rps,errors" > "$csv"
results=()
declare -A p50_direct p99_direct
measure() { # name port pid rate
  local name=$1 port=$2 pid=$3 rate=$4 before after json
  taskset -c 1 oha -z 2s -q "$rate" -c 32 --latency-correction --no-tui -H "Host: $HOST" \
    "http://127.0.0.1:$port/" >/dev/null 2>&1
  before=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  json=$(taskset -c 1 oha -z "${DURATION}s" -q "$rate" -c 32 --latency-correction --no-tui \
    --output-format json -H "Host: $HOST" "http://127.0.0.1:$port/" 2>/dev/null)
  after=$( [ "$pid" = - ] && echo 0 || ticks "$pid")
  local row
  echo "$json" > "$work/oha.json"
  row=$(python3 - "$name" "$rate" "$((after - before))" "$hz" "$DURATION" "$work/oha.json" <<'PY'
import json, sys
name, rate, ticks, hz, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
d = json.load(open(sys.argv[6]))
p = d["latencyPercentiles"]
us = lambda k: round((p.get(k) or 0) * 1e6)
cpu = "-" if name == "direct" else "%.3f" % (ticks / hz / dur / (rate / 1000))
errors = sum(d.get("errorDistribution", {}).values())
print(f"{name},{rate},{us('p50')},{us('p90')},{us('p99')},{us('p99.9')},{cpu},{errors}")
PY
)
  echo "$row" | tee -a "$csv"
  IFS=, read -r _ _ p50 p90 p99 p999 cpu errs <<<"$row"
  if [ "$name" = direct ]; then p50_direct[$rate]=$p50; p99_direct[$rate]=$p99; fi
  results+=("| $name | $rate | $p50 | $p90 | $p99 | $p999 | $((p50 - ${p50_direct[$rate]})) | $((p99 - ${p99_direct[$rate]})) | $cpu | $errs |")
}
for rate in $RATES; do
  measure direct 18380 - "$rate"
  measure "weft sidecar" 18383 "$weft" "$rate"
  measure haproxy 18381 "$haproxy_pid" "$rate"
  measure "nginx proxy" 18382 "$nginx_worker" "$rate"
done
weft_loaded=$(rss_mib "$weft")

# RSS with 10 000 endpoints in config: 1 000 services of 10 endpoints each, in files of 100
# services (the file source takes at most 1024 documents per file).
python3 - "$work/big" <<'PY'
import sys
out = []
for s in range(1000):
    out.append(f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: default}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n")
    eps = ", ".join(f'{{addresses: ["10.{s // 250}.{s % 250}.{e}"]}}' for e in range(10))
    out.append(f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}, namespace: default, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{eps}]\n")
for f in range(0, len(out), 200):
    open(f"{sys.argv[1]}/world-{f // 200}.yaml", "w").write("---\n".join(out[f:f + 200]))
PY
taskset -c 1 target/release/weft-control-plane --source-dir "$work/big" --xds-plaintext-addr 127.0.0.1:18393 \
  --grpc-addr 127.0.0.1:18395 --metrics-addr 127.0.0.1:18394 --log warn >/dev/null & pids+=($!)
taskset -c 0 target/release/weft-sidecar run --plaintext-xds --xds-addr 127.0.0.1:18393 \
  --outbound-addr 127.0.0.1:18386 --inbound-addr 127.0.0.1:18387 --admin-addr 127.0.0.1:18388 \
  --log warn >/dev/null & big=$!; pids+=($big)
for _ in $(seq 300); do curl -fs http://127.0.0.1:18388/ready >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1
# The measurement means something only if the sidecar holds the whole mesh.
held=$(curl -fs http://127.0.0.1:18388/clusters | python3 -c 'import json, sys; c = json.load(sys.stdin); print(sum(len(p) for v in c.values() for p in (v.get("endpoints") or {}).get("priorities", [])))')
[ "$held" -ge 10000 ] || { echo "the sidecar holds $held endpoints, not 10 000"; exit 1; }
weft_big=$(rss_mib "$big")
verdict() { awk -v v="$1" -v goal="$2" 'BEGIN {print (v <= goal) ? "holds" : "does not hold"}'; }
{
  echo
  echo "## Added latency at fixed rates, RSS — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)); $(haproxy -v | head -1 | cut -d' ' -f1-3); $(nginx -v 2>&1); $(oha --version)."
  echo "oha on core 1 (32 keep-alive connections, ${DURATION}s per run, \`--latency-correction\`), each proxy pinned to core 0, the nginx upstream on core 1."
  echo
  echo "Command: \`DURATION=$DURATION ./e2e/bench/latency.sh\` (part of \`./e2e/bench/run.sh\`). Plot: [latency.png](e2e/bench/latency.png)."
  echo
  echo "| contender | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | proxy CPU s/s per 1k req/s | errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  w1k=$(awk -F, '$1=="weft sidecar" && $2==1000' "$csv")
  d1k=$(awk -F, '$1=="direct" && $2==1000' "$csv")
  if [ -n "$w1k" ] && [ -n "$d1k" ]; then
    a50=$(( $(echo "$w1k" | cut -d, -f3) - $(echo "$d1k" | cut -d, -f3) ))
    a99=$(( $(echo "$w1k" | cut -d, -f5) - $(echo "$d1k" | cut -d, -f5) ))
    echo "Goals at 1k req/s: added p50 ≤ 50 µs: $(verdict "$a50" 50) ($a50 µs); added p99 ≤ 200 µs: $(verdict "$a99" 200) ($a99 µs)."
  fi
  echo "Weft sidecar RSS: idle $weft_idle MiB (goal ≤ 10 MB: $(verdict "$weft_idle" 9.5)), after the load runs $weft_loaded MiB, with 10 000 endpoints (1 000 services) in its config $weft_big MiB (goal ≤ 50 MB: $(verdict "$weft_big" 47.7))."
} | tee -a BENCHMARKS.md
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  .venv/bin/python e2e/bench/plot.py "$csv" e2e/bench/latency.png && echo "plot: e2e/bench/latency.png"
fi
