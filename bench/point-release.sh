#!/bin/bash
# Point-release benchmark (issue 12, item 4), as root (the Tails method's
# loop mounts):
#
#   sudo bench/point-release.sh [MIB [CHANGED [RELEASES]]]   # results in target/point-release-bench.txt
#
# TAILS=7 (the default) makes Tails 7's system images (zstd level 22, 1 MiB
# blocks, no export table) and compares with the Tails method run with
# trixie's gensquashfs 1.3.2 (scripts/trixie-sqfs-tools.sh); TAILS=6 makes
# Tails 6's (xz, x86 filter) and uses this machine's gensquashfs 1.2.0.
#
# Makes Tails-like ISOs from this machine's /usr/share, then /usr/lib and
# /usr/bin (MIB of files, default 600: ~46,000 files, a ~160 MiB system
# image made by mksquashfs with Tails' options; 3000 gives a ~1 GiB image):
# 1.0, then 1.1 and 1.2, each with CHANGED files changed (default 131;
# appended to, spread evenly through the tree like package upgrades).
# Builds the IUK 1.0 -> 1.1 with the Tails method and with `iukfarm build`,
# side by side: without a cache, with a cold block cache, and with both
# images' tail digests kept; then 1.1 -> 1.2, the next release's IUK with
# its old image's digests kept. RELEASES=2 stops at 1.1 (mksquashfs takes
# some 20 minutes per 1 GiB image on 2 cores). Prints times, ratios,
# whether the bytes are the same, and where iukfarm's time went; fails when
# any bytes differ.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-600}
changed=${2:-131}
releases=${3:-3}
tails_major=${TAILS:-7}
case $tails_major in
    7) comp=(-comp zstd -Xcompression-level 22 -no-exports)
       gensquashfs_version=1.3.2
       GENSQUASHFS=$(./scripts/trixie-sqfs-tools.sh)/gensquashfs ;;
    6) comp=(-comp xz -Xbcj x86 -Xdict-size 1M)
       gensquashfs_version=1.2.0
       GENSQUASHFS=gensquashfs ;;
    *) echo "point-release.sh: TAILS is 6 or 7" >&2; exit 2 ;;
esac
export GENSQUASHFS
case $releases in 2) versions="old new" ;; 3) versions="old new next" ;; *)
    echo "point-release.sh: RELEASES is 2 or 3" >&2; exit 2 ;; esac
out=target/point-release-bench.txt
for t in mksquashfs xorriso gensquashfs rsync bsdtar; do
    command -v "$t" >/dev/null || { echo "point-release.sh: $t is missing (scripts/test.sh installs the reference tools)" >&2; exit 2; }
done
cargo build --release -q -p iukfarm
work=$(mktemp -d /var/tmp/point-release.XXXXXX)
trap 'rm -rf "$work"' EXIT
system=$(python3 - "$work/old" "$mib" <<'PY'
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
for d in ("share", "lib", "bin"):
    os.makedirs(f"{dst_root}/usr/{d}", exist_ok=True)
    walk(f"/usr/{d}", f"{dst_root}/usr/{d}")
print(f"{files} files, {copied >> 20} MiB")
PY
)
total=$(find "$work/old" -type f | wc -l)
stride=$((total / changed))
[ "$stride" -ge 2 ] || { echo "point-release.sh: $total files are too few to change $changed" >&2; exit 2; }
cp -a "$work/old" "$work/new"
find "$work/new" -type f | LC_ALL=C sort |
    awk -v s="$stride" -v c="$changed" 'NR % s == 7 % s && ++n <= c' |
    while read -r f; do printf '\nupdated by a point release\n' >> "$f"; done
# The point release after it: as many other files.
if [ "$releases" = 3 ]; then
    cp -a "$work/new" "$work/next"
    find "$work/next" -type f | LC_ALL=C sort |
        awk -v s="$stride" -v c="$changed" 'NR % s == (s / 2 + 7) % s && ++n <= c' |
        while read -r f; do printf '\nupdated by the next point release\n' >> "$f"; done
fi
for v in $versions; do
    cd_dir=$work/cd-$v
    mkdir -p "$cd_dir/live" "$cd_dir/EFI/BOOT" "$cd_dir/isolinux" "$cd_dir/utils/linux"
    echo "kernel $v" > "$cd_dir/live/vmlinuz"
    echo efi > "$cd_dir/EFI/BOOT/bootx64.efi"
    printf 'kernel /live/vmlinuz\n' > "$cd_dir/isolinux/isolinux.cfg"
    : > "$cd_dir/utils/linux/syslinux"
    mksquashfs "$work/$v" "$cd_dir/live/filesystem.squashfs" -noappend -no-progress -quiet \
        -b 1M "${comp[@]}"
    if [ "$v" = new ]; then image_mib=$(($(stat -c %s "$cd_dir/live/filesystem.squashfs") >> 20)); fi
    SOURCE_DATE_EPOCH=1729075844 xorriso -as mkisofs -quiet -R -r -J -o "$work/$v.iso" "$cd_dir" 2>/dev/null
    rm -rf "$cd_dir" "${work:?}/$v"
done
export SOURCE_DATE_EPOCH=1730285444
tails() { # old new name
    /usr/bin/time -o "$work/$3.time" -f "%e %U %S" bash tests/reference/tails-create-iuk.sh \
        "$work/$1.iso" "$work/$2.iso" 1.1.squashfs "$work/$3.iuk" >/dev/null 2>&1
}
ours() { # old new name [build options]
    local old=$1 new=$2 name=$3
    shift 3
    /usr/bin/time -o "$work/$name.time" -f "%e %U %S" target/release/iukfarm build \
        --old-iso "$work/$old.iso" --new-iso "$work/$new.iso" --squashfs-diff-name 1.1.squashfs \
        --out "$work/$name.iuk" --gensquashfs "$gensquashfs_version" "$@" 2>"$work/$name.log"
}
tails old new tails-1
[ "$releases" = 2 ] || tails new next tails-2
# Without a cache: fragment blocks stored alike in both images are not
# decompressed, every other one is.
ours old new plain
# With a block cache: the other tails are compared by digest and the
# digests kept.
cache=$work/cache
ours old new cold --block-cache "$cache"
# Both images known, as for every later IUK of a release on a worker that
# kept the digests of earlier releases.
ours old new warm --block-cache "$cache"
# The next point release's IUK from this one: its old image is known (it
# was the new image above), its new image is not.
[ "$releases" = 2 ] || ours new next next --block-cache "$cache"
# The fast profile (not the Tails bytes): copies the new image's stored
# blocks where they are xz with the kit's settings (Tails 6), else
# compresses like the tails profile but stores incompressible blocks as is.
ours old new fast --profile fast
{
    echo "point release (Tails $tails_major images, gensquashfs $gensquashfs_version): system of $system, $image_mib MiB image in a $(du -m "$work/new.iso" | cut -f1) MiB ISO, $changed files changed, IUK $(stat -c %s "$work/plain.iuk") bytes; $(nproc) cores"
    printf '%-44s %8s %8s %8s %s\n' "" "wall s" "CPU s" "ratio" "same bytes"
    row() { # label time-file tails-time-file iuk tails-iuk
        read -r w u s < "$work/$2.time"
        read -r tw _ < "$work/$3.time"
        same=no
        [ "$(sha256sum < "$work/$4.iuk")" = "$(sha256sum < "$work/$5.iuk")" ] && same=yes
        awk -v l="$1" -v w="$w" -v c="$u+$s" -v tw="$tw" -v same="$same" 'BEGIN {
            split(c, a, "+")
            printf "%-44s %8.1f %8.1f %7.1fx %s\n", l, w, a[1] + a[2], tw / w, same }'
    }
    row "Tails method, 1.0 -> 1.1" tails-1 tails-1 tails-1 tails-1
    [ "$releases" = 2 ] || row "Tails method, 1.1 -> 1.2" tails-2 tails-2 tails-2 tails-2
    row "iukfarm build 1.0 -> 1.1, no cache" plain tails-1 plain tails-1
    row "  cache: cold (both images hashed)" cold tails-1 cold tails-1
    row "  cache: both images known" warm tails-1 warm tails-1
    [ "$releases" = 2 ] || row "iukfarm build 1.1 -> 1.2, 1.1 known" next tails-2 next tails-2
    row "iukfarm build --profile fast, 1.0 -> 1.1" fast tails-1 fast tails-1
    runs="plain cold warm fast"
    [ "$releases" = 2 ] || runs="$runs next"
    for n in $runs; do
        echo "$n:"
        grep -E '^(time|tail digests):' "$work/$n.log" | sed 's/^/  /'
    done
} | tee "$out"
for n in plain cold warm; do cmp -s "$work/$n.iuk" "$work/tails-1.iuk"; done
[ "$releases" = 2 ] || cmp -s "$work/next.iuk" "$work/tails-2.iuk"
