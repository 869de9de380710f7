//! The release's input ISOs: checked up front (so a bad one fails the
//! release at once, named), then hashed, with digests remembered across
//! restarts, and authenticated against what the RM vouches for: a
//! `SHA256SUMS`-style file, or OpenPGP signatures (`<iso>.sig`) by a key
//! of a keyring.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use iukfarm_engine::io::SeqReader;
use iukfarm_engine::kit::{CheckedIso, OpenIso};

use crate::Error;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    sha256_of(f, path)
}

/// SHA-256 of what `r` reads (`path` names it in errors).
fn sha256_of(mut f: impl Read, path: &Path) -> Result<String, Error> {
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
    /// The ISO opened once, at its check: its digest is computed from this
    /// file, and workers and verification read this file, so a file put at
    /// `path` afterwards changes nothing.
    pub iso: OpenIso,
    pub size: u64,
    pub sha256: String,
    /// Size of its system image (for scheduling).
    pub system_size: u64,
}

/// Checks that a version's ISO is there and usable; the message names the
/// file and what is wrong with it.
pub fn check(version: &str, path: &Path) -> Result<(CheckedIso, OpenIso), Error> {
    let bad = |e: std::io::Error| {
        Error::BadInput(format!(
            "ISO of {version}: {}: {}",
            path.display(),
            if e.kind() == std::io::ErrorKind::NotFound {
                "no such file (check --iso-root and --iso-pattern)".to_string()
            } else {
                e.to_string()
            }
        ))
    };
    let not_file = || {
        Error::BadInput(format!(
            "ISO of {version}: {} is not a regular file",
            path.display()
        ))
    };
    // Looked at before opening: opening a FIFO would block.
    if !std::fs::metadata(path).map_err(bad)?.is_file() {
        return Err(not_file());
    }
    let f = File::open(path).map_err(bad)?;
    if !f.metadata().map_err(bad)?.is_file() {
        return Err(not_file());
    }
    let iso = OpenIso {
        file: std::sync::Arc::new(f),
        path: path.to_path_buf(),
    };
    let checked = iukfarm_engine::kit::check_iso(&iso).map_err(|e| {
        Error::BadInput(format!(
            "ISO of {version}: {}: {}",
            path.display(),
            e.to_string().replace(&format!("{}: ", path.display()), "")
        ))
    })?;
    Ok((checked, iso))
}

/// What the RM vouches for. With either part, no ISO is used before its
/// digest or signature checked out.
#[derive(Debug, Default)]
pub struct Authority {
    /// `--iso-sha256sums`: the file, and its entries (name, digest).
    sums: Option<(PathBuf, Vec<(String, String)>)>,
    /// `--iso-keyring`: the file, and its certificates.
    keyring: Option<(PathBuf, Vec<u8>)>,
}

/// Reads `sha256sum` output: `<64 hex>  <name>` (or ` *<name>`) per line.
fn parse_sums(path: &Path, text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line
            .split_at_checked(64)
            .filter(|(h, _)| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|(h, rest)| {
                let name = rest
                    .strip_prefix("  ")
                    .or_else(|| rest.strip_prefix(" *"))?;
                (!name.is_empty()).then(|| (name.trim_start_matches("./").to_string(), h))
            });
        let Some((name, h)) = parsed else {
            return Err(Error::BadInput(format!(
                "{}: line {} is not `<sha256>  <file name>` (the format of sha256sum)",
                path.display(),
                n + 1
            )));
        };
        out.push((name, h.to_ascii_lowercase()));
    }
    if out.is_empty() {
        return Err(Error::BadInput(format!(
            "{}: no digests in it",
            path.display()
        )));
    }
    Ok(out)
}

impl Authority {
    /// Loads the RM's digests and keyring (either may be absent).
    pub fn load(sums: Option<&Path>, keyring: Option<&Path>) -> Result<Authority, Error> {
        let bad = |p: &Path, e: std::io::Error| Error::BadInput(format!("{}: {e}", p.display()));
        let sums = sums
            .map(|p| {
                let text = std::fs::read_to_string(p).map_err(|e| bad(p, e))?;
                Ok::<_, Error>((p.to_path_buf(), parse_sums(p, &text)?))
            })
            .transpose()?;
        let keyring = keyring
            .map(|p| {
                let data = std::fs::read(p).map_err(|e| bad(p, e))?;
                crate::signing::parse_certs(&data)
                    .map_err(|e| Error::BadInput(format!("{}: {e}", p.display())))?;
                Ok::<_, Error>((p.to_path_buf(), data))
            })
            .transpose()?;
        Ok(Authority { sums, keyring })
    }

    /// Whether the RM vouches for the inputs at all.
    pub fn is_set(&self) -> bool {
        self.sums.is_some() || self.keyring.is_some()
    }

    /// The digest the RM's file gives for `iso` (found by its path under
    /// the archive, or by its file name).
    fn expected(&self, version: &str, iso: &Path, relpath: &str) -> Result<Option<String>, Error> {
        let Some((file, entries)) = &self.sums else {
            return Ok(None);
        };
        let base = iso.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut found: Vec<&String> = entries
            .iter()
            .filter(|(n, _)| {
                n == relpath
                    || Path::new(n)
                        .file_name()
                        .map(|b| b.to_string_lossy().into_owned())
                        == base
            })
            .map(|(_, h)| h)
            .collect();
        found.sort();
        found.dedup();
        match found.as_slice() {
            [h] => Ok(Some((*h).clone())),
            [] => Err(Error::BadInput(format!(
                "ISO of {version}: {} has no digest in {}; add its line (sha256sum output)",
                iso.display(),
                file.display()
            ))),
            _ => Err(Error::BadInput(format!(
                "ISO of {version}: {} has several different digests in {}",
                iso.display(),
                file.display()
            ))),
        }
    }

    fn signature_path(iso: &Path) -> PathBuf {
        let mut s = iso.as_os_str().to_owned();
        s.push(".sig");
        PathBuf::from(s)
    }

    /// What can be checked without reading the ISO: its digest is listed,
    /// its signature file is there.
    pub fn precheck(&self, version: &str, iso: &Path, relpath: &str) -> Result<(), Error> {
        self.expected(version, iso, relpath)?;
        if let Some((ring, _)) = &self.keyring {
            let sig = Self::signature_path(iso);
            if !sig.is_file() {
                return Err(Error::BadInput(format!(
                    "ISO of {version}: no signature {} (--iso-keyring {} needs each ISO's \
                     detached OpenPGP signature next to it)",
                    sig.display(),
                    ring.display()
                )));
            }
        }
        Ok(())
    }

    /// The ISO's SHA-256, checked against the RM's digest and signature.
    /// `known` is a remembered digest; it is used only when no signature
    /// must be checked (checking one reads the file anyway, and hashes it
    /// in the same pass).
    pub fn digest(
        &self,
        version: &str,
        open: &OpenIso,
        relpath: &str,
        known: Option<String>,
    ) -> Result<String, Error> {
        let iso = open.path.as_path();
        // Read through the file opened at the check, never the path again.
        let reader = || SeqReader::new(open.file.clone()).map_err(|e| Error::io(iso, e));
        let sha = match &self.keyring {
            Some((ring, certs)) => {
                let sig_path = Self::signature_path(iso);
                let sig = std::fs::read(&sig_path).map_err(|e| Error::io(&sig_path, e))?;
                let f = reader()?;
                let mut tee = HashingReader {
                    inner: std::io::BufReader::with_capacity(1 << 20, f),
                    hasher: Sha256::new(),
                };
                let signer = crate::signing::verify_reader(certs, &mut tee, &sig).map_err(|e| {
                    Error::BadInput(format!(
                        "ISO of {version}: {} is not signed by a key of {} ({e}): \
                         the ISO is damaged or not the release; fetch it again",
                        iso.display(),
                        ring.display()
                    ))
                })?;
                // The verifier reads to the end of the data; make sure of it.
                std::io::copy(&mut tee, &mut std::io::sink()).map_err(|e| Error::io(iso, e))?;
                tracing::info!("{}: signed by {signer}", iso.display());
                hex(&tee.hasher.finalize())
            }
            None => match known {
                Some(k) => k,
                None => sha256_of(reader()?, iso)?,
            },
        };
        if let Some(want) = self.expected(version, iso, relpath)?
            && want != sha
        {
            return Err(Error::BadInput(format!(
                "ISO of {version}: {} has sha256 {sha}, but {} says {want}: the ISO is damaged \
                 or not the release; fetch it again",
                iso.display(),
                self.sums
                    .as_ref()
                    .map(|(p, _)| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
        Ok(sha)
    }
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheEntry {
    size: u64,
    mtime_ns: i128,
    /// A file rewritten in place with its mtime set back still gets a new
    /// ctime (which no one can set).
    #[serde(default)]
    ctime_ns: i128,
    inode: u64,
    sha256: String,
}

/// Digests of files that have not changed since they were last hashed
/// (same size, mtime, ctime and inode), kept in the output directory's
/// state.
pub struct DigestCache {
    path: PathBuf,
    entries: BTreeMap<String, CacheEntry>,
}

/// The entry of an open file, named by the path it was opened at.
fn key_of(file: &OpenIso) -> Result<(String, CacheEntry), Error> {
    let path = file.path.as_path();
    let m = file.file.metadata().map_err(|e| Error::io(path, e))?;
    let abs = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    Ok((
        abs.display().to_string(),
        CacheEntry {
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
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

    pub fn get(&self, file: &OpenIso) -> Option<String> {
        let (k, now) = key_of(file).ok()?;
        let e = self.entries.get(&k)?;
        (e.size == now.size
            && e.mtime_ns == now.mtime_ns
            && e.ctime_ns == now.ctime_ns
            && e.inode == now.inode)
            .then(|| e.sha256.clone())
    }

    pub fn put(&mut self, file: &OpenIso, sha256: &str) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_cache_does_not_trust_a_file_rewritten_behind_its_back() {
        let d = tempfile::tempdir().unwrap();
        let iso = d.path().join("x.iso");
        std::fs::write(&iso, b"first").unwrap();
        let mut cache = DigestCache::load(&d.path().join("digests.json"));
        let open = || OpenIso::open(&iso).unwrap();
        cache.put(&open(), "11").unwrap();
        assert_eq!(cache.get(&open()).as_deref(), Some("11"));
        // Same size, same mtime, same inode: only the ctime tells.
        let mtime = std::fs::metadata(&iso).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&iso).unwrap();
        std::io::Write::write_all(&mut &f, b"other").unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&iso).unwrap().modified().unwrap(), mtime);
        assert_eq!(cache.get(&open()), None);
    }

    #[test]
    fn sums_as_sha256sum_writes_them() {
        let p = Path::new("SHA256SUMS");
        let a = "ab".repeat(32);
        let b = "CD".repeat(32);
        let text = format!("{a}  tails-amd64-6.0.iso\n\n{b} *./tails-amd64-6.1.iso\n");
        let sums = parse_sums(p, &text).unwrap();
        assert_eq!(
            sums,
            [
                ("tails-amd64-6.0.iso".to_string(), a.clone()),
                ("tails-amd64-6.1.iso".to_string(), "cd".repeat(32)),
            ]
        );
        for bad in ["x  y.iso", &format!("{a} y.iso"), &format!("{a}  "), ""] {
            assert!(parse_sums(p, bad).is_err(), "{bad:?}");
        }
        let e = parse_sums(p, &format!("{a}  ok.iso\nnonsense\n")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn an_iso_is_found_by_path_or_name_once() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let auth = |text: String| Authority {
            sums: Some((
                PathBuf::from("S"),
                parse_sums(Path::new("S"), &text).unwrap(),
            )),
            keyring: None,
        };
        let iso = Path::new("/srv/isos/tails-amd64-6.0/tails-amd64-6.0.iso");
        let rel = "tails-amd64-6.0/tails-amd64-6.0.iso";
        // The same digest listed under its path and its name, apart: one digest.
        let same = auth(format!(
            "{a}  {rel}\n{b}  other.iso\n{a}  tails-amd64-6.0.iso\n"
        ));
        assert_eq!(same.expected("6.0", iso, rel).unwrap(), Some(a.clone()));
        let differ = auth(format!("{a}  {rel}\n{b}  tails-amd64-6.0.iso\n"));
        assert!(differ.expected("6.0", iso, rel).is_err());
        let missing = auth(format!("{b}  other.iso\n"));
        let e = missing.expected("6.0", iso, rel).unwrap_err().to_string();
        assert!(e.contains("has no digest"), "{e}");
    }
}
