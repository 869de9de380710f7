//! What the coordinator shows Prometheus (`--metrics-listen`): counters of
//! what happened, counted where it happens, and the release's state, read
//! from the same status the RM's client sees at each scrape.

use iukfarm_metrics::prometheus::{
    Gauge, GaugeVec, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use iukfarm_metrics::{DURATION_BUCKETS, encode, mirror, seconds_until};

use crate::state::Shared;

/// Job states and release phases, every one always shown (0 when none):
/// a series that vanishes cannot be alerted on.
const JOB_STATES: [&str; 6] = [
    "pending",
    "leased",
    "verifying",
    "done",
    "failed",
    "cancelled",
];
const PHASES: [&str; 6] = [
    "preparing",
    "running",
    "finishing",
    "succeeded",
    "failed",
    "cancelled",
];
/// Outcomes of a kit that reached the coordinator.
pub const KIT_OUTCOMES: [&str; 5] = [
    "accepted",
    "reproduced",
    "wrong",
    "upload_failed",
    "revoked",
];

pub(crate) struct Metrics {
    registry: Registry,
    /// Kits by outcome: verified and kept; a reproduction received; proven
    /// wrong by applying it; refused or cut before it was whole; its
    /// worker's certificate revoked before it was kept.
    pub kits: IntCounterVec,
    /// Leases that expired (a silent worker); the job goes to another.
    pub lease_losses: IntCounter,
    /// Verify-by-apply, per kit that could be applied or proven wrong.
    pub verify_seconds: Histogram,
    /// Bytes sent: ISOs to workers, files to the RM (blocks: from the store).
    pub sent: IntCounterVec,
    /// Bytes received: kits (blocks: from the store).
    pub received: IntCounterVec,
    phase: IntGaugeVec,
    jobs: IntGaugeVec,
    workers: IntGaugeVec,
    worker_slots: IntGaugeVec,
    worker_busy: IntGaugeVec,
    worker_jobs_done: IntGaugeVec,
    worker_bad_blocks: IntGaugeVec,
    worker_cert: GaugeVec,
    store_entries: IntGauge,
    store_bytes: IntGauge,
    store_cap: IntGauge,
    store_blocks: IntCounterVec,
    /// The coordinator's own certificate: when it expires, and the gauge.
    cert: Option<(i64, Gauge)>,
}

const PREFIX: &str = "iukfarm_coordinator";

impl Metrics {
    /// `cert_not_after`: when the coordinator's own TLS certificate expires.
    pub fn new(cert_not_after: Option<i64>) -> Metrics {
        let r = iukfarm_metrics::Registrar::new(PREFIX);
        let verify_seconds = r.histogram(
            "verify_seconds",
            "Time to verify a kit by applying it to its old release.",
            DURATION_BUCKETS.to_vec(),
        );
        let m = Metrics {
            registry: r.registry(),
            kits: r.int_counter_vec(
                "kits_total",
                "Kits that reached the coordinator, by outcome.",
                &["outcome"],
            ),
            lease_losses: r.int_counter(
                "lease_losses_total",
                "Leases that expired because their worker fell silent.",
            ),
            verify_seconds,
            sent: r.int_counter_vec(
                "sent_bytes_total",
                "Bytes sent: ISOs to workers, files downloaded, compressed blocks from the store.",
                &["what"],
            ),
            received: r.int_counter_vec(
                "received_bytes_total",
                "Bytes received: kits, compressed blocks for the store.",
                &["what"],
            ),
            phase: r.int_gauge_vec("phase", "1 for the phase the release is in.", &["phase"]),
            jobs: r.int_gauge_vec("jobs", "Jobs (IUKs) by state.", &["state"]),
            workers: r.int_gauge_vec(
                "workers",
                "Registered workers, connected (heard from within the lease timeout) or lost.",
                &["state"],
            ),
            worker_slots: r.int_gauge_vec(
                "worker_slots",
                "Jobs a connected worker runs at once.",
                &["worker"],
            ),
            worker_busy: r.int_gauge_vec(
                "worker_busy_slots",
                "Jobs a connected worker holds a lease on.",
                &["worker"],
            ),
            worker_jobs_done: r.int_gauge_vec(
                "worker_jobs_done",
                "Kits a connected worker delivered in this release.",
                &["worker"],
            ),
            worker_bad_blocks: r.int_gauge_vec(
                "worker_bad_blocks",
                "Compressed blocks a worker sent that were not the blocks they named.",
                &["worker"],
            ),
            worker_cert: r.gauge_vec(
                "worker_certificate_expiry_seconds",
                "Seconds until a connected worker's client certificate expires.",
                &["worker"],
            ),
            store_entries: r.int_gauge(
                "block_store_entries",
                "Compressed blocks in the farm's block store.",
            ),
            store_bytes: r.int_gauge("block_store_bytes", "Bytes the farm's block store holds."),
            store_cap: r.int_gauge(
                "block_store_cap_bytes",
                "Size cap of the farm's block store.",
            ),
            store_blocks: r.int_counter_vec(
                "block_store_blocks_total",
                "Blocks through the farm's block store and work sharing, by event.",
                &["event"],
            ),
            // Shown only with a certificate: 0 would read "expired".
            cert: cert_not_after.map(|t| {
                let g = r.gauge(
                    "certificate_expiry_seconds",
                    "Seconds until the coordinator's TLS certificate expires.",
                );
                (t, g)
            }),
        };
        // Counters with labels show from the start, at 0.
        for o in KIT_OUTCOMES {
            m.kits.with_label_values(&[o]);
        }
        for w in ["iso", "download"] {
            m.sent.with_label_values(&[w]);
        }
        m.received.with_label_values(&["kit"]);
        m
    }

    /// The page, with the state as of now.
    pub fn render(&self, sh: &Shared) -> String {
        let s = crate::service::status(sh);
        for p in PHASES {
            self.phase
                .with_label_values(&[p])
                .set(i64::from(s.state == p));
        }
        for state in JOB_STATES {
            let n = s.jobs.iter().filter(|j| j.state == state).count();
            self.jobs.with_label_values(&[state]).set(n as i64);
        }
        let connected = s.workers.iter().filter(|w| w.connected).count();
        (self.workers.with_label_values(&["connected"])).set(connected as i64);
        let lost = (s.workers.len() - connected) as i64;
        self.workers.with_label_values(&["lost"]).set(lost);
        // Per worker: only those connected now, so a worker gone is gone.
        for g in [
            &self.worker_slots,
            &self.worker_busy,
            &self.worker_jobs_done,
            &self.worker_bad_blocks,
        ] {
            g.reset();
        }
        self.worker_cert.reset();
        for w in s.workers.iter().filter(|w| w.connected) {
            let l = [w.name.as_str()];
            // Without certificates two workers may share a name: added up.
            self.worker_slots.with_label_values(&l).add(w.slots.into());
            self.worker_busy.with_label_values(&l).add(w.busy.into());
            (self.worker_jobs_done.with_label_values(&l)).add(w.jobs_done.into());
            let bad = i64::try_from(w.bad_blocks).unwrap_or(i64::MAX);
            self.worker_bad_blocks.with_label_values(&l).set(bad);
            if w.certificate_not_after != 0 {
                (self.worker_cert.with_label_values(&l))
                    .set(seconds_until(w.certificate_not_after));
            }
        }
        if let Some(b) = &s.block_store {
            let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.store_entries.set(int(b.entries));
            self.store_bytes.set(int(b.bytes));
            self.store_cap.set(int(b.cap));
            for (event, v) in [
                ("served", b.served),
                ("stored", b.stored),
                ("duplicate", b.duplicates),
                ("refused", b.refused),
                ("evicted", b.evicted),
                ("expired_claim", b.expired_claims),
                ("offered", b.offered),
                ("helped", b.helped),
                ("given_back", b.given_back),
            ] {
                mirror(&self.store_blocks.with_label_values(&[event]), v);
            }
            mirror(&self.sent.with_label_values(&["block"]), b.sent_bytes);
            mirror(&self.sent.with_label_values(&["helper"]), b.helper_bytes);
            mirror(
                &self.received.with_label_values(&["block"]),
                b.received_bytes,
            );
        }
        if let Some((t, g)) = &self.cert {
            g.set(seconds_until(*t));
        }
        encode(&self.registry)
    }
}
