//! The kernel check: a kit read back through the Linux kernel's own
//! squashfs, the code that reads it on a Tails system, and compared entry
//! by entry with what our reader sees in it (the kit, then the SquashFS
//! diff inside it). Verification by applying the kit proves our reader's
//! view right; this proves the kernel's view equal to it. The kernel takes
//! less than liblzma does (an xz block with a SHA-256 check reads as EIO)
//! and follows pointers our reader never needs.
//!
//! Needs root and loop devices. All mounts are made by one thread in a
//! mount namespace of its own (see [`mount`]): nothing is mounted where
//! anyone else can see it, and when the process dies, even by kill -9, the
//! kernel tears the mounts and their loop devices down itself.

mod loopdev;
mod mount;

use std::path::Path;
use std::sync::{Arc, Mutex};

use iukfarm_engine::compare::{CompareOptions, Difference, compare_trees};
use iukfarm_engine::io::ReadAt;
use iukfarm_engine::sqfs::Archive;
use iukfarm_engine::tree::{Kind, Node};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This machine cannot run the check (not root, no loop devices, no
    /// squashfs in the kernel): not the kit's fault.
    #[error("the kernel check cannot run here: {0}")]
    Unavailable(String),
    /// The kernel refused the kit, or could not read a file of it.
    #[error("the Linux kernel cannot read this kit: {0}")]
    Refused(String),
    #[error(transparent)]
    Engine(#[from] iukfarm_engine::Error),
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Whether this machine can run the check, and if not, why.
pub fn available() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Unavailable(
            "it mounts the kit read-only, which takes root".into(),
        ));
    }
    if !Path::new(loopdev::CONTROL).exists() {
        return Err(Error::Unavailable(format!(
            "{} is missing (no loop devices)",
            loopdev::CONTROL
        )));
    }
    Ok(())
}

/// Whether a verifier runs the check: `auto` where it can (saying so when
/// it cannot), `on` or refuse to start, `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--kernel-check takes auto, on or off, not {s:?}")),
        }
    }
}

impl Mode {
    /// Whether to run the check here: `Ok(Err(why))` where `auto` cannot;
    /// `Err` where `on` cannot.
    pub fn resolve(self) -> Result<std::result::Result<(), String>> {
        match (self, available()) {
            (Mode::Off, _) => Ok(Err("--kernel-check off".into())),
            (_, Ok(())) => Ok(Ok(())),
            (Mode::Auto, Err(e)) => Ok(Err(e.to_string())),
            (Mode::On, Err(e)) => Err(e),
        }
    }
}

/// What the kernel read.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Entries compared (the kit's and its diff's).
    pub entries: u64,
    /// File bytes the kernel read and decompressed.
    pub bytes: u64,
    /// Where the kernel's view and ours differ; empty when they agree.
    pub differences: Vec<Difference>,
}

/// Mounts `kit` read-only, and the SquashFS diff in its `overlay/live/`,
/// reads every file through the kernel and compares every entry with our
/// reader's view of the same bytes. `work` is a directory of the caller's
/// where two empty mount points are made and removed.
pub fn check_kit(kit: &Path, work: &Path) -> Result<Report> {
    available()?;
    let points = tempfile::Builder::new()
        .prefix(".kernel-check")
        .tempdir_in(work)
        .map_err(|e| {
            Error::Io(format!(
                "cannot make mount points in {}: {e}",
                work.display()
            ))
        })?;
    let failure = Arc::new(Mutex::new(None));
    let mounted = mount::mount_kit(kit, points.path(), failure.clone())?;

    let ours = |src: Arc<dyn ReadAt>, what: &str| -> Result<Node> {
        let ar = Archive::open(src).map_err(|e| Error::Io(format!("{what}: {e}")))?;
        Ok(ar.to_tree()?)
    };
    let kit_file =
        std::fs::File::open(kit).map_err(|e| Error::Io(format!("{}: {e}", kit.display())))?;
    let mut report = Report::default();
    let compare = |ours: &Node, kernel: &Node, what: &str, report: &mut Report| -> Result<()> {
        let opts = CompareOptions {
            mtime: true,
            ..Default::default()
        };
        match compare_trees(ours, kernel, opts) {
            Ok(diffs) => {
                report.differences.extend(diffs.into_iter().map(|mut d| {
                    d.path = format!("{what}: {}", d.path);
                    d
                }));
                count(kernel, report);
                Ok(())
            }
            Err(e) => match failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                Some(m) => Err(Error::Refused(m)),
                None => Err(e.into()),
            },
        }
    };
    compare(
        &ours(Arc::new(kit_file), "the kit")?,
        &mounted.kit,
        "kit",
        &mut report,
    )?;
    if let Some((diff_file, kernel)) = &mounted.diff {
        let src: Arc<dyn ReadAt> = Arc::new(
            diff_file
                .try_clone()
                .map_err(|e| Error::Io(e.to_string()))?,
        );
        compare(&ours(src, "the kit's diff")?, kernel, "diff", &mut report)?;
    }
    drop(mounted);
    points
        .close()
        .map_err(|e| Error::Io(format!("cannot remove the mount points: {e}")))?;
    Ok(report)
}

fn count(n: &Node, report: &mut Report) {
    report.entries += 1;
    match &n.kind {
        Kind::File(f) => report.bytes += f.size,
        Kind::Dir(c) => c.iter().for_each(|c| count(c, report)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::path::PathBuf;

    use iukfarm_engine::sqfs::{WriterOptions, write_image};
    use iukfarm_engine::tree::{FileContent, Kind, Meta, Node};

    use super::*;

    fn meta(mode: u16, uid: u32, mtime: u32, xattrs: &[(&str, &str)]) -> Meta {
        Meta {
            mode,
            uid,
            gid: uid + 1,
            mtime,
            xattrs: xattrs
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn node(name: &str, meta: Meta, kind: Kind) -> Node {
        Node {
            name: name.as_bytes().to_vec(),
            meta,
            kind,
        }
    }

    fn file(name: &str, data: Vec<u8>) -> Node {
        node(
            name,
            meta(0o644, 0, 1_700_000_000, &[]),
            Kind::File(FileContent::from_bytes(data)),
        )
    }

    fn image(root: &Node) -> Vec<u8> {
        let out = tempfile::tempfile().unwrap();
        write_image(
            root,
            &WriterOptions::default(),
            &out,
            &iukfarm_engine::NoProgress,
        )
        .unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut v).unwrap();
        v
    }

    /// A diff as overlayfs reads it (a whiteout, an opaque directory),
    /// every inode type, owners, times, a file of many blocks.
    fn diff() -> Vec<u8> {
        let m = |mode| meta(mode, 0, 1_650_000_000, &[]);
        let opaque = meta(0o755, 0, 1_650_000_001, &[("trusted.overlay.opaque", "y")]);
        let noise: Vec<u8> = (0..700_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        image(&Node::dir(
            "",
            m(0o755),
            vec![
                node("gone", m(0o000), Kind::CharDev(0)),
                Node::dir(
                    "usr",
                    opaque,
                    vec![file("big", noise), file("small", b"tail\n".to_vec())],
                ),
                node(
                    "link",
                    meta(0o777, 5, 1_650_000_002, &[]),
                    Kind::Symlink(b"usr/small".to_vec()),
                ),
                node("blk", m(0o600), Kind::BlockDev(0x0801)),
                node("fifo", m(0o644), Kind::Fifo),
                node(
                    "suid",
                    meta(0o4755, 1000, 1_650_000_003, &[("user.k", "v")]),
                    Kind::File(FileContent::from_bytes(b"#!/bin/sh\n".to_vec())),
                ),
            ],
        ))
    }

    fn kit(diff: Vec<u8>) -> Vec<u8> {
        let d = meta(0o755, 0, 1_700_000_000, &[]);
        image(&Node::dir(
            "",
            d.clone(),
            vec![
                file("FORMAT", b"2\n".to_vec()),
                file("control.yml", b"---\ndelete_files: []\n".to_vec()),
                Node::dir(
                    "overlay",
                    d.clone(),
                    vec![
                        Node::dir(
                            "EFI",
                            d.clone(),
                            vec![file("grub.cfg", b"menuentry\n".to_vec())],
                        ),
                        Node::dir("live", d, vec![file("7.1.squashfs", diff)]),
                    ],
                ),
            ],
        ))
    }

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("kit.iuk");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Loop devices backed by `file`, as /sys lists them.
    fn loops_on(file: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let backing = e.path().join("loop/backing_file");
            if let Ok(b) = std::fs::read_to_string(&backing)
                && Path::new(b.trim()) == file
            {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out
    }

    fn wait_until_no_loops_on(file: &Path) {
        // The kernel frees an auto-clearing loop device on its last close,
        // which it may finish after the close returns.
        for _ in 0..200 {
            if loops_on(file).is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "loop devices still bound to {}: {:?}",
            file.display(),
            loops_on(file)
        );
    }

    fn mounted_under(dir: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines().any(|l| l.contains(&*dir.to_string_lossy()))
    }

    fn need_root() {
        // Fails where it cannot run, never passes silently; CI runs as root.
        available().expect("the kernel check tests need root and loop devices");
    }

    #[test]
    fn the_kernel_reads_a_good_kit_as_our_reader_does() {
        need_root();
        let dir = tempfile::tempdir().unwrap();
        let kit = write(dir.path(), &kit(diff()));
        let report = check_kit(&kit, dir.path()).unwrap();
        assert!(report.differences.is_empty(), "{:?}", report.differences);
        // The kit's 8 entries, and the diff's 9.
        assert_eq!(report.entries, 8 + 9);
        assert!(report.bytes > 700_000, "{report:?}");
        assert!(!mounted_under(dir.path()));
        wait_until_no_loops_on(&kit);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("kit.iuk")],
            "mount points removed"
        );
    }

    #[test]
    fn a_pointer_our_reader_skips_but_the_kernel_follows_is_refused() {
        need_root();
        // An export table pointer: our plain reader ignores it without the
        // exportable flag, the kernel's mount reads the table it names.
        let mut d = diff();
        let id_table = d[48..56].to_vec();
        d[88..96].copy_from_slice(&id_table);
        let dir = tempfile::tempdir().unwrap();
        let kit = write(dir.path(), &kit(d));
        let e = check_kit(&kit, dir.path()).unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e}");
        assert!(
            e.to_string().contains("refuses to mount the kit's diff"),
            "{e}"
        );
        wait_until_no_loops_on(&kit);
        assert!(!mounted_under(dir.path()));
    }

    #[test]
    fn a_killed_check_leaves_no_mount_and_no_loop_device() {
        if let Ok(dir) = std::env::var("IUKFARM_KERNELCHECK_HOLD") {
            // The child: mount, say so, wait to be killed.
            let dir = PathBuf::from(dir);
            let failure = Arc::new(Mutex::new(None));
            let held =
                mount::mount_kit(&dir.join("kit.iuk"), &dir.join("points"), failure).unwrap();
            println!("mounted {}", held.kit.children().len());
            loop {
                std::thread::park();
            }
        }
        need_root();
        let dir = tempfile::tempdir().unwrap();
        let kit = write(dir.path(), &kit(diff()));
        std::fs::create_dir(dir.path().join("points")).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_killed_check_leaves_no_mount_and_no_loop_device",
                "--nocapture",
            ])
            .env("IUKFARM_KERNELCHECK_HOLD", dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mounted = lines.find_map(|l| l.ok().filter(|l| l.starts_with("mounted")));
        assert_eq!(
            mounted.as_deref(),
            Some("mounted 3"),
            "the child mounted the kit"
        );
        assert_eq!(
            loops_on(&kit).len(),
            1,
            "the kit's loop device, while the child lives"
        );
        assert!(
            !mounted_under(dir.path()),
            "nothing mounted where others can see it"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        wait_until_no_loops_on(&kit);
    }
}
