#!/usr/bin/env bash
# Builds the Debian package for the builders, target/debian/iukfarm_<version>_amd64.deb:
# the binary, a man page per command and shell completions (written from the
# clap definitions by `iukfarm package-assets`), the worker's hardened systemd
# unit, its settings in /etc/iukfarm/worker.env and its system user.
# Installs cargo-deb when missing.
#
# usage: scripts/deb.sh [--profile PROFILE]   (default release; CI packages its dev build)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --profile ]; then profile=${2:?--profile needs a name}; fi
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb@3.8.0
# The dev build (CI's) is the test build of the whole workspace: building
# it the same way reuses it instead of compiling dependencies again.
if [ "$profile" = dev ]; then
  cargo build --locked --workspace
else
  cargo build --locked --profile "$profile" -p iukfarm
fi
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
dir=$profile; [ "$profile" = dev ] && dir=debug
rm -rf dist/generated
"$target/$dir/iukfarm" package-assets dist/generated
cargo deb -p iukfarm --no-build --locked --profile "$profile" --output target/debian/
