//! Getting a job's ISOs: from the worker's own archive when its copy has
//! the expected digest, else streamed from the coordinator into a cache
//! named by digest. Paths from a job never leave the archive root.

use iukfarm_metrics::prometheus::IntCounter;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use iukfarm_proto::{FarmClient, v1};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::error::JobError;
use crate::{Config, Error, JobProgress};

type Key = (PathBuf, u64, SystemTime);

pub struct Isos {
    root: Option<PathBuf>,
    cache: PathBuf,
    /// Digests of archive files already hashed by this process.
    hashed: Mutex<HashMap<Key, String>>,
    /// One download per digest at a time.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bytes of ISOs received from coordinators.
    received: IntCounter,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha256_file(p: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(hex(&h.finalize())),
            n => h.update(&buf[..n]),
        }
    }
}

/// A job's ISO path, if it is a plain relative path.
fn safe_relpath(rel: &str) -> Option<&Path> {
    let p = Path::new(rel);
    (!rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))).then_some(p)
}

impl Isos {
    pub fn new(cfg: &Config, received: IntCounter) -> Result<Isos, Error> {
        let cache = cfg.cache_dir.join("isos");
        std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
        for e in std::fs::read_dir(&cache)
            .map_err(|e| Error::io(&cache, e))?
            .flatten()
        {
            if e.path().extension().is_some_and(|x| x == "part") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Some(r) = &cfg.iso_root
            && !r.is_dir()
        {
            return Err(Error::Config(format!(
                "ISO archive {} is not a directory",
                r.display()
            )));
        }
        Ok(Isos {
            root: cfg.iso_root.clone(),
            cache,
            hashed: Mutex::default(),
            fetching: Mutex::default(),
            received,
        })
    }

    /// The path of an ISO with the job's digest.
    pub async fn get(
        &self,
        client: &mut FarmClient,
        worker_id: &str,
        r: &v1::IsoRef,
        progress: &JobProgress,
    ) -> Result<PathBuf, JobError> {
        if r.sha256.len() != 64 || !r.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(JobError::Bad(format!("bad ISO digest {:?}", r.sha256)));
        }
        if let Some(p) = self.in_archive(r).await {
            return Ok(p);
        }
        let cached = self.cache.join(format!("{}.iso", r.sha256));
        let lock = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(r.sha256.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        // Cache entries are only ever renamed into place once verified.
        if std::fs::metadata(&cached).is_ok_and(|m| m.len() == r.size) {
            return Ok(cached);
        }
        self.fetch(client, worker_id, r, &cached, progress).await?;
        Ok(cached)
    }

    async fn in_archive(&self, r: &v1::IsoRef) -> Option<PathBuf> {
        let root = self.root.as_ref()?;
        let Some(rel) = safe_relpath(&r.path) else {
            warn!("ignoring ISO path {:?}: not a plain relative path", r.path);
            return None;
        };
        let p = root.join(rel);
        let m = std::fs::metadata(&p).ok()?;
        if !m.is_file() || m.len() != r.size {
            return None;
        }
        let key = (p.clone(), m.len(), m.modified().ok()?);
        let known = self
            .hashed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let sha = match known {
            Some(s) => s,
            None => {
                let q = p.clone();
                let s = tokio::task::spawn_blocking(move || sha256_file(&q))
                    .await
                    .ok()?
                    .ok()?;
                self.hashed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, s.clone());
                s
            }
        };
        if sha == r.sha256 {
            Some(p)
        } else {
            warn!(
                "{}: sha256 {sha}, the release expects {}; using the coordinator's copy",
                p.display(),
                r.sha256
            );
            None
        }
    }

    async fn fetch(
        &self,
        client: &mut FarmClient,
        worker_id: &str,
        r: &v1::IsoRef,
        dst: &Path,
        progress: &JobProgress,
    ) -> Result<(), JobError> {
        info!(
            "fetching {} ({} bytes) from the coordinator",
            r.path, r.size
        );
        progress.set_phase("fetch ISO", r.size);
        let part = dst.with_extension("part");
        let result = async {
            let mut stream = client
                .fetch_iso(v1::FetchIsoRequest {
                    worker_id: worker_id.to_string(),
                    sha256: r.sha256.clone(),
                    offset: 0,
                })
                .await
                .map_err(|s| JobError::Transient(format!("fetching {}: {}", r.path, s.message())))?
                .into_inner();
            let mut f = tokio::fs::File::create(&part)
                .await
                .map_err(|e| JobError::Transient(format!("{}: {e}", part.display())))?;
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(c) = stream
                .message()
                .await
                .map_err(|s| JobError::Transient(format!("fetching {}: {}", r.path, s.message())))?
            {
                if progress.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
                n += c.data.len() as u64;
                if n > r.size {
                    return Err(JobError::Transient(format!(
                        "{}: more bytes than announced",
                        r.path
                    )));
                }
                h.update(&c.data);
                f.write_all(&c.data)
                    .await
                    .map_err(|e| JobError::Transient(format!("{}: {e}", part.display())))?;
                progress.advance_by(c.data.len() as u64);
                self.received.inc_by(c.data.len() as u64);
            }
            f.sync_all()
                .await
                .map_err(|e| JobError::Transient(format!("{}: {e}", part.display())))?;
            let sha = hex(&h.finalize());
            if n != r.size || sha != r.sha256 {
                return Err(JobError::Transient(format!(
                    "{} arrived damaged ({n} bytes, sha256 {sha})",
                    r.path
                )));
            }
            tokio::fs::rename(&part, dst)
                .await
                .map_err(|e| JobError::Transient(format!("{}: {e}", dst.display())))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::safe_relpath;

    #[test]
    fn job_paths_stay_inside_the_archive() {
        assert!(safe_relpath("tails-amd64-6.0/tails-amd64-6.0.iso").is_some());
        for bad in [
            "",
            "/etc/passwd",
            "../x.iso",
            "a/../../x",
            "./x",
            "a//b/../c",
        ] {
            assert!(safe_relpath(bad).is_none(), "{bad}");
        }
    }
}
