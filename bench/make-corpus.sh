#!/bin/bash
# make-corpus.sh - build a benchmark corpus of four Debian-based "live OS"
# versions (1.0 .. 1.3) that evolve like point releases, each packed as a
# Tails-like ISO (live/filesystem.squashfs + kernel + initrd + boot stubs).
#
#   1.0  debootstrap --variant=minbase of bookworm main (no updates/security)
#   1.1  1.0 + bookworm-updates + bookworm-security, apt-get upgrade
#   1.2  1.1 + a few packages installed, a few purged
#   1.3  1.2 + bookworm-backports kernel, old 6.1 kernel purged
#
# Usage: make-corpus.sh [--clean-roots] [OUTDIR]       (default OUTDIR ./corpus)
#
# Output: OUTDIR/tails-amd64-<version>.iso, OUTDIR/roots/<version>/ (unpacked
# systems, needed to derive the next version), OUTDIR/timings.tsv,
# OUTDIR/sizes.tsv.  Idempotent: a version whose ISO exists is skipped; if its
# root is needed later but was deleted, it is re-extracted from the ISO.
# --clean-roots deletes OUTDIR/roots once all ISOs exist.
#
# TAILS=7 (the default) compresses the system images as Tails 7's auto/build
# does (zstd level 22, 1 MiB blocks, -no-exports); TAILS=6 as Tails 6's (xz,
# x86 filter, 1 MiB dictionary). Only the images differ: the systems are the
# same bookworm ones.
#
# Environment: TAILS, MIRROR, SECURITY_MIRROR, V11_UPGRADE, SOURCE_DATE_EPOCH (if unset, each
# squashfs/ISO uses the newest mtime in its root, so nothing is clamped and the
# timestamps are a function of the root's content).
#
# Needs root, debootstrap, squashfs-tools (mksquashfs, unsquashfs), xorriso.
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
VERSIONS=(1.0 1.1 1.2 1.3)

# v1.0 package set (on top of minbase).  Dependencies only, no Recommends.
V10_INCLUDE=(
    linux-image-amd64 initramfs-tools zstd kmod
    systemd-sysv udev dbus
    python3 python3-gi gir1.2-glib-2.0 python3-dbus
    perl
    locales less vim-tiny nano man-db bash-completion
    curl wget ca-certificates gnupg openssh-client
    iproute2 iputils-ping netbase rsync
    procps psmisc file xz-utils bzip2 sudo
)
# v1.1: "upgrade" keeps the kernel ABI back (new linux-image-6.1.0-NN package);
# V11_UPGRADE=full-upgrade makes 1.1 a kernel security update as well.
V11_UPGRADE=${V11_UPGRADE:-upgrade}
case ${TAILS:-7} in
    7) SQUASHFS_COMP=(-comp zstd -Xcompression-level 22 -no-exports) ;;
    6) SQUASHFS_COMP=(-comp xz -Xbcj x86 -Xdict-size 1M) ;;
    *) echo "make-corpus.sh: TAILS is 6 or 7" >&2; exit 2 ;;
esac
# v1.2 changes
V12_INSTALL=(git tmux htop python3-yaml)
V12_PURGE=(nano wget)

CLEAN_ROOTS=0
OUT=
for arg in "$@"; do
    case "$arg" in
        --clean-roots) CLEAN_ROOTS=1 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "unknown option: $arg" >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "only one OUTDIR allowed" >&2; exit 2; }
           OUT=$arg ;;
    esac
done
OUT=${OUT:-./corpus}

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
for t in debootstrap mksquashfs unsquashfs xorriso chroot mount; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

mkdir -p "$OUT/roots" "$OUT/cache/debootstrap"
OUT=$(cd "$OUT" && pwd -P)
ROOTS=$OUT/roots
TIMINGS=$OUT/timings.tsv
SIZES=$OUT/sizes.tsv
[ -f "$TIMINGS" ] || printf 'version\tstep\tseconds\n' >"$TIMINGS"
[ -f "$SIZES" ] || printf 'version\troot_du\tsquashfs_bytes\tiso_bytes\n' >"$SIZES"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# ---------------------------------------------------------------- mounts
# Unmount everything mounted below $ROOTS (deepest first).  Used by the EXIT
# trap, so it runs on success, error and interruption alike.
umount_all() {
    local mp tries
    for tries in 1 2 3; do
        mapfile -t mps < <(awk -v p="$ROOTS/" 'index($2, p) == 1 { print $2 }' \
                               /proc/self/mounts | sort -r)
        [ "${#mps[@]}" -gt 0 ] || return 0
        for mp in "${mps[@]}"; do
            umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
        done
    done
    if awk -v p="$ROOTS/" 'index($2, p) == 1 { f = 1 } END { exit !f }' /proc/self/mounts; then
        echo "WARNING: still mounted below $ROOTS:" >&2
        awk -v p="$ROOTS/" 'index($2, p) == 1 { print "  " $2 }' /proc/self/mounts >&2
        return 1
    fi
}
on_exit() {
    local rc=$?
    umount_all || rc=1
    [ -z "${STAGE:-}" ] || rm -rf --one-file-system "$STAGE"
    [ "$rc" = 0 ] || log "FAILED (exit $rc)"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# rm -rf a root, refusing if anything is still mounted inside it (a bind
# mount of /dev inside would otherwise be wiped on the host).
safe_rm_root() {
    local d=$1
    [ -e "$d" ] || return 0
    umount_all
    if awk -v p="$d/" 'index($2, p) == 1 { f = 1 } END { exit !f }' /proc/self/mounts; then
        echo "refusing to delete $d: something is mounted inside" >&2
        return 1
    fi
    rm -rf --one-file-system "$d"
}

chroot_mount() {
    local r=$1
    mount -t proc proc "$r/proc"
    mount -t sysfs sysfs "$r/sys"
    mount --bind /dev "$r/dev"
    mount --bind /dev/pts "$r/dev/pts"
    # Name resolution for apt while inside the chroot; reset by clean_root.
    rm -f "$r/etc/resolv.conf"
    cp -L /etc/resolv.conf "$r/etc/resolv.conf"
    # Never start services from maintainer scripts.
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
    chmod 755 "$r/usr/sbin/policy-rc.d"
}

# Kill (by pid) any process left running with its root inside the chroot,
# e.g. a daemon a maintainer script started despite policy-rc.d, then unmount.
chroot_umount() {
    local r=$1 p root pids=()
    for p in /proc/[0-9]*; do
        root=$(readlink "$p/root" 2>/dev/null) || continue
        case "$root" in "$r"|"$r"/*) pids+=("${p#/proc/}") ;; esac
    done
    if [ "${#pids[@]}" -gt 0 ]; then
        log "killing leftover chroot processes: ${pids[*]}"
        kill "${pids[@]}" 2>/dev/null || true; sleep 2
        kill -9 "${pids[@]}" 2>/dev/null || true
    fi
    umount_all
}

# Run a shell snippet inside the chroot with a clean, non-interactive env.
in_chroot() {
    local r=$1; shift
    chroot "$r" /usr/bin/env -i \
        HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb \
        LANG=C.UTF-8 LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
        /bin/bash -euo pipefail -c "$*"
}

APT='apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o Dpkg::Use-Pty=0 -o APT::Install-Recommends=false'

# Remove caches/logs/identity so that they are not part of the image.
clean_root() {
    local r=$1
    in_chroot "$r" "apt-get clean"
    rm -rf "$r"/var/lib/apt/lists/*
    rm -f "$r"/var/cache/apt/*.bin
    rm -f "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
    rm -f "$r"/var/cache/ldconfig/aux-cache
    # logs: delete rotated ones, truncate the rest
    find "$r/var/log" -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
    find "$r/var/log" -type f -exec truncate -s 0 {} +
    rm -rf "$r"/tmp/* "$r"/tmp/.[!.]* "$r"/var/tmp/* 2>/dev/null || true
    rm -rf "$r"/root/.bash_history "$r"/root/.cache "$r"/root/.wget-hsts "$r"/root/.lesshst
    : >"$r/etc/machine-id"
    rm -f "$r/var/lib/dbus/machine-id"
    ln -s /etc/machine-id "$r/var/lib/dbus/machine-id" 2>/dev/null || true
    rm -f "$r/var/lib/systemd/random-seed"
    rm -f "$r/usr/sbin/policy-rc.d"
    rm -f "$r/etc/resolv.conf"; : >"$r/etc/resolv.conf"
    echo localhost >"$r/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' \
        >"$r/etc/hosts"
}

# ---------------------------------------------------------------- timing
now() { date +%s.%N; }
# timed VERSION STEP CMD... : run CMD, record wall time in timings.tsv
timed() {
    local v=$1 s=$2; shift 2
    local t0 t1 dt
    log "[$v] $s ..."
    t0=$(now)
    "$@"
    t1=$(now)
    dt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\n' "$v" "$s" "$dt" >>"$TIMINGS"
    log "[$v] $s done in ${dt}s"
}

# ---------------------------------------------------------------- versions
build_1.0() {
    local r=$1
    debootstrap --variant=minbase --components=main \
        --cache-dir="$OUT/cache/debootstrap" \
        --include="$(IFS=,; echo "${V10_INCLUDE[*]}")" \
        "$SUITE" "$r" "$MIRROR"
    echo "deb $MIRROR $SUITE main" >"$r/etc/apt/sources.list"
    sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$r/etc/locale.gen"
    chroot_mount "$r"
    in_chroot "$r" "locale-gen && update-locale LANG=en_US.UTF-8"
    clean_root "$r"
    chroot_umount "$r"
}

build_1.1() {
    local r=$1
    cat >"$r/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    chroot_mount "$r"
    in_chroot "$r" "apt-get -q update && $APT $V11_UPGRADE"
    clean_root "$r"
    chroot_umount "$r"
}

build_1.2() {
    local r=$1
    chroot_mount "$r"
    in_chroot "$r" "apt-get -q update && $APT install ${V12_INSTALL[*]} && $APT purge ${V12_PURGE[*]} && $APT autoremove --purge"
    clean_root "$r"
    chroot_umount "$r"
}

build_1.3() {
    local r=$1
    echo "deb $MIRROR $SUITE-backports main" >>"$r/etc/apt/sources.list"
    chroot_mount "$r"
    # Purge exactly the kernel image packages installed before the switch
    # (a glob like linux-image-6.1* would also match 6.12).
    in_chroot "$r" "
        old=\$(dpkg-query -W -f='\${db:Status-Abbrev} \${Package}\n' 'linux-image-[0-9]*' | awk '/^ii/{print \$2}')
        apt-get -q update
        $APT install -t $SUITE-backports linux-image-amd64
        [ -z \"\$old\" ] || $APT purge \$old
        $APT autoremove --purge
        ls -l /boot /lib/modules"
    clean_root "$r"
    chroot_umount "$r"
}

prev_of() { case "$1" in 1.1) echo 1.0 ;; 1.2) echo 1.1 ;; 1.3) echo 1.2 ;; *) echo "" ;; esac; }
iso_of() { echo "$OUT/tails-amd64-$1.iso"; }

# Make sure $ROOTS/$v exists: reuse it, re-extract it from its ISO, or build it.
ensure_root() {
    local v=$1 r=$ROOTS/$1 tmp=$ROOTS/.$1.tmp prev
    [ -d "$r" ] && return 0
    safe_rm_root "$tmp"
    if [ -f "$(iso_of "$v")" ]; then
        log "[$v] re-extracting root from $(iso_of "$v")"
        local x=$OUT/.extract-$v
        rm -rf "$x"; mkdir -p "$x"
        xorriso -osirrox on -indev "$(iso_of "$v")" \
            -extract /live/filesystem.squashfs "$x/filesystem.squashfs" >/dev/null 2>&1
        unsquashfs -q -n -d "$tmp" "$x/filesystem.squashfs"
        rm -rf "$x"
        mv "$tmp" "$r"
        return 0
    fi
    prev=$(prev_of "$v")
    if [ -z "$prev" ]; then
        timed "$v" debootstrap build_1.0 "$tmp"
    else
        ensure_root "$prev"
        timed "$v" "copy-from-$prev" cp -a "$ROOTS/$prev" "$tmp"
        timed "$v" "upgrade-step" "build_$v" "$tmp"
    fi
    mv "$tmp" "$r"
}

make_iso() {
    local v=$1 r=$ROOTS/$1 iso tmpiso kver k i epoch sqsize
    iso=$(iso_of "$v"); tmpiso=$iso.tmp
    STAGE=$OUT/.stage-$v
    rm -rf --one-file-system "$STAGE" "$tmpiso"
    mkdir -p "$STAGE/live" "$STAGE/EFI/BOOT" "$STAGE/isolinux" "$STAGE/utils/linux"

    if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
        epoch=$SOURCE_DATE_EPOCH
    else # newest mtime in the root: deterministic, clamps nothing
        epoch=$(find "$r" -xdev -printf '%Ts\n' | sort -n | tail -n1)
    fi

    timed "$v" mksquashfs env SOURCE_DATE_EPOCH="$epoch" \
        mksquashfs "$r" "$STAGE/live/filesystem.squashfs" -noappend -no-progress -quiet \
            -b 1M "${SQUASHFS_COMP[@]}"
    sqsize=$(stat -c %s "$STAGE/live/filesystem.squashfs")

    k=$(find "$r/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sort -V | tail -n1)
    [ -n "$k" ] || { echo "no kernel in $r/boot" >&2; return 1; }
    kver=${k#vmlinuz-}
    cp "$r/boot/$k" "$STAGE/live/vmlinuz"
    i=$r/boot/initrd.img-$kver
    if [ -f "$i" ]; then cp "$i" "$STAGE/live/initrd.img"; else : >"$STAGE/live/initrd.img"; fi
    printf 'placeholder EFI loader (corpus %s, kernel %s)\n' "$v" "$kver" >"$STAGE/EFI/BOOT/bootx64.efi"
    printf 'kernel /live/vmlinuz\nappend /isolinux/x\n' \
        >"$STAGE/isolinux/isolinux.cfg"
    : >"$STAGE/utils/linux/syslinux"
    find "$STAGE" -exec touch -h -d "@$epoch" {} +

    timed "$v" xorriso env SOURCE_DATE_EPOCH="$epoch" \
        xorriso -as mkisofs -quiet -R -r -J -o "$tmpiso" "$STAGE"
    mv "$tmpiso" "$iso"
    printf '%s\t%s\t%s\t%s\n' "$v" "$(du -sh "$r" | cut -f1)" "$sqsize" "$(stat -c %s "$iso")" >>"$SIZES"
    rm -rf --one-file-system "$STAGE"; STAGE=
}

# ---------------------------------------------------------------- main
for v in "${VERSIONS[@]}"; do
    if [ -f "$(iso_of "$v")" ]; then
        log "[$v] $(iso_of "$v") exists, skipping"
        continue
    fi
    ensure_root "$v"
    make_iso "$v"
    log "[$v] built $(iso_of "$v")"
done

if [ "$CLEAN_ROOTS" = 1 ]; then
    log "removing $ROOTS"
    safe_rm_root "$ROOTS"
fi
log "done; ISOs in $OUT"
