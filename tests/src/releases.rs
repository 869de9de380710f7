//! Generated release pairs: system trees, boot files and ISOs made with
//! mksquashfs and xorriso, as Tails' own test helpers make them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixtures::random_tree;
use crate::{Rng, Tree, run};

/// `utils/linux/syslinux`, which Tails' installer runs on the boot device
/// (`-d syslinux PARTITION`): a stand-in that writes nothing.
pub const SYSLINUX: &[u8] =
    b"#!/bin/sh\n# test stand-in for syslinux\n[ \"$#\" -gt 0 ] || exit 1\n";

/// Boot files of a release, with the given kernel; `old_extras` adds
/// files the next release removes.
pub fn boot_files(cd: &Tree, kernel: &[u8], old_extras: bool) {
    cd.file("live/vmlinuz", kernel)
        .file("live/initrd.img", &Rng::new(77).bytes(50_000))
        .file("EFI/BOOT/bootx64.efi", b"efi")
        .file(
            "isolinux/isolinux.cfg",
            b"bla\n   bli/isolinux/blu\n\n\n bla/isolinux/",
        )
        .file(
            "isolinux/live.cfg",
            b"kernel /live/vmlinuz\nappend initrd=/live/initrd.img /isolinux/x\n",
        )
        .file("isolinux/isolinux.bin", &Rng::new(5).bytes(8192))
        .file("utils/linux/syslinux", SYSLINUX)
        .chmod("utils/linux/syslinux", 0o755)
        .file("utils/mbr/mbr.bin", &[0u8; 440]);
    if old_extras {
        cd.file("EFI/BOOT/OLD.EFI", b"gone in the new release")
            .file("live/a", b"deleted later");
    }
}

/// How a release's system image is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Tails 6: xz with the x86 filter, 1 MiB blocks.
    Tails6,
    /// Tails 7 (`auto/build`): zstd level 22, 1 MiB blocks, no export table.
    Tails7,
}

/// The GRUB module directory of a Tails 7 ISO: about 280 files in
/// `EFI/BOOT/grub/x86_64-efi/`, so that the kit holds a directory that
/// gensquashfs 1.3 indexes. `release` changes a few modules.
pub fn grub_modules(cd: &Tree, release: u64) {
    let mut r = Rng::new(31);
    for i in 0..280u64 {
        let mut body = r.bytes(200 + (i as usize * 37) % 3000);
        if i % 40 == 0 {
            body.extend(release.to_le_bytes());
        }
        cd.file(format!("EFI/BOOT/grub/x86_64-efi/module{i:03}.mod"), &body);
    }
}

/// Adds to a system a library directory of 300 files whose contents
/// depend on `content`: two systems made with different ones give an IUK
/// whose diff holds a directory of 256 entries or more.
pub fn wide_directory(sys: &Path, content: &[u8]) {
    let t = Tree::new(sys);
    for i in 0..300 {
        t.file(
            format!("usr/lib/x86_64-linux-gnu/libwide{i:03}.so.1"),
            &[content, format!("{i}").as_bytes()].concat(),
        );
    }
}

/// Tails 7.0 and 7.1 made of two systems: zstd system images, the GRUB
/// module directory (a few modules changed), boot files; (old ISO, new ISO).
pub fn tails7_pair(work: &Path, old_sys: &Path, new_sys: &Path) -> (PathBuf, PathBuf) {
    let old = make_iso_as(Layout::Tails7, work, "7.0", old_sys, &|t| {
        boot_files(t, b"kernel 7.0", true);
        grub_modules(t, 70);
    });
    let new = make_iso_as(Layout::Tails7, work, "7.1", new_sys, &|t| {
        boot_files(t, b"kernel 7.1", false);
        grub_modules(t, 71);
    });
    (old, new)
}

/// The date of the releases [`make_iso`] makes (their ISOs' volume date):
/// two weeks before the tests' SOURCE_DATE_EPOCH, 1730285444.
pub const ISO_DATE: u32 = 1_729_075_844;

/// Writes `work/cd-<version>/` (the system image made by mksquashfs, the
/// boot files from `boot`) and the ISO `work/tails-amd64-<version>.iso`.
pub fn make_iso(work: &Path, version: &str, sys: &Path, boot: &dyn Fn(&Tree)) -> PathBuf {
    make_iso_as(Layout::Tails6, work, version, sys, boot)
}

/// [`make_iso`] with the system image compressed as `layout` says.
pub fn make_iso_as(
    layout: Layout,
    work: &Path,
    version: &str,
    sys: &Path,
    boot: &dyn Fn(&Tree),
) -> PathBuf {
    let cd = work.join(format!("cd-{version}"));
    let t = Tree::new(&cd);
    boot(&t);
    let comp: &[&str] = match layout {
        Layout::Tails6 => &["-comp", "xz", "-Xbcj", "x86"],
        Layout::Tails7 => &["-comp", "zstd", "-Xcompression-level", "22", "-no-exports"],
    };
    run(Command::new("mksquashfs")
        .arg(sys)
        .arg(cd.join("live/filesystem.squashfs"))
        .args(["-noappend", "-no-progress", "-quiet"])
        .args(comp)
        .args(["-b", "1M"]));
    let iso = work.join(format!("tails-amd64-{version}.iso"));
    run(Command::new("xorriso")
        // Dates the volume, as Tails' build does: earlier than the kits'.
        .env("SOURCE_DATE_EPOCH", ISO_DATE.to_string())
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-r",
            "-J",
            "-joliet-long",
            "-l",
            "-iso-level",
            "3",
            "-o",
        ])
        .arg(&iso)
        .arg(&cd));
    iso
}

/// An old system and a new one with every kind of change of tails-iuk.md §2.2.
pub fn systems(work: &Path) -> (PathBuf, PathBuf) {
    let old = work.join("sys-old");
    random_tree(&Tree::new(&old), 11);
    let t = Tree::new(&old);
    t.file("etc/os-release", b"VERSION=6.0\n")
        .file("changed", b"old content")
        .file("meta-only", b"same")
        .file("mode-only", b"same")
        .file("deleted", b"x")
        .file("deleted-tree/a/b", b"y")
        .file("file-to-dir", b"f")
        .file("dir-to-file/inner", b"i")
        .symlink("link", "target-a")
        .file("xattr-change", b"x")
        .xattr(
            "xattr-change",
            "security.capability",
            &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
        .file("system-systemd\\x2dcryptsetup.slice", b"unit")
        .file("hard", b"linked")
        .hardlink("hard2", "hard");
    let new = work.join("sys-new");
    run(Command::new("cp").args(["-a"]).arg(&old).arg(&new));
    let t = Tree::new(&new);
    std::fs::remove_file(new.join("deleted")).unwrap();
    std::fs::remove_dir_all(new.join("deleted-tree")).unwrap();
    std::fs::remove_file(new.join("file-to-dir")).unwrap();
    std::fs::remove_dir_all(new.join("dir-to-file")).unwrap();
    std::fs::remove_file(new.join("link")).unwrap();
    t.file("etc/os-release", b"VERSION=6.1\n")
        .file("changed", b"new content!")
        .chown("meta-only", 33, 33)
        .chmod("mode-only", 0o600)
        .file("file-to-dir/now-inside", b"d")
        .file("dir-to-file", b"now a file")
        .symlink("link", "target-b")
        .xattr("xattr-change", "user.new", b"v")
        .file("A", b"new file")
        .chown("A", 33, 33)
        .node("newdev", libc::S_IFCHR, 10, 200)
        .node("newfifo", libc::S_IFIFO, 0, 0);
    run(Command::new("touch")
        .args(["-d", "2030-01-01"])
        .arg(new.join("system-systemd\\x2dcryptsetup.slice")));
    (old, new)
}
