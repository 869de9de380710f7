//! `iukfarm sqfs pack` must write exactly the bytes gensquashfs 1.2.0 writes,
//! for both option sets Tails uses, on trees covering every feature of the
//! format, and whatever the number of threads.

use std::path::Path;
use std::process::Command;

use iukfarm_tests::fixtures::{fixtures, random_tree};
use iukfarm_tests::{Tree, iukfarm, require_root, require_tool, run, sha256_file};

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

fn gensquashfs(src: &Path, out: &Path, opts: &[&str]) {
    run(Command::new("gensquashfs")
        .env("SOURCE_DATE_EPOCH", SDE)
        .arg("--quiet")
        .args(opts)
        .arg("--pack-dir")
        .arg(src)
        .arg(out));
}

fn ours(src: &Path, out: &Path, opts: &[&str], jobs: &str) {
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["sqfs", "pack", "--quiet", "-j", jobs])
        .args(opts)
        .arg("--pack-dir")
        .arg(src)
        .arg(out));
}

#[test]
fn byte_identical_to_gensquashfs() {
    require_root("fixtures need mknod, chown and trusted.* xattrs");
    require_tool("gensquashfs");
    let tmp = tempfile::tempdir().unwrap();
    let all = fixtures();
    assert!(all.len() >= 30);
    let mut failures = Vec::new();
    for (name, build) in all {
        let src = tmp.path().join(name);
        build(&Tree::new(&src));
        for (k, opts) in OPTION_SETS.iter().enumerate() {
            let g = tmp.path().join(format!("{name}.{k}.gen.sqfs"));
            let o = tmp.path().join(format!("{name}.{k}.ours.sqfs"));
            gensquashfs(&src, &g, opts);
            ours(&src, &o, opts, "2");
            let (hg, ho) = (sha256_file(&g), sha256_file(&o));
            if hg != ho {
                failures.push(format!("{name} with {opts:?}: gensquashfs {hg}, ours {ho}"));
            }
            std::fs::remove_file(&g).unwrap();
            std::fs::remove_file(&o).unwrap();
        }
        std::fs::remove_dir_all(&src).unwrap();
    }
    assert!(
        failures.is_empty(),
        "images differ:\n{}",
        failures.join("\n")
    );
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
            let o = tmp.path().join(format!("out.{jobs}.{k}"));
            ours(&src, &o, opts, jobs);
            hashes.push((k, sha256_file(&o)));
        }
    }
    for k in 0..OPTION_SETS.len() {
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
    require_tool("gensquashfs");
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
    let g = Command::new("gensquashfs")
        .args(["--quiet", "--keep-xattr", "--pack-dir"])
        .arg(&src)
        .arg(tmp.path().join("g"))
        .output()
        .unwrap();
    assert!(!g.status.success(), "gensquashfs accepted a system.* xattr");
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
