#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what it needs (idempotent), then
# checks formatting and lints, builds once, and runs every test with cargo-nextest.
#
#   ./scripts/test.sh
#
# As root it installs the Debian packages the network tests use (iptables, iproute2). Not as
# root it installs nothing system-wide, says so, and the tests that need root skip with a
# printed reason. The Python venv for third-party interop clients (grpcio) and the offline
# Kubernetes schema checker (kubernetes-validate) lives in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# No incremental artifacts: a fresh CI checkout builds once, and they doubled target/ (1.4 GB),
# enough to fill a small CI disk.
export CARGO_INCREMENTAL=0

say() { printf '\n== %s\n' "$*"; }

say "system packages (iptables, iproute2)"
need=()
for pkg in iptables iproute2 python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "already installed"
elif [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  updated=1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  echo "installed: ${need[*]}"
else
  echo "not root: NOT installing ${need[*]}; tests that need them (network namespaces, iptables) skip and say why"
fi

say "container tools (podman, buildah, runc: the mesh-in-containers test)"
need=()
for pkg in podman buildah runc binutils; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  echo "already installed"
elif [ "$(id -u)" -eq 0 ]; then
  # Not fatal: without them the containers test skips and says why.
  [ -n "${updated:-}" ] || apt-get update -qq || true
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; then
    echo "installed: ${need[*]}"
  else
    echo "could not install ${need[*]}: the containers test skips"
  fi
else
  echo "not root: NOT installing ${need[*]}; the containers test skips and says why"
fi

say "Python venv for interop clients and schema checks (.venv)"
if .venv/bin/python -c 'import grpc' >/dev/null 2>&1 && [ -x .venv/bin/kubernetes-validate ]; then
  echo "already set up"
else
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r e2e/interop/requirements.txt
  echo "installed: $(tr '\n' ' ' < e2e/interop/requirements.txt)"
fi

say "cargo-nextest"
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi
cargo nextest --version

say "cargo deny (licenses, bans, sources; advisories when the RustSec database is reachable)"
if ! cargo deny --version >/dev/null 2>&1; then
  cargo install cargo-deny --locked
fi
cargo deny --version
cargo deny --locked check --hide-inclusion-graph licenses bans sources
if fetch_err=$(cargo deny fetch db 2>&1); then
  cargo deny --locked check --hide-inclusion-graph advisories
else
  echo "SKIPPED advisories: the RustSec advisory database cannot be fetched here ($(printf '%s' "$fetch_err" | grep -m1 -iE 'fatal|error' || echo 'fetch failed'))"
fi

say "cargo fmt --check"
cargo fmt --all -- --check

say "module graph: no cycle among the sidecar's modules (scripts/module-cycles.py)"
python3 scripts/module-cycles.py --self-test
python3 scripts/module-cycles.py sidecar/src

say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

say "build (one debug build shared by every test; the e2e tests run the real binaries)"
cargo build --workspace --bins --locked

say "tests"
cargo nextest run --workspace --locked --no-fail-fast
