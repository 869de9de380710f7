//! `iukfarm build` must write the same bytes as the Tails method, re-enacted
//! by `tests/reference/tails-create-iuk.sh` with loop mounts, overlayfs,
//! rsync, gensquashfs, bsdtar, libcdio and YAML::XS, on release pairs that
//! cover the cases of tails-iuk.md §2.2 and §7.1: Tails 6 releases with
//! bookworm's gensquashfs 1.2.0, Tails 7 ones (zstd system images, a GRUB
//! module directory, a diff with a directory of 300 entries) with trixie's
//! 1.3.2, as Tails pins them, and with 1.2.0 when the RM asks for it.

use std::path::Path;
use std::process::Command;

use iukfarm_engine::sqfs::Gensquashfs::{self, V1_2_0, V1_3_2};
use iukfarm_tests::fixtures::random_tree;
use iukfarm_tests::releases::{boot_files, make_iso, systems, tails7_pair, wide_directory};
use iukfarm_tests::{
    Tree, iukfarm, reference_tool, require_root, require_tools, run, sha256_file, sqfs_ls,
};

/// The demo uses the same SOURCE_DATE_EPOCH.
const SDE: &str = "1730285444";

fn reference(v: Gensquashfs, old: &Path, new: &Path, diff_name: &str, out: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/tails-create-iuk.sh");
    run(Command::new("bash")
        .env("GENSQUASHFS", reference_tool("gensquashfs", v))
        .arg(script)
        .arg(old)
        .arg(new)
        .arg(diff_name)
        .arg(out)
        .env("SOURCE_DATE_EPOCH", SDE));
}

/// `iukfarm build`; `v` passed as --gensquashfs, else the version decides.
fn ours(v: Option<Gensquashfs>, old: &Path, new: &Path, diff_name: &str, out: &Path) {
    // A kit from a release to itself, which Tails' script makes: iukfarm
    // takes the same version twice for a mistake, so the old one is named
    // otherwise (names only; the bytes do not depend on it).
    let same = (old == new).then_some(["--old-version", "0.1"]);
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", SDE)
        .args(["build", "-q", "--squashfs-diff-name", diff_name])
        .args(same.into_iter().flatten())
        .args(v.map(|v| format!("--gensquashfs={v}")))
        .arg("--old-iso")
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

    // 3. Tails 7: zstd system images, the GRUB module directory (a few
    //    modules changed), a library directory of 300 changed files.
    let (sys7a, sys7b) = (work.join("sys-7.0"), work.join("sys-7.1"));
    for (from, to, content) in [(&old_sys, &sys7a, b"a"), (&new_sys, &sys7b, b"b")] {
        run(Command::new("cp").arg("-a").arg(from).arg(to));
        wide_directory(to, content);
    }
    let (v70, v71) = tails7_pair(work, &sys7a, &sys7b);

    let mut failures = Vec::new();
    // (name, old, new, the gensquashfs the reference runs, what we are told)
    type Case<'a> = (
        &'a str,
        &'a Path,
        &'a Path,
        Gensquashfs,
        Option<Gensquashfs>,
    );
    let cases: [Case; 7] = [
        ("changes", &old, &new, V1_2_0, None),
        ("identical", &new, &new, V1_2_0, None),
        ("kernel-added", &new, &v3, V1_2_0, None),
        ("two-releases", &old, &v3, V1_2_0, None),
        ("tails7", &v70, &v71, V1_3_2, None),
        ("tails7-identical", &v71, &v71, V1_3_2, None),
        ("tails7-asked-1.2.0", &v70, &v71, V1_2_0, Some(V1_2_0)),
    ];
    let mut kits = std::collections::BTreeMap::new();
    for (name, a, b, reference_v, asked) in cases {
        let diff_name = format!("{name}.squashfs");
        let r = work.join(format!("{name}.reference.iuk"));
        let o = work.join(format!("{name}.ours.iuk"));
        reference(reference_v, a, b, &diff_name, &r);
        ours(asked, a, b, &diff_name, &o);
        if sha256_file(&r) != sha256_file(&o) {
            failures.push(format!(
                "{name} (gensquashfs {reference_v}): {}",
                explain(&r, &o, &diff_name)
            ));
        }
        kits.insert(name, o.clone());
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
    // The Tails 7 pair must show what changed between the two writers.
    let (k13, k12) = (&kits["tails7"], &kits["tails7-asked-1.2.0"]);
    let kit = run(Command::new(iukfarm()).args(["sqfs", "ls"]).arg(k13)).stdout;
    assert!(
        String::from_utf8_lossy(&kit).contains("module279.mod"),
        "the Tails 7 kit lacks its GRUB modules"
    );
    assert_ne!(
        sha256_file(k13),
        sha256_file(k12),
        "gensquashfs 1.2.0 and 1.3.2 gave the same Tails 7 kit: the pair no longer shows the difference"
    );
}

/// The demo's natively written ISOs (no xorriso) are read by libcdio, bsdtar
/// and xorriso in the reference pipeline, which then makes the same IUK the
/// demo's farm made: Tails 7 samples (zstd system images, a GRUB module
/// directory, a 300-entry library directory in every diff) with trixie's
/// gensquashfs 1.3.2, and Tails 6 samples with 1.2.0.
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
    for (layout, gensquashfs) in [("7", V1_3_2), ("6", V1_2_0)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("demo");
        run(Command::new(iukfarm())
            .args([
                "demo",
                "--releases",
                "2",
                "--scale",
                "2",
                "--layout",
                layout,
            ])
            .arg("--output-dir")
            .arg(&out));
        let (old_v, new_v) = (format!("{layout}.0"), format!("{layout}.1"));
        let iso = |v: &str| out.join(format!("isos/tails-amd64-{v}/tails-amd64-{v}.iso"));
        let r = tmp.path().join("reference.iuk");
        reference(
            gensquashfs,
            &iso(&old_v),
            &iso(&new_v),
            &format!("{new_v}.squashfs"),
            &r,
        );
        assert_eq!(
            sha256_file(&r),
            sha256_file(&out.join(format!("release/Tails_amd64_{old_v}_to_{new_v}.iuk"))),
            "Tails {layout} samples"
        );
        let sums = std::fs::read_to_string(out.join("release/SHA256SUMS")).unwrap();
        assert!(sums.starts_with(&sha256_file(&r)), "SHA256SUMS: {sums}");
    }
}
