//! Helpers shared by the end-to-end tests: locating the `iukfarm` binary,
//! insisting on the reference tools and on root where a test needs them
//! (a test that cannot run fails loudly instead of passing), and building
//! fixture trees with every kind of entry SquashFS can hold.

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
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A small deterministic PRNG (xorshift64*), so fixtures are the same on
/// every run and machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
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
