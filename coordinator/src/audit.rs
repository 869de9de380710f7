//! Audits of helpers' forms. A form a helper sends is checked by the store
//! (it decompresses to the block its id names) and by the job that takes
//! it (our writer's container); what no check short of compressing again
//! can tell is whether it is the form our encoder makes, byte for byte.
//! So the coordinator compresses again a sample of the blocks each helper
//! takes, and compares before the form is stored: the first [`FIRST`] a
//! helper takes, then those a keyed hash picks at [`RATE`] in 1024 (a key
//! of this run's, so a helper cannot tell which of its blocks are
//! audited). A form that differs bans the helper from sharing, and every
//! job that may have used its forms is built again without the store
//! ([`crate::release`]).
//!
//! What audited blocks cost: one compression each, on the coordinator
//! (measured in BENCHMARKS.md). Their blocks are held in memory from the
//! take to the put, [`MAX_HELD`] at most; past that, blocks are not
//! sampled.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use iukfarm_engine::blockcache::{BlockId, BlockKey, Cached};
use iukfarm_engine::sqfs::XzConfig;
use sha2::{Digest, Sha256};

/// Every helper's first blocks are all audited.
pub const FIRST: u64 = 4;
/// Of the rest, this many in 1024.
pub const RATE: u64 = 64;
/// Audited blocks held at once, waiting for their forms.
pub const MAX_HELD: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AuditStats {
    /// Forms compressed again and compared.
    pub checked: u64,
    pub failed: u64,
    /// CPU time the compressions took here.
    pub seconds: f64,
}

/// What an audit found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not sampled: nothing was compared.
    NotAudited,
    Same,
    Differs,
}

struct Held {
    helper: String,
    xz: XzConfig,
    data: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    held: HashMap<BlockKey, Held>,
    held_bytes: u64,
    /// Blocks each helper took.
    taken: HashMap<String, u64>,
    /// The jobs each helper compressed blocks for.
    helped: HashMap<String, HashSet<String>>,
    stats: AuditStats,
}

pub struct Audits {
    secret: [u8; 32],
    /// In 1024, past a helper's first [`FIRST`].
    rate: u64,
    inner: Mutex<Inner>,
}

impl Audits {
    pub fn new(rate: u64) -> Audits {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the system's random source");
        Audits {
            secret,
            rate,
            inner: Mutex::default(),
        }
    }
}

impl Default for Audits {
    fn default() -> Self {
        Audits::new(RATE)
    }
}

impl Audits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> AuditStats {
        self.lock().stats
    }

    fn sampled(&self, key: &BlockKey) -> bool {
        let h = Sha256::new()
            .chain_update(self.secret)
            .chain_update(key.hex())
            .finalize();
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % 1024 < self.rate
    }

    /// `helper` took a block of job `job` to compress: keep it if sampled.
    pub fn taken(&self, helper: &str, job: &str, id: &BlockId, xz: &XzConfig, data: &[u8]) {
        let key = id.key();
        let sampled = self.sampled(&key);
        let mut g = self.lock();
        (g.helped.entry(helper.to_string()).or_default()).insert(job.to_string());
        let n = g.taken.entry(helper.to_string()).or_default();
        *n += 1;
        let audit = *n <= FIRST || sampled;
        let len = data.len() as u64;
        if audit && g.held_bytes + len <= MAX_HELD && !g.held.contains_key(&key) {
            g.held_bytes += len;
            let held = Held {
                helper: helper.to_string(),
                xz: *xz,
                data: data.to_vec(),
            };
            g.held.insert(key, held);
        }
    }

    /// Compares `helper`'s form of `id` with ours, if the block was
    /// audited. Compresses: call it off the async threads.
    pub fn check(&self, helper: &str, id: &BlockId, form: &Cached) -> Verdict {
        let key = id.key();
        let held = {
            let mut g = self.lock();
            match g.held.get(&key) {
                Some(h) if h.helper == helper => {
                    let h = g.held.remove(&key).expect("just seen");
                    g.held_bytes -= h.data.len() as u64;
                    h
                }
                _ => return Verdict::NotAudited,
            }
        };
        let started = cpu_time();
        let ours = match held.xz.compress_here(&held.data) {
            Ok(Some(c)) => Cached::Compressed(c),
            Ok(None) => Cached::Uncompressed,
            // Our own compression failing says nothing of the helper.
            Err(_) => return Verdict::NotAudited,
        };
        let same = ours == *form;
        let mut g = self.lock();
        g.stats.checked += 1;
        g.stats.seconds += cpu_time() - started;
        if same {
            Verdict::Same
        } else {
            g.stats.failed += 1;
            Verdict::Differs
        }
    }

    /// The jobs `helper` compressed blocks for; drops what is held for it.
    pub fn ban(&self, helper: &str) -> HashSet<String> {
        let mut g = self.lock();
        let gone: Vec<BlockKey> = (g.held.iter())
            .filter(|(_, h)| h.helper == helper)
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some(h) = g.held.remove(&k) {
                g.held_bytes -= h.data.len() as u64;
            }
        }
        g.helped.get(helper).cloned().unwrap_or_default()
    }
}

/// This thread's CPU time, in seconds.
fn cpu_time() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u32) -> (BlockId, XzConfig, Vec<u8>) {
        let xz = XzConfig::for_block_size(131072);
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| ((i / 7).wrapping_mul(seed + 3) % 61) as u8)
            .collect();
        (BlockId::new(&xz, &data), xz, data)
    }

    #[test]
    fn a_helpers_first_forms_are_compressed_again_and_compared() {
        let a = Audits::default();
        let (id, xz, data) = block(1);
        a.taken("h", "job1", &id, &xz, &data);
        let ours = Cached::Compressed(xz.compress_here(&data).unwrap().unwrap());
        assert_eq!(a.check("h", &id, &ours), Verdict::Same);
        // Once checked, not again; another helper's put is not audited.
        assert_eq!(a.check("h", &id, &ours), Verdict::NotAudited);
        let (id2, xz2, data2) = block(2);
        a.taken("h", "job2", &id2, &xz2, &data2);
        assert_eq!(a.check("other", &id2, &ours), Verdict::NotAudited);
        // A sound form that is not our encoder's: stored uncompressed.
        assert_eq!(a.check("h", &id2, &Cached::Uncompressed), Verdict::Differs);
        let st = a.stats();
        assert_eq!((st.checked, st.failed), (2, 1));
        assert!(st.seconds > 0.0);
        let jobs = a.ban("h");
        assert_eq!(jobs.len(), 2);
        assert_eq!(a.lock().held_bytes, 0);
    }

    #[test]
    fn past_the_first_a_keyed_sample_and_bounded_memory() {
        let a = Audits::default();
        let (id, xz, data) = block(9);
        for n in 0..2000u32 {
            // Ids only: the sample is drawn on the key.
            let id = BlockId::new(&xz, &n.to_le_bytes());
            a.taken("h", "job", &id, &xz, &n.to_le_bytes());
        }
        let held = a.lock().held.len() as u64;
        // 4 + about 2000 × 64 / 1024 = 125.
        assert!((FIRST + 60..FIRST + 200).contains(&held), "{held}");
        // Never more than MAX_HELD bytes waiting.
        let big = vec![7u8; 1 << 20];
        for n in 0..100u32 {
            let mut d = big.clone();
            d[..4].copy_from_slice(&n.to_le_bytes());
            a.taken("g", "job", &BlockId::new(&xz, &d), &xz, &d);
        }
        assert!(a.lock().held_bytes <= MAX_HELD);
        drop((id, data));
    }
}
