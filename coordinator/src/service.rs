//! The gRPC service: what workers and the RM's client may ask.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iukfarm_engine::blockcache::{BlockId, Cached, MAX_BLOCK};
use iukfarm_engine::sqfs::XzConfig;
use iukfarm_proto::v1::{self, farm_server::Farm};
use iukfarm_proto::{CHUNK_SIZE, PROTOCOL_VERSION, Peer, Role};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::blocks::Answer;
use crate::inputs::hex;
use crate::jobs::{Built, JobState, Lease};
use crate::journal::Entry;
use crate::state::{JOB_MEMORY, Phase, Shared, State, WorkerInfo, random_hex};
use crate::text;

type Chunks = Pin<Box<dyn Stream<Item = Result<v1::Chunk, Status>> + Send>>;
type Statuses = Pin<Box<dyn Stream<Item = Result<v1::ReleaseStatus, Status>> + Send>>;

pub(crate) struct FarmService {
    sh: Arc<Shared>,
}

impl FarmService {
    pub fn new(sh: Arc<Shared>) -> Self {
        FarmService { sh }
    }
}

fn no_store() -> Status {
    Status::failed_precondition("this coordinator runs without a block store")
}

/// Whether a verification that failed says the kit is wrong (it cannot be
/// read or applied), rather than that this machine could not check it (a
/// disk or I/O error here): the inputs were checked before the release,
/// so only the kit can be corrupt.
fn kit_at_fault(e: &iukfarm_engine::Error) -> bool {
    use iukfarm_engine::Error;
    match e {
        Error::Io { source, .. } | Error::RawIo(source) => {
            source.kind() == std::io::ErrorKind::InvalidData
        }
        Error::Cancelled => false,
        _ => true,
    }
}

/// A block id as the wire gives it, its digests checked for length.
fn block_id(b: Option<v1::BlockRef>) -> Result<BlockId, Status> {
    let b = b.ok_or_else(|| Status::invalid_argument("no block"))?;
    BlockId::try_from(&b).map_err(Status::invalid_argument)
}

/// xz settings from the wire, for work sharing.
fn xz_config(x: Option<v1::XzSettings>) -> Result<XzConfig, Status> {
    let x = x.ok_or_else(|| Status::invalid_argument("no xz settings"))?;
    let cfg = XzConfig::from(&x);
    cfg.validate_shared()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(cfg)
}

/// The blocks of an offer, each checked to be the block its id names
/// (helpers compress what is here, and the job's id must name it).
async fn offered_blocks(
    xz: Option<v1::XzSettings>,
    offered: Vec<v1::OfferedBlock>,
) -> Result<Vec<(BlockId, XzConfig, Vec<u8>)>, Status> {
    if offered.is_empty() {
        return Ok(Vec::new());
    }
    if offered.len() > crate::offers::MAX_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "at most {} blocks per offer",
            crate::offers::MAX_BLOCKS
        )));
    }
    let xz = xz_config(xz)?;
    let mut blocks = Vec::with_capacity(offered.len());
    for b in offered {
        let id = block_id(b.block)?;
        if b.data.is_empty() || b.data.len() as u64 > MAX_BLOCK {
            return Err(Status::invalid_argument("a block of 1 byte to 1 MiB"));
        }
        blocks.push((id, xz, b.data));
    }
    tokio::task::spawn_blocking(move || {
        (blocks.iter())
            .all(|(id, xz, data)| BlockId::new(xz, data) == *id)
            .then_some(blocks)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .ok_or_else(|| Status::invalid_argument("an offered block is not the block its id names"))
}

fn unknown_worker() -> Status {
    Status::not_found("unknown worker (the coordinator restarted?): register again")
}

/// The worker `worker_id`, if the caller is it: with client certificates,
/// an id is only good with the certificate that registered it.
fn seen(st: &mut State, worker_id: &str, caller: &Option<Peer>) -> Result<String, Status> {
    let w = st.workers.get_mut(worker_id).ok_or_else(unknown_worker)?;
    if let Some(p) = caller
        && w.credential.as_deref() != Some(p.name.as_str())
    {
        warn!("{} used the worker id of {}: refused", p.name, w.name);
        return Err(Status::permission_denied(
            "this worker id belongs to another certificate",
        ));
    }
    w.last_seen = Instant::now();
    Ok(w.name.clone())
}

/// The release as the RM's client shows it.
pub(crate) fn status(sh: &Shared) -> v1::ReleaseStatus {
    let st = sh.lock();
    let now = Instant::now();
    let jobs = st
        .table
        .jobs
        .iter()
        .map(|j| {
            let (worker, phase, done, total, elapsed, eta) = match &j.lease {
                Some(l) => {
                    let in_phase = now.duration_since(l.phase_started).as_secs_f64();
                    let eta = if l.done > 0 && l.total > l.done {
                        in_phase * (l.total - l.done) as f64 / l.done as f64
                    } else {
                        0.0
                    };
                    (
                        l.worker_name.clone(),
                        l.phase.clone(),
                        l.done,
                        l.total,
                        now.duration_since(l.started).as_secs_f64(),
                        eta,
                    )
                }
                None => {
                    let b = j.built.as_ref();
                    (
                        b.map(|b| b.worker.clone()).unwrap_or_default(),
                        String::new(),
                        0,
                        0,
                        b.map(|b| b.build_seconds).unwrap_or(0.0),
                        0.0,
                    )
                }
            };
            v1::JobStatus {
                job_id: j.id.clone(),
                old_version: j.old_version.clone(),
                output_name: j.output_name.clone(),
                state: j.state.name().into(),
                worker,
                phase,
                done,
                total,
                elapsed_seconds: elapsed,
                eta_seconds: eta,
                size: j.built.as_ref().map(|b| b.size).unwrap_or(0),
                sha256: j
                    .built
                    .as_ref()
                    .map(|b| b.sha256.clone())
                    .unwrap_or_default(),
                attempts: j.attempts,
                error: j.error.clone(),
                reproduction: j.reproduction_of.is_some(),
                resumed: j.resumed,
                blocks: j.built.as_ref().and_then(|b| b.blocks),
            }
        })
        .collect();
    let timeout = sh.cfg.lease_timeout;
    let workers = st
        .workers
        .iter()
        .map(|(id, w)| {
            let busy = st
                .table
                .jobs
                .iter()
                .filter(|j| j.lease.as_ref().is_some_and(|l| &l.worker_id == id))
                .count() as u32;
            let ago = now.duration_since(w.last_seen);
            v1::WorkerStatus {
                id: id.clone(),
                name: w.name.clone(),
                slots: w.slots,
                busy,
                connected: ago < timeout,
                last_seen_seconds: ago.as_secs_f64(),
                jobs_done: w.jobs_done,
                memory_bytes: w.memory,
                bad_blocks: sh.blocks.as_ref().map_or(0, |b| b.bad_blocks(&w.name)),
            }
        })
        .collect();
    let fp = &sh.fingerprint;
    v1::ReleaseStatus {
        release: format!("{} {}", sh.cfg.product, sh.cfg.new_version),
        new_version: sh.cfg.new_version.clone(),
        state: st.phase.name().into(),
        message: st.message.clone(),
        jobs,
        workers,
        files: st.files.clone(),
        fingerprint: Some(v1::Fingerprint {
            engine_version: fp.engine_version.clone(),
            git_commit: fp.git_commit.clone(),
            liblzma_version: fp.liblzma_version.clone(),
            iuk_format: fp.iuk_format,
            gensquashfs: fp.gensquashfs.clone(),
        }),
        output_dir: sh.cfg.output_dir.display().to_string(),
        block_store: sh.blocks.as_ref().map(|b| {
            let s = b.stats();
            let o = sh.offers.stats();
            v1::BlockStoreStatus {
                offered: o.offered,
                helped: o.helped,
                given_back: o.given_back,
                helper_bytes: o.helper_bytes,
                entries: s.entries,
                bytes: s.bytes,
                cap: s.cap,
                served: s.served,
                served_bytes: s.served_bytes,
                stored: s.stored,
                duplicates: s.duplicates,
                refused: s.refused,
                evicted: s.evicted,
                expired_claims: s.expired_claims,
                sent_bytes: s.sent_bytes,
                received_bytes: s.received_bytes,
            }
        }),
    }
}

/// Streams a file from `offset`, a chunk at a time.
fn stream_file(path: PathBuf, offset: u64) -> Chunks {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::internal(format!("{}: {e}", path.display()))))
                    .await;
                return;
            }
        };
        if let Err(e) = f.seek(std::io::SeekFrom::Start(offset)).await {
            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
            return;
        }
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]).await {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            }
            if n == 0 {
                return;
            }
            buf.truncate(n);
            if tx.send(Ok(v1::Chunk { data: buf })).await.is_err() {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// What a kit may weigh at most: a diff of the new system plus its boot
/// files cannot exceed the new ISO by more than metadata; anything bigger
/// is a worker filling the coordinator's disk.
pub(crate) fn kit_size_cap(new_iso_size: u64) -> u64 {
    new_iso_size + new_iso_size / 64 + (16 << 20)
}

/// Checks what a worker announces before a byte is written.
fn check_header(h: &v1::UploadHeader, cap: u64) -> Result<(), Status> {
    if h.size == 0 || h.size > cap {
        return Err(Status::invalid_argument(format!(
            "announced size {} is outside 1..={cap} bytes (the new ISO plus a margin)",
            h.size
        )));
    }
    if h.sha256.len() != 64
        || !h
            .sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(Status::invalid_argument(
            "the announced sha256 is not 64 lower-case hex digits",
        ));
    }
    if !h.build_seconds.is_finite() || !(0.0..=1e6).contains(&h.build_seconds) {
        return Err(Status::invalid_argument(format!(
            "build_seconds {} is not a duration",
            h.build_seconds
        )));
    }
    if h.summary.len() > 4096 {
        return Err(Status::invalid_argument("summary longer than 4 KiB"));
    }
    Ok(())
}

/// Removes a part file however its upload ends.
struct PartFile(PathBuf);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", self.0.display());
        }
    }
}

impl FarmService {
    /// Receives a kit into the incoming directory, in a file of its own
    /// created exclusively; returns it once every byte is on disk (written,
    /// flushed and fsynced, each step checked) and size and digest match
    /// the header. Stops as soon as the lease is no longer the uploader's.
    async fn receive(
        &self,
        h: &v1::UploadHeader,
        stream: &mut Streaming<v1::UploadMessage>,
    ) -> Result<PartFile, Status> {
        let path = self
            .sh
            .incoming
            .join(format!("{}.{}.part", h.lease_id, random_hex()));
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
        let part = PartFile(path);
        let disk = |e: std::io::Error| Status::internal(format!("{}: {e}", part.0.display()));
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        // A stalled stream (a cut link) must not keep its part file past the
        // lease: look at the lease while waiting for the next chunk.
        let mut watch =
            tokio::time::interval((self.sh.cfg.lease_timeout / 4).max(Duration::from_millis(100)));
        loop {
            let m = tokio::select! {
                m = stream.message() => m?,
                _ = watch.tick() => {
                    if !self.renew(&h.lease_id, &h.worker_id, false) {
                        return Err(Status::failed_precondition(
                            "the lease ended during the upload",
                        ));
                    }
                    continue;
                }
            };
            let Some(m) = m else { break };
            let Some(v1::upload_message::Part::Data(d)) = m.part else {
                return Err(Status::invalid_argument("a second header in one upload"));
            };
            got += d.len() as u64;
            if got > h.size {
                return Err(Status::data_loss(format!(
                    "more bytes than the announced {}",
                    h.size
                )));
            }
            hasher.update(&d);
            f.write_all(&d).await.map_err(disk)?;
            if !self.renew(&h.lease_id, &h.worker_id, true) {
                return Err(Status::failed_precondition(
                    "the lease ended during the upload",
                ));
            }
        }
        // tokio's File may still hold the last write: its error (a full
        // disk) only shows in flush.
        f.flush().await.map_err(disk)?;
        f.sync_all().await.map_err(disk)?;
        let sha = hex(&hasher.finalize());
        if got != h.size || sha != h.sha256 {
            return Err(Status::data_loss(format!(
                "the kit arrived damaged ({got} of {} bytes, sha256 {sha}, announced {})",
                h.size, h.sha256
            )));
        }
        Ok(part)
    }

    /// Whether the lease is still the uploader's; with `extend`, also
    /// extends it.
    fn renew(&self, lease_id: &str, worker_id: &str, extend: bool) -> bool {
        let mut st = self.sh.lock();
        let Some(i) = st.table.by_lease(lease_id) else {
            return false;
        };
        match st.table.jobs[i].lease.as_mut() {
            Some(l) if l.worker_id == worker_id => {
                if extend {
                    l.deadline = Instant::now() + self.sh.cfg.lease_timeout;
                }
                true
            }
            _ => false,
        }
    }

    /// Verifies a received kit by applying it, then journals it and moves
    /// it into the output directory. A verification that could not run
    /// (disk, I/O) is retried; a kit proven wrong is built again by
    /// another worker, if there is one ([`crate::jobs::Table::refuse`]).
    async fn verify_and_keep(sh: Arc<Shared>, i: usize, part: PartFile, built: Built) {
        let _slot = sh.verify_slots.acquire().await;
        let (old, new, name, old_v, job_id) = {
            let st = sh.lock();
            let j = &st.table.jobs[i];
            (
                st.inputs[st.job_input[i]].path.clone(),
                st.inputs[0].path.clone(),
                j.output_name.clone(),
                j.old_version.clone(),
                j.id.clone(),
            )
        };
        let incoming = sh.incoming.clone();
        let p = part.0.clone();
        let memo = sh.clone();
        let started = std::time::Instant::now();
        let verified = tokio::task::spawn_blocking(move || {
            let scratch = tempfile::NamedTempFile::new_in(&incoming)
                .map_err(|e| format!("scratch file in {}: {e}", incoming.display()))?;
            Ok(iukfarm_engine::kit::verify::verify_iuk(
                &old,
                &new,
                &p,
                scratch.as_file(),
                &iukfarm_engine::NoProgress,
                Some(&memo.verify_memo),
            ))
        })
        .await
        .unwrap_or_else(|e| Err(format!("verification crashed: {e}")));
        // Err(transient) or Ok(Err(proven wrong)).
        let kept: Result<Result<(), String>, String> = match verified {
            Ok(Ok(v)) if v.differences.is_empty() => sh
                .journal(&Entry {
                    job: job_id,
                    name: name.clone(),
                    sha256: built.sha256.clone(),
                    size: built.size,
                    worker: built.worker.clone(),
                    build_seconds: built.build_seconds,
                    reproduction: false,
                })
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    let dst = sh.cfg.output_dir.join(&name);
                    std::fs::rename(&part.0, &dst)
                        .and_then(|_| std::fs::File::open(&sh.cfg.output_dir)?.sync_all())
                        .map_err(|e| format!("{}: {e}", dst.display()))
                })
                .map(Ok),
            Ok(Ok(v)) => {
                let shown: Vec<String> = v
                    .differences
                    .iter()
                    .take(5)
                    .map(|d| d.to_string())
                    .collect();
                Ok(Err(format!(
                    "does not turn {old_v} into {} ({} differences: {}{})",
                    sh.cfg.new_version,
                    v.differences.len(),
                    shown.join("; "),
                    if v.differences.len() > 5 { "; ..." } else { "" }
                )))
            }
            Ok(Err(e)) if kit_at_fault(&e) => Ok(Err(format!("cannot be applied: {e}"))),
            Ok(Err(e)) => Err(format!("verification could not run: {e}")),
            Err(e) => Err(e),
        };
        drop(part);
        let mut st = sh.lock();
        if st.table.jobs[i].state == JobState::Verifying {
            match kept {
                Ok(Ok(())) => {
                    info!(
                        "{name}: verified by applying it in {:.1}s; {} bytes, sha256 {}",
                        started.elapsed().as_secs_f64(),
                        built.size,
                        built.sha256
                    );
                    let j = &mut st.table.jobs[i];
                    j.state = JobState::Done;
                    j.note("verified by applying it to the old release".into());
                    st.files.push(name);
                    st.table.check_reproduction(i);
                }
                Ok(Err(e)) => {
                    let why = format!("the kit built by {} {e}", built.worker);
                    warn!("{name}: {why}");
                    st.refuse(i, &built.worker, &why, &sh.cfg);
                }
                Err(e) => {
                    warn!("{name}: {e}; building again");
                    st.table.retry(i, &e, sh.cfg.max_attempts, Instant::now());
                }
            }
        }
        drop(st);
        sh.bump();
    }
}

#[tonic::async_trait]
impl Farm for FarmService {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterReply>, Status> {
        let caller = self
            .sh
            .auth
            .check(&req, &[Role::Worker], "register as a worker")?;
        let mut r = req.into_inner();
        // With certificates, the name is the certificate's, whatever was sent.
        if let Some(p) = &caller {
            r.name = p.name.clone();
        }
        if r.protocol != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker {} speaks protocol {}, this coordinator {PROTOCOL_VERSION}: install the same iukfarm on both",
                r.name, r.protocol
            )));
        }
        let fp = r.fingerprint.unwrap_or_default();
        let own = &self.sh.fingerprint;
        let theirs = format!(
            "iukfarm-engine {} (git {}, liblzma {}, IUK format {}, gensquashfs {})",
            fp.engine_version,
            fp.git_commit,
            fp.liblzma_version,
            fp.iuk_format,
            fp.gensquashfs.join("/")
        );
        let gensquashfs = self.sh.gensquashfs.as_str();
        let ok = fp.engine_version == self.sh.required_version
            && (self.sh.required_commit.is_empty() || fp.git_commit == self.sh.required_commit)
            && fp.liblzma_version == own.liblzma_version
            && fp.iuk_format == own.iuk_format
            && fp.gensquashfs.iter().any(|g| g == gensquashfs);
        if !ok {
            let want = format!(
                "iukfarm-engine {}{} (liblzma {}, IUK format {}, gensquashfs {gensquashfs})",
                self.sh.required_version,
                if self.sh.required_commit.is_empty() {
                    String::new()
                } else {
                    format!(" at git {}", self.sh.required_commit)
                },
                own.liblzma_version,
                own.iuk_format
            );
            warn!(
                "refused worker {}: engine {theirs}, required {want}",
                r.name
            );
            return Err(Status::failed_precondition(format!(
                "engine fingerprint mismatch: this release requires {want}, worker {} runs {theirs}; \
                 the same bytes need the same engine: install the release's iukfarm build on this worker",
                r.name
            )));
        }
        if r.slots == 0 {
            return Err(Status::invalid_argument("a worker needs at least one slot"));
        }
        let mut st = self.sh.lock();
        // A lingering coordinator only serves the RM: a worker waiting for
        // the next release must not register with this one again and again.
        if st.phase.is_over() {
            return Err(Status::aborted(
                "this release is over; waiting for the next coordinator",
            ));
        }
        let id = Shared::new_id("w");
        info!("worker {} registered as {id} ({} slots)", r.name, r.slots);
        if let Some(p) = &caller {
            // A reconnecting worker replaces its idle earlier registrations.
            let busy: Vec<String> = st
                .table
                .jobs
                .iter()
                .filter_map(|j| j.lease.as_ref().map(|l| l.worker_id.clone()))
                .collect();
            st.workers.retain(|wid, w| {
                w.credential.as_deref() != Some(p.name.as_str()) || busy.contains(wid)
            });
        }
        st.workers.insert(
            id.clone(),
            WorkerInfo {
                credential: caller.map(|p| p.name),
                name: r.name,
                slots: r.slots,
                memory: r.memory_bytes,
                last_seen: Instant::now(),
                jobs_done: 0,
                told_over: false,
            },
        );
        drop(st);
        self.sh.bump();
        Ok(Response::new(v1::RegisterReply {
            worker_id: id,
            release: format!("{} {}", self.sh.cfg.product, self.sh.cfg.new_version),
            heartbeat_ms: (self.sh.cfg.lease_timeout.as_millis() / 4).max(100) as u32,
        }))
    }

    async fn lease(
        &self,
        req: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::LeaseReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "lease jobs")?;
        let r = req.into_inner();
        let sh = &self.sh;
        let mut st = sh.lock();
        let name = seen(&mut st, &r.worker_id, &caller)?;
        let wait = |ms: u64| {
            Ok(Response::new(v1::LeaseReply {
                job: None,
                retry_after_ms: ms,
                release_over: false,
            }))
        };
        if st.phase.is_over() || st.cancel_reason.is_some() {
            return Ok(Response::new(v1::LeaseReply {
                job: None,
                retry_after_ms: 0,
                release_over: true,
            }));
        }
        if st.phase != Phase::Running {
            return wait(100);
        }
        let w = &st.workers[&r.worker_id];
        let busy = st
            .table
            .jobs
            .iter()
            .filter(|j| j.lease.as_ref().is_some_and(|l| l.worker_id == r.worker_id))
            .count() as u64;
        let fits = busy < w.slots as u64 && (busy == 0 || (busy + 1) * JOB_MEMORY <= w.memory);
        if !fits {
            return wait(1000);
        }
        let now = Instant::now();
        let Some(i) = st.table.pick(&name, now) else {
            let soonest = st
                .table
                .jobs
                .iter()
                .filter(|j| j.state == JobState::Pending)
                .map(|j| j.not_before.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(100), Duration::from_secs(1));
            return wait(soonest.as_millis() as u64);
        };
        let lease_id = Shared::new_id("lease");
        st.table.start(
            i,
            Lease {
                id: lease_id.clone(),
                worker_id: r.worker_id.clone(),
                worker_name: name.clone(),
                deadline: now + sh.cfg.lease_timeout,
                started: now,
                phase: "starting".into(),
                phase_started: now,
                done: 0,
                total: 0,
                uploading: false,
            },
        );
        let j = &st.table.jobs[i];
        let old = &st.inputs[st.job_input[i]];
        let new = &st.inputs[0];
        let iso = |x: &crate::inputs::IsoInput| v1::IsoRef {
            path: x.relpath.clone(),
            sha256: x.sha256.clone(),
            size: x.size,
        };
        let job = v1::Job {
            lease_id,
            job_id: j.id.clone(),
            attempt: j.attempts,
            old_version: j.old_version.clone(),
            new_version: sh.cfg.new_version.clone(),
            old_iso: Some(iso(old)),
            new_iso: Some(iso(new)),
            source_date_epoch: sh.cfg.source_date_epoch,
            diff_name: sh.cfg.diff_name(),
            engine_options: sh.cfg.engine_options.clone(),
            output_name: j.output_name.clone(),
            lease_ms: sh.cfg.lease_timeout.as_millis() as u64,
            reproduction: j.reproduction_of.is_some(),
            block_store: sh.blocks.is_some() && j.reproduction_of.is_none(),
        };
        info!(
            "{}{}: attempt {} on {name}",
            j.output_name,
            if j.reproduction_of.is_some() {
                " (reproduction)"
            } else {
                ""
            },
            j.attempts
        );
        drop(st);
        sh.bump();
        Ok(Response::new(v1::LeaseReply {
            job: Some(job),
            retry_after_ms: 0,
            release_over: false,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "renew leases")?;
        let r = req.into_inner();
        let sh = &self.sh;
        let mut st = sh.lock();
        seen(&mut st, &r.worker_id, &caller)?;
        let now = Instant::now();
        let mut cancelled = Vec::new();
        for p in r.jobs {
            let i = st.table.by_lease(&p.lease_id);
            match i.and_then(|i| st.table.jobs[i].lease.as_mut()) {
                Some(l) if l.worker_id == r.worker_id => {
                    l.deadline = now + sh.cfg.lease_timeout;
                    let phase = text::untrusted(&p.phase, text::PHASE);
                    if l.phase != phase {
                        l.phase = phase;
                        l.phase_started = now;
                    }
                    l.done = p.done;
                    l.total = p.total;
                }
                _ => cancelled.push(p.lease_id),
            }
        }
        let over = st.phase.is_over() || st.cancel_reason.is_some();
        if over && let Some(w) = st.workers.get_mut(&r.worker_id) {
            w.told_over = true;
        }
        drop(st);
        sh.bump();
        Ok(Response::new(v1::HeartbeatReply {
            cancelled,
            release_over: over,
        }))
    }

    type FetchIsoStream = Chunks;

    async fn fetch_iso(
        &self,
        req: Request<v1::FetchIsoRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "fetch ISOs")?;
        let r = req.into_inner();
        let mut st = self.sh.lock();
        seen(&mut st, &r.worker_id, &caller)?;
        let path = self.sh.input_path(&st, &r.sha256).ok_or_else(|| {
            Status::not_found(format!("no ISO with sha256 {} in this release", r.sha256))
        })?;
        Ok(Response::new(stream_file(path, r.offset)))
    }

    async fn upload(
        &self,
        req: Request<Streaming<v1::UploadMessage>>,
    ) -> Result<Response<v1::UploadReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "upload kits")?;
        let mut stream = req.into_inner();
        let h = match stream.message().await? {
            Some(v1::UploadMessage {
                part: Some(v1::upload_message::Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("an upload starts with its header")),
        };
        let sh = self.sh.clone();
        {
            let mut st = sh.lock();
            seen(&mut st, &h.worker_id, &caller)?;
            let mine = st.table.by_lease(&h.lease_id).filter(|&i| {
                st.table.jobs[i]
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.worker_id == h.worker_id)
            });
            let Some(i) = mine else {
                return Err(Status::failed_precondition(format!(
                    "lease {} is no longer yours (it expired or the job was cancelled)",
                    h.lease_id
                )));
            };
            let cap = kit_size_cap(st.inputs[0].size);
            let l = st.table.jobs[i].lease.as_mut().expect("checked above");
            if l.uploading {
                warn!(
                    "{}: refused a second upload stream on {}",
                    st.table.jobs[i].output_name, h.lease_id
                );
                return Err(Status::already_exists(
                    "this lease already has an upload in progress",
                ));
            }
            if let Err(e) = check_header(&h, cap) {
                let why = format!("upload from {} refused: {}", l.worker_name, e.message());
                warn!("{}: {why}", st.table.jobs[i].output_name);
                st.table.retry(i, &why, sh.cfg.max_attempts, Instant::now());
                drop(st);
                sh.bump();
                return Err(e);
            }
            l.uploading = true;
        }
        let received = self.receive(&h, &mut stream).await;
        let mut st = sh.lock();
        let Some(i) = st.table.by_lease(&h.lease_id) else {
            return Err(Status::failed_precondition(
                "the lease ended during the upload",
            ));
        };
        let name = st.table.jobs[i].output_name.clone();
        let part = match received {
            Ok(p) => p,
            Err(e) => {
                let why = format!(
                    "upload from {}: {}; building again",
                    st.table.jobs[i]
                        .lease
                        .as_ref()
                        .map(|l| l.worker_name.clone())
                        .unwrap_or_default(),
                    e.message()
                );
                warn!("{name}: {why}");
                st.table.retry(i, &why, sh.cfg.max_attempts, Instant::now());
                drop(st);
                sh.bump();
                return Err(e);
            }
        };
        let worker_name = st.table.jobs[i]
            .lease
            .as_ref()
            .map(|l| l.worker_name.clone())
            .unwrap_or_default();
        if let Some(w) = st.workers.get_mut(&h.worker_id) {
            w.jobs_done += 1;
        }
        let built = Built {
            sha256: h.sha256.clone(),
            size: h.size,
            worker: worker_name.clone(),
            build_seconds: h.build_seconds,
            blocks: h.blocks,
        };
        let j = &mut st.table.jobs[i];
        j.lease = None;
        j.built = Some(built.clone());
        j.note(format!(
            "built by {worker_name} in {:.1}s: {} bytes, sha256 {}{}",
            h.build_seconds,
            h.size,
            h.sha256,
            if h.summary.is_empty() {
                String::new()
            } else {
                format!(" ({})", text::untrusted(&h.summary, text::MESSAGE))
            }
        ));
        info!(
            "{name}: built by {worker_name} in {:.1}s, sha256 {}",
            h.build_seconds, h.sha256
        );
        if j.reproduction_of.is_some() {
            j.state = JobState::Done;
            let entry = Entry {
                job: j.id.clone(),
                name: name.clone(),
                sha256: h.sha256.clone(),
                size: h.size,
                worker: worker_name,
                build_seconds: h.build_seconds,
                reproduction: true,
            };
            drop(part);
            st.table.check_reproduction(i);
            drop(st);
            if let Err(e) = sh.journal(&entry) {
                warn!("journal: {e}");
            }
        } else {
            j.state = JobState::Verifying;
            drop(st);
            tokio::spawn(Self::verify_and_keep(sh.clone(), i, part, built));
        }
        sh.bump();
        Ok(Response::new(v1::UploadReply {}))
    }

    async fn fail(&self, req: Request<v1::FailRequest>) -> Result<Response<v1::FailReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "fail jobs")?;
        let r = req.into_inner();
        let sh = &self.sh;
        let mut st = sh.lock();
        let name = seen(&mut st, &r.worker_id, &caller)?;
        if let Some(i) = st.table.by_lease(&r.lease_id)
            && st.table.jobs[i]
                .lease
                .as_ref()
                .is_some_and(|l| l.worker_id == r.worker_id)
        {
            let out = st.table.jobs[i].output_name.clone();
            let why = format!("{name}: {}", text::untrusted(&r.message, text::MESSAGE));
            warn!("{out}: {why}");
            if r.deterministic {
                st.refuse(i, &name, &why, &sh.cfg);
            } else {
                st.table.retry(i, &why, sh.cfg.max_attempts, Instant::now());
            }
        }
        drop(st);
        sh.bump();
        Ok(Response::new(v1::FailReply {}))
    }

    async fn get_block(
        &self,
        req: Request<v1::GetBlockRequest>,
    ) -> Result<Response<v1::GetBlockReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "get blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        let id = block_id(r.block)?;
        let asked = Instant::now();
        let answer = if r.unless_busy {
            store.get_unless_busy(&name, &id).await
        } else {
            store.get(&name, &id).await
        };
        let waited_ms = asked.elapsed().as_millis().min(u32::MAX as u128) as u32;
        let reply = match answer {
            Answer::Compress => v1::GetBlockReply::default(),
            Answer::Busy => v1::GetBlockReply {
                busy: true,
                ..Default::default()
            },
            Answer::Found(Cached::Uncompressed) => v1::GetBlockReply {
                found: true,
                uncompressed: true,
                waited_ms,
                ..Default::default()
            },
            Answer::Found(Cached::Compressed(b)) => v1::GetBlockReply {
                found: true,
                compressed: b,
                waited_ms,
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    async fn put_block(
        &self,
        req: Request<v1::PutBlockRequest>,
    ) -> Result<Response<v1::PutBlockReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "put blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        if self.sh.blocks.is_none() {
            return Err(no_store());
        }
        let id = block_id(r.block)?;
        let form = match (r.uncompressed, r.compressed.is_empty()) {
            (true, true) => Cached::Uncompressed,
            (false, false) => Cached::Compressed(r.compressed),
            _ => {
                return Err(Status::invalid_argument(
                    "a block is either compressed or not",
                ));
            }
        };
        let sh = self.sh.clone();
        // Checking a form decompresses it: off the async threads.
        let accepted = tokio::task::spawn_blocking(move || {
            sh.blocks.as_ref().is_some_and(|b| b.put(&name, &id, &form))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::PutBlockReply { accepted }))
    }

    async fn offer_blocks(
        &self,
        req: Request<v1::OfferBlocksRequest>,
    ) -> Result<Response<v1::OfferBlocksReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "offer blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        let blocks = offered_blocks(r.xz, r.blocks).await?;
        let priority = {
            let st = self.sh.lock();
            let mine = st.table.by_lease(&r.lease_id).filter(|&i| {
                let j = &st.table.jobs[i];
                j.reproduction_of.is_none()
                    && j.lease.as_ref().is_some_and(|l| l.worker_id == r.worker_id)
            });
            let Some(i) = mine else {
                return Err(Status::failed_precondition(format!(
                    "lease {} is not a running job of yours that may share blocks",
                    r.lease_id
                )));
            };
            st.table.jobs[i].priority
        };
        if store.bad_blocks(&name) > 0 {
            return Err(Status::permission_denied(
                "this worker sent wrong blocks: it takes no part in sharing in this release",
            ));
        }
        if blocks.is_empty() {
            let wanted = self.sh.offers.wanted(&name).await;
            return Ok(Response::new(v1::OfferBlocksReply {
                wanted: wanted.min(crate::offers::MAX_BLOCKS) as u32,
                taken: Vec::new(),
            }));
        }
        let keys = self.sh.offers.offer(&name, priority, blocks);
        let taken = self.sh.offers.settle(&keys).await;
        Ok(Response::new(v1::OfferBlocksReply { wanted: 0, taken }))
    }

    async fn take_blocks(
        &self,
        req: Request<v1::TakeBlocksRequest>,
    ) -> Result<Response<v1::TakeBlocksReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "take blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        if store.bad_blocks(&name) > 0 {
            return Err(Status::permission_denied(
                "this worker sent wrong blocks: it takes no part in sharing in this release",
            ));
        }
        let batch = self
            .sh
            .offers
            .take(&name, r.max_blocks as usize, |id| store.claim(&name, id))
            .await;
        let blocks = batch
            .into_iter()
            .map(|o| v1::TakenBlock {
                block: Some((&o.id).into()),
                xz: Some((&o.xz).into()),
                data: o.data,
            })
            .collect();
        Ok(Response::new(v1::TakeBlocksReply { blocks }))
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ReleaseStatus>, Status> {
        self.sh
            .auth
            .check(&req, &[Role::Rm, Role::Reader], "read the status")?;
        Ok(Response::new(status(&self.sh)))
    }

    type WatchStream = Statuses;

    async fn watch(&self, req: Request<v1::StatusRequest>) -> Result<Response<Statuses>, Status> {
        self.sh
            .auth
            .check(&req, &[Role::Rm, Role::Reader], "watch the release")?;
        let sh = self.sh.clone();
        let Ok(permit) = sh.watchers.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "too many watchers of this release: use `iukfarm status` instead",
            ));
        };
        let mut changed = sh.changed.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let s = status(&sh);
                let over = Phase::is_over(match s.state.as_str() {
                    "succeeded" => Phase::Succeeded,
                    "failed" => Phase::Failed,
                    "cancelled" => Phase::Cancelled,
                    _ => Phase::Running,
                });
                if tx.send(Ok(s)).await.is_err() || over {
                    return;
                }
                // At most ~4 updates a second; at least one a second.
                tokio::time::sleep(Duration::from_millis(250)).await;
                let _ = tokio::time::timeout(Duration::from_millis(750), changed.changed()).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelReply>, Status> {
        let caller = self
            .sh
            .auth
            .check(&req, &[Role::Rm], "cancel the release")?;
        let by = caller.map_or_else(|| "the RM".to_string(), |p| p.name);
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            format!("cancelled by {by}")
        } else {
            format!("{} (by {by})", text::untrusted(&r.reason, text::MESSAGE))
        };
        self.sh.cancel(&reason);
        Ok(Response::new(v1::CancelReply {}))
    }

    type DownloadStream = Chunks;

    async fn download(
        &self,
        req: Request<v1::DownloadRequest>,
    ) -> Result<Response<Chunks>, Status> {
        self.sh.auth.check(&req, &[Role::Rm], "download files")?;
        let r = req.into_inner();
        let st = self.sh.lock();
        // Only names the coordinator listed: nothing else under the output directory.
        if !st.files.iter().any(|f| f == &r.name) {
            return Err(Status::not_found(format!(
                "{:?} is not (yet) a file of this release",
                r.name
            )));
        }
        Ok(Response::new(stream_file(
            self.sh.cfg.output_dir.join(&r.name),
            0,
        )))
    }
}
