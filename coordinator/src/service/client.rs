//! Status, Watch, Cancel, Download: what the RM and readers call.

use std::time::{Duration, Instant};

use iukfarm_proto::Role;
use iukfarm_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::transfer::stream_file;
use super::{Chunks, FarmService, Statuses};
use crate::state::{Phase, Shared};
use crate::text;

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
                certificate_not_after: w.cert_not_after.unwrap_or(0),
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

impl FarmService {
    pub(super) async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ReleaseStatus>, Status> {
        self.sh
            .auth
            .check(&req, &[Role::Rm, Role::Reader], "read the status")?;
        Ok(Response::new(status(&self.sh)))
    }

    pub(super) async fn watch(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<Statuses>, Status> {
        let caller = self
            .sh
            .auth
            .check(&req, &[Role::Rm, Role::Reader], "watch the release")?;
        let sh = self.sh.clone();
        // Readers cannot lock the RM out: the RM has watches of its own.
        let rm = caller.as_ref().is_none_or(|p| p.role == Role::Rm);
        let own = rm.then(|| sh.rm_watchers.clone().try_acquire_owned().ok());
        let permit = own
            .flatten()
            .ok_or(())
            .or_else(|_| sh.watchers.clone().try_acquire_owned());
        let Ok(permit) = permit else {
            return Err(Status::resource_exhausted(
                "too many watchers of this release: use `iukfarm status` instead",
            ));
        };
        let mut changed = sh.changed.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                // A revoked watcher hears no more.
                if sh.auth.revoked_since(&caller) {
                    let e = Status::permission_denied("this certificate was revoked");
                    let _ = tx.send(Err(e)).await;
                    return;
                }
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

    pub(super) async fn cancel(
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

    pub(super) async fn download(
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
        let sent = self.sh.metrics.sent.with_label_values(&["download"]);
        Ok(Response::new(stream_file(
            self.sh.cfg.output_dir.join(&r.name),
            0,
            sent,
        )))
    }
}
