#!/usr/bin/env bash
# Sidecar memory (not a test; under a minute): the Weft sidecar's RSS with one Service in its
# config (idle), then with SERVICES Services of ENDPOINTS endpoints each (default 1 000 × 10 =
# 10 000 endpoints), both from the file source through a real control plane over ADS. The
# endpoint addresses are on 198.18.0.0/15 and are never contacted (no traffic is sent). Results
# are appended to BENCHMARKS.md.
#
#   ./e2e/bench/rss.sh            # SERVICES=1000 ENDPOINTS=10 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVICES=${SERVICES:-1000}
ENDPOINTS=${ENDPOINTS:-10}
# This measures a sidecar holding the whole mesh (on demand it would hold only what it calls:
# see on_demand.sh).
export WEFT_DISCOVERY=all
. e2e/bench/lib.sh
need "apt-get install -y nginx curl" nginx curl python3

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# split PID: "anonymous/file" KiB (heap and stacks vs the binary's mapped pages).
split_kib() { awk '/RssAnon/ {a=$2} /RssFile/ {f=$2} END {print a "/" f}' "/proc/$1/status"; }
mib() { echo "$(($1 / 1024)).$(( ($1 % 1024) * 10 / 1024 ))"; }
# held PORT: how many clusters the sidecar on admin PORT holds, from its weft_xds_resources
# gauge (cheap: /clusters renders every endpoint, megabytes at this size, which would grow the
# very memory being measured).
held() {
  curl -fs "http://127.0.0.1:$1/metrics" | awk '/^weft_xds_resources\{type="cluster"\}/ {print $2; f=1} END {if (!f) print 0}'
}
# clusters PORT: how many clusters the sidecar's /clusters lists (the check after measuring).
clusters() {
  curl -fs "http://127.0.0.1:$1/clusters" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))'
}

start_upstream 18080
start_weft 18000
sleep 2
idle=$(rss_kib "$weft")
idle_split=$(split_kib "$weft")
idle_clusters=$(clusters 18085)

# The big world, written next to the small one: the control plane's file source picks it up
# (100 Services a file: a file holds at most 1 024 documents).
python3 - "$work/world" "$SERVICES" "$ENDPOINTS" <<'PY'
import sys
folder, services, endpoints = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
docs = []
for i in range(services):
    addrs = []
    for j in range(endpoints):
        n = i * endpoints + j + 1
        addrs.append(f'{{addresses: ["198.{18 + n // 65536}.{n // 256 % 256}.{n % 256}"]}}')
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: default}}
spec: {{ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc-{i}, namespace: default, labels: {{kubernetes.io/service-name: svc-{i}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{", ".join(addrs)}]""")
for k in range(0, len(docs), 100):
    with open(f"{folder}/big-{k // 100}.yaml", "w") as f:
        f.write("\n---\n".join(docs[k:k + 100]) + "\n")
PY
want=$((SERVICES + idle_clusters))
for _ in $(seq 300); do
  [ "$(held 18085)" -ge "$want" ] && break
  sleep 0.2
done
sleep 2
loaded=$(rss_kib "$weft")
loaded_split=$(split_kib "$weft")
got=$(clusters 18085)
[ "$got" -ge "$want" ] || { echo "the sidecar holds $got clusters, not $want"; exit 1; }

{
  echo
  echo "## Sidecar memory — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`SERVICES=$SERVICES ENDPOINTS=$ENDPOINTS ./e2e/bench/rss.sh\`"
  echo
  echo "| config | clusters | sidecar RSS | anonymous / file-backed |"
  echo "|---|---|---|---|"
  echo "| idle: one Service, one endpoint | $idle_clusters | $(mib "$idle") MiB | $(mib "${idle_split%/*}") / $(mib "${idle_split#*/}") MiB |"
  echo "| $SERVICES Services × $ENDPOINTS endpoints ($((SERVICES * ENDPOINTS)) endpoints) | $got | $(mib "$loaded") MiB | $(mib "${loaded_split%/*}") / $(mib "${loaded_split#*/}") MiB |"
} | tee -a BENCHMARKS.md
