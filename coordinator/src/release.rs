//! A running coordinator: shared state, the main loop, and the end of the
//! release (manifest, signature, JUnit report).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iukfarm_engine::fingerprint::Fingerprint;
use iukfarm_engine::kit::check_source_date;
use iukfarm_proto::v1;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::auth::{Auth, Revoked};
use crate::config::{Config, Reproduce};
use crate::inputs::{self, Authority, DigestCache, IsoInput};
use crate::jobs::{Built, Job, JobState, Table};
use crate::journal::{Entry, Journal};
use crate::manifest::{self, Manifest};
use crate::state::{Phase, STATE_DIR, Shared, State};
use crate::{Error, junit};

/// Concurrent calls on one connection (a worker with many slots uses a
/// handful: lease, heartbeats, one upload and one ISO stream per slot).
const MAX_STREAMS: u32 = 64;

/// How a release ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every IUK built, verified and signed.
    Succeeded,
    /// Some IUKs failed; the messages name them.
    Failed(Vec<String>),
    /// Interrupted or cancelled.
    Cancelled(String),
}

/// A started coordinator.
pub struct Running {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    stop_server: oneshot::Sender<()>,
    /// `/metrics`, served while the coordinator runs (its linger included).
    _metrics: Option<iukfarm_metrics::Serving>,
}

fn required(cfg: &Config, own: &Fingerprint) -> (String, String) {
    match cfg.require_engine.as_deref() {
        None => (own.engine_version.clone(), own.git_commit.clone()),
        Some(r) => match r.split_once('@') {
            Some((v, c)) => (v.to_string(), c.to_string()),
            None => (r.to_string(), String::new()),
        },
    }
}

/// An exclusive lock on the output directory for this process's lifetime.
fn lock_dir(state_dir: &Path) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    let p = state_dir.join("lock");
    let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Config(format!(
            "another coordinator is using {}; stop it or choose another --output-dir",
            state_dir.parent().unwrap_or(state_dir).display()
        )));
    }
    Ok(f)
}

/// Checks the configuration and the inputs, then starts serving on
/// `listener` (or `cfg.listen`). Bad input fails here, before any work.
pub async fn start(cfg: Config, listener: Option<TcpListener>) -> Result<Running, Error> {
    cfg.validate()?;
    let (_, expiring) = cfg
        .signing
        .certificate_and_warning()
        .map_err(|e| Error::Config(e.to_string()))?;
    if let Some(w) = expiring {
        warn!("the manifest's signing key: {w}");
    }
    let own = iukfarm_engine::fingerprint::fingerprint();
    let (required_version, required_commit) = required(&cfg, &own);

    // Inputs: every ISO must be there and usable before anything else.
    let mut wanted = vec![cfg.new_version.clone()];
    wanted.extend(cfg.source_versions.iter().cloned());
    let root = cfg.iso_root.clone();
    let relpaths: Vec<(String, String)> = wanted
        .iter()
        .map(|v| (v.clone(), cfg.iso_relpath(v)))
        .collect();
    let authority = Arc::new(Authority::load(
        cfg.iso_sha256sums.as_deref(),
        cfg.iso_keyring.as_deref(),
    )?);
    let auth = authority.clone();
    let (new_version, sde) = (cfg.new_version.clone(), cfg.source_date_epoch);
    let checked = tokio::task::spawn_blocking(move || {
        relpaths
            .into_iter()
            .map(|(v, rel)| {
                let path = root.join(&rel);
                let (iso, open) = inputs::check(&v, &path)?;
                if v != new_version {
                    check_source_date(sde, iso.created, &format!("the ISO of {v}"))
                        .map_err(|e| Error::BadInput(e.to_string()))?;
                }
                auth.precheck(&v, &path, &rel)?;
                let size = (open.file.metadata())
                    .map_err(|e| Error::io(&path, e))?
                    .len();
                Ok(IsoInput {
                    version: v,
                    relpath: rel,
                    path,
                    iso: open,
                    size,
                    sha256: String::new(),
                    system_size: iso.system_size,
                })
            })
            .collect::<Result<Vec<_>, Error>>()
    })
    .await
    .map_err(|e| Error::Other(e.to_string()))??;

    // The output directory and our state inside it.
    let state_dir = cfg.output_dir.join(STATE_DIR);
    let incoming = state_dir.join("incoming");
    std::fs::create_dir_all(&incoming).map_err(|e| Error::io(&incoming, e))?;
    let lock = lock_dir(&state_dir)?;
    // What a killed run left in `incoming` is sorted out by `plan`, once
    // the checks that may refuse this run have passed.

    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", cfg.listen)))?,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Other(e.to_string()))?;
    let tls = match &cfg.tls {
        None => None,
        Some((cert, key)) => {
            let c = std::fs::read(cert).map_err(|e| Error::io(cert, e))?;
            let k = std::fs::read(key).map_err(|e| Error::io(key, e))?;
            let mut t = ServerTlsConfig::new().identity(Identity::from_pem(c, k));
            if let Some(ca) = &cfg.tls_client_ca {
                let pem = std::fs::read(ca).map_err(|e| Error::io(ca, e))?;
                // Optional in the handshake so that a caller without one gets
                // an answer saying what to do; every call then requires one
                // (`auth::Auth::check`), and a presented one must be the CA's.
                t = t
                    .client_ca_root(tonic::transport::Certificate::from_pem(pem))
                    .client_auth_optional(true);
            }
            Some(t)
        }
    };
    let cert_not_after = match &cfg.tls {
        Some((cert, _)) => {
            let pem = std::fs::read(cert).map_err(|e| Error::io(cert, e))?;
            Some(
                iukfarm_proto::pem_not_after(&pem)
                    .map_err(|e| Error::Config(format!("{}: {e}", cert.display())))?,
            )
        }
        None => None,
    };
    let metrics_endpoint = match cfg.metrics_listen {
        Some(a) => Some(iukfarm_metrics::Endpoint::bind(a).await.map_err(|e| {
            Error::Config(format!("cannot listen on {a} for --metrics-listen: {e}"))
        })?),
        None => None,
    };
    let auth = Auth {
        mtls: cfg.tls_client_ca.is_some(),
        revoked: cfg.tls_revoked.clone().map(Revoked::new).transpose()?,
    };

    let (changed, _) = watch::channel(0u64);
    let state_dir_blocks = state_dir.join("blocks");
    let shared = Arc::new(Shared {
        verify_slots: Semaphore::new(cfg.verify_jobs),
        verify_memo: Default::default(),
        fingerprint: own,
        gensquashfs: cfg.gensquashfs()?,
        required_version,
        required_commit,
        state: Mutex::new(State {
            phase: Phase::Preparing,
            message: "hashing the input ISOs".into(),
            table: Table::default(),
            inputs: checked,
            job_input: Vec::new(),
            workers: BTreeMap::new(),
            files: Vec::new(),
            cancel_reason: None,
            audit_failed: Vec::new(),
        }),
        changed,
        state_dir,
        incoming,
        journal: Mutex::new(None),
        stop_lingering: Notify::new(),
        authority,
        auth,
        watchers: Arc::new(Semaphore::new(crate::state::MAX_WATCHERS)),
        rm_watchers: Arc::new(Semaphore::new(crate::state::RM_WATCHERS)),
        blocks: (cfg.block_store > 0)
            .then(|| crate::blocks::Store::new(state_dir_blocks, cfg.block_store)),
        offers: Default::default(),
        audits: crate::audit::Audits::new(cfg.audit_rate),
        metrics: crate::metrics::Metrics::new(cert_not_after),
        cfg,
    });
    let metrics = match metrics_endpoint {
        Some(e) => {
            info!("metrics at http://{}/metrics", e.local_addr());
            let sh = shared.clone();
            Some(e.serve(Arc::new(move || sh.metrics.render(&sh))))
        }
        None => None,
    };

    let (stop_server, stop_rx) = oneshot::channel::<()>();
    let svc = crate::service::FarmService::new(shared.clone());
    let token = iukfarm_proto::CheckToken::new(shared.cfg.token.as_deref());
    // Limits: a client may not hold the coordinator's resources forever
    // (keep-alives find dead peers: a cut link, a frozen worker).
    let mut builder = Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS))
        .concurrency_limit_per_connection(MAX_STREAMS as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS certificate or key: {e}")))?;
    }
    let router = builder.add_service(tonic::service::interceptor::InterceptedService::new(
        v1::farm_server::FarmServer::new(svc).max_decoding_message_size(16 << 20),
        token,
    ));
    let incoming_conns = crate::listener::bounded(listener);
    let server = tokio::spawn(async move {
        let _lock = lock;
        router
            .serve_with_incoming_shutdown(incoming_conns, async {
                let _ = stop_rx.await;
            })
            .await
    });
    info!("coordinator listening on {addr}");
    Ok(Running {
        shared,
        addr,
        server,
        stop_server,
        _metrics: metrics,
    })
}

/// Marks a job done by an earlier run, as its journal entry says.
fn resumed(j: &mut Job, e: &Entry, how: &str) {
    j.state = JobState::Done;
    j.resumed = true;
    j.built = Some(Built {
        sha256: e.sha256.clone(),
        size: e.size,
        worker: e.worker.clone(),
        build_seconds: e.build_seconds,
        blocks: None,
        certificate: e.certificate.clone(),
    });
    j.ran_on.push(e.worker.clone());
    j.note(format!(
        "built by {} and verified in an earlier run (journal){how}; not rebuilt",
        e.worker
    ));
}

/// A file directly in `dir` with this size and digest (the size is looked
/// at first: most leftovers are partial uploads).
fn find_in(dir: &Path, size: u64, sha256: &str) -> Option<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    names.into_iter().find(|p| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() == size)
            && inputs::sha256_file(p).is_ok_and(|s| s == sha256)
    })
}

/// Orders versions as Debian does, enough for Tails': numbers numerically,
/// `~` before anything.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let digit = c.is_ascii_digit();
            match out.last_mut() {
                Some((d, p)) if *d == digit => p.push(c),
                _ => out.push((digit, c.to_string())),
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let o = match (pa.get(i), pb.get(i)) {
            (Some((true, x)), Some((true, y))) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            (Some((_, x)), Some((_, y))) => {
                let key = |s: &str| {
                    s.chars()
                        .map(|c| if c == '~' { 0u32 } else { c as u32 + 1 })
                        .collect::<Vec<_>>()
                };
                key(x).cmp(&key(y))
            }
            (Some((_, x)), None) => {
                if x.starts_with('~') {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            }
            (None, Some((_, y))) => {
                if y.starts_with('~') {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Less
                }
            }
            (None, None) => std::cmp::Ordering::Equal,
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    std::cmp::Ordering::Equal
}

impl Running {
    /// The address workers and clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cancels the release; [`Running::wait`] then returns `Cancelled`.
    pub fn cancel(&self, reason: &str) {
        self.shared.cancel(reason);
    }

    /// A handle that can cancel the release from elsewhere (a signal task).
    pub fn canceller(&self) -> impl Fn(&str) + Send + Sync + 'static {
        let s = self.shared.clone();
        move |r: &str| s.cancel(r)
    }

    /// Runs the release to its end, then keeps serving for the linger time.
    pub async fn wait(self) -> Result<Outcome, Error> {
        let result = self.run().await;
        if let Some(b) = &self.shared.blocks {
            let s = b.stats();
            info!(
                "block store: {} blocks given to workers, {} stored, {} compressed twice, {} refused",
                s.served, s.stored, s.duplicates, s.refused
            );
            b.close();
        }
        if let Err(e) = &result {
            let mut st = self.shared.lock();
            st.phase = Phase::Failed;
            st.message = e.to_string();
            st.table.cancel_all(&e.to_string());
        }
        self.shared.bump();
        // Workers learn that the release is over from their next call; let
        // the connected ones hear it before the listener goes away.
        let grace = Instant::now() + Duration::from_secs(5);
        while Instant::now() < grace {
            let timeout = self.shared.cfg.lease_timeout;
            let waiting = (self.shared.lock().workers.values())
                .any(|w| !w.told_over && w.last_seen.elapsed() < timeout);
            if !waiting {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let linger = self.shared.cfg.linger;
        if !linger.is_zero() {
            info!("release over; serving status and downloads for {linger:?}");
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = self.shared.stop_lingering.notified() => info!("stopped lingering"),
            }
        }
        let _ = self.stop_server.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.server).await {
            Ok(Ok(Err(e))) => warn!("server: {e}"),
            Ok(Err(e)) => warn!("server task: {e}"),
            _ => {}
        }
        result
    }

    async fn run(&self) -> Result<Outcome, Error> {
        let sh = &self.shared;
        self.hash_inputs().await?;
        self.plan()?;
        {
            let mut st = sh.lock();
            if st.cancel_reason.is_none() {
                st.phase = Phase::Running;
                st.message.clear();
            }
        }
        sh.bump();
        let mut changed = sh.changed.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changed.changed() => {}
            }
            let mut st = sh.lock();
            if let Some(b) = &sh.blocks {
                // Nobody waits for blocks a silent worker claimed.
                for w in st.workers.values() {
                    if w.last_seen.elapsed() > sh.cfg.lease_timeout {
                        b.forget(&w.name);
                    }
                }
            }
            // A revoked worker is gone now: its leases go to others (its
            // uploads end within a second: `receive`).
            let revoked: Vec<(String, String)> = (st.workers.iter())
                .filter(|(_, w)| {
                    (w.cert_serial.as_deref()).is_some_and(|s| sh.auth.serial_revoked(s))
                })
                .map(|(id, w)| (id.clone(), w.name.clone()))
                .collect();
            for (id, name) in revoked {
                warn!("the certificate of worker {name} was revoked: its jobs go to others");
                st.workers.remove(&id);
                let held: Vec<usize> = (0..st.table.jobs.len())
                    .filter(|&i| {
                        (st.table.jobs[i].lease.as_ref()).is_some_and(|l| l.worker_id == id)
                    })
                    .collect();
                for i in held {
                    sh.metrics.lease_losses.inc();
                    let why = format!("the certificate of {name} was revoked");
                    st.table.retry(i, &why, sh.cfg.max_attempts, Instant::now());
                }
            }
            for (helper, served_to) in std::mem::take(&mut st.audit_failed) {
                isolate_users_of(sh, &mut st, &helper, &served_to);
            }
            let expired = st.table.expire(Instant::now(), sh.cfg.max_attempts);
            sh.metrics.lease_losses.inc_by(expired.len() as u64);
            for i in &expired {
                warn!(
                    "{}: {}",
                    st.table.jobs[*i].output_name, st.table.jobs[*i].error
                );
            }
            if let Some(r) = st.cancel_reason.clone() {
                st.phase = Phase::Cancelled;
                st.message = r.clone();
                drop(st);
                self.write_junit()?;
                return Ok(Outcome::Cancelled(r));
            }
            if st.table.all_terminal() {
                break;
            }
            drop(st);
            if !expired.is_empty() {
                sh.bump();
            }
        }
        let audits = sh.audits.stats();
        if audits.checked > 0 {
            info!(
                "helpers' forms compressed again to audit them: {} in {:.2} CPU s, {} not ours",
                audits.checked, audits.seconds, audits.failed
            );
        }
        let failed: Vec<String> = {
            let st = sh.lock();
            st.table
                .jobs
                .iter()
                .filter(|j| j.state != JobState::Done)
                .map(|j| format!("{}: {}", j.output_name, j.error))
                .collect()
        };
        if !failed.is_empty() {
            let mut st = sh.lock();
            st.phase = Phase::Failed;
            st.message = format!("{} of {} jobs failed", failed.len(), st.table.jobs.len());
            drop(st);
            self.write_junit()?;
            return Ok(Outcome::Failed(failed));
        }
        sh.lock().phase = Phase::Finishing;
        sh.bump();
        self.finish().await?;
        self.write_junit()?;
        let mut st = sh.lock();
        st.phase = Phase::Succeeded;
        st.message = format!(
            "{} IUKs built, verified and signed in {} (gensquashfs {}'s bytes)",
            st.table
                .jobs
                .iter()
                .filter(|j| j.reproduction_of.is_none())
                .count(),
            sh.cfg.output_dir.display(),
            sh.gensquashfs
        );
        info!("{}", st.message);
        Ok(Outcome::Succeeded)
    }

    async fn hash_inputs(&self) -> Result<(), Error> {
        let sh = &self.shared;
        let cache_path = sh.state_dir.join("digests.json");
        let mut cache = DigestCache::load(&cache_path);
        let n = sh.lock().inputs.len();
        if !sh.authority.is_set() {
            warn!(
                "the input ISOs are not authenticated: pass --iso-sha256sums or --iso-keyring \
                 so that a damaged or substituted ISO cannot reach a signed IUK"
            );
        }
        for k in 0..n {
            let (iso, version, relpath) = {
                let st = sh.lock();
                let i = &st.inputs[k];
                (i.iso.clone(), i.version.clone(), i.relpath.clone())
            };
            let path = iso.path.clone();
            let known = cache.get(&iso);
            if known.is_none() || sh.authority.is_set() {
                let mut st = sh.lock();
                st.message = format!(
                    "{} the ISO of {version} ({}/{n})",
                    if sh.authority.is_set() {
                        "authenticating"
                    } else {
                        "hashing"
                    },
                    k + 1
                );
                drop(st);
                sh.bump();
            }
            let fresh = known.is_none();
            let (s2, open, v) = (sh.clone(), iso.clone(), version.clone());
            let sha = tokio::task::spawn_blocking(move || {
                s2.authority.digest(&v, &open, &relpath, known)
            })
            .await
            .map_err(|e| Error::Other(e.to_string()))??;
            if fresh {
                cache.put(&iso, &sha)?;
            }
            info!("{version}: {} sha256 {sha}", path.display());
            sh.lock().inputs[k].sha256 = sha;
            if sh.lock().cancel_reason.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// One job per source (plus reproductions), then what the journal says
    /// is already done.
    fn plan(&self) -> Result<(), Error> {
        let sh = &self.shared;
        let cfg = &sh.cfg;
        let now = Instant::now();
        let mut st = sh.lock();
        let new = st.inputs[0].clone();
        let fp = sh.fingerprint.to_string();
        // Older sources first: their diffs are the largest.
        let mut order: Vec<usize> = (1..st.inputs.len()).collect();
        order.sort_by(|&a, &b| version_cmp(&st.inputs[a].version, &st.inputs[b].version));
        let mut jobs = Vec::new();
        let mut job_input = Vec::new();
        for (rank, &k) in order.iter().enumerate() {
            let old = &st.inputs[k];
            let name = cfg.output_name(&old.version);
            let mut h = Sha256::new();
            for part in [
                "iukfarm job v1",
                &old.sha256,
                &new.sha256,
                &fp,
                &cfg.engine_options.join("\u{1f}"),
                &cfg.source_date_epoch.to_string(),
                &cfg.diff_name(),
                &name,
            ] {
                h.update(part.as_bytes());
                h.update(b"\n");
            }
            let size_delta = new.system_size.abs_diff(old.system_size) >> 20;
            let priority = (order.len() - rank) as u64 * 1_000_000 + size_delta.min(999_999);
            jobs.push(Job::new(
                inputs::hex(&h.finalize()),
                old.version.clone(),
                name,
                priority,
                now,
            ));
            job_input.push(k);
        }
        let twins = match cfg.reproduce {
            Reproduce::None => 0,
            Reproduce::Some(n) => n.min(jobs.len()),
            Reproduce::All => jobs.len(),
        };
        for i in 0..twins {
            let mut r = jobs[i].clone();
            r.id = format!("{}/reproduction", r.id);
            r.reproduction_of = Some(i);
            jobs.push(r);
            job_input.push(job_input[i]);
        }

        // Resume: kits recorded in the journal and still intact are done.
        let (journal, entries) = Journal::open(&sh.state_dir.join("journal"))?;
        let by_id: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.job.as_str(), e)).collect();
        // Journalled kits whose rename into place a crash prevented: their
        // verified bytes may still be in `incoming`.
        let mut not_in_place = Vec::new();
        for (i, j) in jobs.iter_mut().enumerate() {
            let Some(e) = by_id.get(j.id.as_str()).filter(|e| !e.retracted) else {
                continue;
            };
            let p = cfg.output_dir.join(&j.output_name);
            let intact = j.reproduction_of.is_some()
                || (std::fs::metadata(&p).is_ok_and(|m| m.len() == e.size)
                    && inputs::sha256_file(&p).is_ok_and(|s| s == e.sha256));
            if !intact && !p.exists() {
                not_in_place.push(i);
            }
            if intact {
                resumed(j, e, "");
                info!(
                    "{}: already built and verified (journal); not rebuilding",
                    j.output_name
                );
            }
        }
        // Kits in the output directory that the journal does not vouch for:
        // a finished release's are never touched (check first, change
        // later); anything else is set aside, never deleted.
        let unvouched: Vec<String> = jobs
            .iter()
            .filter(|j| {
                j.reproduction_of.is_none()
                    && j.state != JobState::Done
                    && cfg.output_dir.join(&j.output_name).exists()
            })
            .map(|j| j.output_name.clone())
            .collect();
        // So are the kits a signed manifest there names that this release
        // does not make (another version, other sources): its SHA256SUMS
        // and signature are removed below, so refuse first.
        let signed = cfg.output_dir.join(manifest::MANIFEST);
        if signed.exists() {
            let ours: Vec<&str> = jobs
                .iter()
                .filter(|j| j.state == JobState::Done)
                .map(|j| j.output_name.as_str())
                .collect();
            let foreign: Vec<String> = match std::fs::read(&signed)
                .ok()
                .and_then(|b| serde_json::from_slice::<manifest::Manifest>(&b).ok())
            {
                Some(m) => m
                    .iuks
                    .into_iter()
                    .map(|k| k.name)
                    .filter(|n| !ours.contains(&n.as_str()))
                    .collect(),
                None => vec![format!("{} (unreadable)", manifest::MANIFEST)],
            };
            let not_ours: Vec<&String> = unvouched.iter().chain(&foreign).collect();
            if let Some(first) = not_ours.first() {
                return Err(Error::BadInput(format!(
                    "{} holds a signed release made with other parameters (or whose journal is \
                     gone): {first} and {} more kit(s) are not this release's. Nothing was \
                     changed; use another --output-dir, or move that release away",
                    cfg.output_dir.display(),
                    not_ours.len() - 1
                )));
            }
        }
        for i in not_in_place {
            let j = &mut jobs[i];
            let e = by_id[j.id.as_str()];
            if let Some(from) = find_in(&sh.incoming, e.size, &e.sha256) {
                let to = cfg.output_dir.join(&j.output_name);
                std::fs::rename(&from, &to)
                    .and_then(|_| std::fs::File::open(&cfg.output_dir)?.sync_all())
                    .map_err(|err| Error::io(&to, err))?;
                resumed(j, e, ", put in place after a crash");
                info!(
                    "{}: already built and verified (journal); put in place from {}",
                    j.output_name,
                    sh.incoming.display()
                );
            }
        }
        // The rest of a killed run's uploads are worthless, and so are its
        // stored blocks (their senders are gone).
        // So are the mount points of a kernel check it was killed in.
        for e in std::fs::read_dir(&sh.incoming).map_err(|e| Error::io(&sh.incoming, e))? {
            let e = e.map_err(|e| Error::io(&sh.incoming, e))?;
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            } else {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        match &sh.blocks {
            Some(b) => b.reset().map_err(|e| Error::io(b.dir(), e))?,
            None => match std::fs::remove_dir_all(sh.state_dir.join("blocks")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&sh.state_dir.join("blocks"), e));
                }
                _ => {}
            },
        }
        let aside = sh.state_dir.join("set-aside");
        for name in &unvouched {
            let from = cfg.output_dir.join(name);
            std::fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
            let to = (0..)
                .map(|n| aside.join(format!("{name}.{n}")))
                .find(|p| !p.exists())
                .expect("a free name");
            std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            warn!(
                "{}: not vouched for by this release's journal; set aside as {}",
                from.display(),
                to.display()
            );
        }
        // Signed files of an earlier run would be mistaken for this run's;
        // they are rewritten at the end.
        for f in [manifest::SUMS, manifest::MANIFEST, manifest::SIGNATURE] {
            let p = cfg.output_dir.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        *sh.journal.lock().unwrap_or_else(|p| p.into_inner()) = Some(journal);
        st.table = Table { jobs };
        for i in 0..st.table.jobs.len() {
            st.table.check_reproduction(i);
        }
        st.job_input = job_input;
        st.files = st
            .table
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Done && j.reproduction_of.is_none())
            .map(|j| j.output_name.clone())
            .collect();
        Ok(())
    }

    /// SHA256SUMS, manifest.json and its signature, checked once written.
    async fn finish(&self) -> Result<(), Error> {
        let sh = self.shared.clone();
        let m = {
            let st = sh.lock();
            let cfg = &sh.cfg;
            let fp = &sh.fingerprint;
            let mut iuks: Vec<manifest::Iuk> = st
                .table
                .jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.reproduction_of.is_none())
                .map(|(i, j)| {
                    let b = j.built.clone().expect("done jobs have a kit");
                    let twin = st
                        .table
                        .jobs
                        .iter()
                        .find(|r| r.reproduction_of == Some(i))
                        .and_then(|r| r.built.as_ref().map(|b| b.worker.clone()));
                    manifest::Iuk {
                        name: j.output_name.clone(),
                        size: b.size,
                        sha256: b.sha256,
                        source_version: j.old_version.clone(),
                        worker: b.worker,
                        build_seconds: (b.build_seconds * 1000.0).round() / 1000.0,
                        verification: format!(
                            "applied to {} by the coordinator: equals {}",
                            j.old_version, cfg.new_version
                        ),
                        reproduced_by: twin,
                        certificate: b.certificate,
                    }
                })
                .collect();
            iuks.sort_by(|a, b| a.name.cmp(&b.name));
            Manifest {
                format: manifest::FORMAT.into(),
                product: cfg.product.clone(),
                build_target: cfg.build_target.clone(),
                new_version: cfg.new_version.clone(),
                source_date_epoch: cfg.source_date_epoch,
                engine: manifest::Engine {
                    version: fp.engine_version.clone(),
                    git_commit: fp.git_commit.clone(),
                    liblzma_version: fp.liblzma_version.clone(),
                    iuk_format: fp.iuk_format,
                },
                gensquashfs: sh.gensquashfs.to_string(),
                engine_options: cfg.engine_options.clone(),
                inputs: st
                    .inputs
                    .iter()
                    .map(|i| manifest::Input {
                        version: i.version.clone(),
                        path: i.relpath.clone(),
                        size: i.size,
                        sha256: i.sha256.clone(),
                    })
                    .collect(),
                iuks,
            }
        };
        let sh2 = sh.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let out = &sh2.cfg.output_dir;
            // The manifest signs what is on disk now: one more sequential
            // read of every kit it names.
            for k in &m.iuks {
                let p = out.join(&k.name);
                let size = std::fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
                let sha = inputs::sha256_file(&p)?;
                if size != k.size || sha != k.sha256 {
                    return Err(Error::Other(format!(
                        "{} changed on disk after it was verified ({size} bytes, sha256 {sha}; \
                         verified: {} bytes, sha256 {}): not signing. Run the same command \
                         again: it sets that file aside and builds the kit anew",
                        p.display(),
                        k.size,
                        k.sha256
                    )));
                }
            }
            let put = |name: &str, data: &[u8]| -> Result<(), Error> {
                let tmp = sh2.state_dir.join(format!("{name}.tmp"));
                let dst = out.join(name);
                std::fs::write(&tmp, data)
                    .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, &dst))
                    .map_err(|e| Error::io(&dst, e))
            };
            put(manifest::SUMS, m.sums().as_bytes())?;
            put(manifest::MANIFEST, &m.to_json())?;
            let sig_tmp = sh2.state_dir.join("manifest.json.asc.tmp");
            sh2.cfg
                .signing
                .sign(&out.join(manifest::MANIFEST), &sig_tmp)?;
            // Checked against the key's certificate before it is put in place.
            let cert = sh2.cfg.signing.certificate()?;
            let sig = std::fs::read(&sig_tmp).map_err(|e| Error::io(&sig_tmp, e))?;
            let signer = crate::signing::verify(&cert, &m.to_json(), &sig)?;
            let dst = out.join(manifest::SIGNATURE);
            std::fs::rename(&sig_tmp, &dst).map_err(|e| Error::io(&dst, e))?;
            info!("manifest signed by {signer} and checked");
            Ok(())
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))??;
        let mut st = sh.lock();
        for f in [manifest::SUMS, manifest::MANIFEST, manifest::SIGNATURE] {
            st.files.push(f.to_string());
        }
        Ok(())
    }

    fn write_junit(&self) -> Result<(), Error> {
        let Some(path) = &self.shared.cfg.junit else {
            return Ok(());
        };
        let st = self.shared.lock();
        let suite = format!(
            "{} {} IUKs",
            self.shared.cfg.product, self.shared.cfg.new_version
        );
        junit::write(path, &suite, &st.table.jobs)
    }
}

/// A helper failed an audit: every job that may hold its forms is built
/// again without the store and helpers. That is a job it helped, a job
/// that ran on a worker its forms were served to, and its own; a kit
/// already kept is withdrawn (journal first, then the file). It builds
/// nothing more in this release.
fn isolate_users_of(
    sh: &Shared,
    st: &mut crate::state::State,
    helper: &str,
    served_to: &std::collections::HashSet<String>,
) {
    let helped = sh.audits.ban(helper);
    let mut again = Vec::new();
    // Its own compressions are as suspect as its forms: it builds no kit
    // of this release either.
    for j in st.table.jobs.iter_mut().filter(|j| !j.state.is_terminal()) {
        if !j.refused_by.iter().any(|w| w == helper) {
            j.refused_by.push(helper.to_string());
        }
    }
    for i in 0..st.table.jobs.len() {
        let j = &st.table.jobs[i];
        let ran_on = |w: &str| w == helper || served_to.contains(w);
        let used = helped.contains(&j.id)
            || j.lease.as_ref().is_some_and(|l| ran_on(&l.worker_name))
            || j.built.as_ref().is_some_and(|b| ran_on(&b.worker));
        if !used || j.isolated || j.reproduction_of.is_some() {
            continue;
        }
        let why = format!(
            "may hold forms of {helper}, whose audited form was not our encoder's: \
             built again without the block store"
        );
        match j.state {
            JobState::Pending => st.table.jobs[i].note(why),
            JobState::Leased | JobState::Verifying => st.table.requeue(i, &why),
            JobState::Done => {
                if !withdraw_kit(sh, st, i) {
                    continue;
                }
                st.table.requeue(i, &why);
            }
            JobState::Failed | JobState::Cancelled => continue,
        }
        st.table.jobs[i].isolated = true;
        again.push(st.table.jobs[i].output_name.clone());
    }
    warn!(
        "helper {helper} failed an audit: banned from sharing; built again without the store: {}",
        if again.is_empty() {
            "none".into()
        } else {
            again.join(", ")
        }
    );
}

/// Withdraws job `i`'s kept kit: a retraction in the journal first, then
/// the file. `false` (and nothing changed) if the journal cannot take it.
pub(crate) fn withdraw_kit(sh: &Shared, st: &mut State, i: usize) -> bool {
    let j = &st.table.jobs[i];
    let name = j.output_name.clone();
    let retraction = Entry {
        job: j.id.clone(),
        name: name.clone(),
        sha256: String::new(),
        size: 0,
        worker: String::new(),
        build_seconds: 0.0,
        reproduction: false,
        certificate: None,
        retracted: true,
    };
    if let Err(e) = sh.journal(&retraction) {
        warn!("{name}: cannot withdraw it from the journal ({e}); kept");
        return false;
    }
    let path = sh.cfg.output_dir.join(&name);
    if let Err(e) = std::fs::remove_file(&path) {
        warn!("{}: {e}", path.display());
    }
    st.files.retain(|f| *f != name);
    true
}

#[cfg(test)]
mod tests {
    use super::version_cmp;
    use std::cmp::Ordering::*;

    #[test]
    fn versions_order_like_debian() {
        assert_eq!(version_cmp("6.9", "6.10"), Less);
        assert_eq!(version_cmp("6.10", "6.10"), Equal);
        assert_eq!(version_cmp("6.0~rc1", "6.0"), Less);
        assert_eq!(version_cmp("6.0", "6.0.1"), Less);
        assert_eq!(version_cmp("5.20", "6.0~rc1"), Less);
    }
}
