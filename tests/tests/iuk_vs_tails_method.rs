//! `iukfarm build` must write the same bytes as the Tails method, re-enacted
//! by `tests/reference/tails-create-iuk.sh` with loop mounts, overlayfs,
//! rsync, gensquashfs, bsdtar, libcdio and YAML::XS, on release pairs that
//! cover the cases of tails-iuk.md §2.2 and §7.1.

use std::path::Path;
use std::process::Command;

use iukfarm_tests::fixtures::random_tree;
use iukfarm_tests::releases::{boot_files, make_iso, systems};
use iukfarm_tests::{Tree, iukfarm, require_root, require_tools, run, sha256_file, sqfs_ls};

/// The demo uses the same SOURCE_DATE_EPOCH.
const SDE: &str = "1730285444";

fn reference(old: &Path, new: &Path, diff_name: &str, out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/tails-create-iuk.sh");
    run(Command::new("bash")
        .arg(script)
        .arg(old)
        .arg(new)
        .arg(diff_name)
        .arg(out)
        .env("SOURCE_DATE_EPOCH", SDE));
}

fn ours(old: &Path, new: &Path, diff_name: &str, out: &Path) {
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args([
            "build",
            "-q",
            "--squashfs-diff-name",
            diff_name,
            "--old-iso",
        ])
        .arg(old)
        .arg("--new-iso")
        .arg(new)
        .arg("--out")
        .arg(out));
}

/// What differs between two kits, to make a failure readable.
fn explain(a: &Path, b: &Path, diff_name: &str) -> String {
    let ls = |img: &Path| sqfs_ls(img, &["-x"]);
    let mut report = String::new();
    let (la, lb) = (ls(a), ls(b));
    if la != lb {
        report.push_str(&format!(
            "kit listings differ:\n--- reference\n{la}\n--- ours\n{lb}\n"
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut diffs = Vec::new();
    for (k, img) in [a, b].iter().enumerate() {
        let p = tmp.path().join(format!("d{k}"));
        let data = run(Command::new(iukfarm())
            .args(["sqfs", "cat"])
            .arg(img)
            .arg(format!("overlay/live/{diff_name}")))
        .stdout;
        std::fs::write(&p, data).unwrap();
        diffs.push(ls(&p));
    }
    if diffs[0] != diffs[1] {
        report.push_str(&format!(
            "diff listings differ:\n--- reference\n{}\n--- ours\n{}\n",
            diffs[0], diffs[1]
        ));
    } else {
        report.push_str("diff listings are equal (layout or xattr order differs)\n");
    }
    report
}

#[test]
fn same_bytes_as_the_tails_method() {
    require_root("loop mounts, overlayfs, fixtures with owners and devices");
    require_tools(&[
        "mksquashfs",
        "xorriso",
        "gensquashfs",
        "rsync",
        "bsdtar",
        "perl",
        "python3",
    ]);
    let probe = Command::new("perl")
        .args(["-MDevice::Cdio::ISO9660::IFS", "-MYAML::XS", "-e", "1"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "the reference needs libdevice-cdio-perl and libyaml-libyaml-perl (scripts/test.sh installs them)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();

    // 1. Every kind of system change, a changed kernel, removed boot files.
    let (old_sys, new_sys) = systems(work);
    let old = make_iso(work, "6.0", &old_sys, &|t| boot_files(t, b"kernel 1", true));
    let new = make_iso(work, "6.1", &new_sys, &|t| {
        boot_files(t, b"kernel 2", false)
    });

    // 2. Unchanged kernel, a kernel added, a boot config changed, a larger
    //    system change (a different random tree under usr/).
    let sys3 = work.join("sys-6.2");
    run(Command::new("cp").arg("-a").arg(&new_sys).arg(&sys3));
    random_tree(&Tree::new(&sys3.join("usr")), 12);
    let v3 = make_iso(work, "6.2", &sys3, &|t| {
        boot_files(t, b"kernel 2", false);
        t.file("live/vmlinuz2", b"second kernel")
            .file("live/initrd2.img", b"second initrd")
            .file("isolinux/live.cfg", b"new /isolinux/ config\n");
    });

    let mut failures = Vec::new();
    let cases: [(&str, &Path, &Path); 4] = [
        ("changes", &old, &new),
        ("identical", &new, &new),
        ("kernel-added", &new, &v3),
        ("two-releases", &old, &v3),
    ];
    for (name, a, b) in cases {
        let diff_name = format!("{name}.squashfs");
        let r = work.join(format!("{name}.reference.iuk"));
        let o = work.join(format!("{name}.ours.iuk"));
        reference(a, b, &diff_name, &r);
        ours(a, b, &diff_name, &o);
        if sha256_file(&r) != sha256_file(&o) {
            failures.push(format!("{name}: {}", explain(&r, &o, &diff_name)));
        }
        let v = Command::new(iukfarm())
            .args(["verify-iuk", "-q", "--old-iso"])
            .arg(a)
            .arg("--new-iso")
            .arg(b)
            .arg(&o)
            .output()
            .unwrap();
        if !v.status.success() {
            failures.push(format!(
                "{name}: verify-iuk refused the kit:\n{}",
                String::from_utf8_lossy(&v.stdout)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The demo's natively written ISOs (no xorriso) are read by libcdio, bsdtar
/// and xorriso in the reference pipeline, which then makes the same IUK the
/// demo's farm made.
#[test]
fn demo_isos_and_iuks_match_the_tails_method() {
    require_root("loop mounts and overlayfs in the reference pipeline");
    require_tools(&[
        "xorriso",
        "gensquashfs",
        "rsync",
        "bsdtar",
        "perl",
        "python3",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    run(Command::new(iukfarm())
        .args(["demo", "--releases", "2", "--scale", "2", "--output-dir"])
        .arg(&out));
    let old = out.join("isos/tails-amd64-6.0/tails-amd64-6.0.iso");
    let new = out.join("isos/tails-amd64-6.1/tails-amd64-6.1.iso");
    let r = tmp.path().join("reference.iuk");
    reference(&old, &new, "6.1.squashfs", &r);
    assert_eq!(
        sha256_file(&r),
        sha256_file(&out.join("release/Tails_amd64_6.0_to_6.1.iuk"))
    );
    let sums = std::fs::read_to_string(out.join("release/SHA256SUMS")).unwrap();
    assert!(sums.starts_with(&sha256_file(&r)), "SHA256SUMS: {sums}");
}
