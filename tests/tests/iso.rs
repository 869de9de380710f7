//! The ISO 9660 reader against xorriso: extents equal xorriso's
//! `report_lba`, names and symlinks come through Rock Ridge and Joliet, and
//! the SquashFS inside an ISO reads in place exactly like the image itself
//! (and like `unsquashfs -o OFFSET`).

use std::path::Path;
use std::process::Command;

use iukfarm_tests::fixtures::random_tree;
use iukfarm_tests::{Rng, Tree, iukfarm, require_root, require_tool, run};

const LONG_DIR: &str =
    "a directory name with spaces that is eighty characters long, really: 0123456789";

fn staging(dir: &Path) {
    let sys = dir.join("sys");
    random_tree(&Tree::new(&sys), 31);
    let t = Tree::new(&dir.join("cd"));
    t.dir("live");
    run(Command::new(iukfarm())
        .env("SOURCE_DATE_EPOCH", "1")
        .args(["sqfs", "pack", "-q", "--keep-xattr", "--pack-dir"])
        .arg(&sys)
        .arg(t.path("live/filesystem.squashfs")));
    let mut r = Rng::new(3);
    t.file("live/vmlinuz", &r.bytes(300_000))
        .file("live/initrd.img", &r.bytes(100_000))
        .file("EFI/BOOT/BOOTX64.EFI", &r.bytes(5_000))
        .file(
            "isolinux/isolinux.cfg",
            b"bla\n   bli/isolinux/blu\n\n\n bla/isolinux/",
        )
        .file("isolinux/isolinux.bin", &r.bytes(2048 * 4))
        .file("utils/linux/syslinux", b"")
        .file(
            format!("{LONG_DIR}/file-with-a-rather-long-name-beyond-iso-limits.txt"),
            b"long",
        )
        .symlink("utils/link", "linux/syslinux");
}

fn xorriso(cd: &Path, iso: &Path, opts: &[&str]) {
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet"])
        .args(opts)
        .arg("-o")
        .arg(iso)
        .arg(cd));
}

/// (start byte, size) of a file as xorriso reports it.
fn report_lba(iso: &Path, path: &str) -> (u64, u64) {
    let out = run(Command::new("xorriso").arg("-indev").arg(iso).args([
        "-find",
        path,
        "-exec",
        "report_lba",
        "--",
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with("File data lba:"))
        .unwrap_or_else(|| panic!("no report_lba line in {text}"));
    let f: Vec<&str> = line
        .trim_start_matches("File data lba:")
        .split(',')
        .map(str::trim)
        .collect();
    let lba: u64 = f[1].parse().unwrap();
    let size: u64 = f[3].parse().unwrap();
    (lba * 2048, size)
}

#[test]
fn extents_names_and_in_place_reading_match_xorriso() {
    require_root("the fixture changes owners");
    require_tool("xorriso");
    require_tool("unsquashfs");
    let tmp = tempfile::tempdir().unwrap();
    staging(tmp.path());
    let cd = tmp.path().join("cd");
    let image = cd.join("live/filesystem.squashfs");
    let direct = String::from_utf8(
        run(Command::new(iukfarm())
            .args(["sqfs", "ls", "-x"])
            .arg(&image))
        .stdout,
    )
    .unwrap();

    let variants: [(&str, &[&str]); 3] = [
        ("rock-ridge", &["-R", "-J", "-joliet-long"]),
        (
            "hybrid",
            &[
                "-R",
                "-r",
                "-J",
                "-joliet-long",
                "-l",
                "-iso-level",
                "3",
                "-partition_offset",
                "16",
                "-b",
                "isolinux/isolinux.bin",
                "-c",
                "isolinux/boot.cat",
                "-no-emul-boot",
                "-boot-load-size",
                "4",
            ],
        ),
        ("joliet-only", &["-J", "-joliet-long"]),
    ];
    for (name, opts) in variants {
        let iso = tmp.path().join(format!("{name}.iso"));
        xorriso(&cd, &iso, opts);
        for path in [
            "live/filesystem.squashfs",
            "live/vmlinuz",
            "EFI/BOOT/BOOTX64.EFI",
        ] {
            let mut c = Command::new(iukfarm());
            c.args(["iso", "extent"]).arg(&iso).arg(path);
            let out = String::from_utf8(run(&mut c).stdout).unwrap();
            let (off, len) = report_lba(&iso, &format!("/{path}"));
            assert_eq!(
                out.trim(),
                format!("{off} {len}"),
                "{name}: extent of {path}"
            );
        }

        let mut c = Command::new(iukfarm());
        c.args(["sqfs", "ls", "-x", "--in-iso", "live/filesystem.squashfs"])
            .arg(&iso);
        let in_place = String::from_utf8(run(&mut c).stdout).unwrap();
        assert_eq!(
            in_place, direct,
            "{name}: reading the image inside the ISO differs"
        );

        let (off, _) = report_lba(&iso, "/live/filesystem.squashfs");
        let a = run(Command::new("unsquashfs")
            .env("TZ", "UTC")
            .arg("-lln")
            .arg(&image))
        .stdout;
        let b = run(Command::new("unsquashfs")
            .env("TZ", "UTC")
            .args(["-lln", "-o", &off.to_string()])
            .arg(&iso))
        .stdout;
        assert_eq!(a, b, "{name}: unsquashfs at our offset");

        let mut c = Command::new(iukfarm());
        c.args(["iso", "cat"])
            .arg(&iso)
            .arg("isolinux/isolinux.cfg");
        assert_eq!(
            run(&mut c).stdout,
            std::fs::read(cd.join("isolinux/isolinux.cfg")).unwrap()
        );

        let listing = {
            let mut c = Command::new(iukfarm());
            c.args(["iso", "ls", "-R"]).arg(&iso);
            String::from_utf8(run(&mut c).stdout).unwrap()
        };
        assert!(
            listing.contains(&format!(
                "{LONG_DIR}/file-with-a-rather-long-name-beyond-iso-limits.txt"
            )),
            "{name}: long names lost:\n{listing}"
        );
        if name != "joliet-only" {
            assert!(
                listing.contains("utils/link -> linux/syslinux"),
                "{name}: symlink lost:\n{listing}"
            );
            assert!(
                listing.contains("EFI/BOOT/BOOTX64.EFI"),
                "{name}: case lost:\n{listing}"
            );
        }
        let cdio = {
            let mut c = Command::new(iukfarm());
            c.args(["iso", "ls", "--cdio"]).arg(&iso).arg("EFI/BOOT");
            String::from_utf8(run(&mut c).stdout).unwrap()
        };
        assert!(
            cdio.contains("bootx64.efi"),
            "{name}: libcdio-style names: {cdio}"
        );
    }
}

#[test]
fn not_an_iso_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("random.iso");
    std::fs::write(&f, Rng::new(1).bytes(100_000)).unwrap();
    let out = Command::new(iukfarm())
        .args(["iso", "ls"])
        .arg(&f)
        .output()
        .unwrap();
    // Bad input: exit 2, as for every command.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an ISO 9660 image"), "{err}");
    assert!(
        err.contains("random.iso"),
        "error does not name the file: {err}"
    );
}
