//! `iukfarm build` on generated release pairs: the kit's layout follows the
//! Tails IUK v2 format (tails-iuk.md §1, §7.1), and the kernel, stacking the
//! diff on the old system with overlayfs, sees exactly the new system.

use std::path::{Path, PathBuf};
use std::process::Command;

use iukfarm_tests::fixtures::random_tree;
use iukfarm_tests::{
    Mount, Rng, Tree, diff_listings, disk_listing, iukfarm, require_root, require_tool, run,
    sha256_file,
};

const SDE: &str = "1730285444";

/// Boot files of a release; `v` changes the kernel.
fn boot_files(cd: &Tree, kernel: &[u8], extra_efi: bool) {
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
        .file("utils/linux/syslinux", b"")
        .file("utils/mbr/mbr.bin", &[0u8; 440]);
    if extra_efi {
        cd.file("EFI/BOOT/OLD.EFI", b"gone in the new release")
            .file("live/a", b"deleted later");
    }
}

fn make_iso(work: &Path, version: &str, sys: &Path, kernel: &[u8], old: bool) -> PathBuf {
    let cd = work.join(format!("cd-{version}"));
    let t = Tree::new(&cd);
    boot_files(&t, kernel, old);
    run(Command::new("mksquashfs")
        .arg(sys)
        .arg(cd.join("live/filesystem.squashfs"))
        .args([
            "-noappend",
            "-no-progress",
            "-quiet",
            "-comp",
            "xz",
            "-Xbcj",
            "x86",
            "-b",
            "1M",
        ]));
    let iso = work.join(format!("tails-amd64-{version}.iso"));
    run(Command::new("xorriso")
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

/// The old system and a new one with every kind of change of §2.2.
fn systems(work: &Path) -> (PathBuf, PathBuf) {
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
        .node("newdev", libc::S_IFCHR, 10, 200);
    run(Command::new("touch")
        .args(["-d", "2030-01-01"])
        .arg(new.join("system-systemd\\x2dcryptsetup.slice")));
    (old, new)
}

fn build(old: &Path, new: &Path, out: &Path, threads: &str) -> std::process::Output {
    Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["build", "-q", "--threads", threads, "--old-iso"])
        .arg(old)
        .arg("--new-iso")
        .arg(new)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn cat(image: &Path, path: &str) -> Vec<u8> {
    run(Command::new(iukfarm())
        .args(["sqfs", "cat"])
        .arg(image)
        .arg(path))
    .stdout
}

#[test]
fn kit_layout_and_overlay_semantics() {
    require_root("fixtures with owners and devices, loop and overlay mounts");
    require_tool("mksquashfs");
    require_tool("xorriso");
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let (old_sys, new_sys) = systems(work);
    let old_iso = make_iso(work, "6.0", &old_sys, b"kernel 1", true);
    let new_iso = make_iso(work, "6.1", &new_sys, b"kernel 2", false);

    let outdir = work.join("out");
    std::fs::create_dir(&outdir).unwrap();
    let kit = outdir.join("Tails_amd64_6.0_to_6.1.iuk");
    let res = build(&old_iso, &new_iso, &kit, "2");
    assert!(
        res.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let names: Vec<_> = std::fs::read_dir(&outdir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        [kit.file_name().unwrap()],
        "something else was left in the output directory"
    );

    // §1: the kit is a SquashFS with FORMAT, control.yml and overlay/.
    assert_eq!(cat(&kit, "FORMAT"), b"2");
    assert_eq!(
        cat(&kit, "control.yml"),
        b"---\ndelete_files:\n- EFI/BOOT/old.efi\n- live/a\n",
        "delete_files (libcdio names, lower-cased)"
    );
    let listing =
        String::from_utf8(run(Command::new(iukfarm()).args(["sqfs", "ls"]).arg(&kit)).stdout)
            .unwrap();
    for want in [
        "/overlay/live/6.1.squashfs",
        "/overlay/live/vmlinuz",
        "/overlay/EFI/BOOT/bootx64.efi",
        "/overlay/utils/linux/syslinux",
        "/overlay/syslinux/syslinux.cfg",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(want)),
            "{want} missing:\n{listing}"
        );
    }
    assert!(
        !listing.contains("initrd.img"),
        "unchanged initrd shipped:\n{listing}"
    );
    assert!(
        !listing.contains("isolinux.cfg"),
        "isolinux.cfg not renamed:\n{listing}"
    );
    assert!(
        listing
            .lines()
            .all(|l| l.split_whitespace().nth(1) == Some("0/0")),
        "not all-root:\n{listing}"
    );
    let cfg = cat(&kit, "overlay/syslinux/syslinux.cfg");
    assert_eq!(cfg, b"bla\n   bli/syslinux/blu\n\n\n bla/syslinux/");
    let live = cat(&kit, "overlay/syslinux/live.cfg");
    assert_eq!(
        live,
        b"kernel /live/vmlinuz\nappend initrd=/live/initrd.img /syslinux/x\n"
    );

    // The diff: real owners kept, no trusted.overlay.*, whiteouts; the
    // kernel stacking it on the old system sees the new one.
    let diff = work.join("diff.sqfs");
    std::fs::write(&diff, cat(&kit, "overlay/live/6.1.squashfs")).unwrap();
    let diff_ls = String::from_utf8(
        run(Command::new(iukfarm())
            .args(["sqfs", "ls", "-x"])
            .arg(&diff))
        .stdout,
    )
    .unwrap();
    assert!(!diff_ls.contains("trusted.overlay"), "{diff_ls}");
    assert!(
        diff_ls
            .lines()
            .any(|l| l.ends_with("/A") && l.contains(" 33/33 ")),
        "owner of A lost:\n{diff_ls}"
    );
    assert!(
        diff_ls
            .lines()
            .any(|l| l.starts_with("c--------- 0/0") && l.ends_with("/deleted")),
        "{diff_ls}"
    );
    assert!(
        diff_ls.lines().any(|l| l.ends_with("/deleted-tree")),
        "{diff_ls}"
    );
    assert!(
        !diff_ls.contains("deleted-tree/"),
        "whiteout not at the topmost path:\n{diff_ls}"
    );
    assert!(!diff_ls.contains("/untouched"), "{diff_ls}");

    let old_img = work.join("old.sqfs");
    let new_img = work.join("new.sqfs");
    std::fs::copy(
        old_sys
            .parent()
            .unwrap()
            .join("cd-6.0/live/filesystem.squashfs"),
        &old_img,
    )
    .unwrap();
    std::fs::copy(work.join("cd-6.1/live/filesystem.squashfs"), &new_img).unwrap();
    let m_old = Mount::new(&old_img, "squashfs", "");
    let m_diff = Mount::new(&diff, "squashfs", "");
    let m_new = Mount::new(&new_img, "squashfs", "");
    let merged = tempfile::tempdir().unwrap();
    let opts = format!(
        "lowerdir={}:{}",
        m_diff.path().display(),
        m_old.path().display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(merged.path()));
    let upgraded = disk_listing(merged.path());
    let _ = Command::new("umount").arg(merged.path()).status();
    let problems = diff_listings(&upgraded, &disk_listing(m_new.path()), true);
    assert!(
        problems.is_empty(),
        "old + diff != new:\n{}",
        problems.join("\n")
    );

    // Same bytes whatever the thread count.
    let kit8 = work.join("k8.iuk");
    let res = build(&old_iso, &new_iso, &kit8, "8");
    assert!(res.status.success());
    assert_eq!(sha256_file(&kit), sha256_file(&kit8));
}

#[test]
fn identical_isos_and_clear_failures() {
    require_root("fixtures with owners");
    require_tool("mksquashfs");
    require_tool("xorriso");
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let sys = work.join("sys");
    random_tree(&Tree::new(&sys), 3);
    let iso = make_iso(work, "6.0", &sys, b"k", false);
    let kit = work.join("same.iuk");
    let res = build(&iso, &iso, &kit, "2");
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(cat(&kit, "control.yml"), b"---\ndelete_files: []\n");
    let ls = String::from_utf8(run(Command::new(iukfarm()).args(["sqfs", "ls"]).arg(&kit)).stdout)
        .unwrap();
    assert!(
        ls.contains("/overlay/syslinux/syslinux.cfg") && !ls.contains("vmlinuz"),
        "{ls}"
    );

    // Refuses to overwrite; names the file.
    let res = build(&iso, &iso, &kit, "2");
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--force"));

    // A new ISO without utils/.
    let cd = work.join("cd-broken");
    let t = Tree::new(&cd);
    t.file("live/vmlinuz", b"k")
        .file("EFI/BOOT/x", b"e")
        .file("isolinux/isolinux.cfg", b"c");
    std::fs::copy(
        work.join("cd-6.0/live/filesystem.squashfs"),
        cd.join("live/filesystem.squashfs"),
    )
    .unwrap();
    let broken = work.join("tails-amd64-6.1.iso");
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-o"])
        .arg(&broken)
        .arg(&cd));
    let out = work.join("broken.iuk");
    let res = build(&iso, &broken, &out, "2");
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("utils/"), "unclear error: {err}");
    assert!(!out.exists());

    // No system image, and not an ISO at all.
    std::fs::remove_file(cd.join("live/filesystem.squashfs")).unwrap();
    t.file("utils/x", b"u");
    std::fs::remove_file(&broken).unwrap();
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-o"])
        .arg(&broken)
        .arg(&cd));
    let res = build(&iso, &broken, &out, "2");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("live/filesystem.squashfs") && err.contains("not found"),
        "{err}"
    );
    std::fs::write(work.join("junk.iso"), Rng::new(9).bytes(70_000)).unwrap();
    let res = build(&work.join("junk.iso"), &iso, &out, "2");
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("junk.iso") && err.contains("not an ISO"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}
