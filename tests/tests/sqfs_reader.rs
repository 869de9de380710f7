//! Our reader and our images against what no one here wrote: the kernel's
//! squashfs driver, unsquashfs 4.5.1, rdsquashfs and sqfsdiff 1.2.0, on our
//! images and on images made by mksquashfs (Tails 7's zstd options among
//! them) and gensquashfs 1.2.0 and 1.3.2.

use std::path::Path;
use std::process::Command;

use iukfarm_engine::sqfs::Gensquashfs;
use iukfarm_tests::fixtures::{fixtures, random_tree};
use iukfarm_tests::{
    Mount, Tree, diff_listings, disk_listing, gensquashfs, image_listing, iukfarm, link_groups,
    open_image, require_root, require_tool, run, without_empty_xattrs,
};

const DIFF_OPTS: &[&str] = &[
    "--keep-xattr",
    "--comp-extra",
    "x86,dictsize=1024K",
    "--block-size",
    "1048576",
];

fn pack_ours(src: &Path, out: &Path, opts: &[&str]) {
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["sqfs", "pack", "--quiet"])
        .args(opts)
        .arg("--pack-dir")
        .arg(src)
        .arg(out));
}

/// Every fixture: the kernel's view of our image equals our reader's view,
/// and both equal the source tree (owners, modes, xattrs, contents, link
/// targets, device numbers), except for the root directory, which
/// gensquashfs always makes 0755 root:root.
#[test]
fn kernel_mount_agrees_with_our_reader_and_the_source() {
    require_root("loop mounts, mknod and chown");
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    for (name, build) in fixtures() {
        if name == "executables" {
            continue;
        }
        let src = tmp.path().join(name);
        build(&Tree::new(&src));
        let img = tmp.path().join(format!("{name}.sqfs"));
        pack_ours(&src, &img, DIFF_OPTS);
        let ours = image_listing(&open_image(&img));
        let mount = Mount::new(&img, "squashfs", "");
        let kernel = disk_listing(mount.path());
        let source = without_empty_xattrs(disk_listing(&src));
        for d in diff_listings(&ours, &kernel, false) {
            problems.push(format!("{name}: reader vs kernel: {d}"));
        }
        for d in diff_listings(&source, &kernel, true) {
            problems.push(format!("{name}: source vs kernel: {d}"));
        }
        drop(mount);
        std::fs::remove_dir_all(&src).unwrap();
        std::fs::remove_file(&img).unwrap();
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Images made by mksquashfs (xz with BCJ, gzip, zstd) and by gensquashfs:
/// what unsquashfs extracts equals what our reader reads, including xattrs
/// and hard links.
#[test]
fn reads_foreign_images_like_unsquashfs() {
    require_root("mknod, chown, trusted.* xattrs and extracting them");
    require_tool("mksquashfs");
    require_tool("unsquashfs");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let t = Tree::new(&src);
    for (name, build) in fixtures() {
        if matches!(
            name,
            "hard-links"
                | "xattrs"
                | "devices"
                | "fully-sparse"
                | "duplicate-tails"
                | "special-modes"
                | "dir-255-256-257"
        ) {
            build(&Tree::new(&src.join(name)));
        }
    }
    t.hardlink("top-link", "hard-links/orig");
    random_tree(&Tree::new(&src.join("random")), 7);
    let source = disk_listing(&src);

    let makers: Vec<(&str, Vec<&str>)> = vec![
        (
            "mksquashfs-xz-bcj",
            vec![
                "-comp",
                "xz",
                "-Xbcj",
                "x86",
                "-b",
                "1M",
                "-Xdict-size",
                "1M",
            ],
        ),
        ("mksquashfs-gzip", vec!["-comp", "gzip"]),
        ("mksquashfs-zstd", vec!["-comp", "zstd", "-b", "64K"]),
        // Tails 7's system image (auto/build).
        (
            "mksquashfs-zstd-tails7",
            vec![
                "-comp",
                "zstd",
                "-Xcompression-level",
                "22",
                "-b",
                "1M",
                "-no-exports",
            ],
        ),
        ("gensquashfs", vec![]),
        ("gensquashfs-1.3.2", vec![]),
    ];
    let mut problems = Vec::new();
    for (name, opts) in makers {
        let img = tmp.path().join(format!("{name}.sqfs"));
        if let Some(v) = name.strip_prefix("gensquashfs") {
            let v = match v {
                "" => Gensquashfs::V1_2_0,
                _ => Gensquashfs::V1_3_2,
            };
            run(gensquashfs(v)
                .args(["--quiet", "--keep-xattr", "--pack-dir"])
                .arg(&src)
                .arg(&img));
        } else {
            run(Command::new("mksquashfs")
                .arg(&src)
                .arg(&img)
                .args(["-no-progress", "-quiet", "-noappend"])
                .args(&opts));
        }
        let ours = image_listing(&open_image(&img));
        let out = tmp.path().join(format!("{name}.out"));
        run(Command::new("unsquashfs")
            .args(["-no-progress", "-d"])
            .arg(&out)
            .arg(&img));
        let extracted = disk_listing(&out);
        for d in diff_listings(&ours, &extracted, false) {
            problems.push(format!("{name}: reader vs unsquashfs: {d}"));
        }
        if link_groups(&ours) != link_groups(&extracted) {
            problems.push(format!(
                "{name}: hard links differ: ours {:?}, unsquashfs {:?}",
                link_groups(&ours),
                link_groups(&extracted)
            ));
        }
        if !name.starts_with("gensquashfs") && link_groups(&ours) != link_groups(&source) {
            problems.push(format!("{name}: hard links of the source not seen"));
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// rdsquashfs unpacks our image into the source tree again, and sqfsdiff
/// finds no difference between our image and mksquashfs's of the same tree.
#[test]
fn squashfs_tools_ng_and_mksquashfs_agree_with_our_images() {
    require_root("chown and unpacking owners");
    require_tool("rdsquashfs");
    require_tool("sqfsdiff");
    require_tool("mksquashfs");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    random_tree(&Tree::new(&src), 99);
    let ours = tmp.path().join("ours.sqfs");
    pack_ours(&src, &ours, DIFF_OPTS);

    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run(Command::new("rdsquashfs")
        .args([
            "--quiet",
            "--chown",
            "--chmod",
            "--set-xattr",
            "--unpack-path",
            "/",
            "--unpack-root",
        ])
        .arg(&out)
        .arg(&ours));
    let diffs = diff_listings(&disk_listing(&src), &disk_listing(&out), true);
    assert!(
        diffs.is_empty(),
        "rdsquashfs unpacked something else:\n{}",
        diffs.join("\n")
    );

    let theirs = tmp.path().join("mksquashfs.sqfs");
    run(Command::new("mksquashfs").arg(&src).arg(&theirs).args([
        "-no-progress",
        "-quiet",
        "-noappend",
        "-comp",
        "xz",
    ]));
    // The root's mode and owner differ by design (gensquashfs semantics),
    // and "has a basic type" only says one tool used an extended inode
    // (e.g. for a sparse file) where the other used a basic one.
    let res = Command::new("sqfsdiff")
        .arg("-a")
        .arg(&ours)
        .arg("-b")
        .arg(&theirs)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&res.stdout);
    let real: Vec<&str> = report
        .lines()
        .filter(|l| {
            !l.trim().is_empty() && !l.starts_with("/:") && !l.ends_with("has a basic type")
        })
        .collect();
    assert!(
        res.status.code() != Some(2) && real.is_empty(),
        "sqfsdiff reports differences ({}):\n{report}\n{}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
}

/// `iukfarm sqfs ls` prints what `unsquashfs -lln` prints (numeric owners,
/// UTC times), entry for entry.
#[test]
fn ls_matches_unsquashfs_listing() {
    require_root("fixtures with devices and owners");
    require_tool("unsquashfs");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    random_tree(&Tree::new(&src), 5);
    Tree::new(&src)
        .node("dev/null", libc::S_IFCHR, 1, 3)
        .node("dev/sda", libc::S_IFBLK, 8, 0);
    let img = tmp.path().join("img.sqfs");
    pack_ours(&src, &img, &["--keep-xattr"]);
    let ours = run(Command::new(iukfarm()).args(["sqfs", "ls"]).arg(&img)).stdout;
    let theirs = run(Command::new("unsquashfs")
        .env("TZ", "UTC")
        .arg("-lln")
        .arg(&img))
    .stdout;
    let norm = |s: &[u8], strip: &str| -> Vec<Vec<String>> {
        String::from_utf8_lossy(s)
            .lines()
            .filter(|l| l.starts_with(['d', '-', 'l', 'c', 'b', 'p', 's']))
            .map(|l| {
                let mut f: Vec<String> = l.split_whitespace().map(str::to_string).collect();
                // Device sizes are "major, minor" in one or two fields.
                if f.len() > 2 && f[2].ends_with(',') {
                    let m = f.remove(3);
                    f[2].push_str(&m);
                }
                let path = f[5]
                    .strip_prefix(strip)
                    .unwrap_or(&f[5])
                    .trim_start_matches('/')
                    .to_string();
                f[5] = path;
                f
            })
            .collect()
    };
    assert_eq!(norm(&ours, "/"), norm(&theirs, "squashfs-root"));
}
