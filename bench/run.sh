#!/bin/bash
# The release benchmark in one command (root: debootstrap, chroot, and the
# Tails method's loop mounts):
#
#   sudo bench/run.sh            # results in target/release-bench.txt
#
# Builds the corpus once (bench/make-corpus.sh: four Debian bookworm systems
# from the Debian mirror, evolving like point releases, as Tails-like ISOs in
# target/bench-corpus; ~30 min, mostly mksquashfs), then runs release-bench.
# CORPUS=DIR uses (or builds) another corpus directory.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${CORPUS:-target/bench-corpus}

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
cargo build --release -p iukfarm -p iukfarm-bench
exec target/release/release-bench --corpus "$corpus" --out target/release-bench.txt "$@"
