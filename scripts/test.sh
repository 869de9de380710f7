#!/usr/bin/env bash
# Runs the whole test suite. Installs the reference tools the tests compare
# against (with apt-get, when missing; trixie's squashfs-tools-ng 1.3.2,
# which Tails 7 pins, beside bookworm's 1.2.0 with debootstrap, once), then
# runs `cargo test --workspace`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A tools=(
  [gensquashfs]=squashfs-tools-ng
  [rdsquashfs]=squashfs-tools-ng
  [sqfsdiff]=squashfs-tools-ng
  [mksquashfs]=squashfs-tools
  [unsquashfs]=squashfs-tools
  [xorriso]=xorriso
  [setfattr]=attr
  [rsync]=rsync
  [bsdtar]=libarchive-tools
  [gpg]=gnupg
  [sqv]=sqv
  [sqop]=sqop
  [ip]=iproute2
  [tc]=iproute2
  [nft]=nftables
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [pkill]=procps
  [debootstrap]=debootstrap
  [jenkins-jobs]=jenkins-job-builder
  [prometheus]=prometheus
  [promtool]=prometheus
)
missing=()
for t in "${!tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("${tools[$t]}")
done
# Perl modules the reference tails-create-iuk pipeline uses, as Tails does.
perl -MDevice::Cdio::ISO9660::IFS -e 1 2>/dev/null || missing+=(libdevice-cdio-perl)
perl -MYAML::XS -e 1 2>/dev/null || missing+=(libyaml-libyaml-perl)
# The publish test's rsync server.
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "Installing reference tools: $pkgs"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: not root; install them first: apt-get install $pkgs" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq $pkgs >/dev/null
fi

# The build and the tests' sample releases need room; a full disk would
# fail tests one by one with ENOSPC instead of saying so once.
need_gib=4
for dir in "${CARGO_TARGET_DIR:-target}" "${TMPDIR:-/tmp}"; do
  mkdir -p "$dir"
  free=$(df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free" -lt "$need_gib" ]; then
    echo "error: only ${free} GiB free for $dir; the tests need ${need_gib} GiB there (free some space, or point CARGO_TARGET_DIR or TMPDIR elsewhere)" >&2
    exit 1
  fi
done

IUKFARM_TRIXIE_BIN=$(./scripts/trixie-sqfs-tools.sh)
export IUKFARM_TRIXIE_BIN

exec cargo test --workspace --no-fail-fast "$@"
