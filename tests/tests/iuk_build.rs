//! `iukfarm build` on generated release pairs: the kit's layout follows the
//! Tails IUK v2 format (tails-iuk.md §1, §7.1), and the kernel, stacking the
//! diff on the old system with overlayfs, sees exactly the new system.

use std::path::Path;
use std::process::Command;

use iukfarm_tests::fixtures::random_tree;
use iukfarm_tests::releases::{boot_files, make_iso, systems, tails7_pair, wide_directory};
use iukfarm_tests::{
    Mount, Rng, Tree, diff_listings, disk_listing, iukfarm, require_root, require_tools, run,
    sha256_file, sqfs_ls,
};

const SDE: &str = "1730285444";

fn build(old: &Path, new: &Path, out: &Path, threads: &str) -> std::process::Output {
    build_with(old, new, out, threads, &[])
}

fn build_with(
    old: &Path,
    new: &Path,
    out: &Path,
    threads: &str,
    extra: &[&str],
) -> std::process::Output {
    Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["build", "-q", "--threads", threads])
        .args(extra)
        .arg("--old-iso")
        .arg(old)
        .arg("--new-iso")
        .arg(new)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn assert_built(res: &std::process::Output) {
    assert!(
        res.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
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
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let (old_sys, new_sys) = systems(work);
    let old_iso = make_iso(work, "6.0", &old_sys, &|t| boot_files(t, b"kernel 1", true));
    let new_iso = make_iso(work, "6.1", &new_sys, &|t| {
        boot_files(t, b"kernel 2", false)
    });

    let outdir = work.join("out");
    std::fs::create_dir(&outdir).unwrap();
    let kit = outdir.join("Tails_amd64_6.0_to_6.1.iuk");
    let res = build(&old_iso, &new_iso, &kit, "2");
    assert_built(&res);
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
    let listing = sqfs_ls(&kit, &[]);
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
    let diff_ls = sqfs_ls(&diff, &["-x"]);
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
    let root_line = diff_ls.lines().position(|l| l.ends_with(" /")).unwrap();
    assert!(
        !diff_ls
            .lines()
            .nth(root_line + 1)
            .unwrap_or("")
            .starts_with("    "),
        "the diff's root has xattrs (IUKs would not be reproducible):\n{diff_ls}"
    );
    assert!(
        diff_ls
            .lines()
            .any(|l| l.starts_with('p') && l.ends_with("/newfifo")),
        "{diff_ls}"
    );

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

    // verify-iuk accepts the kit, and catches broken ones.
    let verify = |k: &Path| {
        Command::new(iukfarm())
            .args(["verify-iuk", "-q", "--old-iso"])
            .arg(&old_iso)
            .arg("--new-iso")
            .arg(&new_iso)
            .arg(k)
            .output()
            .unwrap()
    };
    let ok = verify(&kit);
    assert!(
        ok.status.success(),
        "good kit refused:\n{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    let breakages: [(&str, &str, &Breakage); 4] = [
        ("missing whiteout", "system: deleted", &|_, diff| {
            std::fs::remove_file(diff.join("deleted")).unwrap()
        }),
        ("wrong owner", "system: A: owner", &|_, diff| {
            std::os::unix::fs::lchown(diff.join("A"), Some(0), Some(0)).unwrap()
        }),
        ("stale kernel", "boot: live/vmlinuz", &|kit, _| {
            std::fs::write(kit.join("overlay/live/vmlinuz"), b"kernel 1").unwrap()
        }),
        ("missing delete_files entry", "boot: live/a", &|kit, _| {
            std::fs::write(
                kit.join("control.yml"),
                b"---\ndelete_files:\n- EFI/BOOT/old.efi\n",
            )
            .unwrap()
        }),
    ];
    for (what, expect, breakage) in breakages {
        let broken = rebuild_kit(work, &kit, breakage);
        let res = verify(&broken);
        let out = String::from_utf8_lossy(&res.stdout);
        assert_eq!(
            res.status.code(),
            Some(1),
            "{what}: not caught:\n{out}{}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert!(
            out.contains(expect),
            "{what}: expected a difference at {expect:?}:\n{out}"
        );
    }

    // Same bytes whatever the thread count.
    for threads in ["1", "8"] {
        let other = work.join(format!("k{threads}.iuk"));
        let res = build(&old_iso, &new_iso, &other, threads);
        assert!(res.status.success());
        assert_eq!(
            sha256_file(&kit),
            sha256_file(&other),
            "--threads {threads} changed the bytes"
        );
    }
}

/// Changes an unpacked kit (first directory) or its unpacked diff (second).
type Breakage = dyn Fn(&Path, &Path);

/// Unpacks a kit and its diff, lets `breakage` change them, packs both again.
fn rebuild_kit(work: &Path, kit: &Path, breakage: &Breakage) -> std::path::PathBuf {
    let dir = tempfile::tempdir_in(work).unwrap().keep();
    let k = dir.join("kit");
    let d = dir.join("diff");
    run(Command::new("unsquashfs")
        .args(["-no-progress", "-d"])
        .arg(&k)
        .arg(kit));
    let diff_img = k.join("overlay/live/6.1.squashfs");
    run(Command::new("unsquashfs")
        .args(["-no-progress", "-d"])
        .arg(&d)
        .arg(&diff_img));
    breakage(&k, &d);
    std::fs::remove_file(&diff_img).unwrap();
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args([
            "sqfs",
            "pack",
            "-q",
            "--keep-xattr",
            "--comp-extra",
            "x86,dictsize=1024K",
            "-b",
            "1M",
            "-D",
        ])
        .arg(&d)
        .arg(&diff_img));
    let out = dir.join("broken.iuk");
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["sqfs", "pack", "-q", "--all-root", "-D"])
        .arg(&k)
        .arg(&out));
    out
}

/// Tails' scenarios: a new kernel added ships only it; a file deleted from a
/// directory tails-create-iuk does not monitor is not listed for deletion.
#[test]
fn added_kernel_and_unmonitored_deletion() {
    require_root("fixtures with owners");
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let sys = work.join("sys");
    random_tree(&Tree::new(&sys), 4);
    let old = make_iso(work, "6.0", &sys, &|t| {
        boot_files(t, b"k", false);
        t.file("whatever.dir/a", b"not monitored");
    });
    let new = make_iso(work, "6.1", &sys, &|t| {
        boot_files(t, b"k", false);
        t.file("live/vmlinuz2", b"k2")
            .file("live/initrd2.img", b"i2");
    });
    let kit = work.join("k.iuk");
    let res = build(&old, &new, &kit, "2");
    assert_built(&res);
    assert_eq!(cat(&kit, "control.yml"), b"---\ndelete_files: []\n");
    let ls = sqfs_ls(&kit, &[]);
    let live: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.rsplit_once(" /overlay/live/").map(|x| x.1))
        .collect();
    assert_eq!(live, ["6.1.squashfs", "initrd2.img", "vmlinuz2"]);
}

/// Ctrl-C in the middle of a build: exit 130, nothing left behind.
#[test]
fn interrupted_build_leaves_nothing() {
    require_root("fixtures with owners");
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let old_sys = work.join("old");
    random_tree(&Tree::new(&old_sys), 5);
    let new_sys = work.join("new");
    random_tree(&Tree::new(&new_sys), 6);
    Tree::new(&new_sys).file("big", &Rng::new(8).bytes(40 << 20));
    let old = make_iso(work, "6.0", &old_sys, &|t| boot_files(t, b"k", false));
    let new = make_iso(work, "6.1", &new_sys, &|t| boot_files(t, b"k", false));
    let outdir = work.join("out");
    std::fs::create_dir(&outdir).unwrap();
    let mut child = Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["build", "-q", "--threads", "1", "--old-iso"])
        .arg(&old)
        .arg("--new-iso")
        .arg(&new)
        .arg("--output-dir")
        .arg(&outdir)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "expected the interrupted exit status, got {status}"
    );
    let left: Vec<_> = std::fs::read_dir(&outdir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind after Ctrl-C: {left:?}");
}

#[test]
fn identical_isos_and_clear_failures() {
    require_root("fixtures with owners");
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let sys = work.join("sys");
    random_tree(&Tree::new(&sys), 3);
    let iso = make_iso(work, "6.0", &sys, &|t| boot_files(t, b"k", false));
    let kit = work.join("same.iuk");
    // Both named 6.0: refused as a mistake in the arguments, writing nothing.
    let res = build(&iso, &iso, &kit, "2");
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("both version 6.0"));
    assert!(!kit.exists());
    // Said to be from another version, the same ISO gives a kit that
    // changes nothing but the boot files.
    let res = build_with(&iso, &iso, &kit, "2", &["--old-version", "5.9"]);
    assert_built(&res);
    assert_eq!(cat(&kit, "control.yml"), b"---\ndelete_files: []\n");
    let ls = sqfs_ls(&kit, &[]);
    assert!(
        ls.contains("/overlay/syslinux/syslinux.cfg") && !ls.contains("vmlinuz"),
        "{ls}"
    );

    // Refuses to overwrite (a usage error); names the file.
    let res = build_with(&iso, &iso, &kit, "2", &["--old-version", "5.9"]);
    assert_eq!(res.status.code(), Some(2));
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
    // Not a release ISO: bad input.
    assert_eq!(res.status.code(), Some(2));
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
    assert_eq!(res.status.code(), Some(2));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("live/filesystem.squashfs") && err.contains("not found"),
        "{err}"
    );
    std::fs::write(work.join("junk.iso"), Rng::new(9).bytes(70_000)).unwrap();
    let res = build(&work.join("junk.iso"), &iso, &out, "2");
    assert_eq!(res.status.code(), Some(2));
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

/// The blocks line `iukfarm build` prints: (compressed, from cache, copied,
/// fragment blocks copied).
fn block_counts(stderr: &[u8]) -> (u64, u64, u64, u64) {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("blocks: "))
        .unwrap_or_else(|| panic!("no blocks line in: {text}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2], n[3])
}

/// Kits of one release share their changed files: the second kit's blocks
/// come from the block cache, and every kit is the same bytes with a cold,
/// warm or damaged cache. The fast profile copies the new image's blocks,
/// applies like the exact kit and stays within 2% of its size.
#[test]
fn block_cache_and_fast_profile() {
    require_root("fixtures with owners");
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let mut rng = Rng::new(31);
    // One base system; the versions differ in their big files.
    let sys = |name: &str| {
        let p = work.join(name);
        random_tree(&Tree::new(&p), 21);
        p
    };
    let old_a = sys("old-a");
    Tree::new(&old_a)
        .file("usr/lib/big-text", &rng.text(1 << 20 | 12345))
        .file("usr/lib/big-random", &rng.bytes(1 << 20 | 999));
    let old_b = sys("old-b");
    Tree::new(&old_b).file("usr/lib/big-text", &rng.text(1 << 20 | 12345));
    let new = sys("new");
    let mut sparse = rng.text(1 << 20);
    sparse.extend(std::iter::repeat_n(0u8, 1 << 20));
    sparse.extend(rng.text(100_000));
    Tree::new(&new)
        .file("usr/lib/big-text", &rng.text(1 << 20 | 12345))
        .file("usr/lib/big-random", &rng.bytes(1 << 20 | 999))
        .file("usr/lib/added", &rng.text(2 << 20))
        .file("usr/lib/sparse", &sparse);
    // Enough small new files to fill fragment blocks of their own.
    for i in 0..600 {
        Tree::new(&new).file(format!("usr/share/new-doc/{i:03}"), &rng.text(4000 + i));
    }
    let iso_a = make_iso(work, "6.0", &old_a, &|t| boot_files(t, b"k1", false));
    let iso_b = make_iso(work, "6.0.1", &old_b, &|t| boot_files(t, b"k1", false));
    let iso_new = make_iso(work, "6.1", &new, &|t| boot_files(t, b"k2", false));

    let kit = |old: &Path, name: &str, extra: &[&str]| {
        let out = work.join(name);
        let res = Command::new(iukfarm())
            .env("SOURCE_DATE_EPOCH", SDE)
            .args(["build", "--force", "--old-iso"])
            .arg(old)
            .arg("--new-iso")
            .arg(&iso_new)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert_built(&res);
        (sha256_file(&out), block_counts(&res.stderr), out)
    };
    let cache = work.join("cache");
    let c = cache.to_str().unwrap();

    let (exact_a, ..) = kit(&iso_a, "a.iuk", &[]);
    let (exact_b, ..) = kit(&iso_b, "b.iuk", &["--threads", "1"]);
    let (cold_a, (compressed, hits, copied, _), _) = kit(&iso_a, "a.iuk", &["--block-cache", c]);
    assert_eq!(cold_a, exact_a, "a cold cache changed the bytes");
    assert!(compressed > 0 && hits == 0 && copied == 0);
    let (warm_b, (_, hits_b, ..), _) = kit(&iso_b, "b.iuk", &["--block-cache", c]);
    assert_eq!(warm_b, exact_b, "a warm cache changed the bytes");
    assert!(
        hits_b >= 4,
        "the other kit's blocks were not reused: {hits_b} hits"
    );
    let (warm_a, (compressed, hits, ..), _) = kit(&iso_a, "a.iuk", &["--block-cache", c]);
    assert_eq!(warm_a, exact_a);
    assert_eq!(
        compressed, 0,
        "{hits} hits, yet blocks were compressed again"
    );

    // Damage every entry: each is dropped and recomputed, never used.
    let mut damaged = 0;
    for sub in std::fs::read_dir(&cache).unwrap().flatten() {
        if sub.file_name() == "tmp" {
            continue;
        }
        for e in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let mut b = std::fs::read(e.path()).unwrap();
            let n = b.len();
            b[n - 1] ^= 0x40;
            std::fs::write(e.path(), b).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let (again, (compressed, hits, ..), _) = kit(&iso_a, "a.iuk", &["--block-cache", c]);
    assert_eq!(again, exact_a, "a damaged cache changed the bytes");
    assert_eq!(hits, 0, "a damaged entry was used");
    assert!(compressed > 0);

    // The fast profile: same bytes on any thread count, applies exactly.
    let (fast1, (_, _, copied, fragments), fast_kit) =
        kit(&iso_a, "fast.iuk", &["--profile", "fast"]);
    let (fast2, ..) = kit(&iso_a, "fast.iuk", &["--profile", "fast", "--threads", "1"]);
    assert_eq!(fast1, fast2, "the fast profile is not reproducible");
    assert_ne!(fast1, exact_a);
    assert!(copied >= 4, "only {copied} blocks copied");
    assert!(fragments >= 1, "no fragment block taken from the new image");
    run(Command::new(iukfarm())
        .args(["verify-iuk", "--old-iso"])
        .arg(&iso_a)
        .arg("--new-iso")
        .arg(&iso_new)
        .arg(&fast_kit));
    // The kernel reads the copied blocks and fragment blocks: every file of
    // the fast kit's diff is the new system's.
    let diff = work.join("fast-diff.squashfs");
    std::fs::write(&diff, cat(&fast_kit, "overlay/live/6.1.squashfs")).unwrap();
    let m = Mount::new(&diff, "squashfs", "");
    let mut checked = 0;
    let mut stack = vec![m.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(m.path()).unwrap().to_path_buf();
                let want = std::fs::read(new.join(&rel)).unwrap();
                assert!(
                    std::fs::read(e.path()).unwrap() == want,
                    "{}: the kernel reads other bytes",
                    rel.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 604, "only {checked} files in the fast diff");
    drop(m);
    let exact_size = std::fs::metadata(work.join("a.iuk")).unwrap().len() as f64;
    let fast_size = std::fs::metadata(&fast_kit).unwrap().len() as f64;
    assert!(
        (fast_size / exact_size - 1.0).abs() <= 0.02,
        "fast kit {fast_size} bytes vs exact {exact_size}"
    );
}

/// Tails 7's inputs: zstd system images. The block cache gives the same
/// bytes cold and warm; the fast profile cannot copy zstd blocks into the
/// xz diff, so it compresses them as the tails profile does (0 copied) and
/// only stores the kit's incompressible blocks as they are; its kit applies
/// exactly. The version picks gensquashfs 1.3.2, and the report says so.
#[test]
fn tails7_zstd_images_with_the_block_cache_and_the_fast_profile() {
    require_root("fixtures with owners");
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let (old_sys, new_sys) = (work.join("sys-7.0"), work.join("sys-7.1"));
    for (sys, seed, content) in [(&old_sys, 41, b"a"), (&new_sys, 42, b"b")] {
        random_tree(&Tree::new(sys), seed);
        wide_directory(sys, content);
    }
    let (old, new) = tails7_pair(work, &old_sys, &new_sys);
    let cache = work.join("cache");
    let kit = |name: &str, extra: &[&str]| {
        let out = work.join(name);
        let res = Command::new(iukfarm())
            .env("SOURCE_DATE_EPOCH", SDE)
            .args(["build", "--force", "--old-iso"])
            .arg(&old)
            .arg("--new-iso")
            .arg(&new)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert_built(&res);
        let says = String::from_utf8_lossy(&res.stderr).into_owned();
        (sha256_file(&out), block_counts(&res.stderr), out, says)
    };
    let (plain, _, plain_kit, says) = kit("plain.iuk", &[]);
    assert!(says.contains("gensquashfs 1.3.2's bytes"), "{says}");
    let c = cache.to_str().unwrap();
    let (cold, (compressed, ..), ..) = kit("cold.iuk", &["--block-cache", c]);
    let (warm, (again, hits, ..), ..) = kit("warm.iuk", &["--block-cache", c]);
    assert_eq!(
        (cold.as_str(), warm.as_str()),
        (plain.as_str(), plain.as_str())
    );
    assert!(
        compressed > 0 && again == 0 && hits > 0,
        "{compressed} {again} {hits}"
    );
    let (_, (_, _, copied, fragments), fast_kit, _) = kit("fast.iuk", &["--profile", "fast"]);
    assert_eq!(
        (copied, fragments),
        (0, 0),
        "zstd blocks copied into an xz diff"
    );
    for k in [&plain_kit, &fast_kit] {
        run(Command::new(iukfarm())
            .args(["verify-iuk", "-q", "--old-iso"])
            .arg(&old)
            .arg("--new-iso")
            .arg(&new)
            .arg(k));
    }
}

/// The numbers of a line of `iukfarm build`'s report that starts with `head`.
fn report_numbers(stderr: &[u8], head: &str) -> Vec<u64> {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with(head))
        .unwrap_or_else(|| panic!("no {head:?} line in: {text}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect()
}

/// Numbers in the build report's `head` line after `marker`.
fn numbers_after(stderr: &[u8], head: &str, marker: &str) -> Vec<u64> {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with(head))
        .unwrap_or_else(|| panic!("no {head:?} line in: {text}"));
    let at = line
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in: {line}"));
    report_numbers(&line.as_bytes()[at + marker.len()..], "")
}

/// Point releases. When a change moves the small files' tails in the
/// fragment blocks, tails are compared decompressed; with a block cache, by
/// digest, and the digests are kept: building again, or building the next
/// release (whose old image is today's new one), decompresses none of a
/// known image's fragment blocks while comparing. When a change leaves
/// most blocks stored as before, only the changed blocks are decompressed,
/// cache or not. Every kit is the bytes of a build without a cache, and
/// `verify-iuk` (which compares decompressed contents) accepts it. A damaged
/// digest file is dropped; one forged to hide the changes gives a kit that
/// `verify-iuk` refuses.
#[test]
fn tail_digests_are_kept_for_the_next_build() {
    require_tools(&["mksquashfs", "xorriso"]);
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // 1,800 files of 3,000 bytes: 349 tails per 1 MiB fragment block, 1,576
    // bytes to spare. Growing file 5 by 3,000 bytes moves every later tail;
    // rewriting files 10 and 1700 in place changes only their blocks.
    let system = |name: &str, grown: &[usize], rewritten: &[usize]| {
        let p = work.join(name);
        let t = Tree::new(&p);
        for i in 0..1800 {
            let mut body = Rng::new(1000 + i as u64).text(3000);
            if grown.contains(&i) {
                body.extend_from_slice(&Rng::new(7).text(3000));
            }
            if rewritten.contains(&i) {
                body[..7].copy_from_slice(b"patched");
            }
            t.file(format!("usr/share/doc/{i:04}"), &body);
        }
        // Only contents change between these releases.
        run(Command::new("find").arg(&p).args([
            "-exec",
            "touch",
            "-h",
            "-d",
            "@1700000000",
            "{}",
            "+",
        ]));
        p
    };
    let isos: Vec<_> = [
        ("6.0", &[][..], &[][..]),
        ("6.0.1", &[5][..], &[][..]),
        ("6.0.2", &[5][..], &[10, 1700][..]),
    ]
    .iter()
    .map(|(v, grown, rewritten)| {
        let sys = system(&format!("sys-{v}"), grown, rewritten);
        make_iso(work, v, &sys, &|t| boot_files(t, b"k1", false))
    })
    .collect();
    let cache = work.join("cache");
    let kit = |old: &Path, new: &Path, name: &str, cached: bool| {
        let out = work.join(name);
        let mut cmd = Command::new(iukfarm());
        cmd.env("SOURCE_DATE_EPOCH", SDE)
            .args(["build", "--force", "--old-iso"])
            .arg(old)
            .arg("--new-iso")
            .arg(new)
            .arg("--out")
            .arg(&out);
        if cached {
            cmd.arg("--block-cache").arg(&cache);
        }
        let res = cmd.output().unwrap();
        assert_built(&res);
        let tails = cached.then(|| report_numbers(&res.stderr, "tail digests: ")[..4].to_vec());
        // Fragment blocks (decompressed, in the image) for old and new while
        // comparing, then the tails found equal from blocks stored alike.
        let f = numbers_after(&res.stderr, "time: ", "fragment blocks decompressed: ");
        let alike = numbers_after(&res.stderr, "time: ", "decided from stored blocks, ")[0];
        let changed = numbers_after(&res.stderr, &out.display().to_string(), "bytes (")[0];
        (
            sha256_file(&out),
            tails,
            [f[0], f[1], f[2], f[3], changed, alike],
            out,
        )
    };
    let verify = |old: &Path, new: &Path, iuk: &Path| {
        let res = Command::new(iukfarm())
            .args(["verify-iuk", "--old-iso"])
            .arg(old)
            .arg("--new-iso")
            .arg(new)
            .arg(iuk)
            .output()
            .unwrap();
        let said = [res.stdout, res.stderr].concat();
        (
            res.status.code(),
            String::from_utf8_lossy(&said).into_owned(),
        )
    };
    let (a, b, c) = (&isos[0], &isos[1], &isos[2]);

    let (exact_ab, _, plain, ab) = kit(a, b, "ab.iuk", false);
    // Fragment blocks (old decompressed, of, new decompressed, of), files
    // changed, tails alike. A block is decompressed again only once it has
    // left the reader's few recent ones.
    assert!(
        plain[0] >= plain[1] && plain[2] >= plain[3] && plain[4] == 1 && plain[5] < 349,
        "tails did not move: {plain:?}"
    );
    let (code, said) = verify(a, b, &ab);
    assert_eq!(code, Some(0), "{said}");
    let (cold, tails, _, _) = kit(a, b, "ab.iuk", true);
    assert_eq!(cold, exact_ab, "digests changed the bytes");
    let tails = tails.unwrap();
    assert!(
        tails[..2] == [0, 0] && tails[2] >= 1800 && tails[3] >= 1800,
        "{tails:?}"
    );
    let (warm, tails, fragments, _) = kit(a, b, "ab.iuk", true);
    assert_eq!(warm, exact_ab, "kept digests changed the bytes");
    let tails = tails.unwrap();
    assert!(
        tails[0] > 1400 && tails[1] > 1400 && tails[2..] == [0, 0],
        "{tails:?}"
    );
    assert!(
        fragments[0] == 0 && fragments[2] == 0,
        "fragment blocks decompressed again: {fragments:?}"
    );

    // The next release rewrote two files in place: only their two blocks
    // are decompressed (none of the old image's with its digests kept).
    let (exact_bc, _, plain, bc) = kit(b, c, "bc.iuk", false);
    assert!(
        plain[0] == 2 && plain[2] == 2 && plain[4] == 2 && plain[5] > 1000,
        "blocks stored alike were decompressed: {plain:?}"
    );
    let (code, said) = verify(b, c, &bc);
    assert_eq!(code, Some(0), "{said}");
    let (next, tails, fragments, _) = kit(b, c, "bc.iuk", true);
    assert_eq!(next, exact_bc);
    let tails = tails.unwrap();
    assert!(
        tails[0] > 0 && tails[0] < 800 && tails[2] == 0 && tails[3] > 0 && tails[3] < 800,
        "{tails:?}"
    );
    assert!(
        fragments[0] == 0 && fragments[2] == 2,
        "the known old image was decompressed: {fragments:?}"
    );

    // Damaged files are dropped and computed again.
    let dir = cache.join("tails");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        bytes[100] ^= 1;
        std::fs::write(f, bytes).unwrap();
    }
    let (again, tails, _, _) = kit(b, c, "bc.iuk", true);
    assert_eq!(again, exact_bc, "a damaged digest file changed the bytes");
    assert_eq!(
        tails.unwrap()[..2],
        [0, 0],
        "a damaged digest file was used"
    );

    // Digest files are as trusted as the cache directory: forged ones that
    // make every tail look the same hide the changes, and verification by
    // applying the kit (as the coordinator does every kit) finds them.
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        let mut bytes = std::fs::read(&f).unwrap();
        let body = bytes.len() - 32;
        for e in bytes[48..body].chunks_exact_mut(44) {
            e[12..].fill(0);
        }
        let sum = {
            use sha2::Digest;
            sha2::Sha256::digest(&bytes[..body])
        };
        bytes[body..].copy_from_slice(&sum);
        std::fs::write(&f, bytes).unwrap();
    }
    let (forged, tails, _, forged_kit) = kit(b, c, "bc.iuk", true);
    assert!(tails.unwrap()[0] > 0, "the forged digests were not used");
    assert_ne!(forged, exact_bc, "forged digests hid nothing");
    let (code, said) = verify(b, c, &forged_kit);
    assert_eq!(code, Some(1), "verify-iuk: {said}");
    assert!(said.contains("usr/share/doc/0010"), "{said}");
}
