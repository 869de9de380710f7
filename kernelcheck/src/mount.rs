//! The mounts, made by one thread that first leaves the process's mount
//! namespace: its mounts are private to it, and when the thread ends the
//! kernel detaches them. What the thread hands back (open directories of
//! the mounted images) keeps them readable for any thread until dropped;
//! the loop devices then free themselves.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use iukfarm_engine::tree::{
    FileContent, Kind, Meta, Node, OpenReader, Source, leaf_kind, read_xattrs,
};

use crate::{Error, Result, loopdev};

/// The first read the kernel failed, which makes the kit refused.
pub type Failure = Arc<Mutex<Option<String>>>;

pub struct Mounted {
    /// The kit as the kernel shows it; its files read through the mount.
    pub kit: Node,
    /// The diff file (opened through the kit's mount) and the diff as the
    /// kernel shows it.
    pub diff: Option<(File, Node)>,
}

pub fn mount_kit(kit: &Path, points: &Path, failure: Failure) -> Result<Mounted> {
    let (kit, points) = (kit.to_path_buf(), points.to_path_buf());
    std::thread::Builder::new()
        .name("kernel-check".into())
        .spawn(move || in_own_namespace(&kit, &points, &failure))
        .map_err(|e| Error::Io(format!("cannot start the kernel check: {e}")))?
        .join()
        .map_err(|_| Error::Io("the kernel check's thread panicked".into()))?
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn in_own_namespace(kit: &Path, points: &Path, failure: &Failure) -> Result<Mounted> {
    // SAFETY: plain system calls on this thread; CLONE_NEWNS (with its
    // implied CLONE_FS) is allowed in a threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(Error::Unavailable(os_error("unshare(CLONE_NEWNS)")));
    }
    let root = CString::new("/").expect("no NUL");
    // SAFETY: valid C strings; null source, type and data are allowed here.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(Error::Unavailable(os_error("making the mounts private")));
    }
    let kit_file = File::open(kit).map_err(|e| Error::Io(format!("{}: {e}", kit.display())))?;
    let kit_dir = points.join("kit");
    let kit_root = mount_squashfs(&kit_file, &kit_dir, "the kit")?;
    let kit_tree = scan_root(&kit_dir, &kit_root, "kit", failure)?;

    let diffs: Vec<&Node> = kit_tree
        .children()
        .iter()
        .filter(|c| c.name == b"overlay")
        .flat_map(|o| o.children())
        .filter(|c| c.name == b"live")
        .flat_map(|l| l.children())
        .filter(|c| c.name.ends_with(b".squashfs") && matches!(c.kind, Kind::File(_)))
        .collect();
    let diff = match diffs.as_slice() {
        [] => None,
        [d] => {
            let rel = [b"overlay/live/".as_slice(), &d.name].concat();
            let path = kit_dir.join(std::ffi::OsStr::from_bytes(&rel));
            let file = File::open(&path).map_err(|e| {
                Error::Refused(format!(
                    "the kernel cannot open {}: {e}",
                    String::from_utf8_lossy(&rel)
                ))
            })?;
            let diff_dir = points.join("diff");
            let diff_root = mount_squashfs(&file, &diff_dir, "the kit's diff")?;
            let tree = scan_root(&diff_dir, &diff_root, "diff", failure)?;
            Some((file, tree))
        }
        _ => {
            return Err(Error::Refused(
                "more than one SquashFS diff in overlay/live/".into(),
            ));
        }
    };
    Ok(Mounted {
        kit: kit_tree,
        diff,
    })
}

/// Mounts the image in `file` read-only at `dir` (made here); returns the
/// mounted root, opened.
fn mount_squashfs(file: &File, dir: &Path, what: &str) -> Result<Arc<OwnedFd>> {
    std::fs::create_dir(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
    let lo = loopdev::attach(file)?;
    let dev = CString::new(lo.path.as_os_str().as_bytes()).expect("no NUL");
    let target = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::Io(format!("{}: path holds NUL", dir.display())))?;
    let fstype = CString::new("squashfs").expect("no NUL");
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid C strings that outlive the call; no data.
    let r = unsafe {
        libc::mount(
            dev.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM | libc::ENODEV | libc::EACCES) => {
                Error::Unavailable(format!("mounting a squashfs: {e}"))
            }
            _ => Error::Refused(format!("the kernel refuses to mount {what}: {e}")),
        });
    }
    drop(lo);
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            target.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::Io(os_error("opening the mounted image")));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

struct Scan<'a> {
    root: &'a Arc<OwnedFd>,
    what: &'a str,
    failure: &'a Failure,
}

impl Scan<'_> {
    fn refused(&self, rel: &[u8], e: impl std::fmt::Display) -> Error {
        Error::Refused(format!(
            "{}: {}: {e}",
            self.what,
            iukfarm_engine::tree::display_path(rel)
        ))
    }

    fn node(&self, path: &Path, rel: &mut Vec<u8>, name: Vec<u8>) -> Result<Node> {
        let md = std::fs::symlink_metadata(path).map_err(|e| self.refused(rel, e))?;
        let mtime =
            u32::try_from(md.mtime()).map_err(|_| self.refused(rel, "time out of range"))?;
        let xattrs = read_xattrs(path).map_err(|e| self.refused(rel, e))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            let mut children = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|e| self.refused(rel, e))? {
                let entry = entry.map_err(|e| self.refused(rel, e))?;
                let name = entry.file_name().as_bytes().to_vec();
                let len = rel.len();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(&name);
                children.push(self.node(&entry.path(), rel, name)?);
                rel.truncate(len);
            }
            children.sort_by(|a, b| a.name.cmp(&b.name));
            Kind::Dir(children)
        } else if ft.is_file() {
            Kind::File(FileContent {
                size: md.len(),
                source: Source::Reader(Arc::new(KernelFile {
                    root: self.root.clone(),
                    rel: CString::new(rel.clone()).map_err(|_| self.refused(rel, "NUL in name"))?,
                    what: self.what.to_string(),
                    failure: self.failure.clone(),
                })),
            })
        } else {
            leaf_kind(path, &md).map_err(|e| self.refused(rel, e))?
        };
        Ok(Node {
            name,
            meta: Meta {
                mode: (md.mode() & 0o7777) as u16,
                uid: md.uid(),
                gid: md.gid(),
                mtime,
                xattrs,
            },
            kind,
        })
    }
}

fn scan_root(dir: &Path, root: &Arc<OwnedFd>, what: &str, failure: &Failure) -> Result<Node> {
    let scan = Scan {
        root,
        what,
        failure,
    };
    scan.node(dir, &mut Vec::new(), Vec::new())
}

/// A file of a mounted image, opened relative to the mount's root, so that
/// any thread can read it.
struct KernelFile {
    root: Arc<OwnedFd>,
    rel: CString,
    what: String,
    failure: Failure,
}

impl KernelFile {
    fn fail(&self, e: io::Error) -> io::Error {
        let m = format!(
            "the kernel cannot read {}: {}: {e}",
            self.what,
            String::from_utf8_lossy(self.rel.as_bytes())
        );
        let mut first = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| m.clone());
        io::Error::new(e.kind(), m)
    }
}

impl OpenReader for KernelFile {
    fn open(&self) -> io::Result<Box<dyn Read + Send + '_>> {
        // SAFETY: a valid directory fd and C string; the result is checked.
        let fd = unsafe {
            libc::openat(
                self.root.as_raw_fd(),
                self.rel.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(self.fail(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Box::new(Reading { file, of: self }))
    }
}

struct Reading<'a> {
    file: File,
    of: &'a KernelFile,
}

impl Read for Reading<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf).map_err(|e| self.of.fail(e))
    }
}
