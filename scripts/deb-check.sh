#!/usr/bin/env bash
# CI's check of the Debian package (as root): builds it from the test build
# (scripts/deb.sh --profile dev; the README's command builds the release
# one), installs it, runs the binary and a man page from it, checks the
# worker's unit, then purges it and checks nothing is left.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "error: installs a package: run as root" >&2
  exit 1
fi
need=()
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
if dpkg -s iukfarm >/dev/null 2>&1; then
  echo "error: iukfarm is already installed here; this check would remove it" >&2
  exit 1
fi

./scripts/deb.sh --profile dev
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=target/debian/iukfarm_${version}_amd64.deb
trap 'dpkg --purge iukfarm >/dev/null 2>&1 || true' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb"

/usr/bin/iukfarm --version | grep -qx "iukfarm $version"
man -P cat iukfarm-worker | grep -q "lease jobs from coordinators"
man -P cat iukfarm-udf-generate | grep -q "release-checkout"
getent passwd iukfarm >/dev/null
[ "$(stat -c %U:%G:%a /etc/iukfarm/worker.env)" = root:iukfarm:640 ]
unit=/usr/lib/systemd/system/iukfarm-worker.service
systemd-analyze verify "$unit"
# Exposure 0.0 (locked down) to 10.0; fail above 2.0.
systemd-analyze security --offline=true --threshold=20 "$unit" | tail -1

dpkg --purge iukfarm
trap - EXIT
for left in /usr/bin/iukfarm "$unit" /etc/iukfarm /usr/share/man/man1/iukfarm.1.gz; do
  if [ -e "$left" ]; then echo "error: $left left after purge" >&2; exit 1; fi
done
if getent passwd iukfarm >/dev/null; then echo "error: user iukfarm left after purge" >&2; exit 1; fi
echo "deb-check: $deb installs, runs, has its man pages and a unit of exposure <= 2.0, purges clean"
