//! Kits installed as Tails' installer installs them (tails-install-iuk,
//! re-enacted step by step in `reference/tails-install-iuk.sh`) onto a fake
//! Tails boot device: a tmpfs laid out from the old release's ISO as Tails
//! Installer lays out a USB stick. Then the device's module stack, mounted
//! with overlayfs in `live/Tails.module`'s order as Tails' initramfs stacks
//! it, must be the new release's system, and its boot files the new ISO's.
//!
//! The kernel here has neither vfat nor case-folding, so the device is a
//! tmpfs: times keep full seconds where FAT keeps two (which only makes the
//! installer's rsync quick check more discerning than on a real stick), and
//! names are case-sensitive, which the installer script makes up for where
//! it matters (delete_files).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iukfarm_tests::releases::{boot_files, make_iso, systems, tails7_pair};
use iukfarm_tests::{
    Mount, diff_listings, disk_listing, iukfarm, require_root, require_tools, run, sha256_file,
};

/// SOURCE_DATE_EPOCH of the newest sample release; each older one is four
/// weeks older (`iukfarm samples`).
const SAMPLE_SDE: u32 = 1_730_285_444;
const FOUR_WEEKS: u32 = 28 * 86_400;
/// SOURCE_DATE_EPOCH of the kits of `releases`' pairs (after their ISOs').
const SDE: &str = "1730285444";

fn requirements() {
    require_root("tmpfs, loop and overlay mounts, as Tails' installer and initramfs do");
    require_tools(&["xorriso", "rsync", "perl", "mksquashfs"]);
}

/// A fake Tails boot device: a tmpfs with the old release's ISO on it as
/// Tails Installer puts it there (`isolinux/` as `syslinux/`, a
/// `live/Tails.module` naming the system image), mounted read-only as on a
/// running Tails. Unmounted when dropped.
struct Device {
    dir: tempfile::TempDir,
    /// What the installer gets as the partition and the boot device.
    scratch: tempfile::TempDir,
}

impl Device {
    fn from_iso(iso: &Path) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m,mode=0755", "iukfarm-device"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs (needs root)");
        let d = Device {
            dir,
            scratch: tempfile::tempdir().unwrap(),
        };
        extract(iso, "/", d.path());
        fs::rename(d.path().join("isolinux"), d.path().join("syslinux")).unwrap();
        fs::rename(
            d.path().join("syslinux/isolinux.cfg"),
            d.path().join("syslinux/syslinux.cfg"),
        )
        .unwrap();
        fs::write(d.path().join("live/Tails.module"), "filesystem.squashfs\n").unwrap();
        run(Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(d.path()));
        d
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn install(&self, kit: &Path) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/tails-install-iuk.sh");
        Command::new("bash")
            .arg(script)
            .arg(self.path())
            .arg(kit)
            .arg(self.scratch.path().join("partition"))
            .arg(self.scratch.path().join("boot-device"))
            .output()
            .unwrap()
    }

    /// Installs `kit`, which must succeed.
    fn installed(&self, kit: &Path) {
        let o = self.install(kit);
        assert!(
            o.status.success(),
            "installing {}: {}",
            kit.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Every way the device differs from the release of `iso`: its module
    /// stack from that release's system, its boot files from the ISO's.
    fn differences_from(&self, iso: &Path) -> Vec<String> {
        let modules = fs::read_to_string(self.path().join("live/Tails.module")).unwrap();
        let layers: Vec<Mount> = modules
            .lines()
            .map(|m| Mount::new(&self.path().join("live").join(m), "squashfs", ""))
            .collect();
        // overlayfs lists the top layer first.
        let lower: Vec<String> = layers
            .iter()
            .rev()
            .map(|l| l.path().display().to_string())
            .collect();
        let stack = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lower.join(":")))
            .arg("overlay")
            .arg(stack.path()));
        let unmount = Unmount(stack.path().to_path_buf());
        let release = tempfile::tempdir().unwrap();
        extract(iso, "/", release.path());
        let system = Mount::new(
            &release.path().join("live/filesystem.squashfs"),
            "squashfs",
            "",
        );
        let mut out: Vec<String> = diff_listings(
            &disk_listing(system.path()),
            &disk_listing(stack.path()),
            true,
        )
        .into_iter()
        .map(|d| format!("system: {d}"))
        .collect();
        drop(unmount);
        drop(system);
        drop(layers);

        // Boot files: the same contents (the installer sets its own modes).
        let contents = |root: &Path| {
            disk_listing(root)
                .into_iter()
                .filter_map(|(p, e)| e.sha256.map(|s| (p, s)))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        for dir in ["EFI", "utils"] {
            let (want, got) = (
                contents(&release.path().join(dir)),
                contents(&self.path().join(dir)),
            );
            for p in want.keys().chain(got.keys()) {
                if want.get(p) != got.get(p) {
                    out.push(format!("{dir}/{} differs", String::from_utf8_lossy(p)));
                }
            }
        }
        for f in ["live/vmlinuz", "live/initrd.img"] {
            if sha256_file(&release.path().join(f)) != sha256_file(&self.path().join(f)) {
                out.push(format!("{f} differs"));
            }
        }
        // isolinux/ as the kit ships it: syslinux/, paths in it rewritten.
        for e in fs::read_dir(release.path().join("isolinux")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let on_device = if name == "isolinux.cfg" {
                "syslinux.cfg".to_string()
            } else {
                name.clone()
            };
            let want = replace(&fs::read(e.path()).unwrap(), b"/isolinux/", b"/syslinux/");
            let got = fs::read(self.path().join("syslinux").join(&on_device)).unwrap_or_default();
            if want != got {
                out.push(format!("syslinux/{on_device} differs"));
            }
        }
        out
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

/// `data` with every `from` replaced by `to` (bytes, not text).
fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Extracts `what` of an ISO into `to` with xorriso (not our reader).
fn extract(iso: &Path, what: &str, to: &Path) {
    run(Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", what])
        .arg(to));
}

fn build(old: &Path, new: &Path, sde: &str, out: &Path) -> Output {
    Command::new(iukfarm())
        .args(["build", "-q", "--source-date-epoch", sde, "--old-iso"])
        .arg(old)
        .arg("--new-iso")
        .arg(new)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn built(old: &Path, new: &Path, sde: &str, out: &Path) -> PathBuf {
    let o = build(old, new, sde, out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.to_path_buf()
}

/// `iukfarm samples` of `layout`: the ISO of each release, oldest first.
fn samples(dir: &Path, layout: &str, releases: u32) -> Vec<PathBuf> {
    run(Command::new(iukfarm())
        .args(["samples", "--layout", layout, "--scale", "1"])
        .args(["--releases", &releases.to_string(), "--output-dir"])
        .arg(dir));
    (0..releases)
        .map(|r| {
            dir.join(format!(
                "tails-amd64-{layout}.{r}/tails-amd64-{layout}.{r}.iso"
            ))
        })
        .collect()
}

#[test]
fn sample_kits_install_as_tails_installer_installs_them() {
    requirements();
    let tmp = tempfile::tempdir().unwrap();
    for layout in ["7", "6"] {
        let isos = samples(&tmp.path().join(layout), layout, 3);
        let kits = tmp.path().join(format!("kits-{layout}"));
        fs::create_dir(&kits).unwrap();
        let kit = |from: usize, to: usize, sde: u32| {
            let out = kits.join(format!("{from}-{to}.iuk"));
            if out.exists() {
                return out;
            }
            built(&isos[from], &isos[to], &sde.to_string(), &out)
        };
        // Straight to the newest, from each older release.
        for from in 0..2 {
            let dev = Device::from_iso(&isos[from]);
            dev.installed(&kit(from, 2, SAMPLE_SDE));
            assert_eq!(
                dev.differences_from(&isos[2]),
                Vec::<String>::new(),
                "Tails {layout}: {from} to the newest"
            );
            let modules = fs::read_to_string(dev.path().join("live/Tails.module")).unwrap();
            assert_eq!(
                modules,
                format!("filesystem.squashfs\n{layout}.2.squashfs\n")
            );
        }
        // Upgraded twice: every kit is made against the release the device
        // was first installed with (its filesystem.squashfs), and each
        // replaces the previous kit's layer.
        let dev = Device::from_iso(&isos[0]);
        dev.installed(&kit(0, 1, SAMPLE_SDE - FOUR_WEEKS));
        assert_eq!(dev.differences_from(&isos[1]), Vec::<String>::new());
        dev.installed(&kit(0, 2, SAMPLE_SDE));
        assert_eq!(
            dev.differences_from(&isos[2]),
            Vec::<String>::new(),
            "Tails {layout}: upgraded twice"
        );
        let live: Vec<String> = fs::read_dir(dev.path().join("live"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".squashfs"))
            .collect();
        assert_eq!(live.len(), 2, "the first kit's layer is gone: {live:?}");
    }
}

#[test]
fn kits_of_releases_made_with_debians_tools_install_too() {
    requirements();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // Tails 7: zstd system images, GRUB modules.
    let (old_sys, new_sys) = systems(work);
    let (old7, new7) = tails7_pair(work, &old_sys, &new_sys);
    // Tails 6: xz system images.
    let old6 = make_iso(work, "6.0", &old_sys, &|t| {
        boot_files(t, b"kernel 6.0", true)
    });
    let new6 = make_iso(work, "6.1", &new_sys, &|t| {
        boot_files(t, b"kernel 6.1", false)
    });
    for (old, new, name) in [(&old7, &new7, "7.0-7.1"), (&old6, &new6, "6.0-6.1")] {
        let kit = built(old, new, SDE, &work.join(format!("{name}.iuk")));
        let dev = Device::from_iso(old);
        dev.installed(&kit);
        assert_eq!(dev.differences_from(new), Vec::<String>::new(), "{name}");
    }
}

/// Two releases with the same SOURCE_DATE_EPOCH: the installer's rsync
/// (size and time, no checksum) skips the new kernel, which has the old
/// one's size, and the device keeps booting the old kernel. Tails' method
/// builds such a kit; `iukfarm build` refuses to.
#[test]
fn a_kit_dated_like_its_source_release_is_refused_since_it_would_install_wrong() {
    requirements();
    require_tools(&["gensquashfs", "bsdtar"]);
    let tmp = tempfile::tempdir().unwrap();
    let isos = samples(&tmp.path().join("isos"), "7", 3);
    let old_date = (SAMPLE_SDE - FOUR_WEEKS).to_string();

    // The Tails method, given 7.1's own date for 7.1 -> 7.2.
    let tails_kit = tmp.path().join("tails.iuk");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/tails-create-iuk.sh");
    run(Command::new("bash")
        .env(
            "GENSQUASHFS",
            iukfarm_tests::reference_tool("gensquashfs", iukfarm_engine::sqfs::Gensquashfs::V1_3_2),
        )
        .env("SOURCE_DATE_EPOCH", &old_date)
        .arg(script)
        .arg(&isos[1])
        .arg(&isos[2])
        .arg("7.2.squashfs")
        .arg(&tails_kit));
    let dev = Device::from_iso(&isos[1]);
    dev.installed(&tails_kit);
    let wrong = dev.differences_from(&isos[2]);
    assert!(
        wrong.iter().any(|d| d == "live/vmlinuz differs"),
        "the same-size kernel was not skipped: {wrong:?}"
    );

    // Ours refuses that date, names both dates and what to do, writes nothing.
    let out = tmp.path().join("ours.iuk");
    let o = build(&isos[1], &isos[2], &old_date, &out);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("is not later than")
            && e.contains("2024-10-02 10:50:44 UTC")
            && e.contains("the new release's SOURCE_DATE_EPOCH"),
        "{e}"
    );
    assert!(!out.exists());
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "only the ISOs and the Tails kit: {left:?}");
    // One second later is later: built, installed, right.
    let later = (SAMPLE_SDE - FOUR_WEEKS + 1).to_string();
    let kit = built(&isos[1], &isos[2], &later, &out);
    let dev = Device::from_iso(&isos[1]);
    dev.installed(&kit);
    assert_eq!(dev.differences_from(&isos[2]), Vec::<String>::new());
}
