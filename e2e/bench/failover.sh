#!/usr/bin/env bash
# Cross-cluster failover figures: runs the three-cluster network-namespace suite
# (e2e/tests/multicluster.rs: the same scenarios and assertions as the test command) and appends
# what it measured to BENCHMARKS.md. Needs root; debug build like the tests.
#
#   ./e2e/bench/failover.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" -eq 0 ] || { echo "failover.sh needs root (network namespaces)"; exit 1; }
cargo build -q --workspace --bins
out=$(mktemp)
trap 'rm -f "$out"' EXIT
WEFT_E2E_FIGURES="$out" cargo nextest run -p weft-e2e --test suite -E "test(/^multicluster::/)" --no-fail-fast >/dev/null
[ -s "$out" ] || { echo "the suite wrote no figures (did it skip?)"; exit 1; }
{
  echo
  echo "## Cross-cluster failover, three clusters in network namespaces — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)). Command: \`./e2e/bench/failover.sh\` (runs \`e2e/tests/multicluster.rs\`; part of \`./e2e/bench/run.sh\`). Client: one Python \`http.client\` request at a time at 50 req/s (100 for the split), intercepted by its sidecar; distances are simulated in the echo apps (ARCHITECTURE.md). Goal (issue 13): failover within 5 s, no failed idempotent request, ≥ 80 % of spilled traffic to the nearer cluster."
  echo
  cat "$out"
} | tee -a BENCHMARKS.md
