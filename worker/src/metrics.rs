//! What the worker daemon shows Prometheus (`--metrics-listen`): what it is
//! doing, what it did, and what its block cache saves.

use std::sync::Arc;

use iukfarm_engine::blockcache::BlockCache;
use iukfarm_metrics::prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use iukfarm_metrics::{encode, mirror, seconds_until};

/// How a job this worker leased ended.
pub const JOB_OUTCOMES: [&str; 4] = ["delivered", "failed", "refused", "cancelled"];
/// Where the compressed blocks of the kits it delivered came from.
pub const BLOCK_SOURCES: [&str; 5] = ["compressed", "cache", "farm", "helpers", "copied"];

pub struct Metrics {
    registry: Registry,
    /// 1 while registered with a coordinator.
    pub connected: IntGauge,
    /// Jobs building or uploading now.
    pub jobs_running: IntGauge,
    /// Blocks being compressed for other workers' jobs now.
    pub helping: IntGauge,
    /// Jobs by outcome: delivered (the coordinator took the kit), failed
    /// here, refused by the coordinator at upload, cancelled (by the
    /// coordinator, or the worker stopping).
    pub jobs: IntCounterVec,
    /// Leases the coordinator took back or that ended with the session.
    pub lease_losses: IntCounter,
    pub build_seconds: Histogram,
    pub blocks: IntCounterVec,
    /// Blocks compressed for other workers' jobs and taken by the store.
    pub helped: IntCounter,
    pub sent: IntCounterVec,
    pub received: IntCounterVec,
    /// The cache, the gauge of its size and its lookups by result.
    cache: Option<(Arc<BlockCache>, IntGauge, IntCounterVec)>,
    cert: Option<(i64, Gauge)>,
}

fn name(n: &str) -> String {
    format!("iukfarm_worker_{n}")
}

impl Metrics {
    pub fn new(slots: u32, cache: Option<Arc<BlockCache>>, cert_not_after: Option<i64>) -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn iukfarm_metrics::prometheus::core::Collector>| {
            registry.register(c).expect("every metric has its own name");
        };
        macro_rules! make {
            ($t:ident, $n:expr, $help:expr) => {{
                let m = $t::new(name($n), $help).expect("a valid metric");
                reg(Box::new(m.clone()));
                m
            }};
            ($t:ident, $n:expr, $help:expr, $labels:expr) => {{
                let m = $t::new(Opts::new(name($n), $help), $labels).expect("a valid metric");
                reg(Box::new(m.clone()));
                m
            }};
        }
        let build_seconds = Histogram::with_opts(
            HistogramOpts::new(name("build_seconds"), "Time to build a kit, ISOs at hand.")
                .buckets(vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
                ]),
        )
        .expect("a valid histogram");
        reg(Box::new(build_seconds.clone()));
        let slot_gauge = make!(IntGauge, "slots", "Jobs this worker runs at once.");
        slot_gauge.set(slots.into());
        let cache = cache.map(|c| {
            let g = make!(
                IntGauge,
                "block_cache_bytes",
                "Bytes the compressed-block cache holds."
            );
            let cap = make!(
                IntGauge,
                "block_cache_cap_bytes",
                "Size cap of the compressed-block cache."
            );
            cap.set(i64::try_from(c.cap()).unwrap_or(i64::MAX));
            let lookups = make!(
                IntCounterVec,
                "block_cache_lookups_total",
                "Lookups in the compressed-block cache, by result (hit rate: hit / (hit + miss)).",
                &["result"]
            );
            (c, g, lookups)
        });
        let m = Metrics {
            connected: make!(
                IntGauge,
                "connected",
                "1 while registered with a coordinator."
            ),
            jobs_running: make!(IntGauge, "jobs_running", "Jobs building or uploading now."),
            helping: make!(
                IntGauge,
                "helper_blocks_in_progress",
                "Blocks being compressed for other workers' jobs now."
            ),
            jobs: make!(
                IntCounterVec,
                "jobs_total",
                "Jobs leased, by outcome.",
                &["outcome"]
            ),
            lease_losses: make!(
                IntCounter,
                "lease_losses_total",
                "Leases the coordinator took back, or lost with the connection, while a job ran."
            ),
            build_seconds,
            blocks: make!(
                IntCounterVec,
                "blocks_total",
                "Compressed blocks of the kits delivered, by where they came from.",
                &["source"]
            ),
            helped: make!(
                IntCounter,
                "helped_blocks_total",
                "Blocks compressed for other workers' jobs and accepted by the block store."
            ),
            sent: make!(
                IntCounterVec,
                "sent_bytes_total",
                "Bytes sent to the coordinator: kits, blocks.",
                &["what"]
            ),
            received: make!(
                IntCounterVec,
                "received_bytes_total",
                "Bytes received from the coordinator: ISOs, blocks.",
                &["what"]
            ),
            // Shown only with a certificate: 0 would read "expired".
            cert: cert_not_after.map(|t| {
                let g = make!(
                    Gauge,
                    "certificate_expiry_seconds",
                    "Seconds until this worker's client certificate expires."
                );
                (t, g)
            }),
            cache,
            registry: registry.clone(),
        };
        for o in JOB_OUTCOMES {
            m.jobs.with_label_values(&[o]);
        }
        for s in BLOCK_SOURCES {
            m.blocks.with_label_values(&[s]);
        }
        for w in ["kit", "block"] {
            m.sent.with_label_values(&[w]);
        }
        for w in ["iso", "block"] {
            m.received.with_label_values(&[w]);
        }
        m
    }

    /// The page, with the cache and certificate as of now.
    pub fn render(&self) -> String {
        if let Some((c, g, lookups)) = &self.cache {
            g.set(i64::try_from(c.size()).unwrap_or(i64::MAX));
            let s = c.stats();
            mirror(&lookups.with_label_values(&["hit"]), s.hits);
            mirror(&lookups.with_label_values(&["miss"]), s.misses);
        }
        if let Some((t, g)) = &self.cert {
            g.set(seconds_until(*t));
        }
        encode(&self.registry)
    }
}
