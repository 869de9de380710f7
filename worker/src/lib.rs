//! The worker daemon: connects to whichever coordinator is up, leases
//! jobs, gets the ISOs (its own archive, else streamed from the
//! coordinator into a content-addressed cache), runs the IUK engine in a
//! directory of the job's own, and streams the kit back.

mod error;
mod farm_blocks;
mod helper;
mod isos;
mod job;
mod metrics;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use iukfarm_engine::blockcache::BlockCache;
use iukfarm_proto::v1;
use iukfarm_proto::{ClientConfig, FarmClient, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Code;
use tracing::{debug, info, warn};

pub use error::Error;
pub use job::JobProgress;

/// Failure injection for the end-to-end tests; all off in production.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Damage this many uploads (one bit of their first chunk).
    pub corrupt_uploads: u32,
    /// Build with SOURCE_DATE_EPOCH + 1: valid kits, different bytes.
    pub perturb: bool,
    /// Wait this long (cancellably) before each build.
    pub job_delay: Duration,
    /// Stall the first upload this long after its first chunk.
    pub upload_pause: Duration,
    /// Send the block store compressed blocks with a bit flipped.
    pub lie_blocks: bool,
    /// As a helper, after this many honest forms, send forms made at
    /// another xz level: sound, in our container, not our encoder's.
    pub foreign_forms_after: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub client: ClientConfig,
    pub name: String,
    /// The worker's own copy of the ISO archive (same layout as the
    /// coordinator's), used when its files have the expected digests.
    pub iso_root: Option<PathBuf>,
    /// ISOs streamed from coordinators, and the jobs' directories.
    pub cache_dir: PathBuf,
    pub slots: u32,
    /// Compression threads per job (0: the cores divided among the slots).
    pub threads: usize,
    pub memory: u64,
    /// Compressed blocks shared by every job of this worker (and of any
    /// other worker given the same cache), across releases.
    pub blocks: Option<Arc<BlockCache>>,
    /// Exit once a release is over instead of waiting for the next one.
    pub once: bool,
    /// Where to serve `/metrics` for Prometheus (none: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub test: TestHooks,
}

/// One worker per cache directory: its start-up clean-up would remove
/// another's jobs. Held for the worker's lifetime.
fn lock_cache(dir: &std::path::Path) -> Result<std::fs::File, Error> {
    use std::os::fd::AsRawFd;
    let p = dir.join("lock");
    let f = std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Config(format!(
            "another worker uses the cache directory {}; give each worker its own --cache-dir",
            dir.display()
        )));
    }
    Ok(f)
}

/// What memory the machine has available (for the coordinator's planning).
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

pub(crate) struct Ctx {
    pub cfg: Config,
    pub isos: isos::Isos,
    pub blocks: Option<Arc<BlockCache>>,
    pub corrupt_left: AtomicU32,
    pub pause_left: AtomicU32,
    pub metrics: Arc<metrics::Metrics>,
}

/// Why a registration failed.
enum Refusal {
    Fatal,
    ReleaseOver,
    Retry,
}

enum SessionEnd {
    ReleaseOver,
    Stopped,
    Lost(String),
}

/// Runs the worker until `stop` turns true (or, with `once`, until a
/// release is over). Jobs in flight when it stops are cancelled and their
/// directories removed.
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
    if cfg.slots == 0 {
        return Err(Error::Config("--slots must be at least 1".into()));
    }
    let jobs_dir = cfg.cache_dir.join("jobs");
    std::fs::create_dir_all(&jobs_dir).map_err(|e| Error::io(&jobs_dir, e))?;
    let _lock = lock_cache(&cfg.cache_dir)?;
    // Directories of jobs of a killed worker are garbage.
    if let Ok(rd) = std::fs::read_dir(&jobs_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let cert_not_after = match &cfg.client.identity {
        Some((cert, _)) => Some(
            iukfarm_proto::pem_not_after(cert)
                .map_err(|e| Error::Config(format!("the client certificate: {e}")))?,
        ),
        None => None,
    };
    let metrics = Arc::new(metrics::Metrics::new(
        cfg.slots,
        cfg.blocks.clone(),
        cert_not_after,
    ));
    let _serving = match cfg.metrics_listen {
        Some(a) => {
            let e = iukfarm_metrics::Endpoint::bind(a).await.map_err(|e| {
                Error::Config(format!("cannot listen on {a} for --metrics-listen: {e}"))
            })?;
            info!("metrics at http://{}/metrics", e.local_addr());
            let m = metrics.clone();
            Some(e.serve(Arc::new(move || m.render())))
        }
        None => None,
    };
    let iso_bytes = metrics.received.with_label_values(&["iso"]);
    let ctx = Arc::new(Ctx {
        metrics,
        isos: isos::Isos::new(&cfg, iso_bytes)?,
        blocks: cfg.blocks.clone(),
        corrupt_left: AtomicU32::new(cfg.test.corrupt_uploads),
        pause_left: AtomicU32::new(u32::from(!cfg.test.upload_pause.is_zero())),
        cfg,
    });
    let url = ctx.cfg.client.url.clone();
    let mut backoff = Duration::from_millis(200);
    let mut told = false;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let attempt = async {
            let mut client = iukfarm_proto::connect(&ctx.cfg.client)
                .await
                .map_err(|e| (Refusal::Retry, e.to_string()))?;
            let fp = iukfarm_engine::fingerprint::fingerprint();
            let reply = client
                .register(v1::RegisterRequest {
                    protocol: PROTOCOL_VERSION,
                    name: ctx.cfg.name.clone(),
                    fingerprint: Some(v1::Fingerprint {
                        engine_version: fp.engine_version,
                        git_commit: fp.git_commit,
                        liblzma_version: fp.liblzma_version,
                        iuk_format: fp.iuk_format,
                        gensquashfs: fp.gensquashfs,
                    }),
                    slots: ctx.cfg.slots,
                    memory_bytes: ctx.cfg.memory,
                })
                .await
                .map_err(|s| {
                    let why = match s.code() {
                        Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                        | Code::InvalidArgument => Refusal::Fatal,
                        // A coordinator whose release has ended refuses
                        // new workers.
                        Code::Aborted => Refusal::ReleaseOver,
                        _ => Refusal::Retry,
                    };
                    (why, iukfarm_proto::explain(&url, &s))
                })?;
            Ok::<_, (Refusal, String)>((client, reply.into_inner()))
        };
        let (client, reg) = match attempt.await {
            Ok(x) => x,
            Err((Refusal::Fatal, msg)) => return Err(Error::Refused(msg)),
            // Started after the release ended (a lingering coordinator
            // refuses new workers): with --once there is nothing to wait for.
            Err((Refusal::ReleaseOver, msg)) if ctx.cfg.once => {
                info!("release over: {msg}");
                return Ok(());
            }
            Err((_, msg)) => {
                if !told {
                    warn!("waiting for a coordinator: {msg}");
                    told = true;
                } else {
                    debug!("still waiting: {msg}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        told = false;
        backoff = Duration::from_millis(200);
        info!(
            "registered with {url} for {} as {}",
            reg.release, reg.worker_id
        );
        match session(ctx.clone(), client, reg, &mut stop).await {
            SessionEnd::Stopped => return Ok(()),
            SessionEnd::ReleaseOver => {
                info!("release over");
                if ctx.cfg.once {
                    return Ok(());
                }
                // The coordinator lingers a while; wait for the next one.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.changed() => {}
                }
            }
            SessionEnd::Lost(why) => warn!("lost the coordinator: {why}; reconnecting"),
        }
    }
}

async fn session(
    ctx: Arc<Ctx>,
    mut client: FarmClient,
    reg: v1::RegisterReply,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let running: Arc<std::sync::Mutex<HashMap<String, Arc<JobProgress>>>> = Default::default();
    ctx.metrics.connected.set(1);
    let (lost_tx, mut lost_rx) = watch::channel(None::<String>);
    let (over_tx, mut over_rx) = watch::channel(false);

    // Heartbeats: renew leases, report progress, learn of cancellations.
    let hb = {
        let mut client = client.clone();
        let running = running.clone();
        let worker_id = reg.worker_id.clone();
        let metrics = ctx.metrics.clone();
        let every = Duration::from_millis(reg.heartbeat_ms.max(100) as u64);
        tokio::spawn(async move {
            let mut failures = 0;
            loop {
                tokio::time::sleep(every).await;
                let jobs: Vec<v1::JobProgress> = running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(id, p)| p.report(id))
                    .collect();
                match client
                    .heartbeat(v1::HeartbeatRequest {
                        worker_id: worker_id.clone(),
                        jobs,
                    })
                    .await
                {
                    Ok(r) => {
                        failures = 0;
                        let r = r.into_inner();
                        let map = running.lock().unwrap_or_else(|p| p.into_inner());
                        for id in &r.cancelled {
                            if let Some(p) = map.get(id) {
                                info!("{id}: cancelled by the coordinator");
                                metrics.lease_losses.inc();
                                p.cancel();
                            }
                        }
                        if r.release_over {
                            let _ = over_tx.send(true);
                        }
                    }
                    Err(s) => {
                        failures += 1;
                        if s.code() == Code::NotFound || failures >= 3 {
                            let _ = lost_tx.send(Some(s.message().to_string()));
                            return;
                        }
                    }
                }
            }
        })
    };

    // Helping other workers' jobs while a slot is free (work sharing).
    let helping = tokio::spawn(helper::run(
        ctx.clone(),
        client.clone(),
        reg.worker_id.clone(),
        running.clone(),
    ));

    let mut tasks: JoinSet<()> = JoinSet::new();
    let end = loop {
        if *stop.borrow() {
            break SessionEnd::Stopped;
        }
        if let Some(why) = lost_rx.borrow().clone() {
            break SessionEnd::Lost(why);
        }
        if *over_rx.borrow() {
            break SessionEnd::ReleaseOver;
        }
        let mut wait = Duration::from_millis(500);
        if tasks.len() < ctx.cfg.slots as usize {
            match client
                .lease(v1::LeaseRequest {
                    worker_id: reg.worker_id.clone(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.release_over {
                        break SessionEnd::ReleaseOver;
                    }
                    if let Some(j) = r.job {
                        let p = Arc::new(JobProgress::default());
                        running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(j.lease_id.clone(), p.clone());
                        let (ctx, client, running, wid) = (
                            ctx.clone(),
                            client.clone(),
                            running.clone(),
                            reg.worker_id.clone(),
                        );
                        tasks.spawn(async move {
                            let lease = j.lease_id.clone();
                            ctx.metrics.jobs_running.inc();
                            job::run(&ctx, client, &wid, j, p).await;
                            ctx.metrics.jobs_running.dec();
                            running
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&lease);
                        });
                        continue;
                    }
                    wait = Duration::from_millis(r.retry_after_ms.clamp(50, 5000));
                }
                Err(s) if s.code() == Code::NotFound => {
                    break SessionEnd::Lost(s.message().to_string());
                }
                Err(s) => {
                    break SessionEnd::Lost(iukfarm_proto::explain(&ctx.cfg.client.url, &s));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.changed() => {}
            _ = lost_rx.changed() => {}
            _ = over_rx.changed() => {}
        }
    };
    // Jobs still running belong to a lease that is gone (or about to be):
    // stop them; their directories go with them.
    for p in running.lock().unwrap_or_else(|p| p.into_inner()).values() {
        if matches!(end, SessionEnd::Lost(_)) && !p.is_cancelled() {
            ctx.metrics.lease_losses.inc();
        }
        p.cancel();
    }
    ctx.metrics.connected.set(0);
    while tasks.join_next().await.is_some() {}
    hb.abort();
    helping.abort();
    end
}

impl Ctx {
    /// Compression threads of one slot: a job's, or a helper's.
    pub fn job_threads(&self) -> usize {
        if self.cfg.threads > 0 {
            self.cfg.threads
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.cfg.slots as usize).max(1)
        }
    }

    pub fn take_corruption(&self) -> bool {
        take_one(&self.corrupt_left)
    }

    pub fn take_upload_pause(&self) -> Option<Duration> {
        take_one(&self.pause_left).then_some(self.cfg.test.upload_pause)
    }
}

fn take_one(left: &AtomicU32) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}
