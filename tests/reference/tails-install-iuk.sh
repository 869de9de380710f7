#!/usr/bin/env bash
# Reference for the installation tests: installs an IUK onto a Tails boot
# device the way Tails' tails-install-iuk does (Tails::IUK::Install->run in
# tails.git, config/chroot_local-includes/usr/src/iuk/, 7.x), step by step,
# as root (Tails runs each step through `sudo -n`):
#
#   1. mount the kit (a SquashFS); FORMAT must be exactly "2"; the
#      overlay's apparent size must fit in the device's free space;
#   2. remount the device read-write;
#   3. rsync --recursive --links --perms --times --chown=root:root
#      overlay/ onto the device: no --checksum, so a file whose size and
#      time match the device's copy is skipped;
#   4. rm --recursive --force each of control.yml's delete_files;
#   5. remount the device sync; rewrite live/Tails.module as
#      filesystem.squashfs followed by the kit's overlay/live/*.squashfs;
#      remove every other live/*.squashfs;
#   6. if the device then has utils/linux/syslinux, run it with
#      `-d syslinux PARTITION`; if it has utils/mbr/mbr.bin, copy its 440
#      bytes to BOOT_DEVICE with dd; sync, unmount the kit.
#
# usage: tails-install-iuk.sh DEVICE KIT.iuk PARTITION BOOT_DEVICE
# DEVICE must be a mount point (it is remounted). Tails' device is FAT;
# where the stand-in's case-sensitive names would behave otherwise, the
# script does what FAT would (see delete_files).
set -euo pipefail
dev=$(realpath "$1"); kit=$(realpath "$2"); partition=$3; boot_device=$4
mnt=$(mktemp -d)
cleanup() {
    umount "$mnt" 2>/dev/null || true
    rmdir "$mnt"
}
trap cleanup EXIT

mount -o loop,ro "$kit" "$mnt"
format=$(cat "$mnt/FORMAT")
[ "$format" = 2 ] || { echo "Unsupported format: $format" >&2; exit 1; }
needed=$(du --block-size=1 --summarize --apparent-size "$mnt/overlay" | cut -f1)
available=$(( $(stat -f -c '%a * %S' "$dev") ))
[ "$available" -gt "$needed" ] || { echo "not enough space: $available < $needed" >&2; exit 1; }

mount -o remount,rw "$dev"
rsync --recursive --links --perms --times --chown=root:root "$mnt/overlay/" "$dev/"
perl -MYAML::XS=LoadFile -e '
    my $c = LoadFile($ARGV[0]) // {};
    print "$_\0" for @{ $c->{delete_files} // [] };
' "$mnt/control.yml" | while IFS= read -r -d '' f; do
    # The device stands in for FAT, whose names match whatever their case
    # (delete_files are libcdio's lower-cased names): find the file as
    # FAT's lookup would.
    [ -e "$dev/$f" ] || f=$(cd "$dev" && find . -ipath "./$f" -print -quit)
    [ -z "$f" ] || rm --recursive --force "$dev/$f"
done

mount -o remount,sync "$dev"
modules=(filesystem.squashfs)
for f in "$mnt"/overlay/live/*.squashfs; do
    [ -f "$f" ] && modules+=("$(basename "$f")")
done
printf '%s\n' "${modules[@]}" > "$dev/live/Tails.module"
for f in "$dev"/live/*.squashfs; do
    name=$(basename "$f")
    printf '%s\n' "${modules[@]}" | grep -qxF "$name" || rm --force "$f"
done
sync

if [ -e "$dev/utils/linux/syslinux" ]; then
    "$dev/utils/linux/syslinux" -d syslinux "$partition"
fi
if [ -e "$dev/utils/mbr/mbr.bin" ]; then
    dd status=none if="$dev/utils/mbr/mbr.bin" of="$boot_device" bs=1 count=440
fi
sync
