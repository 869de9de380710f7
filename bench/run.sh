#!/bin/bash
# The release benchmark in one command (root: debootstrap, chroot, and the
# Tails method's loop mounts):
#
#   sudo bench/run.sh            # results in target/release-bench-7.txt (TAILS=6: -6)
#
# Builds the corpus once (bench/make-corpus.sh: four Debian bookworm systems
# from the Debian mirror, evolving like point releases, as Tails-like ISOs in
# target/bench-corpus-7; ~30 min, mostly mksquashfs), then runs release-bench.
# TAILS=7 (the default): zstd system images as Tails 7 makes them, iukfarm
# writes gensquashfs 1.3.2's bytes and the Tails method runs trixie's
# gensquashfs 1.3.2-1 (scripts/trixie-sqfs-tools.sh); the corpus is
# target/bench-corpus-7. TAILS=6: xz images, gensquashfs 1.2.0 of this
# machine, target/bench-corpus. CORPUS=DIR uses (or builds) another corpus
# directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export TAILS=${TAILS:-7}
case $TAILS in
    7) corpus=${CORPUS:-target/bench-corpus-7}; gensquashfs_version=1.3.2 ;;
    6) corpus=${CORPUS:-target/bench-corpus}; gensquashfs_version=1.2.0 ;;
    *) echo "run.sh: TAILS is 6 or 7" >&2; exit 2 ;;
esac

need=()
for pair in debootstrap:debootstrap mksquashfs:squashfs-tools xorriso:xorriso \
    gensquashfs:squashfs-tools-ng rsync:rsync gpg:gnupg; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q "${need[@]}"
fi

bash bench/make-corpus.sh --clean-roots "$corpus"
if [ "$TAILS" = 7 ]; then
    GENSQUASHFS=$(./scripts/trixie-sqfs-tools.sh)/gensquashfs
else
    GENSQUASHFS=$(command -v gensquashfs)
fi
export GENSQUASHFS
cargo build --release -p iukfarm -p iukfarm-bench
exec target/release/release-bench --corpus "$corpus" --gensquashfs "$gensquashfs_version" \
    --out "target/release-bench-$TAILS.txt" "$@"
