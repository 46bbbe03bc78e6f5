#!/usr/bin/env bash
# mTLS on vs off between two Weft sidecars (not a test; about a minute): the same wrk load
# through client sidecar -> server sidecar -> nginx upstream, once in plaintext and once with
# mTLS between the sidecars, in one run on loopback. Both sidecars are pinned to core 0; wrk
# and the nginx upstream share core 1. Measured: requests/s (at saturation), wrk's latency
# percentiles, and the two sidecars' CPU time per request (utime+stime from /proc). Then
# ROUNDS interleaved pairs, on the same processes, with and without a 10-rule ALLOW
# AuthorizationPolicy on the server (the client allowed by its last rule: every rule's
# principal is different), the policy added and removed live between runs and the order
# alternating (off-on, on-off, ...) so warm-up and drift fall on both sides; the medians are
# compared. Results are appended to BENCHMARKS.md.
#
#   apt-get install -y nginx wrk            # once
#   ./e2e/bench/mtls.sh                     # DURATION=10 CONNS=50 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-50}
ROUNDS=${ROUNDS:-3}
HOST=echo.default.svc.cluster.local
for tool in wrk nginx taskset curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y nginx wrk"; exit 1; }
done
cargo build --release -q -p weft-sidecar -p weft-control-plane -p weftctl

. e2e/bench/lib.sh
start_upstream 18280

# The echo Service's one endpoint is the server sidecar's inbound listener (what iptables
# would redirect to); its pod is meshed, its namespace PERMISSIVE so both runs are served.
mkdir "$work/world"
cat > "$work/world/world.yaml" <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: default, annotations: {weft.dev/mtls-mode: PERMISSIVE}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-0, namespace: default, labels: {weft.dev/tls-mode: weft}}
spec: {serviceAccountName: echo, containers: [{name: app, image: echo}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: echo, namespace: default, labels: {kubernetes.io/service-name: echo}}
addressType: IPv4
ports: [{name: http, port: 18284}]
endpoints: [{addresses: ["127.0.0.2"], targetRef: {kind: Pod, name: echo-0, namespace: default}}]
EOF
taskset -c 1 target/release/weft-control-plane --source-dir "$work/world" --ca-dir "$work/ca" \
  --xds-plaintext-addr 127.0.0.1:18290 --grpc-addr 127.0.0.1:18292 --metrics-addr 127.0.0.1:18291 \
  --log warn >/dev/null & pids+=($!)
for _ in $(seq 100); do curl -fs http://127.0.0.1:18291/ready >/dev/null 2>&1 && break; sleep 0.1; done
# Join tokens come from the admin API on the TLS port, as an operator.
target/release/weft-control-plane operator issue --ca-dir "$work/ca" --name bench --out "$work/operator.pem" >/dev/null
token() { target/release/weftctl --cp 127.0.0.1:18292 --credentials "$work/operator.pem" -o json token create --service-account "$1" | awk -F'"' '/"token"/ {print $4}'; }

# The server sidecar: an SVID (mTLS inbound), forwarding to the upstream.
WEFT_JOIN_TOKEN=$(token echo) taskset -c 0 target/release/weft-sidecar run --xds-addr 127.0.0.1:18292 \
  --trust-bundle "$work/ca/root.pem" --service-account echo --app-addr 127.0.0.1:18280 \
  --outbound-addr 127.0.0.2:18283 --inbound-addr 127.0.0.2:18284 --admin-addr 127.0.0.2:18285 \
  --no-ipv6 --log warn >/dev/null & server=$!; pids+=($server)
# Client sidecars: one without identity (plaintext to the server), one with (mTLS).
taskset -c 0 target/release/weft-sidecar run --plaintext-xds --xds-addr 127.0.0.1:18290 \
  --outbound-addr 127.0.0.3:18283 --inbound-addr 127.0.0.3:18284 --admin-addr 127.0.0.3:18285 \
  --no-ipv6 --log warn >/dev/null & plain=$!; pids+=($plain)
WEFT_JOIN_TOKEN=$(token client) taskset -c 0 target/release/weft-sidecar run --xds-addr 127.0.0.1:18292 \
  --trust-bundle "$work/ca/root.pem" --service-account client \
  --outbound-addr 127.0.0.4:18283 --inbound-addr 127.0.0.4:18284 --admin-addr 127.0.0.4:18285 \
  --no-ipv6 --log warn >/dev/null & mtls=$!; pids+=($mtls)
for a in 127.0.0.2 127.0.0.3 127.0.0.4; do
  for _ in $(seq 100); do curl -fs "http://$a:18285/ready" >/dev/null 2>&1 && break; sleep 0.1; done
done
for a in 127.0.0.3 127.0.0.4; do
  curl -fs -H "Host: $HOST" "http://$a:18283/" | grep -q upstream || { echo "client $a does not route"; exit 1; }
done

results=()
declare -A rps_of
measure() { # name client-ip client-pid
  local name=$1 ip=$2 pid=$3 b1 b2 a1 a2 out reqs rps p50 p99 cpu
  taskset -c 1 wrk -t1 -c"$CONNS" -d2s -H "Host: $HOST" "http://$ip:18283/" >/dev/null
  b1=$(ticks "$pid"); b2=$(ticks "$server")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Host: $HOST" "http://$ip:18283/")
  a1=$(ticks "$pid"); a2=$(ticks "$server")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  # Every request must have been served (a 403 or 5xx is cheaper and would flatter a run).
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$name: $(echo "$out" | grep Non-2xx); one of them:"; curl -si -H "Host: $HOST" "http://$ip:18283/" | head -12; exit 1
  fi
  rps=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  cpu=$(awk -v d=$((a1 - b1 + a2 - b2)) -v hz="$hz" -v n="$reqs" 'BEGIN {printf "%.1f", d / hz / n * 1e6}')
  rps_of[$name]=$rps
  cpu_last=$cpu
  echo "$name: $rps req/s, p50 $p50, p99 $p99, both sidecars' CPU $cpu µs/request"
  results+=("| $name | $rps | $p50 | $p99 | $cpu |")
}
measure "plaintext between sidecars" 127.0.0.3 "$plain"
measure "mTLS between sidecars" 127.0.0.4 "$mtls"
# Ten ALLOW rules (method, path, principal); the client is the last one's.
policy() {
  echo 'apiVersion: security.istio.io/v1'
  echo 'kind: AuthorizationPolicy'
  echo 'metadata: {name: bench, namespace: default}'
  echo 'spec:'
  echo '  rules:'
  for i in $(seq 0 8); do
    echo "  - {from: [{source: {principals: [cluster.local/ns/default/sa/caller-$i]}}], to: [{operation: {methods: [GET], paths: [\"/v$i/*\"]}}]}"
  done
  echo '  - {from: [{source: {principals: [cluster.local/ns/default/sa/client]}}], to: [{operation: {methods: [GET, HEAD], paths: ["/*"]}}]}'
}
has_policy() { curl -fs "http://127.0.0.2:18285/config_dump" | grep -q 'policy\[bench\]-rule\[9\]'; }
policy_on() {
  policy > "$work/world/authz.yaml.tmp" && mv "$work/world/authz.yaml.tmp" "$work/world/authz.yaml"
  for _ in $(seq 100); do has_policy && break; sleep 0.1; done
  has_policy || { echo "the policy did not arrive"; exit 1; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOST" http://127.0.0.3:18283/)" = 403 ] || { echo "a plaintext caller is not denied"; exit 1; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOST" http://127.0.0.4:18283/)" = 200 ] || { echo "the allowed mTLS caller is denied"; exit 1; }
}
policy_off() {
  rm -f "$work/world/authz.yaml"
  for _ in $(seq 100); do has_policy || break; sleep 0.1; done
  ! has_policy || { echo "the policy was not removed"; exit 1; }
}
off_cpu=(); on_cpu=()
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="off on"; else order="on off"; fi
  for side in $order; do
    if [ "$side" = on ]; then
      policy_on; measure "mTLS + 10-rule ALLOW policy (round $r)" 127.0.0.4 "$mtls"; on_cpu+=("$cpu_last")
    else
      policy_off; measure "mTLS, no policy (round $r)" 127.0.0.4 "$mtls"; off_cpu+=("$cpu_last")
    fi
  done
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
ratio=$(awk -v on="${rps_of[mTLS between sidecars]}" -v off="${rps_of[plaintext between sidecars]}" 'BEGIN {printf "%.2f", on / off}')
verdict=$(awk -v r="$ratio" 'BEGIN {print (r >= 0.85) ? "holds" : "does not hold"}')
off_median=$(median "${off_cpu[@]}"); on_median=$(median "${on_cpu[@]}")
authz=$(awk -v on="$on_median" -v off="$off_median" 'BEGIN {printf "%+.1f", (on / off - 1) * 100}')
authz_verdict=$(awk -v r="$authz" 'BEGIN {print (r <= 5) ? "holds" : "does not hold"}')
{
  echo
  echo "## mTLS on vs off between two sidecars — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)."
  echo "wrk (1 thread, $CONNS connections, ${DURATION}s) -> client sidecar -> server sidecar -> nginx upstream; both sidecars pinned to core 0, wrk and nginx on core 1. Upstream connections between the sidecars are pooled (keep-alive), TLS 1.3 with P-256 SVIDs."
  echo
  echo "Command: \`DURATION=$DURATION CONNS=$CONNS ROUNDS=$ROUNDS ./e2e/bench/mtls.sh\`"
  echo
  echo "| path | req/s | p50 | p99 | both sidecars' CPU µs/request |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  echo "mTLS on/off throughput: $ratio (goal ≥ 0.85: $verdict). CPU per request with the 10-rule ALLOW policy vs none, medians of $ROUNDS interleaved rounds ($on_median vs $off_median µs): $authz % (goal ≤ +5 %: $authz_verdict)."
} | tee -a BENCHMARKS.md
