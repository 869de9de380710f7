//! Work sharing: blocks that running jobs offer, for workers with a free
//! slot (helpers) to compress, so that one large IUK uses the cores of
//! every idle worker.
//!
//! A job offers blocks it has not started, taken from the far end of its
//! queue; a helper takes a batch (largest jobs first), gets the block
//! store's claims on them, compresses them and puts them in the store,
//! where the job gets them, checked, like any other form. Nothing here is
//! waited for long: an offer nobody takes within [`OFFER_WAIT`] is the
//! job's again, and a helper that goes silent (puts nothing for a while)
//! loses its claims (the store's rules), so the job compresses those
//! blocks itself. The
//! output bytes never depend on who compressed what.
//!
//! Offered blocks are held in memory, bounded by [`MAX_QUEUED_BYTES`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use iukfarm_engine::blockcache::BlockId;
use iukfarm_engine::sqfs::XzConfig;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long an offered block waits for a helper.
pub const OFFER_WAIT: Duration = Duration::from_secs(3);
/// How long a job asking whether helpers are idle waits for one.
pub const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How long a helper waits for blocks before asking again.
pub const TAKE_WAIT: Duration = Duration::from_secs(5);
/// Offered blocks held at once, all jobs together.
pub const MAX_QUEUED_BYTES: u64 = 256 << 20;
/// At most this many uncompressed bytes in one batch for a helper (the
/// gRPC messages are bounded at 16 MiB).
pub const MAX_BATCH_BYTES: u64 = 8 << 20;
/// At most this many blocks in one offer or one batch.
pub const MAX_BLOCKS: usize = iukfarm_proto::MAX_BLOCKS_PER_CALL;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OfferStats {
    pub offered: u64,
    pub helped: u64,
    pub given_back: u64,
    /// Uncompressed bytes handed to helpers.
    pub helper_bytes: u64,
}

pub struct Offered {
    pub id: BlockId,
    pub xz: XzConfig,
    pub data: Vec<u8>,
    from: String,
    /// The id of the job that offered it.
    pub job: String,
}

#[derive(Default)]
struct Inner {
    /// Untaken offers: largest job first, then in the order offered.
    queue: BTreeMap<(Reverse<u64>, u64), Offered>,
    queued_bytes: u64,
    /// Helpers waiting for blocks now, with how many they want.
    waiting: HashMap<String, usize>,
    seq: u64,
    stats: OfferStats,
}

#[derive(Default)]
pub struct Offers {
    inner: Mutex<Inner>,
    changed: Notify,
}

/// Counts a helper as waiting while its call lasts (a dropped call too).
struct Waiting<'a> {
    offers: &'a Offers,
    worker: String,
    want: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut g = self.offers.lock();
        if let Some(n) = g.waiting.get_mut(&self.worker) {
            *n = n.saturating_sub(self.want);
            if *n == 0 {
                g.waiting.remove(&self.worker);
            }
        }
    }
}

/// Withdraws an offer whose call was dropped before it settled.
struct Withdraw<'a> {
    offers: &'a Offers,
    keys: &'a [Option<(Reverse<u64>, u64)>],
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        self.offers.withdraw(self.keys);
    }
}

impl Offers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> OfferStats {
        self.lock().stats
    }

    /// Blocks that helpers other than `worker` want beyond those already
    /// offered; waits up to [`PROBE_WAIT`] for some.
    pub async fn wanted(&self, worker: &str) -> usize {
        let until = Instant::now() + PROBE_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let n = {
                let g = self.lock();
                let want: usize = (g.waiting.iter())
                    .filter(|(w, _)| w.as_str() != worker)
                    .map(|(_, n)| *n)
                    .sum();
                want.saturating_sub(g.queue.len())
            };
            if n > 0 || tokio::time::timeout_at(until, changed).await.is_err() {
                return n;
            }
        }
    }

    /// Offers `blocks` of `worker`'s job (`priority`: its size), past the
    /// memory bound none; the keys to [`settle`](Offers::settle) them.
    pub fn offer(
        &self,
        worker: &str,
        job: &str,
        priority: u64,
        blocks: Vec<(BlockId, XzConfig, Vec<u8>)>,
    ) -> Vec<Option<(Reverse<u64>, u64)>> {
        let mut keys = Vec::with_capacity(blocks.len());
        {
            let mut g = self.lock();
            for (id, xz, data) in blocks {
                let len = data.len() as u64;
                if g.queued_bytes + len > MAX_QUEUED_BYTES {
                    keys.push(None);
                    continue;
                }
                g.seq += 1;
                let key = (Reverse(priority), g.seq);
                g.queued_bytes += len;
                g.stats.offered += 1;
                g.queue.insert(
                    key,
                    Offered {
                        id,
                        xz,
                        data,
                        from: worker.to_string(),
                        job: job.to_string(),
                    },
                );
                keys.push(Some(key));
            }
        }
        self.changed.notify_waiters();
        keys
    }

    /// Waits until the offers under `keys` are taken, or [`OFFER_WAIT`]
    /// has passed; then withdraws those still here. Whether each was taken.
    /// A call dropped on the way (the job's worker hung up) withdraws them
    /// too: nobody would collect them.
    pub async fn settle(&self, keys: &[Option<(Reverse<u64>, u64)>]) -> Vec<bool> {
        let mut withdraw = Withdraw { offers: self, keys };
        let until = Instant::now() + OFFER_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let all_taken = {
                let g = self.lock();
                keys.iter().flatten().all(|k| !g.queue.contains_key(k))
            };
            if all_taken || tokio::time::timeout_at(until, changed).await.is_err() {
                break;
            }
        }
        let taken = self.withdraw(keys);
        // Settled: nothing left for the guard.
        withdraw.keys = &[];
        taken
    }

    /// Withdraws the offers under `keys` still here; whether each was taken.
    fn withdraw(&self, keys: &[Option<(Reverse<u64>, u64)>]) -> Vec<bool> {
        let mut g = self.lock();
        keys.iter()
            .map(|k| match k {
                None => false,
                Some(k) => match g.queue.remove(k) {
                    Some(o) => {
                        g.queued_bytes -= o.data.len() as u64;
                        g.stats.given_back += 1;
                        false
                    }
                    None => true,
                },
            })
            .collect()
    }

    /// Up to `max` blocks (and [`MAX_BATCH_BYTES`]) that other workers'
    /// jobs offered, the largest jobs' first; waits up to [`TAKE_WAIT`] for
    /// some. `claim` is asked for each: a block it refuses (someone else
    /// is compressing it, or has) counts as taken, for the job finds it in
    /// the store, but is not given to this helper.
    pub async fn take(
        &self,
        worker: &str,
        max: usize,
        claim: impl Fn(&BlockId) -> bool,
    ) -> Vec<Offered> {
        let max = max.clamp(1, MAX_BLOCKS);
        {
            let mut g = self.lock();
            *g.waiting.entry(worker.to_string()).or_insert(0) += max;
        }
        let _waiting = Waiting {
            offers: self,
            worker: worker.to_string(),
            want: max,
        };
        self.changed.notify_waiters();
        let until = Instant::now() + TAKE_WAIT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let batch = self.pick(worker, max, &claim);
            if !batch.is_empty() {
                self.changed.notify_waiters();
                return batch;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Vec::new();
            }
        }
    }

    fn pick(&self, worker: &str, max: usize, claim: &impl Fn(&BlockId) -> bool) -> Vec<Offered> {
        let mut g = self.lock();
        let mut batch: Vec<Offered> = Vec::new();
        let mut bytes = 0u64;
        let keys: Vec<_> = (g.queue.iter())
            .filter(|(_, o)| o.from != worker)
            .map(|(k, o)| (*k, o.data.len() as u64))
            .collect();
        for (k, len) in keys {
            if batch.len() == max || (!batch.is_empty() && bytes + len > MAX_BATCH_BYTES) {
                break;
            }
            let Some(o) = g.queue.remove(&k) else {
                continue;
            };
            g.queued_bytes -= len;
            if claim(&o.id) {
                bytes += len;
                g.stats.helped += 1;
                g.stats.helper_bytes += len;
                batch.push(o);
            }
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u8) -> (BlockId, XzConfig, Vec<u8>) {
        let xz = XzConfig::for_block_size(131072);
        let data = vec![seed; 1000];
        (BlockId::new(&xz, &data), xz, data)
    }

    #[tokio::test(start_paused = true)]
    async fn a_helper_takes_the_largest_jobs_blocks_first_and_never_its_own() {
        let o = Offers::default();
        let small = o.offer("w1", "j1", 10, vec![block(1)]);
        let large = o.offer("w2", "j2", 99, vec![block(2), block(3)]);
        // w2's helper does not take w2's own blocks.
        let got = o.take("w2", 4, |_| true).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data, block(1).2);
        let got = o.take("w3", 1, |_| true).await;
        assert_eq!(got[0].data, block(2).2);
        assert_eq!(o.settle(&small).await, vec![true]);
        // Block 3 was not taken within the offer's wait: given back.
        assert_eq!(o.settle(&large).await, vec![true, false]);
        let st = o.stats();
        assert_eq!((st.offered, st.helped, st.given_back), (3, 2, 1));
        assert_eq!(st.helper_bytes, 2000);
        assert!(o.take("w3", 4, |_| true).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_offer_whose_call_is_dropped_is_withdrawn() {
        let o = std::sync::Arc::new(Offers::default());
        let keys = o.offer("w1", "j1", 1, vec![block(6), block(7)]);
        let settling = {
            let o = o.clone();
            tokio::spawn(async move { o.settle(&keys).await })
        };
        tokio::task::yield_now().await;
        settling.abort();
        assert!(settling.await.unwrap_err().is_cancelled());
        assert!(o.take("w2", 4, |_| true).await.is_empty());
        let st = o.stats();
        assert_eq!((st.offered, st.given_back, st.helped), (2, 2, 0));
        assert_eq!(o.lock().queued_bytes, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn helpers_waiting_are_wanted_and_a_refused_claim_is_not_handed_out() {
        let o = std::sync::Arc::new(Offers::default());
        assert_eq!(o.wanted("w1").await, 0);
        let helper = {
            let o = o.clone();
            tokio::spawn(async move { o.take("w2", 3, |id| id.len != 1000).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(o.wanted("w1").await, 3);
        // A helper is not wanted for its own jobs.
        assert_eq!(o.wanted("w2").await, 0);
        let keys = o.offer("w1", "j1", 1, vec![block(5)]);
        // Claimed elsewhere: counted as taken (the job will find it in the
        // store), not given to the helper, which waits on.
        assert_eq!(o.settle(&keys).await, vec![true]);
        assert!(helper.await.unwrap().is_empty());
        assert_eq!(o.stats().helped, 0);
        // The helper's call is over: nobody waits any more.
        assert_eq!(o.wanted("w1").await, 0);
    }
}
