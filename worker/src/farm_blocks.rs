//! The coordinator's block store as the engine sees it ([`SharedBlocks`]):
//! one job's view, asked from the compression threads.
//!
//! Sharing must never make a job slower than compressing alone, so the
//! job measures both sides and stops asking when the network loses: once
//! at least [`SAMPLES`] blocks of each kind were seen, it falls back to
//! compressing alone when
//! * taking a block from the store costs more per byte than compressing
//!   one here (time spent waiting for another worker's compression does
//!   not count: that is work saved, not network), or
//! * the store's overhead on blocks compressed here (asking, then sending
//!   the result, and the asks answered "busy": another worker was
//!   compressing the block, so the job did another first) exceeds half of
//!   the time compressing them.
//!
//! A call that fails (the coordinator gone, the link cut) also ends the
//! sharing for this job: the build goes on alone.
//!
//! Work sharing goes through the same store: the job offers blocks it has
//! not started to idle workers (helpers), which take them with the store's
//! claims and put their forms there; the job gets them like any other form
//! (and the engine checks them). It stops with the rest of the sharing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use iukfarm_engine::blockcache::{BlockId, BlockKey, Cached, Lookup, SharedBlocks};
use iukfarm_engine::sqfs::XzConfig;
use iukfarm_proto::{FarmClient, v1};
use tracing::{debug, info, warn};

/// Blocks of each kind measured before the fallback rule is applied.
pub const SAMPLES: u64 = 16;
/// Asks for one block, while the store answers that its claimant is still
/// compressing it (each ask waits up to 20 s there; no claim lives past
/// 120 s).
const WAIT_ASKS: u32 = 6;
/// The longest a call may take (the store itself waits at most 10 s).
#[cfg(not(test))]
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Short in unit tests, which cut the link on purpose.
#[cfg(test)]
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Costs {
    /// Blocks taken from the store: their uncompressed bytes and the
    /// network's share of the time.
    found: u64,
    found_bytes: u64,
    found_ns: u128,
    /// Blocks compressed here: bytes, compression time, and the time the
    /// store cost them (the miss, then the put).
    compressed: u64,
    compressed_bytes: u64,
    compress_ns: u128,
    overhead_ns: u128,
    /// Asks answered "busy" (the block done later).
    busy: u64,
    /// Blocks asked for and missed, with the time of the answer.
    pending: HashMap<BlockKey, (Instant, Duration)>,
}

/// Blocks a job keeps queued for helpers beyond its own threads' needs.
const LOOKAHEAD: usize = 48;
/// Puts sent in the background at once; a compression thread waits only
/// when this many are still on their way.
const PUTS_IN_FLIGHT: u32 = 8;

pub struct FarmBlocks {
    /// The `Arc` this lives in, for the puts sent in the background.
    me: Weak<FarmBlocks>,
    puts: Arc<tokio::sync::Semaphore>,
    rt: tokio::runtime::Handle,
    client: FarmClient,
    worker_id: String,
    lease_id: String,
    job: String,
    helped: AtomicU64,
    /// Test hook: send wrong forms.
    lie: bool,
    off: AtomicBool,
    costs: Mutex<Costs>,
    refused: AtomicU64,
    rejected: AtomicU64,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for FarmBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FarmBlocks({})", self.job)
    }
}

impl FarmBlocks {
    pub fn new(
        rt: tokio::runtime::Handle,
        client: FarmClient,
        worker_id: &str,
        lease_id: &str,
        job: &str,
        lie: bool,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<FarmBlocks> {
        Arc::new_cyclic(|me| FarmBlocks {
            me: me.clone(),
            puts: Arc::new(tokio::sync::Semaphore::new(PUTS_IN_FLIGHT as usize)),
            rt,
            client,
            worker_id: worker_id.to_string(),
            lease_id: lease_id.to_string(),
            job: job.to_string(),
            helped: AtomicU64::new(0),
            lie,
            off: AtomicBool::new(false),
            costs: Mutex::new(Costs::default()),
            refused: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            metrics,
        })
    }

    /// Waits until every put sent in the background has its answer, so
    /// that the counts are final.
    pub async fn flush(&self) {
        let _ = self.puts.acquire_many(PUTS_IN_FLIGHT).await;
    }

    fn sent(&self, n: usize) {
        (self.metrics.sent.with_label_values(&["block"])).inc_by(n as u64);
    }

    fn received(&self, n: usize) {
        (self.metrics.received.with_label_values(&["block"])).inc_by(n as u64);
    }

    fn costs(&self) -> std::sync::MutexGuard<'_, Costs> {
        self.costs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self, why: &str) {
        if !self.off.swap(true, Ordering::SeqCst) {
            info!("{}: compressing alone from now on: {why}", self.job);
        }
    }

    fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        self.rt.block_on(self.call_async(what, f))
    }

    async fn call_async<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(s)) => {
                self.stop(&format!("the block store's {what}: {}", s.message()));
                None
            }
            Err(_) => {
                self.stop(&format!("the block store's {what}: no answer"));
                None
            }
        }
    }

    /// An ask answered busy costs a round trip: the store's overhead.
    fn answered_busy(&self, c: &mut Costs, took: Duration) {
        c.busy += 1;
        c.overhead_ns += took.as_nanos();
        self.judge(c);
    }

    /// Applies the fallback rule (see the module documentation).
    fn judge(&self, c: &Costs) {
        if c.found >= SAMPLES && c.compressed >= SAMPLES {
            // ns per byte, compared as cross products.
            let fetch = c.found_ns * c.compressed_bytes as u128;
            let compress = c.compress_ns * c.found_bytes as u128;
            if fetch > compress {
                self.stop(&format!(
                    "taking a block from the store ({:.0} MB/s) is slower than compressing it ({:.0} MB/s)",
                    mb_per_s(c.found_bytes, c.found_ns),
                    mb_per_s(c.compressed_bytes, c.compress_ns)
                ));
            }
        }
        if c.compressed >= SAMPLES && c.overhead_ns * 2 > c.compress_ns {
            self.stop(&format!(
                "the store costs {:.0}% of the compression time",
                100.0 * c.overhead_ns as f64 / c.compress_ns.max(1) as f64
            ));
        }
    }

    /// What the job's log says when it ends.
    pub fn summary(&self) -> String {
        let c = self.costs();
        format!(
            "block store: {} blocks taken ({:.1} MiB), {} compressed by helpers, {} compressed here and shared{}{}{}",
            c.found,
            c.found_bytes as f64 / 1048576.0,
            self.helped.load(Ordering::Relaxed),
            c.compressed,
            match c.busy {
                0 => String::new(),
                n => format!(", {n} asks answered busy (another worker was compressing the block)"),
            },
            match self.rejected.load(Ordering::Relaxed) {
                0 => String::new(),
                n => format!(", {n} wrong forms received and not used"),
            },
            if self.off.load(Ordering::SeqCst) {
                " (then alone)"
            } else {
                ""
            }
        )
    }

    /// Forms the store refused (this worker sent wrong ones).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

fn mb_per_s(bytes: u64, ns: u128) -> f64 {
    bytes as f64 * 1000.0 / ns.max(1) as f64
}

impl FarmBlocks {
    fn ask(&self, id: &BlockId, key: &BlockKey, unless_busy: bool) -> Lookup {
        if self.off.load(Ordering::SeqCst) {
            return Lookup::Compress;
        }
        let t = Instant::now();
        let mut client = self.client.clone();
        let req = v1::GetBlockRequest {
            worker_id: self.worker_id.clone(),
            block: Some(id.into()),
            unless_busy,
        };
        let mut asks = 0;
        let r = loop {
            asks += 1;
            let Some(r) = self.call("get", client.get_block(req.clone())) else {
                return Lookup::Compress;
            };
            // A waiting ask answered busy: the store waited as long as one
            // call may and the claimant is still working on the block. Ask
            // again, a bounded number of times (a coordinator that says
            // busy at once costs this job a few round trips per block).
            if !r.found && r.busy && !unless_busy && asks < WAIT_ASKS {
                continue;
            }
            break r;
        };
        let took = t.elapsed();
        let mut c = self.costs();
        if !r.found {
            if r.busy && unless_busy {
                self.answered_busy(&mut c, took);
                return Lookup::Busy;
            }
            c.pending.insert(*key, (Instant::now(), took));
            return Lookup::Compress;
        }
        let waited = Duration::from_millis(r.waited_ms.into());
        self.received(r.compressed.len());
        c.found += 1;
        c.found_bytes += id.len;
        c.found_ns += took.saturating_sub(waited).as_nanos();
        self.judge(&c);
        Lookup::Found(if r.uncompressed {
            Cached::Uncompressed
        } else {
            Cached::Compressed(r.compressed)
        })
    }
}

impl SharedBlocks for FarmBlocks {
    fn get(&self, id: &BlockId, key: &BlockKey) -> Option<Cached> {
        match self.ask(id, key, false) {
            Lookup::Found(v) => Some(v),
            Lookup::Compress | Lookup::Busy => None,
        }
    }

    fn get_unless_busy(&self, id: &BlockId, key: &BlockKey) -> Lookup {
        self.ask(id, key, true)
    }

    fn put(&self, id: &BlockId, key: &BlockKey, value: &Cached) {
        let Some((asked, miss)) = self.costs().pending.remove(key) else {
            // Not asked (sharing was off then): nothing to measure or send.
            return;
        };
        if self.off.load(Ordering::SeqCst) {
            return;
        }
        let compress = asked.elapsed();
        let (uncompressed, mut compressed) = match value {
            Cached::Uncompressed => (true, Vec::new()),
            Cached::Compressed(b) => (false, b.clone()),
        };
        if self.lie && !compressed.is_empty() {
            let n = compressed.len() / 2;
            compressed[n] ^= 0x20;
        }
        let req = v1::PutBlockRequest {
            worker_id: self.worker_id.clone(),
            block: Some(id.into()),
            uncompressed,
            compressed,
        };
        let Some(me) = self.me.upgrade() else {
            return;
        };
        // Sent in the background: the coordinator checks the form before it
        // answers, and this thread has the next block to compress.
        let Ok(permit) = self.rt.block_on(self.puts.clone().acquire_owned()) else {
            return;
        };
        let len = id.len;
        self.sent(req.compressed.len());
        self.rt.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let mut client = me.client.clone();
            let Some(r) = me.call_async("put", client.put_block(req)).await else {
                return;
            };
            if !r.accepted {
                me.refused.fetch_add(1, Ordering::Relaxed);
            }
            let mut c = me.costs();
            c.compressed += 1;
            c.compressed_bytes += len;
            c.compress_ns += compress.as_nanos();
            c.overhead_ns += (miss + t.elapsed()).as_nanos();
            me.judge(&c);
        });
    }

    fn lookahead(&self) -> usize {
        if self.off.load(Ordering::SeqCst) {
            0
        } else {
            LOOKAHEAD
        }
    }

    fn helpers(&self) -> Option<usize> {
        if self.off.load(Ordering::SeqCst) {
            return None;
        }
        let mut client = self.client.clone();
        let req = v1::OfferBlocksRequest {
            worker_id: self.worker_id.clone(),
            lease_id: self.lease_id.clone(),
            xz: None,
            blocks: Vec::new(),
        };
        let r = self.call("offer", client.offer_blocks(req))?;
        // More in one offer than the coordinator takes would only end the
        // sharing: a number from the coordinator is taken within bounds.
        Some((r.wanted as usize).min(iukfarm_proto::MAX_BLOCKS_PER_CALL))
    }

    fn outsource(&self, cfg: &XzConfig, blocks: &[(BlockId, &[u8])]) -> Vec<Option<Cached>> {
        let mut forms = vec![None; blocks.len()];
        if self.off.load(Ordering::SeqCst) || cfg.validate_shared().is_err() {
            return forms;
        }
        let mut client = self.client.clone();
        let req = v1::OfferBlocksRequest {
            worker_id: self.worker_id.clone(),
            lease_id: self.lease_id.clone(),
            xz: Some(cfg.into()),
            blocks: (blocks.iter())
                .map(|(id, data)| v1::OfferedBlock {
                    block: Some(id.into()),
                    data: data.to_vec(),
                })
                .collect(),
        };
        let offered = Instant::now();
        self.sent(blocks.iter().map(|(_, d)| d.len()).sum());
        let Some(r) = self.call("offer", client.offer_blocks(req)) else {
            return forms;
        };
        if r.taken.len() != blocks.len() {
            self.stop("the coordinator answered an offer with the wrong number of blocks");
            return forms;
        }
        for ((id, _), (taken, form)) in blocks.iter().zip(r.taken.iter().zip(&mut forms)) {
            if !taken {
                continue;
            }
            let req = v1::GetBlockRequest {
                worker_id: self.worker_id.clone(),
                block: Some(id.into()),
                unless_busy: false,
            };
            let Some(r) = self.call("get", client.get_block(req)) else {
                break;
            };
            if r.found {
                self.received(r.compressed.len());
                self.helped.fetch_add(1, Ordering::Relaxed);
                *form = Some(if r.uncompressed {
                    Cached::Uncompressed
                } else {
                    Cached::Compressed(r.compressed)
                });
            }
        }
        debug!(
            "{}: offered {} blocks, helpers took {} and sent {} back in {:.2}s",
            self.job,
            blocks.len(),
            r.taken.iter().filter(|&&t| t).count(),
            forms.iter().flatten().count(),
            offered.elapsed().as_secs_f64()
        );
        forms
    }

    fn rejected(&self, _: &BlockId, _: &BlockKey) {
        if self.rejected.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "{}: the block store gave a form that is not the block it names; \
                 compressed here instead",
                self.job
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_metrics() -> Arc<crate::metrics::Metrics> {
        Arc::new(crate::metrics::Metrics::new(1, None, None))
    }

    /// A coordinator's address that accepts connections and never answers,
    /// as a link cut by a partition leaves an open connection.
    fn black_hole(rt: &tokio::runtime::Runtime) -> FarmClient {
        let l = (rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))).expect("listen");
        let url = format!("http://{}", l.local_addr().expect("address"));
        rt.spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let cfg = iukfarm_proto::ClientConfig {
            url,
            ..Default::default()
        };
        rt.block_on(iukfarm_proto::connect(&cfg)).expect("connects")
    }

    /// A coordinator that lies within the contract: every block is
    /// "busy", even to an ask that waits; it wants a thousand blocks; and
    /// it answers an offer of n blocks with n + 1 "taken" flags.
    struct Liar {
        asked: Arc<AtomicU64>,
    }

    type Chunks = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::Chunk, tonic::Status>> + Send>,
    >;
    type Statuses = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::ReleaseStatus, tonic::Status>> + Send>,
    >;

    fn no<T>() -> Result<tonic::Response<T>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    #[tonic::async_trait]
    impl v1::farm_server::Farm for Liar {
        async fn get_block(
            &self,
            _: tonic::Request<v1::GetBlockRequest>,
        ) -> Result<tonic::Response<v1::GetBlockReply>, tonic::Status> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            Ok(tonic::Response::new(v1::GetBlockReply {
                busy: true,
                ..Default::default()
            }))
        }

        async fn offer_blocks(
            &self,
            req: tonic::Request<v1::OfferBlocksRequest>,
        ) -> Result<tonic::Response<v1::OfferBlocksReply>, tonic::Status> {
            let n = req.into_inner().blocks.len();
            Ok(tonic::Response::new(v1::OfferBlocksReply {
                wanted: if n == 0 { 1000 } else { 0 },
                taken: vec![true; n + 1],
            }))
        }

        async fn register(
            &self,
            _: tonic::Request<v1::RegisterRequest>,
        ) -> Result<tonic::Response<v1::RegisterReply>, tonic::Status> {
            no()
        }
        async fn lease(
            &self,
            _: tonic::Request<v1::LeaseRequest>,
        ) -> Result<tonic::Response<v1::LeaseReply>, tonic::Status> {
            no()
        }
        async fn heartbeat(
            &self,
            _: tonic::Request<v1::HeartbeatRequest>,
        ) -> Result<tonic::Response<v1::HeartbeatReply>, tonic::Status> {
            no()
        }
        type FetchIsoStream = Chunks;
        async fn fetch_iso(
            &self,
            _: tonic::Request<v1::FetchIsoRequest>,
        ) -> Result<tonic::Response<Chunks>, tonic::Status> {
            no()
        }
        async fn upload(
            &self,
            _: tonic::Request<tonic::Streaming<v1::UploadMessage>>,
        ) -> Result<tonic::Response<v1::UploadReply>, tonic::Status> {
            no()
        }
        async fn fail(
            &self,
            _: tonic::Request<v1::FailRequest>,
        ) -> Result<tonic::Response<v1::FailReply>, tonic::Status> {
            no()
        }
        async fn put_block(
            &self,
            _: tonic::Request<v1::PutBlockRequest>,
        ) -> Result<tonic::Response<v1::PutBlockReply>, tonic::Status> {
            no()
        }
        async fn take_blocks(
            &self,
            _: tonic::Request<v1::TakeBlocksRequest>,
        ) -> Result<tonic::Response<v1::TakeBlocksReply>, tonic::Status> {
            no()
        }
        async fn status(
            &self,
            _: tonic::Request<v1::StatusRequest>,
        ) -> Result<tonic::Response<v1::ReleaseStatus>, tonic::Status> {
            no()
        }
        type WatchStream = Statuses;
        async fn watch(
            &self,
            _: tonic::Request<v1::StatusRequest>,
        ) -> Result<tonic::Response<Statuses>, tonic::Status> {
            no()
        }
        async fn cancel(
            &self,
            _: tonic::Request<v1::CancelRequest>,
        ) -> Result<tonic::Response<v1::CancelReply>, tonic::Status> {
            no()
        }
        type DownloadStream = Chunks;
        async fn download(
            &self,
            _: tonic::Request<v1::DownloadRequest>,
        ) -> Result<tonic::Response<Chunks>, tonic::Status> {
            no()
        }
    }

    fn liar(rt: &tokio::runtime::Runtime, asked: Arc<AtomicU64>) -> FarmClient {
        let l = (rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))).expect("listen");
        let url = format!("http://{}", l.local_addr().expect("address"));
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(v1::farm_server::FarmServer::new(Liar { asked }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        let cfg = iukfarm_proto::ClientConfig {
            url,
            ..Default::default()
        };
        rt.block_on(iukfarm_proto::connect(&cfg)).expect("connects")
    }

    #[test]
    fn a_lying_coordinator_is_taken_within_bounds() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let asked = Arc::new(AtomicU64::new(0));
        let fb = FarmBlocks::new(
            rt.handle().clone(),
            liar(&rt, asked.clone()),
            "w1",
            "l1",
            "j1",
            false,
            test_metrics(),
        );
        let [(id, key), ..] = blocks(1)[..] else {
            unreachable!()
        };
        // "Busy" to an ask that waits: asked again a bounded number of
        // times, then compressed here, and put.
        assert_eq!(fb.ask(&id, &key, false), Lookup::Compress);
        assert_eq!(asked.load(Ordering::SeqCst), u64::from(WAIT_ASKS));
        assert!(fb.costs().pending.contains_key(&key));
        // To an ask that may defer: done later.
        assert_eq!(fb.ask(&id, &key, true), Lookup::Busy);
        // A thousand blocks wanted: an offer the coordinator takes at most.
        assert_eq!(fb.helpers(), Some(iukfarm_proto::MAX_BLOCKS_PER_CALL));
        assert!(!fb.off.load(Ordering::SeqCst));
        // An answer that does not match the offer: nothing used, sharing
        // over for this job.
        let xz = XzConfig::for_block_size(1 << 20);
        let data = [vec![1u8; 1000], vec![2u8; 1000]];
        let offer: Vec<(BlockId, &[u8])> = data
            .iter()
            .map(|d| (BlockId::new(&xz, d), &d[..]))
            .collect();
        assert_eq!(fb.outsource(&xz, &offer), vec![None, None]);
        assert!(fb.off.load(Ordering::SeqCst));
        assert_eq!(fb.helpers(), None);
    }

    fn blocks(n: u8) -> Vec<(BlockId, BlockKey)> {
        let xz = XzConfig::for_block_size(1 << 20);
        (0..n)
            .map(|i| {
                let id = BlockId::new(&xz, &[i; 1000]);
                (id, id.key())
            })
            .collect()
    }

    #[test]
    fn asks_answered_busy_count_against_the_store_and_can_end_the_sharing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let fb = FarmBlocks::new(
            rt.handle().clone(),
            black_hole(&rt),
            "w1",
            "l1",
            "j1",
            false,
            test_metrics(),
        );
        let mut c = fb.costs();
        // 16 blocks compressed here in 1.6 s, their asks and puts 0.4 s.
        c.compressed = SAMPLES;
        c.compressed_bytes = SAMPLES << 20;
        c.compress_ns = Duration::from_millis(1600).as_nanos();
        c.overhead_ns = Duration::from_millis(400).as_nanos();
        // Busy answers up to half the compression time leave sharing on.
        for _ in 0..4 {
            fb.answered_busy(&mut c, Duration::from_millis(100));
        }
        assert!(!fb.off.load(Ordering::SeqCst));
        // One more, and the store costs more than it saves.
        fb.answered_busy(&mut c, Duration::from_millis(100));
        assert!(fb.off.load(Ordering::SeqCst));
        drop(c);
        assert!(
            fb.summary().contains(", 5 asks answered busy ("),
            "{}",
            fb.summary()
        );
    }

    #[test]
    fn a_cut_link_costs_a_job_one_timeout_then_it_compresses_alone() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let client = black_hole(&rt);
        let bound = CALL_TIMEOUT * 4;

        // Asking: the first get waits out its timeout, the rest do not ask.
        let fb = FarmBlocks::new(
            rt.handle().clone(),
            client.clone(),
            "w1",
            "l1",
            "j1",
            false,
            test_metrics(),
        );
        let t = Instant::now();
        for (id, key) in blocks(20) {
            assert!(fb.get(&id, &key).is_none());
        }
        assert!(t.elapsed() < bound, "20 gets took {:?}", t.elapsed());
        assert_eq!((fb.lookahead(), fb.helpers()), (0, None));
        assert!(fb.summary().ends_with("(then alone)"), "{}", fb.summary());

        // Sending: the link is cut after the store answered "compress it"
        // for every block. The puts go in the background, at most
        // PUTS_IN_FLIGHT at once; the first timeout ends the sharing, so
        // neither the compression threads nor the job's flush wait for
        // more than about two timeouts, whatever the number of blocks.
        let fb = FarmBlocks::new(
            rt.handle().clone(),
            client,
            "w1",
            "l2",
            "j2",
            false,
            test_metrics(),
        );
        let all = blocks(40);
        {
            let mut c = fb.costs();
            for (_, key) in &all {
                c.pending.insert(*key, (Instant::now(), Duration::ZERO));
            }
        }
        let t = Instant::now();
        for (id, key) in &all {
            fb.put(id, key, &Cached::Compressed(vec![1, 2, 3]));
        }
        let puts = t.elapsed();
        rt.block_on(fb.flush());
        let flushed = t.elapsed();
        assert!(
            puts < bound,
            "40 puts held the compression threads {puts:?}"
        );
        assert!(flushed < bound, "the job waited {flushed:?} for its puts");
        assert!(fb.off.load(Ordering::SeqCst));
        assert_eq!(fb.puts.available_permits(), PUTS_IN_FLIGHT as usize);
        assert!(
            fb.summary()
                .ends_with("0 compressed here and shared (then alone)"),
            "{}",
            fb.summary()
        );
    }
}
