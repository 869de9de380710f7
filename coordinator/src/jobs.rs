//! The job table: which IUK is pending, leased to whom, verified, failed.
//! Pure bookkeeping (time is passed in), so scheduling, lease expiry and
//! retries are tested without a network.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Leased,
    Verifying,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Leased => "leased",
            JobState::Verifying => "verifying",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job handed to a worker until `deadline`, renewed by its heartbeats.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub worker_id: String,
    pub worker_name: String,
    pub deadline: Instant,
    pub started: Instant,
    pub phase: String,
    pub phase_started: Instant,
    pub done: u64,
    pub total: u64,
    /// An upload stream is in progress (a second one is refused).
    pub uploading: bool,
}

/// A kit that arrived intact.
#[derive(Debug, Clone)]
pub struct Built {
    pub sha256: String,
    pub size: u64,
    pub worker: String,
    pub build_seconds: f64,
    /// How the worker got the kit's compressed blocks (unknown for kits
    /// resumed from the journal).
    pub blocks: Option<iukfarm_proto::v1::BlockCounts>,
    /// The fingerprint of the certificate it was uploaded with.
    pub certificate: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    /// Content-derived: the same inputs, engine and options give the same id.
    pub id: String,
    pub old_version: String,
    pub output_name: String,
    /// For a second build checking the first: the first's index.
    pub reproduction_of: Option<usize>,
    pub state: JobState,
    pub attempts: u32,
    pub not_before: Instant,
    pub lease: Option<Lease>,
    pub built: Option<Built>,
    /// Worker names that ran (or run) it, for the reproduction rule.
    pub ran_on: Vec<String>,
    /// Workers whose kit was proven wrong or that said it cannot be built:
    /// it is not leased to them again (see [`Table::refuse`]).
    pub refused_by: Vec<String>,
    pub error: String,
    /// Found built and verified in the journal of an earlier run.
    pub resumed: bool,
    /// Larger first.
    pub priority: u64,
    /// What happened to it, for the RM and the JUnit report (bounded).
    pub log: Vec<String>,
    /// Built without the block store and helpers from now on: a helper
    /// whose forms it may have used failed an audit.
    pub isolated: bool,
}

const LOG_LINES: usize = 100;

impl Job {
    pub fn new(
        id: String,
        old_version: String,
        output_name: String,
        priority: u64,
        now: Instant,
    ) -> Job {
        Job {
            id,
            old_version,
            output_name,
            reproduction_of: None,
            state: JobState::Pending,
            attempts: 0,
            not_before: now,
            lease: None,
            built: None,
            ran_on: Vec::new(),
            refused_by: Vec::new(),
            error: String::new(),
            resumed: false,
            priority,
            log: Vec::new(),
            isolated: false,
        }
    }

    pub fn note(&mut self, line: String) {
        if self.log.len() == LOG_LINES {
            self.log.remove(1);
        }
        self.log.push(line);
    }
}

/// Delay before attempt `attempts + 1` after a transient failure.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

#[derive(Debug, Default)]
pub struct Table {
    pub jobs: Vec<Job>,
}

impl Table {
    /// The job a worker should take now: pending, due, allowed on this
    /// worker, highest priority first (ties: table order).
    pub fn pick(&self, worker_name: &str, now: Instant) -> Option<usize> {
        self.jobs
            .iter()
            .enumerate()
            .filter(|(i, j)| {
                j.state == JobState::Pending && j.not_before <= now && self.allowed(*i, worker_name)
            })
            .max_by(|(ia, a), (ib, b)| a.priority.cmp(&b.priority).then(ib.cmp(ia)))
            .map(|(i, _)| i)
    }

    /// A build and its reproduction must run on different workers, and a
    /// job never goes back to a worker whose word on it was refused.
    fn allowed(&self, i: usize, worker: &str) -> bool {
        if self.jobs[i].refused_by.iter().any(|w| w == worker) {
            return false;
        }
        let twins: Vec<usize> = match self.jobs[i].reproduction_of {
            Some(p) => vec![p],
            None => (0..self.jobs.len())
                .filter(|&k| self.jobs[k].reproduction_of == Some(i))
                .collect(),
        };
        twins.iter().all(|&t| {
            let tj = &self.jobs[t];
            let on_it = tj.lease.as_ref().is_some_and(|l| l.worker_name == worker)
                || tj.built.as_ref().is_some_and(|b| b.worker == worker);
            !on_it
        })
    }

    pub fn by_lease(&self, lease_id: &str) -> Option<usize> {
        self.jobs
            .iter()
            .position(|j| j.lease.as_ref().is_some_and(|l| l.id == lease_id))
    }

    pub fn start(&mut self, i: usize, lease: Lease) {
        let j = &mut self.jobs[i];
        j.attempts += 1;
        j.state = JobState::Leased;
        j.error.clear();
        j.ran_on.push(lease.worker_name.clone());
        j.note(format!(
            "attempt {}: leased to {} ({})",
            j.attempts, lease.worker_name, lease.id
        ));
        j.lease = Some(lease);
    }

    /// A transient failure: run again after a backoff, unless out of attempts.
    pub fn retry(&mut self, i: usize, why: &str, max_attempts: u32, now: Instant) {
        let j = &mut self.jobs[i];
        j.lease = None;
        j.note(why.to_string());
        if j.attempts >= max_attempts {
            j.state = JobState::Failed;
            j.error = format!("{why} (gave up after {} attempts)", j.attempts);
        } else {
            j.state = JobState::Pending;
            j.not_before = now + backoff(j.attempts);
            j.error = why.to_string();
        }
    }

    /// Back to pending at once, whatever its attempts: what it was built
    /// with (or is being built with) is no longer trusted, not the job.
    pub fn requeue(&mut self, i: usize, why: &str) {
        let j = &mut self.jobs[i];
        j.lease = None;
        j.built = None;
        j.state = JobState::Pending;
        j.not_before = Instant::now();
        j.error.clear();
        j.note(why.to_string());
    }

    /// A failure that another attempt cannot fix.
    pub fn fail(&mut self, i: usize, why: &str) {
        let j = &mut self.jobs[i];
        j.lease = None;
        j.state = JobState::Failed;
        j.error = why.to_string();
        j.note(format!("failed: {why}"));
    }

    /// One worker's word that job `i` cannot be built: a failure it calls
    /// deterministic, or a kit that verification proved wrong. Every
    /// worker runs the same engine on the same inputs, so another worker
    /// would say the same unless this one is broken or lying: while one of
    /// the `live` workers may still take the job, it is built again there
    /// (after a backoff, within `max_attempts`); otherwise it fails for
    /// good.
    pub fn refuse(
        &mut self,
        i: usize,
        worker: &str,
        why: &str,
        live: &[String],
        max_attempts: u32,
        now: Instant,
    ) {
        let j = &mut self.jobs[i];
        j.built = None;
        if !j.refused_by.iter().any(|w| w == worker) {
            j.refused_by.push(worker.to_string());
        }
        if live.iter().any(|w| self.allowed(i, w)) {
            self.retry(
                i,
                &format!("{why}; to be built by another worker"),
                max_attempts,
                now,
            );
        } else if self.jobs[i].refused_by.len() > 1 {
            let who = self.jobs[i].refused_by.join(", ");
            self.fail(i, &format!("{why} (found by workers {who})"));
        } else {
            self.fail(i, why);
        }
    }

    /// Leases whose worker stopped renewing them: back to pending.
    pub fn expire(&mut self, now: Instant, max_attempts: u32) -> Vec<usize> {
        let expired: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| {
                self.jobs[i].state == JobState::Leased
                    && self.jobs[i]
                        .lease
                        .as_ref()
                        .is_some_and(|l| l.deadline <= now)
            })
            .collect();
        for &i in &expired {
            let who = self.jobs[i]
                .lease
                .as_ref()
                .map(|l| l.worker_name.clone())
                .unwrap_or_default();
            self.retry(
                i,
                &format!("worker {who} stopped renewing its lease"),
                max_attempts,
                now,
            );
        }
        expired
    }

    pub fn all_terminal(&self) -> bool {
        self.jobs.iter().all(|j| j.state.is_terminal())
    }

    /// Ends every job that has not ended.
    pub fn cancel_all(&mut self, why: &str) {
        for j in &mut self.jobs {
            if !j.state.is_terminal() {
                j.state = JobState::Cancelled;
                j.lease = None;
                j.error = why.to_string();
            }
        }
    }

    /// Once a build and its reproduction are both done, fails the build if
    /// their digests differ.
    pub fn check_reproduction(&mut self, i: usize) {
        let (p, r) = match self.jobs[i].reproduction_of {
            Some(p) => (p, i),
            None => match (0..self.jobs.len()).find(|&k| self.jobs[k].reproduction_of == Some(i)) {
                Some(r) => (i, r),
                None => return,
            },
        };
        if self.jobs[p].state != JobState::Done || self.jobs[r].state != JobState::Done {
            return;
        }
        let (a, b) = match (&self.jobs[p].built, &self.jobs[r].built) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => return,
        };
        if a.sha256 != b.sha256 || a.size != b.size {
            let why = format!(
                "not reproducible: {} built sha256 {} ({} bytes), {} built sha256 {} ({} bytes)",
                a.worker, a.sha256, a.size, b.worker, b.sha256, b.size
            );
            self.fail(p, &why);
            self.fail(r, &why);
        } else {
            self.jobs[r].note(format!("same bytes as {}'s build", a.worker));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize, now: Instant) -> Table {
        Table {
            jobs: (0..n)
                .map(|k| {
                    Job::new(
                        format!("j{k}"),
                        format!("6.{k}"),
                        format!("k{k}.iuk"),
                        (n - k) as u64,
                        now,
                    )
                })
                .collect(),
        }
    }

    fn lease(id: &str, worker: &str, now: Instant) -> Lease {
        Lease {
            id: id.into(),
            worker_id: worker.into(),
            worker_name: worker.into(),
            deadline: now + Duration::from_secs(10),
            started: now,
            phase: String::new(),
            phase_started: now,
            done: 0,
            total: 0,
            uploading: false,
        }
    }

    #[test]
    fn largest_first_then_leases_expire_and_retry() {
        let now = Instant::now();
        let mut t = table(3, now);
        t.jobs[2].priority = 100;
        assert_eq!(t.pick("w", now), Some(2));
        t.start(2, lease("l1", "w", now));
        assert_eq!(t.pick("w", now), Some(0));
        assert_eq!(t.by_lease("l1"), Some(2));
        // No heartbeat: the lease ends, the job waits its backoff, then is due again.
        assert!(t.expire(now + Duration::from_secs(5), 3).is_empty());
        assert_eq!(t.expire(now + Duration::from_secs(10), 3), vec![2]);
        assert_eq!(t.jobs[2].state, JobState::Pending);
        assert!(t.jobs[2].error.contains("stopped renewing"));
        let later = now + Duration::from_secs(10);
        assert_eq!(t.pick("w", later), Some(0));
        assert_eq!(t.pick("w", later + backoff(1)), Some(2));
    }

    #[test]
    fn attempts_are_bounded() {
        let now = Instant::now();
        let mut t = table(1, now);
        for k in 0..3 {
            t.start(0, lease(&format!("l{k}"), "w", now));
            t.retry(0, "upload corrupted", 3, now);
        }
        assert_eq!(t.jobs[0].state, JobState::Failed);
        assert!(t.jobs[0].error.contains("gave up after 3 attempts"));
        assert!(t.all_terminal());
    }

    #[test]
    fn reproductions_run_elsewhere_and_must_match() {
        let now = Instant::now();
        let mut t = table(1, now);
        let mut r = Job::new("j0/r".into(), "6.0".into(), "k0.iuk".into(), 1, now);
        r.reproduction_of = Some(0);
        t.jobs.push(r);
        t.start(0, lease("l1", "a", now));
        assert_eq!(t.pick("a", now), None, "not on the same worker");
        assert_eq!(t.pick("b", now), Some(1));
        t.start(1, lease("l2", "b", now));
        for (i, w, sha) in [(0, "a", "11"), (1, "b", "22")] {
            t.jobs[i].state = JobState::Done;
            t.jobs[i].lease = None;
            t.jobs[i].built = Some(Built {
                certificate: None,
                sha256: sha.into(),
                size: 5,
                worker: w.into(),
                build_seconds: 1.0,
                blocks: None,
            });
        }
        t.check_reproduction(1);
        assert_eq!(t.jobs[0].state, JobState::Failed);
        assert!(
            t.jobs[0].error.contains("not reproducible"),
            "{}",
            t.jobs[0].error
        );
    }

    #[test]
    fn one_workers_word_that_a_job_cannot_be_built_is_checked_by_another() {
        let now = Instant::now();
        let live = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut t = table(1, now);
        t.start(0, lease("l1", "liar", now));
        t.jobs[0].built = Some(Built {
            certificate: None,
            sha256: "11".into(),
            size: 5,
            worker: "liar".into(),
            build_seconds: 1.0,
            blocks: None,
        });
        t.refuse(0, "liar", "wrong kit", &live(&["liar", "b"]), 5, now);
        assert_eq!(t.jobs[0].state, JobState::Pending);
        assert!(t.jobs[0].built.is_none(), "the wrong kit is forgotten");
        let later = now + backoff(1);
        assert_eq!(t.pick("liar", later), None, "never back to the liar");
        assert_eq!(t.pick("b", later), Some(0));
        // The second worker says the same: the job cannot be built.
        t.start(0, lease("l2", "b", later));
        t.refuse(0, "b", "corrupt input", &live(&["liar", "b"]), 5, later);
        assert_eq!(t.jobs[0].state, JobState::Failed);
        assert!(
            t.jobs[0].error.contains("found by workers liar, b"),
            "{}",
            t.jobs[0].error
        );

        // Alone in the farm, a worker's word ends the job at once.
        let mut t = table(1, now);
        t.start(0, lease("l1", "a", now));
        t.refuse(0, "a", "corrupt input", &live(&["a"]), 5, now);
        assert_eq!(t.jobs[0].state, JobState::Failed);
        assert_eq!(t.jobs[0].error, "corrupt input");
        // Attempts stay bounded.
        let mut t = table(1, now);
        t.start(0, lease("l1", "a", now));
        t.refuse(0, "a", "wrong kit", &live(&["a", "b"]), 1, now);
        assert_eq!(t.jobs[0].state, JobState::Failed);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(9), Duration::from_secs(30));
    }
}
