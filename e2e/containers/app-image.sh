#!/usr/bin/env bash
# The containers scenario's application image (not Weft's): the host's python3 with its standard
# library, curl (the unmodified client), and app.py — made from the host's files, as
# scripts/images.sh makes Weft's, since no registry serves base images here.
#
#   ./e2e/containers/app-image.sh REF     # e.g. localhost/weft-e2e/app:1
set -euo pipefail
ref=${1:?usage: app-image.sh REF}
here=$(cd "$(dirname "$0")" && pwd)
py=$(readlink -f /usr/bin/python3)
pyver=$(basename "$py")
root=$(mktemp -d)
ctr=""
cleanup() { [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1; rm -rf "$root"; }
trap cleanup EXIT
copy() { # FILE...: each file and the shared libraries it loads
  local f lib
  for f in "$@"; do
    mkdir -p "$root$(dirname "$f")"; cp -L "$f" "$root$f"
    for lib in $(ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}'); do
      [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
    done
  done
}
copy "$py" /usr/bin/curl
ln -s "$pyver" "$root/usr/bin/python3"
mkdir -p "$root/usr/lib"
cp -a "/usr/lib/$pyver" "$root/usr/lib/"
rm -rf "$root/usr/lib/$pyver"/{test,idlelib,tkinter,ensurepip,lib2to3,pydoc_data,dist-packages,site-packages}
for so in "$root/usr/lib/$pyver"/lib-dynload/*.so; do copy "${so#"$root"}" 2>/dev/null || true; done
install -D -m 0755 "$here/app.py" "$root/app/app.py"
mkdir -p "$root/tmp" "$root/etc"; chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/:/nonexistent\n' > "$root/etc/passwd"
ctr=$(buildah from scratch)
buildah copy --quiet "$ctr" "$root/" / >/dev/null
buildah config --entrypoint '["/usr/bin/python3", "/app/app.py"]' --label org.opencontainers.image.title=weft-e2e-app "$ctr"
buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
ctr=""
echo "$ref"
