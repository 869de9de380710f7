//! The farm's block store: compressed blocks any worker of this release
//! made, for every other worker, so that a block of the new release is
//! compressed once in the whole farm rather than once per worker.
//!
//! A worker asks for a block (by [`BlockId`]) before compressing it. The
//! store answers with the stored form, or hands out a *claim*: compress it
//! and put it here. A worker asking for a claimed block waits for the
//! claimant's put while the claim is *live*: its claimant has put some form
//! within [`CLAIM_IDLE`] (of the claim, or of its last put), and the claim
//! is younger than [`CLAIM_MAX`]. A claimant that is working puts a form
//! every few blocks' time, however loaded its machine, so its claims do not
//! lapse and nothing is compressed twice; one that vanished, hung or never
//! answers loses them all [`CLAIM_IDLE`] after its last put, and the
//! blocks are claimed afresh. A job waits for the blocks it offered to
//! helpers, so a helper's claims lapse sooner: [`HELPER_IDLE`], or three
//! times the longest it has taken between puts while helping (its own
//! pace, measured here, never its word), up to [`CLAIM_IDLE`].
//!
//! Nothing is taken on trust: the key is derived here from the id, and a
//! compressed form must decompress to exactly the block the id names
//! ([`BlockId::admits`]). A worker that sends a wrong form has it and all
//! its earlier forms dropped, and is neither given claims nor heard again
//! for the rest of the release. Workers check what they receive as well.
//!
//! Forms are files under `.iukfarm/blocks/` (the index is in memory, a few
//! dozen bytes per block), bounded by a size cap past which the least
//! recently used go. The store lives as long as the release: it is emptied
//! when a run starts and removed when the release ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use iukfarm_engine::blockcache::{BlockId, BlockKey, Cached, MAX_BLOCK};
use tokio::sync::Notify;
// tokio's clock, so that tests can run the claims' deadlines on paused time.
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a claimant may go without putting any form before its claims
/// lapse: several times what one block takes to compress on a busy core.
pub const CLAIM_IDLE: Duration = Duration::from_secs(15);
/// How long a helper that has not yet shown its pace may hold blocks
/// without putting one: several times what a block takes on a busy core.
pub const HELPER_IDLE: Duration = Duration::from_secs(8);
/// No claim lasts longer, however busy its claimant (a hung compression
/// thread beside working ones).
pub const CLAIM_MAX: Duration = Duration::from_secs(120);
/// The longest one `get` call waits; a claim still live then is answered
/// [`Answer::Busy`], and the worker asks again (it gives up on a call
/// after 30 s, and on a block after a few asks).
pub const MAX_WAIT: Duration = Duration::from_secs(20);

/// What the store answers a worker asking for a block.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Found(Cached),
    /// Compress it here (the caller holds the claim, if it may have one).
    Compress,
    /// Another worker holds the claim: ask again later (at once from
    /// [`Store::get_unless_busy`]; from [`Store::get`] once it has waited
    /// [`MAX_WAIT`] for a claimant still working).
    Busy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub entries: u64,
    /// What the entries take: their files and the index.
    pub bytes: u64,
    pub cap: u64,
    /// Forms given to workers, their uncompressed bytes, and the bytes
    /// sent (what crossed the network).
    pub served: u64,
    pub served_bytes: u64,
    pub sent_bytes: u64,
    /// Bytes of the forms workers put (duplicates and refused ones too).
    pub received_bytes: u64,
    /// Forms accepted.
    pub stored: u64,
    /// Puts of a block the store had already been given: compressed twice.
    pub duplicates: u64,
    /// Forms refused (wrong, or from a worker no longer heard).
    pub refused: u64,
    pub evicted: u64,
    /// Claims that lapsed before their put: the claimant went silent, or
    /// held the claim [`CLAIM_MAX`].
    pub expired_claims: u64,
}

struct Entry {
    /// 0 for the "stored uncompressed" marker, which has no file.
    len: u64,
    raw_len: u64,
    from: String,
    used: u64,
}

struct Claim {
    worker: String,
    at: Instant,
    /// Taken by the worker's helper (for another job), not by a job of its
    /// own: the worker's next job waits for it like anyone else's.
    helping: bool,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<BlockKey, Entry>,
    /// Entries by last use, oldest first.
    lru: BTreeMap<u64, BlockKey>,
    claims: HashMap<BlockKey, Claim>,
    /// When each worker last put a form: its claims live on while it does.
    progress: HashMap<String, Instant>,
    /// Per helper, the longest it took to put a block it was helping with
    /// (since that claim, or its previous put if later).
    helper_pace: HashMap<String, Duration>,
    /// Forms of each worker that arrived and are being checked here: the
    /// coordinator's own time, which its claims do not lapse over.
    checking: HashMap<String, u32>,
    /// Every key ever accepted, to count blocks compressed twice even
    /// after their form was evicted.
    seen: HashSet<BlockKey>,
    /// Workers that sent a wrong form, with the count.
    bad: HashMap<String, u64>,
    /// Per worker whose forms were served, the workers they went to.
    served: HashMap<String, HashSet<String>>,
    seq: u64,
    stats: StoreStats,
}

pub struct Store {
    dir: PathBuf,
    inner: Mutex<Inner>,
    put_done: Notify,
    /// Whether this run emptied the directory: a run that refused to start
    /// never did, and must leave it alone.
    opened: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Whether `c` still holds other workers off the block.
    fn live(&self, c: &Claim, now: Instant) -> bool {
        now < self.claim_deadline(c)
    }

    fn claim_deadline(&self, c: &Claim) -> Instant {
        if self.checking.get(&c.worker).is_some_and(|&n| n > 0) {
            return c.at + CLAIM_MAX;
        }
        let last = (self.progress.get(&c.worker).copied()).map_or(c.at, |p| p.max(c.at));
        let idle = if c.helping {
            let pace = self.helper_pace.get(&c.worker).copied().unwrap_or_default();
            (pace * 3).clamp(HELPER_IDLE, CLAIM_IDLE)
        } else {
            CLAIM_IDLE
        };
        (last + idle).min(c.at + CLAIM_MAX)
    }
}

impl Store {
    /// A store in `dir`, bounded to `cap` bytes of forms; nothing is
    /// touched on disk before [`reset`](Store::reset).
    pub fn new(dir: PathBuf, cap: u64) -> Store {
        let inner = Inner {
            stats: StoreStats {
                cap,
                ..Default::default()
            },
            ..Default::default()
        };
        Store {
            dir,
            inner: Mutex::new(inner),
            put_done: Notify::new(),
            opened: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the store's directory (forms of an earlier run are not
    /// trusted: the workers that made them are gone).
    pub fn reset(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&self.dir)?;
        self.opened.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Removes the store's files, if this run made them; the counters stay.
    pub fn close(&self) {
        if !self.opened.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut g = self.lock();
        g.entries.clear();
        g.lru.clear();
        g.claims.clear();
        g.stats.entries = 0;
        g.stats.bytes = 0;
        drop(g);
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", self.dir.display());
        }
    }

    pub fn stats(&self) -> StoreStats {
        self.lock().stats
    }

    /// Wrong forms `worker` sent.
    pub fn bad_blocks(&self, worker: &str) -> u64 {
        self.lock().bad.get(worker).copied().unwrap_or(0)
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        self.dir.join(key.hex())
    }

    /// The stored form of `id`, or a claim on it for `worker`.
    pub async fn get(&self, worker: &str, id: &BlockId) -> Answer {
        self.lookup(worker, id, true).await
    }

    /// [`Store::get`], except that a block another worker has claimed is
    /// [`Answer::Busy`] at once rather than waited for.
    pub async fn get_unless_busy(&self, worker: &str, id: &BlockId) -> Answer {
        self.lookup(worker, id, false).await
    }

    async fn lookup(&self, worker: &str, id: &BlockId, wait: bool) -> Answer {
        if id.len == 0 || id.len > MAX_BLOCK {
            return Answer::Compress;
        }
        let key = id.key();
        let asked = Instant::now();
        loop {
            let waiting = self.put_done.notified();
            tokio::pin!(waiting);
            // Registered before the state is looked at: no put is missed.
            waiting.as_mut().enable();
            let until = {
                let mut g = self.lock();
                if let Some(form) = self.take(&mut g, &key, worker) {
                    return Answer::Found(form);
                }
                let now = Instant::now();
                let theirs = (g.claims.get(&key)).filter(|c| c.worker != worker || c.helping);
                let live = theirs.is_some_and(|c| g.live(c, now));
                match theirs {
                    Some(_) if live && !wait => return Answer::Busy,
                    // Woken by every put, so a claimant's progress moves
                    // the deadline on.
                    Some(c) if live && now < asked + MAX_WAIT => {
                        g.claim_deadline(c).min(asked + MAX_WAIT)
                    }
                    Some(_) if live => return Answer::Busy,
                    _ => {
                        if theirs.is_some() {
                            g.stats.expired_claims += 1;
                        }
                        if g.bad.contains_key(worker) {
                            g.claims.remove(&key);
                        } else {
                            g.claims.insert(
                                key,
                                Claim {
                                    worker: worker.to_string(),
                                    at: now,
                                    helping: false,
                                },
                            );
                        }
                        return Answer::Compress;
                    }
                }
            };
            let _ = tokio::time::timeout_at(until, waiting).await;
        }
    }

    /// The form of `key` if stored and readable (a file gone or damaged
    /// is dropped, and the block compressed again).
    fn take(&self, g: &mut Inner, key: &BlockKey, to: &str) -> Option<Cached> {
        let e = g.entries.get(key)?;
        let (len, raw_len) = (e.len, e.raw_len);
        let from = e.from.clone();
        let form = if len == 0 {
            Some(Cached::Uncompressed)
        } else {
            std::fs::read(self.path(key))
                .ok()
                .filter(|b| b.len() as u64 == len)
                .map(Cached::Compressed)
        };
        match form {
            Some(f) => {
                g.seq += 1;
                let seq = g.seq;
                if let Some(e) = g.entries.get_mut(key) {
                    let old = std::mem::replace(&mut e.used, seq);
                    g.lru.remove(&old);
                    g.lru.insert(seq, *key);
                }
                (g.served.entry(from).or_default()).insert(to.to_string());
                g.stats.served += 1;
                g.stats.served_bytes += raw_len;
                g.stats.sent_bytes += len;
                Some(f)
            }
            None => {
                self.remove(g, key);
                None
            }
        }
    }

    /// A form from `worker` arrived: it is working. Counted before the form
    /// is checked or audited, which can take the coordinator longer than
    /// the helper took to compress it.
    pub fn arrived(&self, worker: &str, id: &BlockId) {
        let key = id.key();
        let mut g = self.lock();
        if g.bad.contains_key(worker) {
            return;
        }
        let now = Instant::now();
        if let Some(c) = g
            .claims
            .get(&key)
            .filter(|c| c.worker == worker && c.helping)
        {
            let since = (g.progress.get(worker).copied()).map_or(c.at, |p| p.max(c.at));
            let took = now - since;
            let pace = g.helper_pace.entry(worker.to_string()).or_default();
            *pace = (*pace).max(took);
        }
        g.progress.insert(worker.to_string(), now);
        *g.checking.entry(worker.to_string()).or_default() += 1;
    }

    /// The form whose arrival was counted has been dealt with.
    pub fn checked(&self, worker: &str) {
        let mut g = self.lock();
        if let Some(n) = g.checking.get_mut(worker) {
            *n = n.saturating_sub(1);
        }
        if !g.bad.contains_key(worker) {
            g.progress.insert(worker.to_string(), Instant::now());
        }
    }

    /// Takes `worker`'s form of `id` if it is sound; `false` if refused.
    /// Checking decompresses the form: call it off the async threads.
    pub fn put(&self, worker: &str, id: &BlockId, form: &Cached) -> bool {
        self.arrived(worker, id);
        self.keep(worker, id, form)
    }

    /// [`Store::put`] of a form whose arrival was already counted.
    pub fn keep(&self, worker: &str, id: &BlockId, form: &Cached) -> bool {
        let accepted = self.keep_checked(worker, id, form);
        self.checked(worker);
        accepted
    }

    fn keep_checked(&self, worker: &str, id: &BlockId, form: &Cached) -> bool {
        let key = id.key();
        let banned = self.lock().bad.contains_key(worker);
        // The settings are not on the wire (the id digests them): the jobs
        // that take a form check its container.
        let sound = !banned && id.admits(None, form);
        let mut g = self.lock();
        if let Cached::Compressed(b) = form {
            g.stats.received_bytes += b.len() as u64;
        }
        if !banned {
            g.progress.insert(worker.to_string(), Instant::now());
        }
        if g.claims.get(&key).is_some_and(|c| c.worker == worker) {
            g.claims.remove(&key);
        }
        // Banned by a put checked meanwhile: only the first wrong form counts.
        let accepted = if banned || g.bad.contains_key(worker) {
            g.stats.refused += 1;
            false
        } else if !sound {
            self.ban(&mut g, worker);
            false
        } else if !g.seen.insert(key) {
            g.stats.duplicates += 1;
            let first = g.entries.get(&key).map_or("(evicted)", |e| e.from.as_str());
            info!(
                "block {} compressed twice: put by {first}, then by {worker}",
                &key.hex()[..16]
            );
            true
        } else {
            self.insert(&mut g, worker, key, id.len, form);
            true
        };
        drop(g);
        self.put_done.notify_waiters();
        accepted
    }

    /// Bans `worker` from sharing for `why` (its audited form was not our
    /// encoder's): as for a wrong form. Returns the workers its forms were
    /// served to.
    pub fn ban_worker(&self, worker: &str, why: &str) -> HashSet<String> {
        let mut g = self.lock();
        // Banned by a form checked meanwhile: only the first counts.
        if g.bad.contains_key(worker) {
            g.stats.refused += 1;
        } else {
            warn!("worker {worker}: {why}");
            self.ban(&mut g, worker);
        }
        let to = g.served.get(worker).cloned().unwrap_or_default();
        drop(g);
        self.put_done.notify_waiters();
        to
    }

    fn ban(&self, g: &mut Inner, worker: &str) {
        g.stats.refused += 1;
        let n = g.bad.entry(worker.to_string()).or_insert(0);
        *n += 1;
        if *n > 1 {
            return;
        }
        warn!(
            "worker {worker} sent a compressed block that is not one we can use: \
             its blocks are dropped and no more are taken from it in this release"
        );
        let theirs: Vec<BlockKey> = (g.entries.iter())
            .filter(|(_, e)| e.from == worker)
            .map(|(k, _)| *k)
            .collect();
        for k in theirs {
            self.remove(g, &k);
            // Someone else's put of it will be a first again.
            g.seen.remove(&k);
        }
        g.claims.retain(|_, c| c.worker != worker);
    }

    fn insert(&self, g: &mut Inner, worker: &str, key: BlockKey, raw_len: u64, form: &Cached) {
        let len = match form {
            Cached::Uncompressed => 0,
            Cached::Compressed(b) => {
                let tmp = self.dir.join(format!("{}.tmp", key.hex()));
                let written =
                    std::fs::write(&tmp, b).and_then(|_| std::fs::rename(&tmp, self.path(&key)));
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&tmp);
                    warn!("block store: {e}");
                    g.seen.remove(&key);
                    return;
                }
                b.len() as u64
            }
        };
        g.seq += 1;
        let used = g.seq;
        g.entries.insert(
            key,
            Entry {
                len,
                raw_len,
                from: worker.to_string(),
                used,
            },
        );
        g.lru.insert(used, key);
        g.stats.entries += 1;
        g.stats.bytes += charge(len);
        g.stats.stored += 1;
        while g.stats.bytes > g.stats.cap {
            let Some((_, oldest)) = g.lru.first_key_value().map(|(s, k)| (*s, *k)) else {
                break;
            };
            self.remove(g, &oldest);
            g.stats.evicted += 1;
        }
    }

    fn remove(&self, g: &mut Inner, key: &BlockKey) {
        if let Some(e) = g.entries.remove(key) {
            g.lru.remove(&e.used);
            g.stats.entries -= 1;
            g.stats.bytes -= charge(e.len);
            if e.len > 0 {
                let _ = std::fs::remove_file(self.path(key));
            }
        }
    }

    /// Gives a helper the claim on a block a job offered: `false` if the
    /// block is stored, claimed (by another worker, or by this one for its
    /// own job: it would compress the block twice), or the helper is no
    /// longer heard. Either way the job finds the form in the store.
    pub fn claim(&self, worker: &str, id: &BlockId) -> bool {
        let key = id.key();
        let mut g = self.lock();
        if g.bad.contains_key(worker) || g.entries.contains_key(&key) {
            return false;
        }
        let now = Instant::now();
        if g.claims.get(&key).is_some_and(|c| g.live(c, now)) {
            return false;
        }
        g.claims.insert(
            key,
            Claim {
                worker: worker.to_string(),
                at: now,
                helping: true,
            },
        );
        true
    }

    /// Drops the claims of a worker that is gone, so that nobody waits for
    /// them.
    pub fn forget(&self, worker: &str) {
        let mut g = self.lock();
        g.claims.retain(|_, c| c.worker != worker);
        drop(g);
        self.put_done.notify_waiters();
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What an entry counts against the cap: its file and its share of the
/// index, so that markers (which have no file) are bounded too.
fn charge(len: u64) -> u64 {
    len + 128
}

#[cfg(test)]
mod tests {
    use super::*;
    use iukfarm_engine::sqfs::compress::XzConfig;

    fn block(seed: u8) -> (BlockId, Cached) {
        let cfg = XzConfig::for_block_size(131072);
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 13) as u8 ^ seed) % 7)
            .collect();
        let form = Cached::Compressed(cfg.compress(&data).unwrap().unwrap());
        (BlockId::new(&cfg, &data), form)
    }

    fn store(cap: u64) -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path().join("blocks"), cap);
        s.reset().unwrap();
        (d, s)
    }

    #[tokio::test]
    async fn a_block_is_claimed_once_then_served() {
        let (_d, s) = store(1 << 30);
        let (id, form) = block(1);
        assert_eq!(s.get("w1", &id).await, Answer::Compress);
        // w2 waits for w1's put.
        let (got, ()) = tokio::join!(s.get("w2", &id), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(s.put("w1", &id, &form));
        });
        assert_eq!(got, Answer::Found(form.clone()));
        assert_eq!(s.get("w3", &id).await, Answer::Found(form.clone()));
        // A second put of the same block was compressed twice.
        assert!(s.put("w2", &id, &form));
        let st = s.stats();
        assert_eq!(
            (st.stored, st.served, st.duplicates, st.refused),
            (1, 2, 1, 0)
        );
        assert_eq!(st.served_bytes, 2 * id.len);
    }

    #[tokio::test]
    async fn a_block_claimed_elsewhere_is_busy_for_those_who_will_not_wait() {
        let (_d, s) = store(1 << 20);
        let (id, form) = block(7);
        assert_eq!(s.get_unless_busy("w1", &id).await, Answer::Compress);
        let t = Instant::now();
        assert_eq!(s.get_unless_busy("w2", &id).await, Answer::Busy);
        assert!(t.elapsed() < Duration::from_millis(100), "it waited");
        // The claimant's own ask is not busy, nor is a stored block.
        assert_eq!(s.get_unless_busy("w1", &id).await, Answer::Compress);
        assert!(s.put("w1", &id, &form));
        assert_eq!(s.get_unless_busy("w2", &id).await, Answer::Found(form));
    }

    #[tokio::test]
    async fn a_helper_is_not_given_a_block_its_own_job_is_compressing() {
        let (_d, s) = store(1 << 30);
        let (id, form) = block(9);
        assert_eq!(s.get("w2", &id).await, Answer::Compress);
        // w1's job offers the same block; w2, idle meanwhile, asks for work.
        assert!(!s.claim("w2", &id));
        assert!(s.put("w2", &id, &form));
        assert_eq!(s.get("w1", &id).await, Answer::Found(form));
        assert_eq!(s.stats().duplicates, 0);
    }

    #[tokio::test]
    async fn a_workers_next_job_waits_for_the_block_its_helper_is_compressing() {
        let (_d, s) = store(1 << 30);
        let (id, form) = block(10);
        // w1, idle, helps w2's job with a block of the new release; then w1
        // is given a job of its own that needs the same block.
        assert!(s.claim("w1", &id));
        let (got, ()) = tokio::join!(s.get("w1", &id), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(s.put("w1", &id, &form));
        });
        assert_eq!(got, Answer::Found(form));
        assert_eq!(s.stats().duplicates, 0);
        // A claim of a job of its own is not waited for: nothing else of
        // that worker would put it.
        let (id2, _) = block(11);
        assert_eq!(s.get("w1", &id2).await, Answer::Compress);
        assert_eq!(s.get("w1", &id2).await, Answer::Compress);
    }

    #[tokio::test]
    async fn a_helper_claims_an_offered_block_and_the_job_waits_for_its_put() {
        let (_d, s) = store(1 << 30);
        let (id, form) = block(7);
        assert!(s.claim("helper", &id));
        // Claimed: no second helper, not the same one twice, and the job
        // waits for the put.
        assert!(!s.claim("other", &id));
        assert!(!s.claim("helper", &id));
        let (got, ()) = tokio::join!(s.get("job", &id), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(s.put("helper", &id, &form));
        });
        assert_eq!(got, Answer::Found(form.clone()));
        // Stored: nothing to claim.
        assert!(!s.claim("other", &id));
        // A worker no longer heard gets no claim.
        let (id2, form2) = block(8);
        let Cached::Compressed(mut bad) = form2 else {
            unreachable!()
        };
        bad[0] ^= 1;
        assert!(!s.put("liar", &id2, &Cached::Compressed(bad)));
        assert!(!s.claim("liar", &id2));
        assert_eq!(s.stats().duplicates, 0);
    }

    /// The cause of duplicates on a loaded machine: a helper holding a
    /// batch (and the next one) took longer than a fixed claim lifetime.
    #[tokio::test(start_paused = true)]
    async fn a_working_claimant_keeps_its_claims_and_a_silent_one_loses_them() {
        let (_d, s) = store(1 << 30);
        let (wanted, wanted_form) = block(20);
        assert!(s.claim("helper", &wanted));
        // The helper puts other blocks, the first after 4 s (within
        // HELPER_IDLE), then one every 5 s, for longer than
        // 4 × CLAIM_IDLE before the one the job waits for; each of the job's
        // asks ends at MAX_WAIT with "busy", and it asks again, as a job's
        // compression thread does.
        let t = Instant::now();
        let mut busy = 0;
        let job = async {
            loop {
                match s.get("job", &wanted).await {
                    Answer::Found(f) => return f,
                    Answer::Busy => busy += 1,
                    Answer::Compress => panic!("told to compress after {:?}", t.elapsed()),
                }
            }
        };
        let helper = async {
            for seed in 0..13 {
                let (id, form) = block(100 + seed);
                assert!(s.claim("helper", &id));
                let pace = if seed == 0 { 4 } else { 5 };
                tokio::time::sleep(Duration::from_secs(pace)).await;
                assert!(s.put("helper", &id, &form));
            }
            assert!(s.put("helper", &wanted, &wanted_form));
        };
        let (got, ()) = tokio::join!(job, helper);
        assert_eq!(got, wanted_form);
        assert_eq!(t.elapsed(), Duration::from_secs(64));
        assert!(t.elapsed() > CLAIM_IDLE * 4 && t.elapsed() < CLAIM_MAX);
        assert_eq!(busy, 3);
        let st = s.stats();
        assert_eq!((st.expired_claims, st.duplicates), (0, 0), "{st:?}");

        // A helper that takes a block and never answers (alive or not)
        // loses it CLAIM_IDLE after its last put.
        let (taken, _) = block(21);
        assert!(s.claim("helper", &taken));
        let t = Instant::now();
        assert_eq!(s.get("job", &taken).await, Answer::Compress);
        assert_eq!(t.elapsed(), CLAIM_IDLE);
        assert_eq!(s.stats().expired_claims, 1);

        // However busy its claimant, no claim outlives CLAIM_MAX.
        let (stuck, _) = block(22);
        assert!(s.claim("helper", &stuck));
        let t = Instant::now();
        let job = async {
            while s.get("job", &stuck).await == Answer::Busy {}
            t.elapsed()
        };
        let busy = async {
            for seed in 0..(CLAIM_MAX.as_secs() / 5 + 2) as u8 {
                let (id, form) = block(150 + seed);
                tokio::time::sleep(Duration::from_secs(5)).await;
                s.put("helper", &id, &form);
            }
        };
        let (waited, ()) = tokio::join!(job, busy);
        assert_eq!(waited, CLAIM_MAX);
        assert_eq!(s.stats().expired_claims, 2);
    }

    /// A job waits for the blocks it offered: a helper that takes some and
    /// does not answer loses them within seconds, unless it has shown it
    /// needs longer (its pace measured here, not its word).
    #[tokio::test(start_paused = true)]
    async fn a_helper_that_does_not_answer_loses_its_blocks_within_seconds() {
        let (_d, s) = store(1 << 30);
        // A helper that never put anything.
        let (a, _) = block(30);
        assert!(s.claim("new", &a));
        let t = Instant::now();
        assert_eq!(s.get("job", &a).await, Answer::Compress);
        assert_eq!(t.elapsed(), HELPER_IDLE);
        // One that put a block in 200 ms, then went silent.
        let (b, form_b) = block(31);
        let (c, _) = block(32);
        assert!(s.claim("fast", &b) && s.claim("fast", &c));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.put("fast", &b, &form_b));
        let t = Instant::now();
        assert_eq!(s.get("job", &c).await, Answer::Compress);
        assert_eq!(t.elapsed(), HELPER_IDLE);
        // A slow one, 4 s a block: three times that, however it got slow.
        let (d, form_d) = block(33);
        let (e, _) = block(34);
        assert!(s.claim("slow", &d) && s.claim("slow", &e));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(s.put("slow", &d, &form_d));
        let t = Instant::now();
        assert_eq!(s.get("job", &e).await, Answer::Compress);
        assert_eq!(t.elapsed(), Duration::from_secs(12));
        // While the coordinator checks (audits) a form of a helper's, that
        // is its own time: the helper's claims stand.
        let (g, _) = block(36);
        let (h, form_h) = block(37);
        assert!(s.claim("audited", &g) && s.claim("audited", &h));
        s.arrived("audited", &h);
        tokio::time::sleep(HELPER_IDLE * 2).await;
        assert_eq!(s.get_unless_busy("job", &g).await, Answer::Busy);
        assert!(s.keep("audited", &h, &form_h));
        // A job's own claim is CLAIM_IDLE, as before.
        let (f, _) = block(35);
        assert_eq!(s.get("builder", &f).await, Answer::Compress);
        let t = Instant::now();
        assert_eq!(s.get("job", &f).await, Answer::Compress);
        assert_eq!(t.elapsed(), CLAIM_IDLE);
        assert_eq!(s.stats().expired_claims, 4);
    }

    #[tokio::test]
    async fn a_vanished_claimant_is_not_waited_for() {
        let (_d, s) = store(1 << 30);
        let (id, _) = block(2);
        assert_eq!(s.get("w1", &id).await, Answer::Compress);
        s.forget("w1");
        let t = Instant::now();
        assert_eq!(s.get("w2", &id).await, Answer::Compress);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_wrong_form_is_refused_and_its_sender_no_longer_heard() {
        let (_d, s) = store(1 << 30);
        let (id1, form1) = block(3);
        let (id2, form2) = block(4);
        assert!(s.put("liar", &id1, &form1));
        let Cached::Compressed(mut bad) = form2.clone() else {
            unreachable!()
        };
        let n = bad.len() / 2;
        bad[n] ^= 1;
        assert!(!s.put("liar", &id2, &Cached::Compressed(bad)));
        assert_eq!(s.bad_blocks("liar"), 1);
        // A sound form, but under another block's id.
        assert!(!s.put("liar2", &id2, &form1));
        assert_eq!(s.bad_blocks("liar2"), 1);
        // Once refused, not heard again, whatever it sends.
        assert!(!s.put("liar", &id2, &form2));
        // Its earlier, sound-looking form is dropped too; no claims for it.
        assert_eq!(s.get("liar", &id1).await, Answer::Compress);
        assert_eq!(s.get("honest", &id1).await, Answer::Compress);
        assert!(s.put("honest", &id1, &form1));
        assert_eq!(s.get("liar", &id1).await, Answer::Found(form1));
        let st = s.stats();
        assert_eq!((st.refused, st.duplicates, st.entries), (3, 0, 1));
        assert_eq!(s.bad_blocks("liar"), 1);
    }

    #[tokio::test]
    async fn the_store_stays_within_its_cap() {
        let (_d, s) = store(0);
        let forms: Vec<_> = (10..16).map(block).collect();
        let one = match &forms[0].1 {
            Cached::Compressed(b) => charge(b.len() as u64),
            Cached::Uncompressed => unreachable!(),
        };
        let s = Store::new(s.dir().to_path_buf(), 2 * one + one / 2);
        s.reset().unwrap();
        for (id, f) in &forms {
            assert!(s.put("w", id, f));
            assert!(s.stats().bytes <= s.stats().cap);
        }
        let st = s.stats();
        assert_eq!((st.entries, st.evicted), (2, 4));
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 2);
        assert_eq!(
            s.get("w", &forms[5].0).await,
            Answer::Found(forms[5].1.clone())
        );
        s.close();
        assert!(!s.dir().exists());
    }

    #[test]
    fn a_run_that_never_opened_the_store_leaves_its_directory_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("blocks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("left-by-a-killed-run"), b"x").unwrap();
        Store::new(dir.clone(), 1 << 20).close();
        assert!(dir.join("left-by-a-killed-run").exists());
    }
}
