//! A release's parameters, as the RM gives them (flags or a TOML release
//! file), checked before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;
use crate::signing::SigningKey;

/// How many IUKs to build twice, on two workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reproduce {
    #[default]
    None,
    Some(usize),
    All,
}

impl std::str::FromStr for Reproduce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Reproduce::All),
            "0" | "none" => Ok(Reproduce::None),
            n => n
                .parse()
                .map(Reproduce::Some)
                .map_err(|_| format!("--reproduce takes a number or `all`, not {n:?}")),
        }
    }
}

/// Everything a coordinator needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub new_version: String,
    pub source_versions: Vec<String>,
    pub source_date_epoch: u32,
    pub iso_root: PathBuf,
    /// Path of an ISO under `iso_root`; `{version}` is replaced.
    pub iso_pattern: String,
    /// The RM's digests of the ISOs (sha256sum format).
    pub iso_sha256sums: Option<PathBuf>,
    /// Certificates whose detached signatures (`<iso>.sig`) the ISOs need.
    pub iso_keyring: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub product: String,
    pub build_target: String,
    /// Always holds `gensquashfs=…`: every job of a release is written
    /// alike ([`Config::gensquashfs`]).
    pub engine_options: Vec<String>,
    /// `VERSION` or `VERSION@COMMIT` workers must run (default: ours).
    pub require_engine: Option<String>,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The release CA: clients must present a certificate it signed, whose
    /// role and name are all the coordinator believes about them.
    pub tls_client_ca: Option<PathBuf>,
    /// Serials of revoked client certificates, one per line.
    pub tls_revoked: Option<PathBuf>,
    pub token: Option<String>,
    pub signing: SigningKey,
    pub reproduce: Reproduce,
    pub junit: Option<PathBuf>,
    /// A worker that has not renewed a lease for this long loses it.
    pub lease_timeout: Duration,
    /// Attempts per IUK before it fails (transient failures only).
    pub max_attempts: u32,
    /// How long to keep serving status and downloads once the release ended.
    pub linger: Duration,
    /// Concurrent verifications by applying (each reads both systems).
    pub verify_jobs: usize,
    /// Helpers' forms audited past their first few, in 1024
    /// ([`crate::audit`]).
    pub audit_rate: u64,
    /// After applying it, read every kit through the Linux kernel's
    /// squashfs ([`iukfarm_kernelcheck`]); resolved from `--kernel-check`.
    pub kernel_check: bool,
    /// Size cap of the farm's block store (0: workers share no blocks).
    pub block_store: u64,
    /// Where to serve `/metrics` for Prometheus (none: not served).
    pub metrics_listen: Option<SocketAddr>,
}

pub const DEFAULT_ISO_PATTERN: &str = "tails-amd64-{version}/tails-amd64-{version}.iso";

/// The writer a release uses: the RM's choice, else the one Tails pins for
/// the new version.
pub fn resolve_gensquashfs(
    chosen: Option<iukfarm_engine::sqfs::Gensquashfs>,
    new_version: &str,
) -> Result<iukfarm_engine::sqfs::Gensquashfs, Error> {
    use iukfarm_engine::sqfs::Gensquashfs;
    match chosen {
        Some(g) => Ok(g),
        None => Gensquashfs::for_release(new_version).ok_or_else(|| {
            Error::Config(format!(
                "cannot tell from version {new_version:?} which gensquashfs Tails pins for it: \
                 pass --gensquashfs 1.3.2 (Tails 7 and later) or 1.2.0 (Tails 6 and before)"
            ))
        }),
    }
}

/// Splits versions as the RM pastes them: separated by spaces and/or commas.
pub fn parse_versions(text: &str) -> Result<Vec<String>, Error> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| check_version(s.to_string()))
        .collect()
}

/// Versions end up in file names: keep them to what Tails uses.
pub fn check_version(v: String) -> Result<String, Error> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && !v.starts_with(['.', '-', '~'])
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '~' | '-' | '+' | '_'));
    if ok {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "invalid version {v:?}: use letters, digits and . ~ - + _"
        )))
    }
}

/// A product name or build target: they end up in file names.
pub fn check_name(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(Error::Config(format!(
            "invalid {what} {s:?}: use letters, digits and -"
        )));
    }
    Ok(())
}

/// A name of a file the release writes (a kit, the diff inside it): one
/// plain component, no control characters, not hidden.
pub fn check_file_name(what: &str, s: &str) -> Result<(), Error> {
    if s.is_empty()
        || s.len() > 255
        || s.starts_with('.')
        || s.contains('/')
        || s.chars().any(char::is_control)
    {
        return Err(Error::Config(format!(
            "invalid {what} {s:?}: one file name, without / or control characters, \
             not starting with ."
        )));
    }
    Ok(())
}

impl Config {
    /// The gensquashfs whose bytes every kit of the release has.
    pub fn gensquashfs(&self) -> Result<iukfarm_engine::sqfs::Gensquashfs, Error> {
        iukfarm_engine::kit::parse_options(&self.engine_options)
            .map_err(|e| Error::Config(e.to_string()))?
            .gensquashfs
            .ok_or_else(|| Error::Config("the engine options name no gensquashfs version".into()))
    }

    /// Checks what can be checked without reading the ISOs.
    pub fn validate(&self) -> Result<(), Error> {
        check_version(self.new_version.clone())?;
        if self.source_versions.is_empty() {
            return Err(Error::Config(
                "no source versions: pass --source-versions (the releases to upgrade from)".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.source_versions {
            check_version(v.clone())?;
            if v == &self.new_version {
                return Err(Error::Config(format!(
                    "source version {v} is the new version itself"
                )));
            }
            if !seen.insert(v) {
                return Err(Error::Config(format!("source version {v} is listed twice")));
            }
        }
        check_name("product", &self.product)?;
        check_name("build target", &self.build_target)?;
        if !self.iso_pattern.contains("{version}") {
            return Err(Error::Config(format!(
                "ISO pattern {:?} has no {{version}}",
                self.iso_pattern
            )));
        }
        self.gensquashfs()?;
        if self.max_attempts == 0 || self.verify_jobs == 0 {
            return Err(Error::Config(
                "--max-attempts and --verify-jobs must be at least 1".into(),
            ));
        }
        // Each verification holds a diff's scratch file and threads.
        if self.verify_jobs > 64 {
            return Err(Error::Config("--verify-jobs must be at most 64".into()));
        }
        if self.lease_timeout < Duration::from_secs(1) {
            return Err(Error::Config("--lease-timeout must be at least 1s".into()));
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "listening on {} without TLS would send tokens and kits in clear: pass \
                 --tls-cert, --tls-key and --tls-client-ca (see `iukfarm ca`), or listen on \
                 127.0.0.1",
                self.listen
            )));
        }
        if self.token.is_none() && self.tls_client_ca.is_none() && !self.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "listening on {} with neither client certificates nor a token would let \
                 anyone on the network take jobs: pass --tls-client-ca (or --token-file)",
                self.listen
            )));
        }
        if self.tls_client_ca.is_some() && self.tls.is_none() {
            return Err(Error::Config(
                "--tls-client-ca needs --tls-cert and --tls-key (the coordinator's own)".into(),
            ));
        }
        if self.tls_revoked.is_some() && self.tls_client_ca.is_none() {
            return Err(Error::Config(
                "--tls-revoked lists client certificates: it needs --tls-client-ca".into(),
            ));
        }
        Ok(())
    }

    /// Relative path of a version's ISO under the archive root.
    pub fn iso_relpath(&self, version: &str) -> String {
        self.iso_pattern.replace("{version}", version)
    }

    /// The kit's file name, as Tails names it.
    pub fn output_name(&self, old: &str) -> String {
        format!(
            "{}_{}_{old}_to_{}.iuk",
            self.product, self.build_target, self.new_version
        )
    }

    pub fn diff_name(&self) -> String {
        format!("{}.squashfs", self.new_version)
    }
}

/// Parses `1.5s`, `30s`, `2m`, `500ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 30s, 2m, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    if !(0.0..=1e7).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_as_pasted() {
        assert_eq!(
            parse_versions("6.0 6.1,6.2 , 6.3~rc1\n").unwrap(),
            ["6.0", "6.1", "6.2", "6.3~rc1"]
        );
        assert!(parse_versions("6.0 ../etc").is_err());
        assert!(parse_versions("6.0 a/b").is_err());
    }

    #[test]
    fn names_stay_file_names() {
        assert!(check_name("product", "Tails").is_ok());
        for bad in ["", "../../x", "x/y", "a b", "x\ny"] {
            assert!(check_name("product", bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name("diff name", "6.4.squashfs").is_ok());
        for bad in ["", ".hidden", "a/b", "a\nb", "..", &"x".repeat(256)] {
            assert!(check_file_name("diff name", bad).is_err(), "{bad:?}");
        }
        assert!(check_version("6.0\n".into()).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn reproduce_counts() {
        assert_eq!("all".parse::<Reproduce>().unwrap(), Reproduce::All);
        assert_eq!("2".parse::<Reproduce>().unwrap(), Reproduce::Some(2));
        assert!("x".parse::<Reproduce>().is_err());
    }
}
