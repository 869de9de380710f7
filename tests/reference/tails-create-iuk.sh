#!/usr/bin/env bash
# Reference pipeline for the tests: builds an IUK the way Tails'
# tails-create-iuk does (tails-iuk.md §1-§3 and §9), with Debian's tools, as
# root: loop mounts of both system images, an overlay on a tmpfs, rsync of
# the new system over the old one, removal of trusted.overlay.* xattrs,
# gensquashfs for the diff, bsdtar for the boot files, the syslinux rewrite,
# FORMAT and control.yml, gensquashfs for the kit.
#
# usage: SOURCE_DATE_EPOCH=N tails-create-iuk.sh OLD.iso NEW.iso DIFF_NAME OUT.iuk
# GENSQUASHFS names the gensquashfs to run (default: the one on PATH): Tails
# pins 1.2.0 up to 6.x and trixie's 1.3.2 from 7.0 on.
set -euo pipefail
gensquashfs=${GENSQUASHFS:-gensquashfs}
old_iso=$(realpath "$1"); new_iso=$(realpath "$2"); diff_name=$3; out=$(realpath -m "$4")
: "${SOURCE_DATE_EPOCH:?SOURCE_DATE_EPOCH must be set}"
here=$(dirname "$(realpath "$0")")
umask 022

T=$(mktemp -d)
cleanup() {
    cd /
    for m in "$T/union/mount" "$T/new_sq" "$T/old_sq" "$T/union"; do
        mountpoint -q "$m" 2>/dev/null && umount "$m"
    done
    rm -rf "$T"
}
trap cleanup EXIT
mkdir -p "$T/old_sq" "$T/new_sq" "$T/union" "$T/src/overlay/live"

# The kernel here has no iso9660 driver: take the system images out with xorriso.
xorriso -osirrox on -indev "$old_iso" -extract /live/filesystem.squashfs "$T/old.squashfs" 2>/dev/null
xorriso -osirrox on -indev "$new_iso" -extract /live/filesystem.squashfs "$T/new.squashfs" 2>/dev/null

mount -t tmpfs tmpfs "$T/union"
mkdir "$T/union/mount" "$T/union/work" "$T/union/rw"
mount -t squashfs -o loop,ro "$T/old.squashfs" "$T/old_sq"
mount -t squashfs -o loop,ro "$T/new.squashfs" "$T/new_sq"
mount -t overlay overlay -o "lowerdir=$T/old_sq,upperdir=$T/union/rw,workdir=$T/union/work" "$T/union/mount"
rsync --archive --quiet --delete-after --acls --checksum --xattrs "$T/new_sq/" "$T/union/mount/"
umount "$T/union/mount"

python3 - "$T/union/rw" <<'PY'
import os, sys
def strip(p):
    for k in os.listxattr(p, follow_symlinks=False):
        if k.startswith("trusted.overlay."):
            os.removexattr(p, k, follow_symlinks=False)
root = sys.argv[1]
strip(root)
for d, dirs, files in os.walk(root):
    for n in dirs + files:
        strip(os.path.join(d, n))
PY

"$gensquashfs" --keep-xattr --quiet --comp-extra x86,dictsize=1024K --block-size 1048576 \
    --pack-dir "$T/union/rw" "$T/src/overlay/live/$diff_name"

cd "$T/src/overlay"
for k in $(perl "$here/iso-lists.pl" kernels "$old_iso" "$new_iso"); do
    bsdtar -x --no-same-permissions --file "$new_iso" "live/$k"
done
for d in EFI isolinux utils; do
    bsdtar -x --no-same-permissions --file "$new_iso" "$d"
done
chmod -R go+rX .
mv isolinux syslinux
mv syslinux/isolinux.cfg syslinux/syslinux.cfg
for f in syslinux/*; do
    # Path::Tiny's edit_lines writes a new file: mode 0644, owned by root.
    perl -pi -e 's{/isolinux/}{/syslinux/}g' "$f"
    chmod 0644 "$f"
done

cd "$T/src"
printf 2 > FORMAT
perl "$here/iso-lists.pl" control-yml "$old_iso" "$new_iso" > control.yml
rm -f "$out"
"$gensquashfs" --keep-xattr --quiet --all-root --pack-dir "$T/src" "$out"
