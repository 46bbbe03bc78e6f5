#!/usr/bin/env bash
# Builds Weft's container images offline, without pulling a base image: each image is the
# release binary (stripped), the shared libraries `ldd` says it loads, a passwd/group naming its
# non-root user, and nothing else: no shell, no package manager. The sidecar image also carries
# iptables (nft and legacy, with their extensions) for `weft-sidecar init`, the step that
# installs the interception rules in a pod.
#
#   apt-get install -y buildah podman runc        # once
#   ./scripts/images.sh                           # TAG=<workspace version> OUT=target/images
#
# Produces, in local container storage and as OCI archives a cluster can import
# (`ctr -n k8s.io images import`, `kind load image-archive`, `podman load`):
#   localhost/weft/weft-control-plane:TAG OUT/weft-control-plane-TAG.oci.tar   (user 65532)
#   localhost/weft/weft-injector:TAG OUT/weft-injector-TAG.oci.tar        (user 65532)
#   localhost/weft/weft-sidecar:TAG OUT/weft-sidecar-TAG.oci.tar         (user 1337, the UID
#                                     the interception rules exempt)
# `weftctl install --registry localhost/weft --tag TAG` names them. SKIP_BUILD=1 uses the
# binaries already in BIN_DIR (default target/release; the containers test packs its debug
# build with BIN_DIR=target/debug). The Containerfile at the repository root builds
# the same images with a normal toolchain and registry access.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(awk -F'"' '/^version *=/ {print $2; exit}' Cargo.toml)
TAG=${TAG:-$version}
OUT=${OUT:-target/images}
REGISTRY=${REGISTRY:-localhost/weft}
BIN_DIR=${BIN_DIR:-target/release}
COMPONENTS=${COMPONENTS:-control-plane injector sidecar}
want() { [[ " $COMPONENTS " == *" $1 "* ]]; }
for tool in buildah podman ldd strip; do
  command -v "$tool" >/dev/null || { echo "images.sh: $tool is missing (apt-get install -y buildah podman runc binutils)"; exit 1; }
done
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p weft-control-plane -p weft-sidecar -p weft-injector
fi
mkdir -p "$OUT"
work=$(mktemp -d)
ctrs=()
cleanup() {
  for c in "${ctrs[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# add_with_libs ROOT FILE...: copies each FILE (keeping its path) and every shared library it
# loads (and the loader) into ROOT.
add_with_libs() {
  local root=$1 f lib
  shift
  for f in "$@"; do
    mkdir -p "$root$(dirname "$f")"
    cp -L "$f" "$root$f"
    for lib in $(ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}'); do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

# rootfs NAME BINARY UID: the image's root filesystem in $work/NAME.
rootfs() {
  local name=$1 bin=$2 uid=$3 root="$work/$1"
  mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/run"
  chmod 1777 "$root/tmp"
  strip -o "$root/usr/local/bin/$bin" "$BIN_DIR/$bin"
  for lib in $(ldd "$BIN_DIR/$bin" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  printf 'root:x:0:0:root:/:/nonexistent\nweft:x:%s:%s:weft:/:/nonexistent\n' "$uid" "$uid" > "$root/etc/passwd"
  printf 'root:x:0:\nweft:x:%s:\n' "$uid" > "$root/etc/group"
  echo "$root"
}

# image NAME BINARY UID ROOT DESCRIPTION: commits ROOT as REGISTRY/NAME:TAG and saves the archive.
image() {
  local name=$1 bin=$2 uid=$3 root=$4 description=$5 ctr ref archive
  ref="$REGISTRY/weft-$name:$TAG"
  ctr=$(buildah from scratch); ctrs+=("$ctr")
  buildah copy --quiet "$ctr" "$root/" / >/dev/null
  buildah config \
    --entrypoint "[\"/usr/local/bin/$bin\"]" --cmd '' --user "$uid:$uid" --workingdir / \
    --label "org.opencontainers.image.title=weft-$name" \
    --label "org.opencontainers.image.description=$description" \
    --label "org.opencontainers.image.version=$TAG" \
    --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    --label "org.opencontainers.image.source=https://github.com/weft-mesh/weft" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
  ctrs=("${ctrs[@]/$ctr}")
  archive="$OUT/weft-$name-$TAG.oci.tar"
  rm -f "$archive"
  podman save --quiet --format oci-archive -o "$archive" "$ref"
  printf '%-36s %6s MB image, %6s MB archive\n' "$ref" \
    "$(podman image inspect --format '{{.Size}}' "$ref" | awk '{printf "%.1f", $1 / 1e6}')" \
    "$(stat -c %s "$archive" | awk '{printf "%.1f", $1 / 1e6}')"
}

if want control-plane; then
  root=$(rootfs control-plane weft-control-plane 65532)
  image control-plane weft-control-plane 65532 "$root" "Weft control plane: service discovery, federation, xDS, mTLS identities"
fi
if want injector; then
  root=$(rootfs injector weft-injector 65532)
  image injector weft-injector 65532 "$root" "Weft admission webhook: injects the sidecar"
fi
want sidecar || exit 0
root=$(rootfs sidecar weft-sidecar 1337)
# iptables for `weft-sidecar init` (nft first, legacy as the fallback init.rs tries).
add_with_libs "$root" /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi
for x in /usr/lib/x86_64-linux-gnu/xtables/*.so; do add_with_libs "$root" "$x"; done
for n in iptables ip6tables; do
  for v in "" -save -restore; do
    ln -sf xtables-nft-multi "$root/usr/sbin/$n$v"
    ln -sf xtables-nft-multi "$root/usr/sbin/$n-nft$v"
    ln -sf xtables-legacy-multi "$root/usr/sbin/$n-legacy$v"
  done
done
image sidecar weft-sidecar 1337 "$root" "Weft sidecar proxy (and its init step: iptables interception rules)"
