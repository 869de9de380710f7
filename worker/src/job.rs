//! One job: a directory of its own, the ISOs, the engine, the upload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iukfarm_engine::kit::{BuildOptions, build_iuk, parse_options};
use iukfarm_engine::sqfs::DataStats;
use iukfarm_proto::{CHUNK_SIZE, FarmClient, v1};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::Ctx;
use crate::error::JobError;

/// A job's progress as the heartbeats report it, and its cancel flag.
#[derive(Default)]
pub struct JobProgress {
    phase: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
}

impl JobProgress {
    pub fn report(&self, lease_id: &str) -> v1::JobProgress {
        v1::JobProgress {
            lease_id: lease_id.to_string(),
            phase: self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub fn set_phase(&self, name: &str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    pub fn advance_by(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

impl iukfarm_engine::Progress for JobProgress {
    fn phase(&self, name: &str, total: u64) {
        self.set_phase(name, total);
    }
    fn advance(&self, bytes: u64) {
        self.advance_by(bytes);
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// The job's directory, removed however the job ends.
struct JobDir(PathBuf);

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", self.0.display());
        }
    }
}

pub async fn run(
    ctx: &Arc<Ctx>,
    mut client: FarmClient,
    worker_id: &str,
    job: v1::Job,
    progress: Arc<JobProgress>,
) {
    let started = Instant::now();
    let lease = job.lease_id.clone();
    info!(
        "{}: building (attempt {}, {lease})",
        job.output_name, job.attempt
    );
    let result = build_and_upload(ctx, &mut client, worker_id, &job, &progress).await;
    let outcome = match &result {
        Ok(()) => "delivered",
        Err(JobError::Reported) => "refused",
        Err(JobError::Cancelled) => "cancelled",
        Err(JobError::Bad(_) | JobError::Transient(_)) => "failed",
    };
    ctx.metrics.jobs.with_label_values(&[outcome]).inc();
    let (message, deterministic) = match result {
        Ok(()) => {
            info!(
                "{}: delivered in {:.1}s",
                job.output_name,
                started.elapsed().as_secs_f64()
            );
            return;
        }
        Err(JobError::Reported) => return,
        Err(JobError::Cancelled) => (
            "stopped before the end (cancelled or worker stopping)".to_string(),
            false,
        ),
        Err(JobError::Bad(m)) => (m, true),
        Err(JobError::Transient(m)) => (m, false),
    };
    warn!("{}: {message}", job.output_name);
    let _ = client
        .fail(v1::FailRequest {
            worker_id: worker_id.to_string(),
            lease_id: lease,
            message,
            deterministic,
        })
        .await;
}

async fn build_and_upload(
    ctx: &Arc<Ctx>,
    client: &mut FarmClient,
    worker_id: &str,
    job: &v1::Job,
    progress: &Arc<JobProgress>,
) -> Result<(), JobError> {
    if job.lease_id.is_empty()
        || !job
            .lease_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(JobError::Bad(format!("bad lease id {:?}", job.lease_id)));
    }
    let dir = JobDir(ctx.cfg.cache_dir.join("jobs").join(&job.lease_id));
    std::fs::create_dir_all(&dir.0)
        .map_err(|e| JobError::Transient(format!("{}: {e}", dir.0.display())))?;
    let engine = parse_options(&job.engine_options)?;
    // The coordinator always names the writer: guessing it here could mix
    // two writers in one release.
    let gensquashfs = engine
        .gensquashfs
        .ok_or_else(|| JobError::Bad("the job names no gensquashfs version".into()))?;

    let delay = ctx.cfg.test.job_delay;
    let t0 = Instant::now();
    while t0.elapsed() < delay {
        if iukfarm_engine::Progress::is_cancelled(&**progress) {
            return Err(JobError::Cancelled);
        }
        tokio::time::sleep(Duration::from_millis(50).min(delay)).await;
    }

    let (old_ref, new_ref) = match (&job.old_iso, &job.new_iso) {
        (Some(o), Some(n)) => (o, n),
        _ => return Err(JobError::Bad("a job without ISOs".into())),
    };
    let old = ctx.isos.get(client, worker_id, old_ref, progress).await?;
    let new = ctx.isos.get(client, worker_id, new_ref, progress).await?;

    let threads = ctx.job_threads();
    let shared = (job.block_store && !job.reproduction).then(|| {
        crate::farm_blocks::FarmBlocks::new(
            tokio::runtime::Handle::current(),
            client.clone(),
            worker_id,
            &job.lease_id,
            &job.output_name,
            ctx.cfg.test.lie_blocks,
            ctx.metrics.clone(),
        )
    });
    let opts = BuildOptions {
        diff_name: job.diff_name.clone(),
        sde: job.source_date_epoch + u32::from(ctx.cfg.test.perturb),
        threads,
        diff: engine.diff,
        profile: engine.profile,
        gensquashfs,
        cache: if job.reproduction {
            None
        } else {
            ctx.blocks.clone()
        },
        shared: shared
            .clone()
            .map(|s| s as Arc<dyn iukfarm_engine::blockcache::SharedBlocks>),
    };
    let kit_path = dir.0.join("kit.iuk");
    let scratch_path = dir.0.join("diff.squashfs");
    let p = progress.clone();
    let kp = kit_path.clone();
    let built = Instant::now();
    let report = tokio::task::spawn_blocking(move || -> Result<_, JobError> {
        let io = |path: &Path, e: std::io::Error| {
            JobError::Transient(format!("{}: {e}", path.display()))
        };
        // The engine reads both back: open them read-write.
        let create = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| io(p, e))
        };
        let kit = create(&kp)?;
        let scratch = create(&scratch_path)?;
        let r = build_iuk(&old, &new, &opts, &scratch, &kit, &*p)?;
        kit.sync_all().map_err(|e| io(&kp, e))?;
        drop(scratch);
        let _ = std::fs::remove_file(&scratch_path);
        let sha = crate::isos::sha256_file(&kp).map_err(|e| io(&kp, e))?;
        Ok((r, sha))
    })
    .await
    .map_err(|e| JobError::Transient(format!("the build crashed: {e}")))??;
    let build_seconds = built.elapsed().as_secs_f64();
    ctx.metrics.build_seconds.observe(build_seconds);
    let (r, sha) = report;
    let t = &r.timings;
    info!(
        "{}: built in {build_seconds:.1}s: {:.1}s reading, {:.1}s indexing, {:.1}s comparing, \
         {:.1}s writing the diff, {:.1}s writing the kit",
        job.output_name,
        t.read.as_secs_f64(),
        t.tail_index.as_secs_f64(),
        t.compare.as_secs_f64(),
        t.diff_image.as_secs_f64(),
        t.kit.as_secs_f64(),
    );
    if let Some(s) = &shared {
        s.flush().await;
        info!("{}: {}", job.output_name, s.summary());
        if s.refused() > 0 {
            warn!(
                "{}: the block store refused {} of this worker's blocks",
                job.output_name,
                s.refused()
            );
        }
    }
    upload(
        ctx,
        client,
        worker_id,
        job,
        &kit_path,
        &sha,
        r.kit_size,
        build_seconds,
        block_counts(&ctx.metrics, &r.diff_data, &r.kit_data),
        format!(
            "{} changed files, {} whiteouts, {} kernels, {} deletions",
            r.diff.changed_files,
            r.diff.whiteouts,
            r.kernels.len(),
            r.delete_files.len()
        ),
        progress,
    )
    .await
}

/// The kit's blocks by where they came from, for the coordinator's status
/// and the metrics.
fn block_counts(m: &crate::metrics::Metrics, diff: &DataStats, kit: &DataStats) -> v1::BlockCounts {
    let c = v1::BlockCounts {
        compressed: diff.compressed_blocks + kit.compressed_blocks,
        from_cache: diff.cache_hits + kit.cache_hits,
        copied: diff.copied_blocks + kit.copied_blocks,
        compressed_bytes: diff.compressed_bytes + kit.compressed_bytes,
        from_cache_bytes: diff.cache_hit_bytes + kit.cache_hit_bytes,
        copied_bytes: diff.copied_bytes + kit.copied_bytes,
        from_farm: diff.shared_hits + kit.shared_hits,
        from_farm_bytes: diff.shared_hit_bytes + kit.shared_hit_bytes,
        from_helpers: diff.helped_blocks + kit.helped_blocks,
        from_helpers_bytes: diff.helped_bytes + kit.helped_bytes,
    };
    for (source, n) in [
        ("compressed", c.compressed),
        ("cache", c.from_cache),
        ("farm", c.from_farm),
        ("helpers", c.from_helpers),
        ("copied", c.copied),
    ] {
        m.blocks.with_label_values(&[source]).inc_by(n);
    }
    c
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    ctx: &Arc<Ctx>,
    client: &mut FarmClient,
    worker_id: &str,
    job: &v1::Job,
    kit: &Path,
    sha256: &str,
    size: u64,
    build_seconds: f64,
    blocks: v1::BlockCounts,
    summary: String,
    progress: &Arc<JobProgress>,
) -> Result<(), JobError> {
    progress.set_phase("upload", size);
    let (tx, rx) = mpsc::channel(4);
    let header = v1::UploadMessage {
        part: Some(v1::upload_message::Part::Header(v1::UploadHeader {
            worker_id: worker_id.to_string(),
            lease_id: job.lease_id.clone(),
            size,
            sha256: sha256.to_string(),
            build_seconds,
            summary,
            blocks: Some(blocks),
        })),
    };
    let corrupt = ctx.take_corruption();
    let mut pause = ctx.take_upload_pause();
    let path = kit.to_path_buf();
    let p = progress.clone();
    let sent = ctx.metrics.sent.with_label_values(&["kit"]);
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        let mut f = tokio::fs::File::open(&path).await?;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]).await? {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            if first && corrupt {
                buf[n / 2] ^= 0x10;
            }
            first = false;
            p.advance_by(n as u64);
            let m = v1::UploadMessage {
                part: Some(v1::upload_message::Part::Data(buf)),
            };
            if tx.send(m).await.is_err() {
                return Ok(());
            }
            sent.inc_by(n as u64);
            if let Some(d) = pause.take() {
                info!("test hook: upload paused for {d:?} after its first chunk");
                tokio::time::sleep(d).await;
            }
        }
    });
    let result = client.upload(ReceiverStream::new(rx)).await;
    // Refused: the coordinator reads no more; neither does the reader
    // (nor waits out a test pause).
    if result.is_err() {
        reader.abort();
    }
    let read: std::io::Result<()> = reader.await.unwrap_or(Ok(()));
    match result {
        Ok(_) => Ok(()),
        Err(s) => {
            if let Err(e) = read {
                return Err(JobError::Transient(format!("{}: {e}", kit.display())));
            }
            warn!("{}: upload refused: {}", job.output_name, s.message());
            Err(JobError::Reported)
        }
    }
}
