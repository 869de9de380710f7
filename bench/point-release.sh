#!/bin/bash
# Point-release benchmark (issue 12, item 4), as root (the Tails method's
# loop mounts):
#
#   sudo bench/point-release.sh [MIB]        # results in target/point-release-bench.txt
#
# Makes a pair of Tails-like ISOs from this machine's /usr/share (MIB of
# files, default 600: ~46,000 files, a ~200 MiB system image made by
# mksquashfs with Tails' options), the new one with 131 files changed
# (appended to, spread through the tree like package upgrades), then builds
# the IUK with the Tails method and with `iukfarm build`, side by side, and
# prints both times, the ratio, whether the bytes are the same, and where
# iukfarm's time went.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-600}
out=target/point-release-bench.txt
for t in mksquashfs xorriso gensquashfs rsync bsdtar; do
    command -v "$t" >/dev/null || { echo "point-release.sh: $t is missing (scripts/test.sh installs the reference tools)" >&2; exit 2; }
done
cargo build --release -q -p iukfarm
work=$(mktemp -d /var/tmp/point-release.XXXXXX)
trap 'rm -rf "$work"' EXIT
python3 - "$work/old" "$mib" <<'PY'
import os, shutil, sys
dst_root, budget = sys.argv[1], int(sys.argv[2]) << 20
copied = files = 0
def walk(src, dst):
    global copied, files
    try:
        names = sorted(os.listdir(src))
    except OSError:
        return
    for n in names:
        if copied >= budget:
            return
        p, t = os.path.join(src, n), os.path.join(dst, n)
        if os.path.islink(p):
            try:
                os.symlink(os.readlink(p), t)
            except OSError:
                pass
        elif os.path.isdir(p):
            os.makedirs(t, exist_ok=True)
            walk(p, t)
        elif os.path.isfile(p) and os.path.getsize(p) <= 64 << 20:
            try:
                shutil.copy2(p, t)
                copied += os.path.getsize(p)
                files += 1
            except OSError:
                pass
os.makedirs(dst_root + "/usr/share", exist_ok=True)
walk("/usr/share", dst_root + "/usr/share")
print(f"system: {files} files, {copied >> 20} MiB", file=sys.stderr)
PY
cp -a "$work/old" "$work/new"
find "$work/new" -type f | LC_ALL=C sort | awk 'NR % 240 == 7 && ++n <= 131' |
    while read -r f; do printf '\nupdated by a point release\n' >> "$f"; done
for v in old new; do
    cd_dir=$work/cd-$v
    mkdir -p "$cd_dir/live" "$cd_dir/EFI/BOOT" "$cd_dir/isolinux" "$cd_dir/utils/linux"
    echo "kernel $v" > "$cd_dir/live/vmlinuz"
    echo efi > "$cd_dir/EFI/BOOT/bootx64.efi"
    printf 'kernel /live/vmlinuz\n' > "$cd_dir/isolinux/isolinux.cfg"
    : > "$cd_dir/utils/linux/syslinux"
    mksquashfs "$work/$v" "$cd_dir/live/filesystem.squashfs" -noappend -no-progress -quiet \
        -comp xz -Xbcj x86 -b 1M -Xdict-size 1M
    xorriso -as mkisofs -quiet -R -r -J -o "$work/$v.iso" "$cd_dir" 2>/dev/null
    rm -rf "$cd_dir" "${work:?}/$v"
done
export SOURCE_DATE_EPOCH=1730285444
/usr/bin/time -o "$work/tails.time" -f "%e %U %S" bash tests/reference/tails-create-iuk.sh \
    "$work/old.iso" "$work/new.iso" 1.1.squashfs "$work/tails.iuk" >/dev/null 2>&1
/usr/bin/time -o "$work/ours.time" -f "%e %U %S" target/release/iukfarm build \
    --old-iso "$work/old.iso" --new-iso "$work/new.iso" --old-version 1.0 --new-version 1.1 \
    --out "$work/ours.iuk" 2>"$work/ours.log"
read -r tw tu ts < "$work/tails.time"
read -r ow ou os < "$work/ours.time"
same=no
[ "$(sha256sum < "$work/tails.iuk")" = "$(sha256sum < "$work/ours.iuk")" ] && same=yes
{
    echo "point release: $(du -m "$work/new.iso" | cut -f1) MiB ISO, 131 files changed, IUK $(stat -c %s "$work/ours.iuk") bytes; $(nproc) cores"
    printf '%-14s %8s %8s\n' "" "wall s" "CPU s"
    awk -v tw="$tw" -v tc="$tu+$ts" -v ow="$ow" -v oc="$ou+$os" 'BEGIN {
        split(tc, a, "+"); split(oc, b, "+")
        printf "%-14s %8.1f %8.1f\n", "Tails method", tw, a[1] + a[2]
        printf "%-14s %8.1f %8.1f\n", "iukfarm build", ow, b[1] + b[2]
        printf "iukfarm build %.1fx faster than the Tails method; ", tw / ow }'
    echo "same bytes: $same"
    grep '^time:' "$work/ours.log"
} | tee "$out"
[ "$same" = yes ]
