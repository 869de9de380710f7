//! `iukfarm sqfs pack` must write exactly the bytes gensquashfs writes, 1.2.0
//! (bookworm, Tails 6) and 1.3.2 (trixie, Tails 7) alike, for both option
//! sets Tails uses, on trees covering every feature of the format, and
//! whatever the number of threads.

use std::path::Path;
use std::process::Command;

use iukfarm_engine::sqfs::Gensquashfs;
use iukfarm_tests::fixtures::{fixtures, random_tree};
use iukfarm_tests::{Tree, gensquashfs, iukfarm, require_root, run, sha256_file};

const SDE: &str = "1730285444";
/// The diff inside an IUK and the outer kit, as tails-create-iuk runs gensquashfs.
const OPTION_SETS: [&[&str]; 2] = [
    &[
        "--keep-xattr",
        "--comp-extra",
        "x86,dictsize=1024K",
        "--block-size",
        "1048576",
    ],
    &["--keep-xattr", "--all-root"],
];

fn reference(v: Gensquashfs, src: &Path, out: &Path, opts: &[&str]) {
    run(gensquashfs(v)
        .env("SOURCE_DATE_EPOCH", SDE)
        .arg("--quiet")
        .args(opts)
        .arg("--pack-dir")
        .arg(src)
        .arg(out));
}

fn ours(v: Gensquashfs, src: &Path, out: &Path, opts: &[&str], jobs: &str) {
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["sqfs", "pack", "--quiet", "-j", jobs])
        .args(["--gensquashfs", v.as_str()])
        .args(opts)
        .arg("--pack-dir")
        .arg(src)
        .arg(out));
}

#[test]
fn byte_identical_to_gensquashfs() {
    require_root("fixtures need mknod, chown and trusted.* xattrs");
    let tmp = tempfile::tempdir().unwrap();
    let all = fixtures();
    assert!(all.len() >= 30);
    let mut failures = Vec::new();
    // Where the two versions' images differ: the fixtures must exercise
    // what changed, or this test proves nothing about it.
    let mut differ = Vec::new();
    for (name, build) in all {
        let src = tmp.path().join(name);
        build(&Tree::new(&src));
        for (k, opts) in OPTION_SETS.iter().enumerate() {
            // Both versions at once: gensquashfs compresses on one thread,
            // and the machine has two.
            let runs: Vec<(Gensquashfs, String, String)> = std::thread::scope(|s| {
                let handles: Vec<_> = (Gensquashfs::ALL.into_iter())
                    .map(|v| {
                        let (tmp, src) = (tmp.path(), &src);
                        s.spawn(move || {
                            let g = tmp.join(format!("{name}.{k}.{v}.gen.sqfs"));
                            let o = tmp.join(format!("{name}.{k}.{v}.ours.sqfs"));
                            reference(v, src, &g, opts);
                            ours(v, src, &o, opts, "2");
                            let (hg, ho) = (sha256_file(&g), sha256_file(&o));
                            std::fs::remove_file(&g).unwrap();
                            std::fs::remove_file(&o).unwrap();
                            (v, hg, ho)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut by_version = Vec::new();
            for (v, hg, ho) in runs {
                if hg != ho {
                    failures.push(format!(
                        "{name} with {opts:?}: gensquashfs {v} {hg}, ours {ho}"
                    ));
                }
                by_version.push(hg);
            }
            if by_version[0] != by_version[1] {
                differ.push(format!("{name}.{k}"));
            }
        }
        std::fs::remove_dir_all(&src).unwrap();
    }
    assert!(
        failures.is_empty(),
        "images differ:\n{}",
        failures.join("\n")
    );
    // Only directories of 256 entries or more, not larger than 64 KiB
    // (those were extended in 1.2.0 already), tell the versions apart.
    for must in [
        "dir-255-256-257.0",
        "dir-255-256-257.1",
        "twenty-thousand-entries.0",
        "xattrs-many-sets.0",
    ] {
        assert!(
            differ.iter().any(|d| d == must),
            "{must}: 1.2.0 and 1.3.2 wrote the same image; the fixture no longer shows \
             the change (differing: {differ:?})"
        );
    }
    for same in ["dir-255-only", "big-directory", "random-tree-1"] {
        assert!(
            !differ.iter().any(|d| d.starts_with(same)),
            "{same} differs between 1.2.0 and 1.3.2: {differ:?}"
        );
    }
}

#[test]
fn thread_count_never_changes_the_bytes() {
    require_root("the fixture changes owners");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    random_tree(&Tree::new(&src), 4242);
    let mut hashes = Vec::new();
    for jobs in ["1", "2", "8"] {
        for (k, opts) in OPTION_SETS.iter().enumerate() {
            for (n, v) in Gensquashfs::ALL.into_iter().enumerate() {
                let o = tmp.path().join(format!("out.{jobs}.{k}.{v}"));
                ours(v, &src, &o, opts, jobs);
                hashes.push((k * 2 + n, sha256_file(&o)));
            }
        }
    }
    for k in 0..OPTION_SETS.len() * 2 {
        let set: std::collections::BTreeSet<_> =
            hashes.iter().filter(|h| h.0 == k).map(|h| &h.1).collect();
        assert_eq!(
            set.len(),
            1,
            "option set {k}: outputs differ between -j 1, 2 and 8"
        );
    }
}

#[test]
fn unsupported_xattr_namespace_is_refused_like_gensquashfs() {
    require_root("setting a POSIX ACL xattr");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // user::rw-, user:1000:r--, group::r--, mask::r--, other::r-- (an ACL
    // that cannot be folded into the mode bits, so it is really stored).
    let mut acl = vec![2u8, 0, 0, 0];
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1000),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    Tree::new(&src)
        .file("f", b"x")
        .xattr("f", "system.posix_acl_access", &acl);
    for v in Gensquashfs::ALL {
        let g = gensquashfs(v)
            .args(["--quiet", "--keep-xattr", "--pack-dir"])
            .arg(&src)
            .arg(tmp.path().join("g"))
            .output()
            .unwrap();
        assert!(
            !g.status.success(),
            "gensquashfs {v} accepted a system.* xattr"
        );
    }
    let out = tmp.path().join("o");
    let o = Command::new(iukfarm())
        .args(["sqfs", "pack", "--keep-xattr", "--pack-dir"])
        .arg(&src)
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("system.posix_acl_access"),
        "unclear error: {err}"
    );
    assert!(!out.exists(), "a failed pack left its output behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "src")
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

/// `sqfs pack` says whose bytes it wrote (1.3.2, what Tails 7 pins, unless
/// told otherwise) and refuses a version it does not reproduce.
#[test]
fn pack_says_whose_bytes_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    Tree::new(&src).file("f", b"x");
    let pack = |extra: &[&str], out: &str| {
        Command::new(iukfarm())
            .args(["sqfs", "pack", "--pack-dir"])
            .arg(&src)
            .arg(tmp.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, says) in [(&[][..], "1.3.2"), (&["--gensquashfs", "1.2.0"], "1.2.0")] {
        let o = pack(extra, says);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("gensquashfs {says}'s bytes")),
            "{err}"
        );
    }
    let o = pack(&["--gensquashfs", "1.3.1"], "bad");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("expected 1.2.0 or 1.3.2"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!tmp.path().join("bad").exists());
}
