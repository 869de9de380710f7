//! Register, Lease, Heartbeat, Fail: a worker's session and its leases.

use std::time::{Duration, Instant};

use iukfarm_proto::v1;
use iukfarm_proto::{PROTOCOL_VERSION, Peer, Role};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::FarmService;
use crate::jobs::{JobState, Lease};
use crate::state::{JOB_MEMORY, Phase, Shared, State, WorkerInfo};
use crate::text;

pub(super) fn unknown_worker() -> Status {
    Status::not_found("unknown worker (the coordinator restarted?): register again")
}

/// The worker `worker_id`, if the caller is it: with client certificates,
/// an id is only good with the certificate that registered it.
pub(super) fn seen(
    st: &mut State,
    worker_id: &str,
    caller: &Option<Peer>,
) -> Result<String, Status> {
    let w = st.workers.get_mut(worker_id).ok_or_else(unknown_worker)?;
    if let Some(p) = caller
        && w.credential.as_deref() != Some(p.fingerprint.as_str())
    {
        warn!("{} used the worker id of {}: refused", p.name, w.name);
        return Err(Status::permission_denied(
            "this worker id belongs to another certificate",
        ));
    }
    w.last_seen = Instant::now();
    Ok(w.name.clone())
}

impl FarmService {
    /// Whether the lease is still the uploader's; with `extend`, also
    /// extends it.
    pub(super) fn renew(&self, lease_id: &str, worker_id: &str, extend: bool) -> bool {
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

    pub(super) async fn register(
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
        if let Some(p) = &caller {
            // A name is one machine: another certificate under the name of
            // a worker that is still connected is someone else.
            let timeout = self.sh.cfg.lease_timeout;
            let other = st.workers.values().any(|w| {
                w.name == p.name
                    && w.credential.as_deref() != Some(p.fingerprint.as_str())
                    && !w.told_over
                    && w.last_seen.elapsed() < timeout
            });
            if other {
                warn!(
                    "refused a second certificate named {} (fingerprint {}) while the first is connected",
                    p.name, p.fingerprint
                );
                return Err(Status::permission_denied(format!(
                    "a worker named {} is connected with another certificate; one name is one \
                     worker (if it was re-issued, stop the old worker or wait {}s)",
                    p.name,
                    timeout.as_secs()
                )));
            }
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
                w.credential.as_deref() != Some(p.fingerprint.as_str()) || busy.contains(wid)
            });
        }
        st.workers.insert(
            id.clone(),
            WorkerInfo {
                cert_not_after: caller.as_ref().map(|p| p.not_after),
                cert_serial: caller.as_ref().map(|p| p.serial.clone()),
                credential: caller.map(|p| p.fingerprint),
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

    pub(super) async fn lease(
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
            block_store: sh.blocks.is_some() && j.reproduction_of.is_none() && !j.isolated,
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

    pub(super) async fn heartbeat(
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

    pub(super) async fn fail(
        &self,
        req: Request<v1::FailRequest>,
    ) -> Result<Response<v1::FailReply>, Status> {
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
}
