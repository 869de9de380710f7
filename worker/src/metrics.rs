//! What the worker daemon shows Prometheus (`--metrics-listen`): what it is
//! doing, what it did, and what its block cache saves.

use std::sync::Arc;

use iukfarm_engine::blockcache::BlockCache;
use iukfarm_metrics::prometheus::{
    Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry,
};
use iukfarm_metrics::{DURATION_BUCKETS, encode, mirror, seconds_until};

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

const PREFIX: &str = "iukfarm_worker";

impl Metrics {
    pub fn new(slots: u32, cache: Option<Arc<BlockCache>>, cert_not_after: Option<i64>) -> Metrics {
        let r = iukfarm_metrics::Registrar::new(PREFIX);
        let build_seconds = r.histogram(
            "build_seconds",
            "Time to build a kit, ISOs at hand.",
            DURATION_BUCKETS.to_vec(),
        );
        let slot_gauge = r.int_gauge("slots", "Jobs this worker runs at once.");
        slot_gauge.set(slots.into());
        let cache =
            cache.map(|c| {
                let g = r.int_gauge(
                    "block_cache_bytes",
                    "Bytes the compressed-block cache holds.",
                );
                let cap = r.int_gauge(
                    "block_cache_cap_bytes",
                    "Size cap of the compressed-block cache.",
                );
                cap.set(i64::try_from(c.cap()).unwrap_or(i64::MAX));
                let lookups = r.int_counter_vec("block_cache_lookups_total",
                "Lookups in the compressed-block cache, by result (hit rate: hit / (hit + miss)).",
                &["result"]);
                (c, g, lookups)
            });
        let m = Metrics {
            connected: r.int_gauge("connected", "1 while registered with a coordinator."),
            jobs_running: r.int_gauge("jobs_running", "Jobs building or uploading now."),
            helping: r.int_gauge(
                "helper_blocks_in_progress",
                "Blocks being compressed for other workers' jobs now.",
            ),
            jobs: r.int_counter_vec("jobs_total", "Jobs leased, by outcome.", &["outcome"]),
            lease_losses: r.int_counter(
                "lease_losses_total",
                "Leases the coordinator took back, or lost with the connection, while a job ran.",
            ),
            build_seconds,
            blocks: r.int_counter_vec(
                "blocks_total",
                "Compressed blocks of the kits delivered, by where they came from.",
                &["source"],
            ),
            helped: r.int_counter(
                "helped_blocks_total",
                "Blocks compressed for other workers' jobs and accepted by the block store.",
            ),
            sent: r.int_counter_vec(
                "sent_bytes_total",
                "Bytes sent to the coordinator: kits, blocks.",
                &["what"],
            ),
            received: r.int_counter_vec(
                "received_bytes_total",
                "Bytes received from the coordinator: ISOs, blocks.",
                &["what"],
            ),
            // Shown only with a certificate: 0 would read "expired".
            cert: cert_not_after.map(|t| {
                let g = r.gauge(
                    "certificate_expiry_seconds",
                    "Seconds until this worker's client certificate expires.",
                );
                (t, g)
            }),
            cache,
            registry: r.registry(),
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
