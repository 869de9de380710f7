//! What the gRPC service and the main loop share: the release's state
//! behind one lock, and the helpers both sides use.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use iukfarm_engine::fingerprint::Fingerprint;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::warn;

use crate::Error;
use crate::auth::Auth;
use crate::config::Config;
use crate::inputs::{Authority, IsoInput};
use crate::jobs::Table;
use crate::journal::{Entry, Journal};

/// Where the coordinator keeps its own files, inside the output directory.
pub const STATE_DIR: &str = ".iukfarm";

/// 128 random bits in hex: ids and file names no one can guess.
pub fn random_hex() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random number generator");
    crate::inputs::hex(&b)
}

/// Open `Watch` streams at most: of readers (dashboards), and kept for
/// RMs (readers cannot take these).
pub const MAX_WATCHERS: usize = 24;
pub const RM_WATCHERS: usize = 8;

/// Planned memory per job, checked against what a worker advertises.
pub const JOB_MEMORY: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    Running,
    Finishing,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Running => "running",
            Phase::Finishing => "finishing",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn is_over(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Cancelled)
    }
}

pub(crate) struct WorkerInfo {
    pub name: String,
    /// The fingerprint of its client certificate, when the farm uses them:
    /// only calls made with that certificate may use this worker's id.
    pub credential: Option<String>,
    /// When that certificate expires (Unix seconds).
    pub cert_not_after: Option<i64>,
    /// Its serial, to act on a revocation at once.
    pub cert_serial: Option<String>,
    pub slots: u32,
    pub memory: u64,
    pub last_seen: Instant,
    pub jobs_done: u32,
    /// Has been told the release is over.
    pub told_over: bool,
}

pub(crate) struct State {
    pub phase: Phase,
    pub message: String,
    pub table: Table,
    /// Index 0: the new release; then the sources in the RM's order.
    pub inputs: Vec<IsoInput>,
    /// For each job: its source's index in `inputs`.
    pub job_input: Vec<usize>,
    pub workers: BTreeMap<String, WorkerInfo>,
    /// Files Download serves, in the output directory.
    pub files: Vec<String>,
    pub cancel_reason: Option<String>,
    /// Helpers whose audited forms were not our encoder's, each with the
    /// workers their forms were served to: the main loop acts on them.
    pub audit_failed: Vec<(String, std::collections::HashSet<String>)>,
}

impl State {
    /// One worker's word that job `i` cannot be built ([`Table::refuse`]),
    /// weighed against the workers heard from within the lease timeout.
    pub fn refuse(&mut self, i: usize, worker: &str, why: &str, cfg: &Config) {
        let live: Vec<String> = (self.workers.values())
            .filter(|w| !w.told_over && w.last_seen.elapsed() < cfg.lease_timeout)
            .map(|w| w.name.clone())
            .collect();
        let now = Instant::now();
        (self.table).refuse(i, worker, why, &live, cfg.max_attempts, now);
    }
}

pub(crate) struct Shared {
    pub cfg: Config,
    pub fingerprint: Fingerprint,
    /// Whose bytes every kit is; a worker's engine must write them.
    pub gensquashfs: iukfarm_engine::sqfs::Gensquashfs,
    pub required_version: String,
    pub required_commit: String,
    pub state: Mutex<State>,
    pub changed: watch::Sender<u64>,
    pub state_dir: PathBuf,
    pub incoming: PathBuf,
    pub verify_slots: Semaphore,
    /// The new image's file digests, kept from one kit's verification to
    /// the next (every kit is verified against the same new ISO).
    pub verify_memo: iukfarm_engine::kit::verify::VerifyMemo,
    pub journal: Mutex<Option<Journal>>,
    /// Who may call what.
    pub auth: Auth,
    /// What the RM vouches for about the input ISOs.
    pub authority: Arc<Authority>,
    /// One permit per open `Watch` stream: any caller's, and the RMs' own.
    pub watchers: Arc<Semaphore>,
    pub rm_watchers: Arc<Semaphore>,
    /// A signal after the release ended: stop serving at once.
    pub stop_lingering: Notify,
    /// The farm's block store, unless the RM turned it off.
    pub blocks: Option<crate::blocks::Store>,
    /// Blocks jobs offer to helpers (with the store only).
    pub offers: crate::offers::Offers,
    /// Helpers' forms compressed again and compared.
    pub audits: crate::audit::Audits,
    pub metrics: crate::metrics::Metrics,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the main loop and every watcher.
    pub fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A fresh worker or lease id: 128 random bits, so that one worker
    /// cannot guess (and act on) another's lease, and ids of an earlier
    /// process are never taken for this one's.
    pub fn new_id(what: &str) -> String {
        format!("{what}-{}", random_hex())
    }

    /// Cancels the release (SIGINT, SIGTERM, `iukfarm cancel`); once it is
    /// over, ends the linger instead.
    pub fn cancel(&self, reason: &str) {
        let mut st = self.lock();
        if st.phase.is_over() {
            self.stop_lingering.notify_one();
        }
        if !st.phase.is_over() && st.cancel_reason.is_none() {
            warn!("cancelling the release: {reason}");
            st.cancel_reason = Some(reason.to_string());
            st.table.cancel_all(&format!("cancelled: {reason}"));
        }
        drop(st);
        self.bump();
    }

    /// The input ISO with this digest, as opened at its check.
    pub fn input(&self, st: &State, sha256: &str) -> Option<iukfarm_engine::kit::OpenIso> {
        st.inputs
            .iter()
            .find(|i| i.sha256 == sha256)
            .map(|i| i.iso.clone())
    }

    pub fn journal(&self, e: &Entry) -> Result<(), Error> {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        match j.as_mut() {
            Some(j) => j.append(e),
            None => Ok(()),
        }
    }
}
