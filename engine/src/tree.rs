//! The in-memory tree model: what a directory tree is, independent of where
//! it came from (a directory on disk, a SquashFS image, a computed diff).
//!
//! Names are raw bytes and children are kept sorted by name bytes, the order
//! SquashFS directories need; nothing here depends on hash-map order.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// One extended attribute: full key (`user.foo`) and value bytes.
pub type Xattr = (Vec<u8>, Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`0o7777` mask).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    /// In the order the source listed them; the writer's xattr table layout
    /// depends on that order, exactly as gensquashfs's does on `llistxattr`.
    pub xattrs: Vec<Xattr>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: Vec<u8>,
    pub meta: Meta,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    /// Children sorted by name bytes, names unique.
    Dir(Vec<Node>),
    File(FileContent),
    Symlink(Vec<u8>),
    /// Device number in the kernel's 32-bit "new" encoding.
    BlockDev(u32),
    CharDev(u32),
    Fifo,
    Socket,
}

/// A regular file's size and where its bytes come from.
#[derive(Clone)]
pub struct FileContent {
    pub size: u64,
    pub source: Source,
}

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileContent({} bytes)", self.size)
    }
}

/// Where a file's bytes are read from when an image is written.
#[derive(Clone)]
pub enum Source {
    Path(PathBuf),
    Bytes(Arc<[u8]>),
    /// A file inside a SquashFS image, read in place.
    Image(Arc<crate::sqfs::ImageFile>),
    Reader(Arc<dyn OpenReader>),
}

/// A content source that can be opened for one sequential read.
pub trait OpenReader: Send + Sync {
    fn open(&self) -> io::Result<Box<dyn Read + Send + '_>>;
}

impl FileContent {
    pub fn from_bytes(bytes: impl Into<Arc<[u8]>>) -> Self {
        let bytes = bytes.into();
        FileContent {
            size: bytes.len() as u64,
            source: Source::Bytes(bytes),
        }
    }

    pub fn open(&self) -> Result<Box<dyn Read + Send + '_>> {
        Ok(match &self.source {
            Source::Path(p) => Box::new(File::open(p).map_err(|e| Error::io(p, e))?),
            Source::Bytes(b) => Box::new(&b[..]),
            Source::Image(f) => Box::new(f.open()),
            Source::Reader(r) => r.open()?,
        })
    }

    /// A name for error messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Path(p) => p.display().to_string(),
            Source::Bytes(_) => "<in-memory file>".into(),
            Source::Image(_) => "<file in a SquashFS image>".into(),
            Source::Reader(_) => "<reader>".into(),
        }
    }
}

impl Node {
    /// A root directory of regular files named as given, all with the same
    /// metadata (mode 0644, root's, time 0): the trees unit tests write.
    #[cfg(test)]
    pub(crate) fn flat(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> Node {
        let meta = Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        };
        let files = (files.into_iter())
            .map(|(name, data)| Node {
                name: name.into_bytes(),
                meta: meta.clone(),
                kind: Kind::File(FileContent::from_bytes(data)),
            })
            .collect();
        Node::dir("", meta, files)
    }

    pub fn dir(name: impl Into<Vec<u8>>, meta: Meta, children: Vec<Node>) -> Node {
        let mut n = Node {
            name: name.into(),
            meta,
            kind: Kind::Dir(children),
        };
        n.sort_children();
        n
    }

    pub fn children(&self) -> &[Node] {
        match &self.kind {
            Kind::Dir(c) => c,
            _ => &[],
        }
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    /// Sorts this directory's children (recursively) by name bytes.
    pub fn sort_children(&mut self) {
        if let Kind::Dir(children) = &mut self.kind {
            children.sort_by(|a, b| a.name.cmp(&b.name));
            for c in children {
                c.sort_children();
            }
        }
    }

    /// Checks the invariants the writer relies on: valid, unique, sorted
    /// names and storable xattr keys.
    pub fn validate(&self) -> Result<()> {
        self.validate_at(&mut Vec::new())
    }

    fn validate_at(&self, path: &mut Vec<u8>) -> Result<()> {
        for (key, _) in &self.meta.xattrs {
            if crate::sqfs::format::split_xattr_key(key).is_none() {
                return Err(Error::Unsupported(format!(
                    "{}: xattr '{}' cannot be stored in SquashFS (only user.*, trusted.* and security.*)",
                    display_path(path),
                    String::from_utf8_lossy(key)
                )));
            }
        }
        if let Kind::Dir(children) = &self.kind {
            for (i, c) in children.iter().enumerate() {
                if c.name.is_empty()
                    || c.name == b"."
                    || c.name == b".."
                    || c.name.contains(&b'/')
                    || c.name.contains(&0)
                {
                    return Err(Error::Invalid(format!(
                        "{}: invalid entry name {:?}",
                        display_path(path),
                        String::from_utf8_lossy(&c.name)
                    )));
                }
                if c.name.len() > 256 {
                    return Err(Error::Invalid(format!(
                        "{}: entry name longer than 256 bytes",
                        display_path(path)
                    )));
                }
                if i > 0 && children[i - 1].name >= c.name {
                    return Err(Error::Invalid(format!(
                        "{}: entries not sorted or duplicated near {:?}",
                        display_path(path),
                        String::from_utf8_lossy(&c.name)
                    )));
                }
                let len = path.len();
                path.push(b'/');
                path.extend_from_slice(&c.name);
                c.validate_at(path)?;
                path.truncate(len);
            }
        }
        Ok(())
    }

    /// Removes the entry at `path` (relative, `/`-separated) with its
    /// subtree; a path that does not exist is left alone (like `rm -rf`).
    pub fn remove_path(&mut self, path: &[u8]) {
        let comps: Vec<&[u8]> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let mut cur = self;
        for (k, comp) in comps.iter().enumerate() {
            let Kind::Dir(children) = &mut cur.kind else {
                return;
            };
            let Ok(i) = children.binary_search_by(|x| x.name.as_slice().cmp(comp)) else {
                return;
            };
            if k + 1 == comps.len() {
                children.remove(i);
                return;
            }
            cur = &mut children[i];
        }
    }

    /// Visits every node depth-first, parents before children, with its path
    /// relative to this node (`""` for this node itself).
    pub fn walk(&self, f: &mut dyn FnMut(&[u8], &Node)) {
        fn go(n: &Node, path: &mut Vec<u8>, f: &mut dyn FnMut(&[u8], &Node)) {
            f(path, n);
            for c in n.children() {
                let len = path.len();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&c.name);
                go(c, path, f);
                path.truncate(len);
            }
        }
        go(self, &mut Vec::new(), f);
    }
}

/// A path for messages: "/" for the root.
pub fn display_path(p: &[u8]) -> String {
    if p.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(p).into_owned()
    }
}

/// How [`scan_dir`] turns a directory on disk into a tree: the semantics of
/// gensquashfs's `--pack-dir`.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Read extended attributes (`--keep-xattr`), including the root
    /// directory's own.
    pub keep_xattr: bool,
    /// Every inode's modification time (SOURCE_DATE_EPOCH).
    pub mtime: u32,
}

/// Reads a directory tree from disk like `gensquashfs --pack-dir`: the root
/// gets mode 0755, owner 0:0 and `mtime` (its xattrs, with `keep_xattr`,
/// come from the directory itself); every other entry keeps its permission
/// bits and owner; all times are `mtime`; hard links become independent
/// files; symlinks are not followed; empty xattr values are dropped.
pub fn scan_dir(root: &Path, opts: &ScanOptions) -> Result<Node> {
    let md = std::fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !md.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut node = Node {
        name: Vec::new(),
        meta: Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: opts.mtime,
            xattrs: if opts.keep_xattr {
                read_xattrs(root)?
            } else {
                Vec::new()
            },
        },
        kind: Kind::Dir(scan_children(root, opts)?),
    };
    node.sort_children();
    node.validate()?;
    Ok(node)
}

fn scan_children(dir: &Path, opts: &ScanOptions) -> Result<Vec<Node>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir(scan_children(&path, opts)?)
        } else if ft.is_file() {
            Kind::File(FileContent {
                size: md.len(),
                source: Source::Path(path.clone()),
            })
        } else {
            leaf_kind(&path, &md)?
        };
        out.push(Node {
            name: entry.file_name().as_bytes().to_vec(),
            meta: Meta {
                mode: (md.mode() & 0o7777) as u16,
                uid: md.uid(),
                gid: md.gid(),
                mtime: opts.mtime,
                xattrs: if opts.keep_xattr {
                    read_xattrs(&path)?
                } else {
                    Vec::new()
                },
            },
            kind,
        });
    }
    Ok(out)
}

/// What a path that is neither a directory nor a regular file is, from its
/// (not followed) metadata: a symlink and its target, a device and its
/// number as SquashFS stores it, a fifo or a socket.
pub fn leaf_kind(path: &Path, md: &std::fs::Metadata) -> Result<Kind> {
    let ft = md.file_type();
    Ok(if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| Error::io(path, e))?;
        Kind::Symlink(target.as_os_str().as_bytes().to_vec())
    } else if ft.is_block_device() {
        Kind::BlockDev(md.rdev() as u32)
    } else if ft.is_char_device() {
        Kind::CharDev(md.rdev() as u32)
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        return Err(Error::Unsupported(format!(
            "{}: unknown file type",
            path.display()
        )));
    })
}

/// Lists a path's xattrs in `llistxattr` order without following symlinks,
/// dropping empty values as gensquashfs does (none where the file system
/// has none).
pub fn read_xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("{}: path contains NUL", path.display())))?;
    let err = |what: &str| {
        Error::io(
            path,
            io::Error::other(format!("{what}: {}", io::Error::last_os_error())),
        )
    };
    let names = loop {
        // SAFETY: `c` is a valid C string; a null buffer of length 0 asks for the size.
        let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        // A file system without xattrs (a squashfs without an xattr table)
        // says so rather than list none.
        if len < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(Vec::new());
        }
        if len < 0 {
            return Err(err("llistxattr"));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: `buf` is writable for its length.
        let got = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got >= 0 {
            buf.truncate(got as usize);
            break buf;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return Err(err("llistxattr"));
        }
    };
    let mut out = Vec::new();
    for key in names.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let ckey = CString::new(key).expect("split on NUL");
        let value = loop {
            // SAFETY: valid C strings; null buffer asks for the size.
            let len =
                unsafe { libc::lgetxattr(c.as_ptr(), ckey.as_ptr(), std::ptr::null_mut(), 0) };
            if len < 0 {
                return Err(err("lgetxattr"));
            }
            let mut buf = vec![0u8; len as usize];
            // SAFETY: `buf` is writable for its length.
            let got = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    ckey.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if got >= 0 {
                buf.truncate(got as usize);
                break buf;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
                return Err(err("lgetxattr"));
            }
        };
        if !value.is_empty() {
            out.push((key.to_vec(), value));
        }
    }
    Ok(out)
}

/// Joins raw name bytes under a base path.
pub fn join_bytes(base: &Path, rel: &[u8]) -> PathBuf {
    base.join(OsStr::from_bytes(rel))
}
