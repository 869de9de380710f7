//! What a release hands over: `SHA256SUMS` (as `sha256sum` writes it, so
//! `sha256sum --check --strict` works), `manifest.json` and its signature
//! `manifest.json.asc`; and the check of a directory of kits against them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

pub const SUMS: &str = "SHA256SUMS";
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.json.asc";
pub const FORMAT: &str = "iukfarm-manifest/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub product: String,
    pub build_target: String,
    pub new_version: String,
    pub source_date_epoch: u32,
    pub engine: Engine,
    /// Whose bytes every kit is: the gensquashfs version (also among the
    /// engine options). Manifests written before the choice existed were
    /// all 1.2.0's.
    #[serde(default = "gensquashfs_before_the_choice")]
    pub gensquashfs: String,
    pub engine_options: Vec<String>,
    /// The new release's ISO, then the sources', in the RM's order.
    pub inputs: Vec<Input>,
    /// Sorted by name.
    pub iuks: Vec<Iuk>,
}

fn gensquashfs_before_the_choice() -> String {
    "1.2.0".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    pub version: String,
    pub git_commit: String,
    pub liblzma_version: String,
    pub iuk_format: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub version: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Iuk {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub source_version: String,
    pub worker: String,
    pub build_seconds: f64,
    /// How it was verified.
    pub verification: String,
    /// The worker whose second build gave the same bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reproduced_by: Option<String>,
    /// SHA-256 of the client certificate its builder uploaded it with (a
    /// farm with client certificates): which certificate, not just which
    /// name, vouched for it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub certificate: Option<String>,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifests serialise");
        v.push(b'\n');
        v
    }

    pub fn sums(&self) -> String {
        let mut s = String::new();
        for k in &self.iuks {
            s.push_str(&format!("{}  {}\n", k.sha256, k.name));
        }
        s
    }
}

/// Parses `sha256sum` output (text mode, or `*` for binary mode).
pub fn parse_sums(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || Error::BadInput(format!("{SUMS} line {}: not `<sha256>  <name>`", n + 1));
        let (hash, rest) = line.split_once(' ').ok_or_else(bad)?;
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .ok_or_else(bad)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            return Err(bad());
        }
        if out
            .insert(name.to_string(), hash.to_ascii_lowercase())
            .is_some()
        {
            return Err(Error::BadInput(format!("{SUMS}: {name} is listed twice")));
        }
    }
    Ok(out)
}

/// What [`check_dir`] found.
#[derive(Debug, Default)]
pub struct DirCheck {
    /// Kits whose size and digest match.
    pub good: Vec<String>,
    /// Every mismatch, one line each.
    pub problems: Vec<String>,
    /// Fingerprint of the manifest's signer, when a certificate was given.
    pub signer: Option<String>,
}

/// Checks the kits in `dir` against the release files in `release_dir`:
/// the signature (when `certs` are given), SHA256SUMS against the
/// manifest, then each kit's size and digest. With `partial`, kits absent
/// from `dir` are not problems (an RM checking only the ones built locally).
pub fn check_dir(
    dir: &Path,
    release_dir: &Path,
    certs: Option<&[u8]>,
    partial: bool,
) -> Result<DirCheck, Error> {
    let mut c = DirCheck::default();
    let read = |name: &str| {
        let p = release_dir.join(name);
        std::fs::read(&p).map_err(|e| Error::io(&p, e))
    };
    let manifest_bytes = read(MANIFEST)?;
    if let Some(certs) = certs {
        match read(SIGNATURE).and_then(|sig| crate::signing::verify(certs, &manifest_bytes, &sig)) {
            Ok(who) => c.signer = Some(who),
            Err(e) => c
                .problems
                .push(format!("{MANIFEST}: signature not valid: {e}")),
        }
    }
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Error::BadInput(format!("{}: {e}", release_dir.join(MANIFEST).display())))?;
    if manifest.format != FORMAT {
        c.problems.push(format!(
            "{MANIFEST}: format {:?}, expected {FORMAT:?}",
            manifest.format
        ));
    }
    let sums_text = String::from_utf8(read(SUMS)?)
        .map_err(|_| Error::BadInput(format!("{SUMS} is not UTF-8")))?;
    let sums = parse_sums(&sums_text)?;
    let listed: BTreeMap<&str, &Iuk> = manifest.iuks.iter().map(|k| (k.name.as_str(), k)).collect();
    for (name, hash) in &sums {
        match listed.get(name.as_str()) {
            None => c
                .problems
                .push(format!("{name}: in {SUMS} but not in {MANIFEST}")),
            Some(k) if &k.sha256 != hash => c.problems.push(format!(
                "{name}: {SUMS} says {hash}, {MANIFEST} says {}",
                k.sha256
            )),
            Some(_) => {}
        }
    }
    for k in &manifest.iuks {
        if !sums.contains_key(&k.name) {
            c.problems
                .push(format!("{}: in {MANIFEST} but not in {SUMS}", k.name));
        }
        if k.name.contains('/') || k.name.starts_with('.') {
            c.problems
                .push(format!("{:?}: not a plain file name", k.name));
            continue;
        }
        let p = dir.join(&k.name);
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(_) if partial => continue,
            Err(_) => {
                c.problems
                    .push(format!("{}: missing from {}", k.name, dir.display()));
                continue;
            }
        };
        if meta.len() != k.size {
            c.problems.push(format!(
                "{}: {} bytes, the manifest says {}",
                k.name,
                meta.len(),
                k.size
            ));
            continue;
        }
        let got = crate::inputs::sha256_file(&p)?;
        if got != k.sha256 {
            c.problems.push(format!(
                "{}: sha256 {got}, the manifest says {}",
                k.name, k.sha256
            ));
        } else {
            c.good.push(k.name.clone());
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut extra: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".iuk") && !listed.contains_key(n.as_str()))
            .collect();
        extra.sort();
        for n in extra {
            c.problems.push(format!("{n}: not in the manifest"));
        }
    }
    if c.good.is_empty() && c.problems.is_empty() {
        c.problems
            .push(format!("no kit of the manifest is in {}", dir.display()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_like_sha256sum() {
        let h = "a".repeat(64);
        let s = parse_sums(&format!("{h}  x.iuk\n{h} *y.iuk\n")).unwrap();
        assert_eq!(s.len(), 2);
        assert!(parse_sums("abc  x.iuk\n").is_err());
        assert!(parse_sums(&format!("{h}  x\n{h}  x\n")).is_err());
    }
}
