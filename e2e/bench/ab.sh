#!/usr/bin/env bash
# Two sidecar builds side by side (not a test; about 20 s a round): CPU time per request of
# binary A and binary B under the same wrk load (HTTP/1.1 keep-alive, the sidecar pinned to
# core 0, wrk and the nginx upstream on core 1), interleaved A, B, A, B… so that drift of a
# shared machine falls on both. Prints one line per run; appends nothing.
#
#   cp target/release/weft-sidecar /tmp/weft-before    # before the change
#   cargo build --release -p weft-sidecar               # after it
#   ./e2e/bench/ab.sh /tmp/weft-before target/release/weft-sidecar   # ROUNDS=3 DURATION=5
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 2 ] || { echo "usage: $0 SIDECAR_A SIDECAR_B"; exit 2; }
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
a=$(realpath "$1") b=$(realpath "$2")

run() { # binary
  (
    . e2e/bench/lib.sh
    need "apt-get install -y nginx wrk curl" wrk nginx taskset curl
    start_upstream 18080
    WEFT_SIDECAR=$1 start_weft 18000
    taskset -c 1 wrk -t1 -c50 -d2s -H "Host: $HOST" http://127.0.0.1:18083/ >/dev/null
    local t0 t1 out reqs
    t0=$(ticks "$weft")
    out=$(taskset -c 1 wrk -t1 -c50 -d"${DURATION}s" -H "Host: $HOST" http://127.0.0.1:18083/)
    t1=$(ticks "$weft")
    echo "$out" | grep -q Non-2xx && { echo "$1: non-2xx responses; not a valid run"; exit 1; }
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    awk -v r="$reqs" -v t=$((t1 - t0)) -v hz="$hz" -v d="$DURATION" -v n="$1" \
      'BEGIN {printf "%s: %.0f req/s, %.1f µs CPU/request\n", n, r / d, t / hz / r * 1e6}'
  )
}
for _ in $(seq "$ROUNDS"); do
  run "$a"
  run "$b"
done
