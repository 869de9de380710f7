//! Helpers shared by the end-to-end tests: locating the `iukfarm` binary,
//! insisting on the reference tools and on root where a test needs them
//! (a test that cannot run fails loudly instead of passing), and building
//! fixture trees with every kind of entry SquashFS can hold.

pub mod farm;
pub mod fixtures;
pub mod netns;
pub mod releases;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `iukfarm` binary of this workspace, built on demand.
pub fn iukfarm() -> PathBuf {
    if let Some(p) = std::env::var_os("IUKFARM_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target.join(profile).join("iukfarm");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "iukfarm"])
            .current_dir(&root);
        if profile == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "building the iukfarm binary failed");
    });
    bin
}

/// Fails the test unless `tool` is on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "reference tool `{tool}` is missing: run ./scripts/test.sh, which installs \
         squashfs-tools, squashfs-tools-ng, xorriso, attr and rsync"
    );
}

/// [`require_tool`] for each of `tools`.
pub fn require_tools(tools: &[&str]) {
    for t in tools {
        require_tool(t);
    }
}

/// The reference writer whose bytes `version` stands for: bookworm's own
/// `gensquashfs` (1.2.0) on PATH, or trixie's 1.3.2 that
/// `scripts/trixie-sqfs-tools.sh` installs beside it. Fails the test when
/// it is missing or is another version.
pub fn gensquashfs(version: iukfarm_engine::sqfs::Gensquashfs) -> Command {
    Command::new(reference_tool("gensquashfs", version))
}

/// Where [`gensquashfs`]'s `rdsquashfs` (`sqfsdiff`, `gensquashfs`) of the
/// same release is.
pub fn reference_tool(tool: &str, version: iukfarm_engine::sqfs::Gensquashfs) -> PathBuf {
    use iukfarm_engine::sqfs::Gensquashfs;
    let path = match version {
        Gensquashfs::V1_2_0 => {
            require_tool(tool);
            PathBuf::from(tool)
        }
        Gensquashfs::V1_3_2 => {
            let dir = std::env::var_os("IUKFARM_TRIXIE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/cache/iukfarm-tests/trixie/bin"));
            let p = dir.join(tool);
            assert!(
                p.is_file(),
                "trixie's {tool} 1.3.2 (what Tails 7 pins) is missing from {}: run \
                 ./scripts/test.sh, which installs it with scripts/trixie-sqfs-tools.sh",
                dir.display()
            );
            p
        }
    };
    static CHECKED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(&path) {
        let out = run(Command::new(&path).arg("--version"));
        let first = String::from_utf8_lossy(&out.stdout);
        let first = first.lines().next().unwrap_or_default();
        assert!(
            first.ends_with(&format!(" {version}")),
            "{} is {first:?}, not version {version}",
            path.display()
        );
        checked.push(path.clone());
    }
    path
}

/// `iukfarm sqfs ls [extra…] IMAGE` as text.
pub fn sqfs_ls(image: &Path, extra: &[&str]) -> String {
    let out = run(Command::new(iukfarm())
        .args(["sqfs", "ls"])
        .args(extra)
        .arg(image));
    String::from_utf8(out.stdout).expect("listing is UTF-8 for these fixtures")
}

/// Fails the test unless running as root (fixtures need mknod, chown,
/// trusted.* xattrs; kernel checks need loop mounts).
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test must run as root ({why}); CI runs as root"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sha256_file(p: &Path) -> String {
    sha256_reader(fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// A small deterministic PRNG (xorshift64*), so fixtures are the same on
/// every run and machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// Compressible, text-like bytes.
    pub fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "squashfs ",
            "tails ",
            "upgrade ",
            "kit ",
            "block ",
            "fragment ",
            "inode ",
            "\n",
            "xattr ",
            "amnesia ",
            "0123 ",
            "release ",
        ];
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
        }
        out.truncate(n);
        out
    }
}

/// Builds fixture trees on disk.
pub struct Tree {
    pub root: PathBuf,
}

impl Tree {
    pub fn new(root: &Path) -> Tree {
        fs::create_dir_all(root).unwrap();
        Tree {
            root: root.to_path_buf(),
        }
    }

    pub fn path(&self, rel: impl AsRef<[u8]>) -> PathBuf {
        self.root.join(std::ffi::OsStr::from_bytes(rel.as_ref()))
    }

    fn parent_dirs(&self, rel: &[u8]) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        p
    }

    pub fn file(&self, rel: impl AsRef<[u8]>, data: &[u8]) -> &Self {
        let p = self.parent_dirs(rel.as_ref());
        fs::write(&p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        self
    }

    pub fn dir(&self, rel: impl AsRef<[u8]>) -> &Self {
        fs::create_dir_all(self.path(rel)).unwrap();
        self
    }

    pub fn symlink(&self, rel: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &Self {
        let p = self.parent_dirs(rel.as_ref());
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target.as_ref()), &p).unwrap();
        self
    }

    pub fn hardlink(&self, rel: impl AsRef<[u8]>, existing: impl AsRef<[u8]>) -> &Self {
        let p = self.parent_dirs(rel.as_ref());
        fs::hard_link(self.path(existing), &p).unwrap();
        self
    }

    /// A sparse file of `len` bytes with `data` written at `at`.
    pub fn sparse(&self, rel: impl AsRef<[u8]>, len: u64, at: u64, data: &[u8]) -> &Self {
        use std::os::unix::fs::FileExt;
        let p = self.parent_dirs(rel.as_ref());
        let f = fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        if !data.is_empty() {
            f.write_all_at(data, at).unwrap();
        }
        self
    }

    /// mknod: `kind` is libc::S_IFCHR, S_IFBLK or S_IFIFO.
    pub fn node(&self, rel: impl AsRef<[u8]>, kind: libc::mode_t, major: u32, minor: u32) -> &Self {
        let p = self.parent_dirs(rel.as_ref());
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string; makedev/mknod have no other preconditions.
        let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o644, libc::makedev(major, minor)) };
        assert_eq!(
            rc,
            0,
            "mknod {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        self
    }

    pub fn socket(&self, rel: impl AsRef<[u8]>) -> &Self {
        let p = self.parent_dirs(rel.as_ref());
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        drop(l);
        self
    }

    pub fn chmod(&self, rel: impl AsRef<[u8]>, mode: u32) -> &Self {
        let p = self.path(rel);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn chown(&self, rel: impl AsRef<[u8]>, uid: u32, gid: u32) -> &Self {
        let p = self.path(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).unwrap();
        self
    }

    pub fn xattr(&self, rel: impl AsRef<[u8]>, key: &str, value: &[u8]) -> &Self {
        let p = self.path(rel);
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        let k = CString::new(key).unwrap();
        // SAFETY: valid C strings and a value buffer of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                k.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "setxattr {key} on {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        self
    }
}

/// A few real executables from this machine, for the BCJ filter trial.
pub fn some_binaries() -> Vec<PathBuf> {
    [
        "/usr/bin/ls",
        "/usr/bin/cp",
        "/usr/bin/bash",
        "/usr/bin/tar",
        "/usr/bin/gzip",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.is_file())
    .collect()
}

/// One entry of a tree listing, in a form that images, mounts and
/// extracted directories can all be compared in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size of regular files (0 otherwise).
    pub size: u64,
    pub target: Option<Vec<u8>>,
    /// Device number in the kernel's 32-bit encoding.
    pub rdev: u32,
    pub xattrs: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    /// SHA-256 of regular files' contents.
    pub sha256: Option<String>,
    /// Inode number, to compare hard-link groups (not the numbers).
    pub ino: u64,
}

pub type Listing = std::collections::BTreeMap<Vec<u8>, Entry>;

fn sha256_reader(mut r: impl std::io::Read) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Lists a directory tree on disk (a mount point or an extracted image),
/// with paths relative to `root` ("" for the root itself).
pub fn disk_listing(root: &Path) -> Listing {
    use std::os::unix::fs::MetadataExt;
    let mut out = Listing::new();
    fn go(root: &Path, rel: &[u8], out: &mut Listing) {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(std::ffi::OsStr::from_bytes(rel))
        };
        let md = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = md.file_type();
        let xattrs = all_xattrs(&p);
        let e = Entry {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: if ft.is_file() { md.len() } else { 0 },
            target: ft
                .is_symlink()
                .then(|| fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
            rdev: md.rdev() as u32,
            xattrs,
            sha256: ft
                .is_file()
                .then(|| sha256_reader(fs::File::open(&p).unwrap())),
            ino: md.ino(),
        };
        out.insert(rel.to_vec(), e);
        if ft.is_dir() {
            let mut names: Vec<Vec<u8>> = fs::read_dir(&p)
                .unwrap()
                .map(|d| d.unwrap().file_name().as_bytes().to_vec())
                .collect();
            names.sort();
            for n in names {
                let child = if rel.is_empty() {
                    n
                } else {
                    [rel, b"/", &n].concat()
                };
                go(root, &child, out);
            }
        }
    }
    go(root, b"", &mut out);
    out
}

/// Every xattr of a path, empty values included (none where the file
/// system does not support xattrs, as a squashfs mount without an xattr
/// table answers).
pub fn all_xattrs(p: &Path) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "llistxattr {}: {e}",
            p.display()
        );
        return Default::default();
    }
    names.truncate(n as usize);
    let mut out = std::collections::BTreeMap::new();
    for key in names.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let k = CString::new(key).unwrap();
        let mut v = vec![0u8; 1 << 16];
        // SAFETY: valid C strings and buffer.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(
            n >= 0,
            "lgetxattr {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        v.truncate(n as usize);
        out.insert(key.to_vec(), v);
    }
    out
}

/// Drops empty-valued xattrs, which gensquashfs (and so our writer) does
/// not store.
pub fn without_empty_xattrs(mut l: Listing) -> Listing {
    for e in l.values_mut() {
        e.xattrs.retain(|_, v| !v.is_empty());
    }
    l
}

/// Lists an image with the engine's reader.
pub fn image_listing(archive: &std::sync::Arc<iukfarm_engine::sqfs::Archive>) -> Listing {
    use iukfarm_engine::sqfs::InodeKind;
    let mut out = Listing::new();
    archive
        .walk(&mut |path, inode| {
            let xattrs = archive.xattrs(inode.xattr)?.into_iter().collect();
            let (size, target, rdev, sha256) = match &inode.kind {
                InodeKind::File(f) => (f.size, None, 0, Some(sha256_reader(archive.open_file(f)))),
                InodeKind::Symlink(t) => (0, Some(t.clone()), 0, None),
                InodeKind::BlockDev(d) | InodeKind::CharDev(d) => (0, None, *d, None),
                _ => (0, None, 0, None),
            };
            out.insert(
                path.to_vec(),
                Entry {
                    mode: inode.st_mode(),
                    uid: inode.uid,
                    gid: inode.gid,
                    size,
                    target,
                    rdev,
                    xattrs,
                    sha256,
                    ino: inode.number as u64,
                },
            );
            Ok(())
        })
        .unwrap();
    out
}

/// Opens an image file with the engine's reader.
pub fn open_image(path: &Path) -> std::sync::Arc<iukfarm_engine::sqfs::Archive> {
    let f = fs::File::open(path).unwrap();
    iukfarm_engine::sqfs::Archive::open(std::sync::Arc::new(f)).unwrap()
}

/// Describes every difference between two listings, ignoring inode numbers
/// (hard-link groups are compared separately with [`link_groups`]).
pub fn diff_listings(a: &Listing, b: &Listing, ignore_root: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (p, ea) in a {
        if ignore_root && p.is_empty() {
            continue;
        }
        let name = String::from_utf8_lossy(p);
        match b.get(p) {
            None => out.push(format!("{name}: only in the first")),
            Some(eb) => {
                let (mut x, mut y) = (ea.clone(), eb.clone());
                x.ino = 0;
                y.ino = 0;
                if x != y {
                    out.push(format!("{name}: {x:?} != {y:?}"));
                }
            }
        }
    }
    for p in b.keys() {
        if !(a.contains_key(p) || ignore_root && p.is_empty()) {
            out.push(format!(
                "{}: only in the second",
                String::from_utf8_lossy(p)
            ));
        }
    }
    out
}

/// Regular files grouped by inode: the hard-link structure.
pub fn link_groups(l: &Listing) -> std::collections::BTreeSet<Vec<Vec<u8>>> {
    let mut by_ino: std::collections::BTreeMap<u64, Vec<Vec<u8>>> = Default::default();
    for (p, e) in l {
        if e.sha256.is_some() {
            by_ino.entry(e.ino).or_default().push(p.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// A read-only loop mount, unmounted when dropped.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path, fstype: &str, extra: &str) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let opts = if extra.is_empty() {
            "loop,ro".to_string()
        } else {
            format!("loop,ro,{extra}")
        };
        let out = Command::new("mount")
            .args(["-t", fstype, "-o", &opts])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting {} failed (needs root and a loop device): {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Directories of fixtures held in statics (which are never dropped), with
/// whether each is a GnuPG home whose agent must be stopped.
static AT_EXIT: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn clean_at_exit() {
    let dirs = match AT_EXIT.lock() {
        Ok(mut d) => std::mem::take(&mut *d),
        Err(_) => return,
    };
    for (dir, gnupg) in dirs {
        if gnupg {
            let _ = Command::new("gpgconf")
                .env("GNUPGHOME", &dir)
                .args(["--kill", "all"])
                .status();
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Removes `dir` when the test process exits: for temporary directories of
/// shared fixtures kept in statics, so that nothing is left in /tmp.
pub fn remove_at_exit(dir: &Path, gnupg_home: bool) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function without arguments.
    REGISTER.call_once(|| unsafe {
        libc::atexit(clean_at_exit);
    });
    AT_EXIT
        .lock()
        .unwrap()
        .push((dir.to_path_buf(), gnupg_home));
}
