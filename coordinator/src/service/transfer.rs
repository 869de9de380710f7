//! FetchIso and Upload: ISOs to workers, kits from them (received,
//! checked, verified by applying them, then kept).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iukfarm_metrics::prometheus::IntCounter;
use iukfarm_proto::v1;
use iukfarm_proto::{CHUNK_SIZE, Peer, Role};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::workers::seen;
use super::{Chunks, FarmService};
use crate::inputs::hex;
use crate::jobs::{Built, JobState};
use crate::journal::Entry;
use crate::state::{Shared, random_hex};
use crate::text;

/// Whether a verification that failed says the kit is wrong (it cannot be
/// read or applied), rather than that this machine could not check it (a
/// disk or I/O error here): the inputs were checked before the release,
/// so only the kit can be corrupt.
pub(super) fn kit_at_fault(e: &iukfarm_engine::Error) -> bool {
    use iukfarm_engine::Error;
    match e {
        Error::Io { source, .. } | Error::RawIo(source) => {
            source.kind() == std::io::ErrorKind::InvalidData
        }
        Error::Cancelled => false,
        _ => true,
    }
}

/// Streams a file from `offset`, a chunk at a time, counting the bytes sent.
pub(super) fn stream_file(path: PathBuf, offset: u64, sent: IntCounter) -> Chunks {
    match std::fs::File::open(&path) {
        Ok(f) => stream_open(Arc::new(f), path, offset, sent),
        Err(e) => {
            let e = Status::internal(format!("{}: {e}", path.display()));
            Box::pin(tokio_stream::once(Err(e)))
        }
    }
}

/// Streams an open file from `offset` with positional reads, so that any
/// number of streams share one open file (`path` names it in errors).
pub(super) fn stream_open(
    file: Arc<std::fs::File>,
    path: PathBuf,
    offset: u64,
    sent: IntCounter,
) -> Chunks {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut at = offset;
        loop {
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; CHUNK_SIZE];
                let mut n = 0;
                while n < buf.len() {
                    match f.read_at(&mut buf[n..], at + n as u64) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(n);
                Ok(buf)
            })
            .await;
            let buf = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    let e = Status::internal(format!("{}: {e}", path.display()));
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            if buf.is_empty() {
                return;
            }
            let n = buf.len();
            at += n as u64;
            if tx.send(Ok(v1::Chunk { data: buf })).await.is_err() {
                return;
            }
            sent.inc_by(n as u64);
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// What a kit may weigh at most: a diff of the new system plus its boot
/// files cannot exceed the new ISO by more than metadata; anything bigger
/// is a worker filling the coordinator's disk.
pub(super) fn kit_size_cap(new_iso_size: u64) -> u64 {
    new_iso_size + new_iso_size / 64 + (16 << 20)
}

/// Checks what a worker announces before a byte is written.
pub(super) fn check_header(h: &v1::UploadHeader, cap: u64) -> Result<(), Status> {
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
pub(super) struct PartFile(PathBuf);

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
    pub(super) async fn receive(
        &self,
        h: &v1::UploadHeader,
        caller: &Option<Peer>,
        stream: &mut Streaming<v1::UploadMessage>,
    ) -> Result<PartFile, Status> {
        let revoked =
            || Status::permission_denied("this worker's certificate was revoked during the upload");
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
        let received = self.sh.metrics.received.with_label_values(&["kit"]);
        // A stalled stream (a cut link) must not keep its part file past the
        // lease: look at the lease while waiting for the next chunk.
        // (and a revocation: every second at most).
        let mut watch = tokio::time::interval(
            (self.sh.cfg.lease_timeout / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(1)),
        );
        loop {
            let m = tokio::select! {
                m = stream.message() => m?,
                _ = watch.tick() => {
                    if self.sh.auth.revoked_since(caller) {
                        return Err(revoked());
                    }
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
            received.inc_by(d.len() as u64);
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
        if self.sh.auth.revoked_since(caller) {
            return Err(revoked());
        }
        let sha = hex(&hasher.finalize());
        if got != h.size || sha != h.sha256 {
            return Err(Status::data_loss(format!(
                "the kit arrived damaged ({got} of {} bytes, sha256 {sha}, announced {})",
                h.size, h.sha256
            )));
        }
        Ok(part)
    }

    /// Verifies a received kit by applying it, then journals it and moves
    /// it into the output directory. A verification that could not run
    /// (disk, I/O) is retried; a kit proven wrong is built again by
    /// another worker, if there is one ([`crate::jobs::Table::refuse`]).
    pub(super) async fn verify_and_keep(
        sh: Arc<Shared>,
        i: usize,
        part: PartFile,
        built: Built,
        uploader: Option<Peer>,
    ) {
        let _slot = sh.verify_slots.acquire().await;
        let (old, new, name, old_v, job_id) = {
            let st = sh.lock();
            let j = &st.table.jobs[i];
            (
                st.inputs[st.job_input[i]].iso.clone(),
                st.inputs[0].iso.clone(),
                j.output_name.clone(),
                j.old_version.clone(),
                j.id.clone(),
            )
        };
        let incoming = sh.incoming.clone();
        let p = part.0.clone();
        let memo = sh.clone();
        let kernel = sh.cfg.kernel_check;
        let started = std::time::Instant::now();
        let verified = tokio::task::spawn_blocking(move || {
            let scratch = tempfile::NamedTempFile::new_in(&incoming)
                .map_err(|e| format!("scratch file in {}: {e}", incoming.display()))?;
            let v = iukfarm_engine::kit::verify::verify_iuk(
                &old,
                &new,
                &p,
                scratch.as_file(),
                &iukfarm_engine::NoProgress,
                Some(&memo.verify_memo),
            );
            drop(scratch);
            match v {
                Ok(v) if kernel && v.differences.is_empty() => read_by_kernel(v, &p, &incoming),
                other => Ok(other),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("verification crashed: {e}")));
        if matches!(&verified, Ok(Ok(_))) || matches!(&verified, Ok(Err(e)) if kit_at_fault(e)) {
            (sh.metrics.verify_seconds).observe(started.elapsed().as_secs_f64());
        }
        // Nothing of a worker revoked meanwhile is kept, nor a kit its job
        // no longer waits for (an audit sent it back to be built again).
        let revoked = sh.auth.revoked_since(&uploader);
        let unwanted = sh.lock().table.jobs[i].state != JobState::Verifying;
        // Err(transient) or Ok(Err(proven wrong)).
        let kept: Result<Result<(), String>, String> = match verified {
            _ if revoked => Err(format!(
                "the certificate of {} was revoked before its kit was kept",
                built.worker
            )),
            _ if unwanted => Err("its job was sent back meanwhile".into()),
            Ok(Ok(v)) if v.differences.is_empty() => sh
                .journal(&Entry {
                    job: job_id,
                    name: name.clone(),
                    sha256: built.sha256.clone(),
                    size: built.size,
                    worker: built.worker.clone(),
                    build_seconds: built.build_seconds,
                    reproduction: false,
                    certificate: built.certificate.clone(),
                    retracted: false,
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
                    j.note(if sh.cfg.kernel_check {
                        "verified by applying it to the old release and reading it through the kernel"
                            .into()
                    } else {
                        "verified by applying it to the old release".into()
                    });
                    sh.metrics.kits.with_label_values(&["accepted"]).inc();
                    st.files.push(name);
                    st.table.check_reproduction(i);
                }
                Ok(Err(e)) => {
                    sh.metrics.kits.with_label_values(&["wrong"]).inc();
                    let why = format!("the kit built by {} {e}", built.worker);
                    warn!("{name}: {why}");
                    st.refuse(i, &built.worker, &why, &sh.cfg);
                }
                Err(e) => {
                    if revoked {
                        sh.metrics.kits.with_label_values(&["revoked"]).inc();
                    }
                    warn!("{name}: {e}; building again");
                    st.table.retry(i, &e, sh.cfg.max_attempts, Instant::now());
                }
            }
        } else if matches!(kept, Ok(Ok(()))) {
            // Sent back between the check above and now: kept, then withdrawn.
            crate::release::withdraw_kit(&sh, &mut st, i);
        }
        drop(st);
        sh.bump();
    }

    pub(super) async fn fetch_iso(
        &self,
        req: Request<v1::FetchIsoRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "fetch ISOs")?;
        let r = req.into_inner();
        let mut st = self.sh.lock();
        seen(&mut st, &r.worker_id, &caller)?;
        let iso = self.sh.input(&st, &r.sha256).ok_or_else(|| {
            Status::not_found(format!("no ISO with sha256 {} in this release", r.sha256))
        })?;
        let sent = self.sh.metrics.sent.with_label_values(&["iso"]);
        // The file opened at the check, never the path again.
        Ok(Response::new(stream_open(
            iso.file, iso.path, r.offset, sent,
        )))
    }

    pub(super) async fn upload(
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
                sh.metrics.kits.with_label_values(&["upload_failed"]).inc();
                warn!("{}: {why}", st.table.jobs[i].output_name);
                st.table.retry(i, &why, sh.cfg.max_attempts, Instant::now());
                drop(st);
                sh.bump();
                return Err(e);
            }
            l.uploading = true;
        }
        let received = self.receive(&h, &caller, &mut stream).await;
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
                sh.metrics.kits.with_label_values(&["upload_failed"]).inc();
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
            certificate: caller.as_ref().map(|p| p.fingerprint.clone()),
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
            sh.metrics.kits.with_label_values(&["reproduced"]).inc();
            let entry = Entry {
                job: j.id.clone(),
                name: name.clone(),
                sha256: h.sha256.clone(),
                size: h.size,
                worker: worker_name,
                build_seconds: h.build_seconds,
                reproduction: true,
                certificate: caller.as_ref().map(|p| p.fingerprint.clone()),
                retracted: false,
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
            tokio::spawn(Self::verify_and_keep(sh.clone(), i, part, built, caller));
        }
        sh.bump();
        Ok(Response::new(v1::UploadReply {}))
    }
}

/// The kernel check, on a kit that applied right: what the kernel reads
/// differently, or cannot read at all, makes the kit wrong (the uploading
/// worker's fault); a check that could not run is retried.
fn read_by_kernel(
    mut v: iukfarm_engine::kit::verify::Verification,
    kit: &std::path::Path,
    work: &std::path::Path,
) -> Result<iukfarm_engine::Result<iukfarm_engine::kit::verify::Verification>, String> {
    use iukfarm_kernelcheck::Error as K;
    match iukfarm_kernelcheck::check_kit(kit, work) {
        Ok(r) => {
            v.differences.extend(r.differences.into_iter().map(|mut d| {
                d.path = format!("as the kernel reads it, {}", d.path);
                d
            }));
            Ok(Ok(v))
        }
        Err(K::Refused(m)) => Ok(Err(iukfarm_engine::Error::Corrupt(format!(
            "the Linux kernel cannot read it: {m}"
        )))),
        Err(e) => Err(format!("the kernel check could not run: {e}")),
    }
}
