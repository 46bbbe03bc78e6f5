#!/usr/bin/env bash
# The benchmark suite — the README's benchmark command, not part of the test command. On a
# fresh Debian machine it installs its peers (haproxy, nginx, wrk, h2load from apt; oha from crates.io;
# matplotlib in .venv for the plot; h2load from nghttp2-client), builds release binaries once, then runs side by side on
# loopback and appends every result to BENCHMARKS.md:
#   1. proxies.sh  — throughput and CPU per request: direct vs Weft vs haproxy vs nginx;
#   2. latency.sh  — added latency at 1k and 5k req/s (coordinated omission corrected), CPU
#                    per 1000 req/s, sidecar RSS idle / under load / with 10k endpoints, plot;
#   3. h2.sh       — HTTP/2 clients (h2load) through Weft, haproxy and nginx;
#   4. mtls.sh     — two sidecars, plaintext vs mTLS between them;
#   5. csr_sign    — CSRs signed per second on one core;
#   6. micro       — criterion: balancer pick (10..10 000 endpoints), route matching, translator;
#   7. failover.sh — three clusters in network namespaces: failover time, requests lost.
# About 9 minutes on 2 cores once the release build and oha exist (each is a few minutes once).
#
#   ./e2e/bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { printf '\n== %s\n' "$*"; }

say "peers"
need=()
for pkg in haproxy nginx wrk nghttp2-client python3-venv; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "run as root to install ${need[*]}"; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v oha >/dev/null || cargo install oha --locked
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install --quiet matplotlib
systemctl stop nginx haproxy 2>/dev/null || true   # the packages' own services, if they started

say "release build"
cargo build --release -q -p weft-sidecar -p weft-control-plane -p weftctl

say "1/7 proxies";  ./e2e/bench/proxies.sh
say "2/7 latency";  ./e2e/bench/latency.sh
say "3/7 HTTP/2";   ./e2e/bench/h2.sh
say "4/7 mTLS";     ./e2e/bench/mtls.sh
say "5/7 CSR signing"
taskset -c 0 cargo bench -q -p weft-e2e --bench csr_sign -- --count 5000 --append
say "6/7 micro-benchmarks"
rm -rf target/criterion
cargo bench -q -p weft-e2e --bench micro -- --warm-up-time 0.5 --measurement-time 1 >/dev/null
{
  echo
  echo "## Micro-benchmarks (criterion) — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Machine: $(nproc) cores ($(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs)). Command: \`cargo bench -p weft-e2e --bench micro\` (part of \`./e2e/bench/run.sh\`)."
  echo
  python3 e2e/bench/micro_table.py target/criterion
} | tee -a BENCHMARKS.md
say "7/7 cross-cluster failover"; ./e2e/bench/failover.sh
