//! The release's input ISOs: checked up front (so a bad one fails the
//! release at once, named), then hashed, with digests remembered across
//! restarts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// One input ISO.
#[derive(Debug, Clone)]
pub struct IsoInput {
    pub version: String,
    /// Under the archive root, as workers look it up in theirs.
    pub relpath: String,
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// Size of its system image (for scheduling).
    pub system_size: u64,
}

/// Checks that a version's ISO is there and usable; the message names the
/// file and what is wrong with it.
pub fn check(version: &str, path: &Path) -> Result<u64, Error> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::BadInput(format!(
            "ISO of {version}: {}: {}",
            path.display(),
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such file (check --iso-root and --iso-pattern)".to_string()
            } else {
                e.to_string()
            }
        ))
    })?;
    if !meta.is_file() {
        return Err(Error::BadInput(format!(
            "ISO of {version}: {} is not a regular file",
            path.display()
        )));
    }
    iukfarm_engine::kit::check_iso(path).map_err(|e| {
        Error::BadInput(format!(
            "ISO of {version}: {}: {}",
            path.display(),
            e.to_string().replace(&format!("{}: ", path.display()), "")
        ))
    })
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    sha256: String,
}

/// Digests of files that have not changed since they were last hashed
/// (same size, mtime and inode), kept in the output directory's state.
pub struct DigestCache {
    path: PathBuf,
    entries: BTreeMap<String, CacheEntry>,
}

fn key_of(path: &Path) -> Result<(String, CacheEntry), Error> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let abs = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    Ok((
        abs.display().to_string(),
        CacheEntry {
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            inode: m.ino(),
            sha256: String::new(),
        },
    ))
}

impl DigestCache {
    pub fn load(path: &Path) -> DigestCache {
        let entries = std::fs::read(path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        DigestCache {
            path: path.to_path_buf(),
            entries,
        }
    }

    pub fn get(&self, file: &Path) -> Option<String> {
        let (k, now) = key_of(file).ok()?;
        let e = self.entries.get(&k)?;
        (e.size == now.size && e.mtime_ns == now.mtime_ns && e.inode == now.inode)
            .then(|| e.sha256.clone())
    }

    pub fn put(&mut self, file: &Path, sha256: &str) -> Result<(), Error> {
        let (k, mut e) = key_of(file)?;
        e.sha256 = sha256.to_string();
        self.entries.insert(k, e);
        let tmp = self.path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&self.entries).expect("serialisable"),
        )
        .and_then(|_| std::fs::rename(&tmp, &self.path))
        .map_err(|e| Error::io(&self.path, e))
    }
}
