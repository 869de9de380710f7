#!/usr/bin/env bash
# Installs the writer Tails' release managers pin for 7.x, Debian trixie's
# squashfs-tools-ng 1.3.2-1, beside this machine's own (bookworm's 1.2.0),
# without touching the system: a minimal trixie tree made by debootstrap,
# run through trixie's own loader. Cached; a second run does nothing.
#
# Prints the directory holding the wrappers (gensquashfs, rdsquashfs,
# sqfsdiff). The tests and benchmarks find it there, or through
# IUKFARM_TRIXIE_BIN.
set -euo pipefail

cache=${IUKFARM_TRIXIE_CACHE:-/var/cache/iukfarm-tests/trixie}
bin=$cache/bin
want=1.3.2

if [ -x "$bin/gensquashfs" ] && "$bin/gensquashfs" --version 2>/dev/null | grep -q " $want\$"; then
  echo "$bin"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: not root; debootstrap needs root: sudo $0" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq debootstrap >/dev/null
fi

mkdir -p "$(dirname "$cache")"
# Built beside the cache and renamed into place: an interrupted run leaves
# no half-made tree that a later run would take for a good one.
tmp=$(mktemp -d "$cache.new.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "Installing trixie's squashfs-tools-ng $want into $cache (once; about a minute)" >&2
if ! debootstrap --variant=minbase --include=squashfs-tools-ng trixie "$tmp/root" \
    http://deb.debian.org/debian >"$tmp/debootstrap.log" 2>&1; then
  tail -20 "$tmp/debootstrap.log" >&2
  echo "error: debootstrap of trixie failed (log above)" >&2
  exit 1
fi
mkdir "$tmp/bin"
for tool in gensquashfs rdsquashfs sqfsdiff; do
  cat >"$tmp/bin/$tool" <<EOF
#!/bin/sh
# trixie's $tool $want, run by trixie's loader with trixie's libraries.
R=$cache/root
exec "\$R/lib64/ld-linux-x86-64.so.2" --library-path "\$R/lib/x86_64-linux-gnu:\$R/usr/lib/x86_64-linux-gnu" "\$R/usr/bin/$tool" "\$@"
EOF
  chmod 755 "$tmp/bin/$tool"
done
rm -rf "$cache"
mv "$tmp" "$cache"
trap - EXIT
if ! "$bin/gensquashfs" --version | grep -q " $want\$"; then
  echo "error: $bin/gensquashfs is not version $want" >&2
  exit 1
fi
echo "$bin"
