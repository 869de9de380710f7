//! A content-addressed, on-disk cache of compressed blocks, shared by every
//! image a process writes (every IUK of a release on one worker).
//!
//! In a release every kit carries most of the same changed files, and a
//! file's full blocks are cut from the file's own start, so the same
//! uncompressed blocks are compressed again for every kit. The cache maps
//! *(uncompressed block, every setting that shapes the compressed bytes)*
//! to the bytes the writer produced, so a hit gives exactly the bytes a miss
//! would: outputs never depend on whether the cache was cold or warm.
//!
//! Entries are files `<dir>/<2 hex>/<64 hex>`, written to a temporary name
//! and renamed into place, so concurrent jobs (and processes) only ever see
//! whole entries. Every entry carries a checksum, and a compressed entry is
//! also decompressed and compared with the block in hand before it is used;
//! an entry that fails either check is deleted and the block compressed
//! again. The cache is bounded: past its size cap, the least recently used
//! entries (by modification time, refreshed on every hit) are removed.
//! Failing to store an entry never fails a build: the cache only saves work.
//!
//! The cache also keeps, per system image, the digests of the file tails
//! its fragment blocks hold ([`TailDigests`], in `<dir>/tails/`, named by
//! [`Archive::fragment_identity`](crate::sqfs::Archive::fragment_identity)),
//! so comparing an image a second time, as the new image of the next job or
//! the old image of the next release, decompresses none of its fragment
//! blocks. Unlike a block, a digest cannot be checked without that work: it
//! is as trusted as the cache directory. A wrong one could only hide a
//! change, which verification by applying the kit (the coordinator's, and
//! `--reproduce`, which uses no cache) finds.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::sqfs::TailDigests;
use crate::sqfs::compress::{XzConfig, decompress, liblzma_version};
use crate::sqfs::format::CompressorId;

const MAGIC: &[u8; 8] = b"IUKBLK1\n";
const HEADER: usize = 8 + 32 + 1 + 4 + 32;
/// Bumped whenever the writer's compression could give other bytes for the
/// same settings (a change of filter trial, say): old entries then miss.
const COMPRESS_REVISION: u32 = 1;
/// No block is larger than 1 MiB (SquashFS's largest block size).
pub const MAX_BLOCK: u64 = 1 << 20;
/// An entry file larger than this is junk.
const MAX_ENTRY: u64 = HEADER as u64 + MAX_BLOCK + 4096;
const TAILS_MAGIC: &[u8; 8] = b"IUKTAIL1";
/// One tail: fragment index, offset, length, digest.
const TAIL_ENTRY: usize = 4 + 4 + 4 + 32;
/// A tail digest file larger than this (about 1.5 million tails) is junk.
const MAX_TAILS_FILE: u64 = 64 << 20;
/// Tail digest files kept (the most recently used); each is a few MiB.
const KEEP_TAILS_FILES: usize = 32;

/// Counters of one [`BlockCache`] since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Uncompressed bytes whose compression a hit saved.
    pub hit_bytes: u64,
    /// Entries that failed their checks and were deleted.
    pub dropped: u64,
    pub stored: u64,
    pub evicted: u64,
    /// Entries that could not be written (the build went on without them).
    pub store_errors: u64,
}

/// What names a block without its bytes: a digest of every setting that
/// decides its compressed form, its length and the digest of its bytes. A
/// store that never sees the bytes (the farm's) can still check that a
/// [`BlockKey`] is this block's, and that a stored form decompresses to it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockId {
    pub settings: [u8; 32],
    pub len: u64,
    pub data: [u8; 32],
}

impl BlockId {
    pub fn new(cfg: &XzConfig, data: &[u8]) -> BlockId {
        let mut h = Sha256::new();
        h.update(b"iukfarm block settings\0");
        h.update(env!("CARGO_PKG_VERSION").as_bytes());
        h.update([0]);
        h.update(liblzma_version().as_bytes());
        h.update([0]);
        for v in [
            COMPRESS_REVISION,
            cfg.level,
            cfg.dict_size,
            cfg.lc,
            cfg.lp,
            cfg.pb,
            cfg.flags,
        ] {
            h.update(v.to_le_bytes());
        }
        BlockId {
            settings: h.finalize().into(),
            len: data.len() as u64,
            data: Sha256::digest(data).into(),
        }
    }

    pub fn key(&self) -> BlockKey {
        let mut h = Sha256::new();
        h.update(b"iukfarm block key\0");
        h.update(self.settings);
        h.update(self.len.to_le_bytes());
        h.update(self.data);
        BlockKey(h.finalize().into())
    }

    /// Whether `value` is a sound stored form of this block as far as can be
    /// told without compressing: a compressed form must be smaller than the
    /// block, decompress to exactly its bytes and, given the settings
    /// (`cfg`, which the caller knows and this id only digests), be in our
    /// writer's exact xz container ([`crate::sqfs::xz_form`]: the kernel
    /// refuses other integrity checks). (Whether the block would have
    /// compressed, and to these very LZMA2 bytes, only compressing tells;
    /// reproduction builds, which use no shared store, check that.)
    pub fn admits(&self, cfg: Option<&XzConfig>, value: &Cached) -> bool {
        if self.len > MAX_BLOCK {
            return false;
        }
        match value {
            Cached::Uncompressed => true,
            Cached::Compressed(b) => {
                !b.is_empty()
                    && (b.len() as u64) < self.len
                    && decompress(CompressorId::Xz, b, self.len as usize).is_ok_and(|d| {
                        d.len() as u64 == self.len
                            && <[u8; 32]>::from(Sha256::digest(&d)) == self.data
                            && cfg.is_none_or(|c| crate::sqfs::xz_form::check(c, b, &d).is_ok())
                    })
            }
        }
    }
}

/// The cache key of one block: the uncompressed bytes and everything that
/// decides their compressed form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockKey([u8; 32]);

impl BlockKey {
    pub fn new(cfg: &XzConfig, data: &[u8]) -> BlockKey {
        BlockId::new(cfg, data).key()
    }

    pub fn from_bytes(b: [u8; 32]) -> BlockKey {
        BlockKey(b)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// A form [`BlockCache::get_or_insert_with`] was handed, and whether to keep
/// it. Only forms this worker compressed are kept: one from another worker
/// is checked to decompress right and to be in our container, but not to
/// be what our encoder makes (that would take compressing it again); kept,
/// a wrong one would be built into this worker's kits from then on, with
/// the farm's store off or not.
pub struct Obtained {
    pub form: Cached,
    pub keep: bool,
}

impl Obtained {
    pub fn mine(form: Cached) -> Obtained {
        Obtained { form, keep: true }
    }
}

/// What the writer stores for a block: compressed bytes, or the block as is
/// when compression did not make it smaller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Compressed(Vec<u8>),
    Uncompressed,
}

/// What [`SharedBlocks::get_unless_busy`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Cached),
    /// Compress it here, then [`put`](SharedBlocks::put) it.
    Compress,
    /// Another process is compressing it: ask again later.
    Busy,
}

/// A store of compressed blocks shared beyond this process: the blocks
/// every worker of a farm compressed for a release. Consulted when the local
/// cache misses, before compressing; whatever it returns is checked with
/// [`BlockId::admits`] before use, so a store can save work but never change
/// a byte. Implementations decide how long to wait for a peer that is
/// compressing the same block, and must give up (return `None`) rather than
/// fail a build.
pub trait SharedBlocks: Send + Sync + std::fmt::Debug {
    /// The stored form of the block, or `None`: compress it here, then
    /// [`put`](SharedBlocks::put) it.
    fn get(&self, id: &BlockId, key: &BlockKey) -> Option<Cached>;
    /// [`get`](SharedBlocks::get), except that when another process is
    /// compressing the block it answers [`Lookup::Busy`] at once rather than
    /// wait for it: the caller may do other blocks first.
    fn get_unless_busy(&self, id: &BlockId, key: &BlockKey) -> Lookup {
        match self.get(id, key) {
            Some(v) => Lookup::Found(v),
            None => Lookup::Compress,
        }
    }
    /// What this process stored for a block `get` did not give.
    fn put(&self, id: &BlockId, key: &BlockKey, value: &Cached);
    /// A form `get` returned failed its check and was not used.
    fn rejected(&self, id: &BlockId, key: &BlockKey);

    /// Work sharing: how many blocks a job may queue beyond what its own
    /// threads need, so that helpers elsewhere can take some (0: no
    /// helpers, the default).
    fn lookahead(&self) -> usize {
        0
    }

    /// Waits briefly (about a second at most) until helpers elsewhere can
    /// take blocks: how many they want now. `None`: stop asking for the
    /// rest of this job.
    fn helpers(&self) -> Option<usize> {
        None
    }

    /// Has helpers compress `blocks` with `cfg`: for each, the form a
    /// helper made, or `None` (compress it here). The caller checks every
    /// form with [`BlockId::admits`] and reports failures to
    /// [`rejected`](SharedBlocks::rejected).
    fn outsource(&self, cfg: &XzConfig, blocks: &[(BlockId, &[u8])]) -> Vec<Option<Cached>> {
        let _ = cfg;
        vec![None; blocks.len()]
    }
}

/// A block some job is compressing now; others wait for its result.
#[derive(Default)]
struct Flight {
    /// `None` while in flight; then the result (`None`: it failed).
    result: Mutex<Option<Option<Cached>>>,
    landed: Condvar,
}

impl Flight {
    fn land(&self, c: Option<Cached>) {
        let mut r = self.result.lock().expect("flight lock");
        if r.is_none() {
            *r = Some(c);
        }
        self.landed.notify_all();
    }

    fn wait(&self) -> Option<Cached> {
        let mut r = self.result.lock().expect("flight lock");
        loop {
            if let Some(c) = &*r {
                return c.clone();
            }
            r = self.landed.wait(r).expect("flight lock");
        }
    }
}

/// Ends a flight when the compressing job is done, failed or panicked.
struct Landing<'a> {
    cache: &'a BlockCache,
    key: BlockKey,
    flight: Arc<Flight>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.flight.land(None);
        if let Ok(mut map) = self.cache.in_flight.lock() {
            map.remove(&self.key);
        }
    }
}

/// See the module documentation.
pub struct BlockCache {
    dir: PathBuf,
    cap: u64,
    size: AtomicU64,
    seq: AtomicU64,
    evicting: Mutex<()>,
    in_flight: Mutex<HashMap<BlockKey, Arc<Flight>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    hit_bytes: AtomicU64,
    dropped: AtomicU64,
    stored: AtomicU64,
    evicted: AtomicU64,
    store_errors: AtomicU64,
}

impl std::fmt::Debug for BlockCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockCache({}, cap {})", self.dir.display(), self.cap)
    }
}

impl BlockCache {
    /// Opens (creating it if needed) the cache in `dir`, bounded to about
    /// `cap` bytes. Leftover temporary files of an interrupted run are
    /// removed.
    pub fn open(dir: &Path, cap: u64) -> Result<BlockCache> {
        fs::create_dir_all(dir.join("tmp")).map_err(|e| Error::io(dir, e))?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            cap,
            size: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            evicting: Mutex::new(()),
            in_flight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hit_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
        };
        let tmp = dir.join("tmp");
        for e in fs::read_dir(&tmp)
            .map_err(|e| Error::io(&tmp, e))?
            .flatten()
        {
            // Another process's entry in flight loses its rename and is
            // simply not stored.
            let _ = fs::remove_file(e.path());
        }
        let size = cache.entries()?.iter().map(|e| e.1).sum();
        cache.size.store(size, Ordering::Relaxed);
        if size > cap {
            cache.evict();
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size cap in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes the entries take, as far as this process knows.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> CacheStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: l(&self.hits),
            misses: l(&self.misses),
            hit_bytes: l(&self.hit_bytes),
            dropped: l(&self.dropped),
            stored: l(&self.stored),
            evicted: l(&self.evicted),
            store_errors: l(&self.store_errors),
        }
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        let hex = key.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// The stored form of `data` if the cache has a sound entry for it.
    pub fn get(&self, key: &BlockKey, data: &[u8]) -> Option<Cached> {
        let found = self.lookup(key, data);
        self.count(found.is_some(), data.len());
        found
    }

    /// The stored form of `data`: from the cache, from a concurrent job
    /// that is compressing the same block right now (waiting for it rather
    /// than compressing twice), or from `compress`, whose result is then
    /// stored if it says to keep it ([`Obtained::keep`]: what this worker
    /// compressed itself, never a form from another worker). The flag says
    /// whether `compress` was spared.
    ///
    /// `compress` must not block or enter rayon (whose work stealing could
    /// run a task waiting on this very block on this thread): it runs while
    /// others may wait for it.
    pub fn get_or_insert_with<E>(
        &self,
        key: &BlockKey,
        data: &[u8],
        compress: impl FnOnce() -> Result<Obtained, E>,
    ) -> Result<(Cached, bool), E> {
        if let Some(c) = self.lookup(key, data) {
            self.count(true, data.len());
            return Ok((c, true));
        }
        let flight = {
            let mut map = self.in_flight.lock().expect("in-flight lock");
            match map.get(key) {
                Some(f) => Err(f.clone()),
                None => {
                    let f = Arc::new(Flight::default());
                    map.insert(*key, f.clone());
                    Ok(f)
                }
            }
        };
        match flight {
            Err(theirs) => {
                if let Some(c) = theirs.wait() {
                    self.count(true, data.len());
                    return Ok((c, true));
                }
                // The other job failed: compress here.
                self.count(false, data.len());
                let c = compress()?;
                if c.keep {
                    self.put(key, &c.form);
                }
                Ok((c.form, false))
            }
            Ok(mine) => {
                // Whatever happens (an error, a panic), waiters are released.
                let guard = Landing {
                    cache: self,
                    key: *key,
                    flight: mine,
                };
                self.count(false, data.len());
                let c = compress()?;
                if c.keep {
                    self.put(key, &c.form);
                }
                guard.flight.land(Some(c.form.clone()));
                Ok((c.form, false))
            }
        }
    }

    fn count(&self, hit: bool, len: usize) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.hit_bytes.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lookup(&self, key: &BlockKey, data: &[u8]) -> Option<Cached> {
        let path = self.path(key);
        match read_entry(&path, key, data) {
            Ok(found) => found,
            Err(()) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if let Ok(m) = fs::metadata(&path)
                    && fs::remove_file(&path).is_ok()
                {
                    self.size.fetch_sub(
                        disk_size(m.len()).min(self.size.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
                None
            }
        }
    }

    /// Records what the writer stored for the block with `key`.
    pub fn put(&self, key: &BlockKey, value: &Cached) {
        match self.write_entry(key, value) {
            Ok(n) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                if self.size.fetch_add(n, Ordering::Relaxed) + n > self.cap {
                    self.evict();
                }
            }
            Err(_) => {
                self.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn write_entry(&self, key: &BlockKey, value: &Cached) -> std::io::Result<u64> {
        let (flag, bytes): (u8, &[u8]) = match value {
            Cached::Compressed(b) => (1, b),
            Cached::Uncompressed => (0, &[]),
        };
        let mut buf = Vec::with_capacity(HEADER + bytes.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&key.0);
        buf.push(flag);
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        let sum = checksum(&buf, bytes);
        buf.extend_from_slice(&sum);
        buf.extend_from_slice(bytes);
        self.write_whole(&self.path(key), &buf)
            .map(|()| disk_size(buf.len() as u64))
    }

    /// Writes `buf` to `path` through a temporary file and a rename, so that
    /// readers (in any process) only ever see a whole file.
    fn write_whole(&self, path: &Path, buf: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(buf)?;
            drop(f);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn tails_path(&self, image: &[u8; 32]) -> PathBuf {
        self.dir.join("tails").join(hex(image))
    }

    /// The tail digests kept for the image whose fragment identity is
    /// `image`; empty when none are kept. A damaged file is deleted.
    pub fn tail_digests(&self, image: &[u8; 32]) -> TailDigests {
        let path = self.tails_path(image);
        match read_tails(&path, image) {
            Ok(Some(t)) => t,
            Ok(None) => TailDigests::new(),
            Err(()) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                let _ = fs::remove_file(&path);
                TailDigests::new()
            }
        }
    }

    /// Keeps `digests` for the image `image`, replacing what was kept, and
    /// forgets the least recently used images past the last
    /// `KEEP_TAILS_FILES`. Failing to keep them never fails a build.
    pub fn put_tail_digests(&self, image: &[u8; 32], digests: &TailDigests) {
        let mut entries: Vec<_> = digests.iter().collect();
        entries.sort_unstable_by_key(|(k, _)| **k);
        let mut buf = Vec::with_capacity(48 + entries.len() * TAIL_ENTRY + 32);
        buf.extend_from_slice(TAILS_MAGIC);
        buf.extend_from_slice(image);
        buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for ((frag, off, len), d) in entries {
            for v in [frag, off, len] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            buf.extend_from_slice(d);
        }
        let sum: [u8; 32] = Sha256::digest(&buf).into();
        buf.extend_from_slice(&sum);
        if buf.len() as u64 > MAX_TAILS_FILE {
            return;
        }
        if self.write_whole(&self.tails_path(image), &buf).is_err() {
            self.store_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(rd) = fs::read_dir(self.dir.join("tails")) else {
            return;
        };
        let mut kept: Vec<(SystemTime, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let used = e.metadata().ok()?.modified().ok()?;
                Some((used, e.path()))
            })
            .collect();
        if kept.len() > KEEP_TAILS_FILES {
            kept.sort();
            for (_, p) in &kept[..kept.len() - KEEP_TAILS_FILES] {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Every entry with its size and last use.
    fn entries(&self) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for sub in rd.flatten() {
            let name = sub.file_name();
            if name.len() != 2 || !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(m) = f.metadata()
                    && m.is_file()
                {
                    let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((f.path(), disk_size(m.len()), used));
                }
            }
        }
        Ok(out)
    }

    /// Removes the least recently used entries until the cache is at 90% of
    /// its cap. One eviction at a time; others skip it.
    fn evict(&self) {
        let Ok(_guard) = self.evicting.try_lock() else {
            return;
        };
        let Ok(mut all) = self.entries() else {
            return;
        };
        all.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
        let mut size: u64 = all.iter().map(|e| e.1).sum();
        let target = self.cap / 10 * 9;
        for (path, n, _) in all {
            if size <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                size -= n;
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.size.store(size, Ordering::Relaxed);
    }
}

/// What an entry is counted as against the cap: its length rounded up to
/// the usual file system block.
fn disk_size(len: u64) -> u64 {
    len.next_multiple_of(4096)
}

fn checksum(header: &[u8], bytes: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header);
    h.update(bytes);
    h.finalize().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `Ok(None)`: no file. `Err(())`: a file that must not be used.
fn read_tails(path: &Path, image: &[u8; 32]) -> std::result::Result<Option<TailDigests>, ()> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => return Err(()),
    };
    let len = f.metadata().map_err(|_| ())?.len();
    if !(80..=MAX_TAILS_FILE).contains(&len) {
        return Err(());
    }
    let mut buf = Vec::with_capacity(len as usize);
    (&f).take(len).read_to_end(&mut buf).map_err(|_| ())?;
    let (body, sum) = buf.split_at(buf.len() - 32);
    if &body[..8] != TAILS_MAGIC || &body[8..40] != image || Sha256::digest(body)[..] != *sum {
        return Err(());
    }
    let count = u64::from_le_bytes(body[40..48].try_into().expect("8 bytes"));
    let rest = &body[48..];
    if count.checked_mul(TAIL_ENTRY as u64) != Some(rest.len() as u64) {
        return Err(());
    }
    let u32_at = |c: &[u8], i: usize| u32::from_le_bytes(c[i..i + 4].try_into().expect("4 bytes"));
    // Refresh the file's place in the LRU order; failing is harmless.
    let _ = f.set_modified(SystemTime::now());
    Ok(Some(
        rest.chunks_exact(TAIL_ENTRY)
            .map(|c| {
                let key = (u32_at(c, 0), u32_at(c, 4), u32_at(c, 8));
                (key, c[12..].try_into().expect("32 bytes"))
            })
            .collect(),
    ))
}

/// `Ok(None)`: no entry. `Err(())`: an entry that must not be used.
fn read_entry(path: &Path, key: &BlockKey, data: &[u8]) -> std::result::Result<Option<Cached>, ()> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => return Err(()),
    };
    let len = f.metadata().map_err(|_| ())?.len();
    if len > MAX_ENTRY || len < HEADER as u64 {
        return Err(());
    }
    let mut buf = Vec::with_capacity(len as usize);
    (&f).take(len).read_to_end(&mut buf).map_err(|_| ())?;
    if buf.len() < HEADER || &buf[..8] != MAGIC || buf[8..40] != key.0 {
        return Err(());
    }
    let flag = buf[40];
    let n = u32::from_le_bytes(buf[41..45].try_into().expect("4 bytes")) as usize;
    if buf.len() != HEADER + n || checksum(&buf[..45], &buf[HEADER..]) != buf[45..HEADER] {
        return Err(());
    }
    let value = match (flag, n) {
        (0, 0) => Cached::Uncompressed,
        (1, _) if n > 0 && n < data.len() => {
            let bytes = buf.split_off(HEADER);
            match decompress(CompressorId::Xz, &bytes, data.len()) {
                Ok(d) if d == data => Cached::Compressed(bytes),
                _ => return Err(()),
            }
        }
        _ => return Err(()),
    };
    // Refresh the entry's place in the LRU order; failing is harmless.
    let _ = f.set_modified(SystemTime::now());
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u8) -> Vec<u8> {
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ seed)
            .map(|b| b % 7)
            .collect()
    }

    #[test]
    fn hit_gives_what_was_stored_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 30).unwrap();
        let cfg = XzConfig::for_block_size(1 << 20);
        let data = sample(1);
        let key = BlockKey::new(&cfg, &data);
        assert_eq!(cache.get(&key, &data), None);
        let compressed = cfg.compress(&data).unwrap().unwrap();
        cache.put(&key, &Cached::Compressed(compressed.clone()));
        assert_eq!(
            cache.get(&key, &data),
            Some(Cached::Compressed(compressed.clone()))
        );
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.stored), (1, 1, 1));

        // Another setting is another key.
        let mut x86 = cfg;
        x86.flags = crate::sqfs::compress::xz_flags::X86;
        assert_ne!(BlockKey::new(&x86, &data), key);

        // A flipped byte in the entry: dropped, never used.
        let path = cache.path(&key);
        let mut raw = fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert_eq!(cache.get(&key, &data), None);
        assert!(!path.exists());
        assert_eq!(cache.stats().dropped, 1);

        // An entry whose checksum is right but whose bytes decode to other
        // data (a wrong entry under this key): dropped too.
        let other = cfg.compress(&sample(2)).unwrap().unwrap();
        cache.put(&key, &Cached::Compressed(other));
        assert_eq!(cache.get(&key, &data), None);
        assert_eq!(cache.stats().dropped, 2);

        // A truncated entry.
        cache.put(&key, &Cached::Compressed(compressed));
        let raw = fs::read(&path).unwrap();
        fs::write(&path, &raw[..raw.len() / 2]).unwrap();
        assert_eq!(cache.get(&key, &data), None);
        assert_eq!(cache.stats().dropped, 3);
    }

    #[test]
    fn a_form_from_elsewhere_is_used_but_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 30).unwrap();
        let cfg = XzConfig::for_block_size(1 << 20);
        let data = sample(5);
        let key = BlockKey::new(&cfg, &data);
        let form = Cached::Compressed(cfg.compress(&data).unwrap().unwrap());
        let shared = || {
            Ok::<_, Error>(Obtained {
                form: form.clone(),
                keep: false,
            })
        };
        let (got, spared) = cache.get_or_insert_with(&key, &data, shared).unwrap();
        assert_eq!((got, spared), (form.clone(), false));
        assert_eq!(cache.lookup(&key, &data), None, "not kept");
        let mine = || {
            Ok::<_, Error>(Obtained {
                form: form.clone(),
                keep: true,
            })
        };
        cache.get_or_insert_with(&key, &data, mine).unwrap();
        assert_eq!(cache.lookup(&key, &data), Some(form), "kept");
    }

    #[test]
    fn concurrent_jobs_compress_a_block_once() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 30).unwrap();
        let cfg = XzConfig::for_block_size(1 << 20);
        let data = sample(3);
        let key = BlockKey::new(&cfg, &data);
        let calls = AtomicUsize::new(0);
        let results: Vec<(Cached, bool)> = std::thread::scope(|s| {
            let run = || {
                cache
                    .get_or_insert_with(&key, &data, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        Ok::<_, Error>(Obtained::mine(Cached::Compressed(
                            cfg.compress(&data)?.unwrap(),
                        )))
                    })
                    .unwrap()
            };
            let a = s.spawn(run);
            let b = s.spawn(run);
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(results[0].0, results[1].0);
        assert_eq!(results.iter().filter(|r| r.1).count(), 1);

        // A failed compression releases the waiters, which compress themselves.
        let other = sample(4);
        let key = BlockKey::new(&cfg, &other);
        let failed =
            cache.get_or_insert_with(&key, &other, || Err(Error::Compressor("injected".into())));
        assert!(failed.is_err());
        let (got, spared) = cache
            .get_or_insert_with(&key, &other, || {
                Ok::<_, Error>(Obtained::mine(Cached::Compressed(
                    cfg.compress(&other)?.unwrap(),
                )))
            })
            .unwrap();
        assert!(!spared && matches!(got, Cached::Compressed(_)));
        assert!(cache.in_flight.lock().unwrap().is_empty());
    }

    /// Identical blocks in one image, tried with two filters each: a block
    /// that waits for another must never wait on its own thread's work.
    #[test]
    fn an_image_of_repeated_blocks_is_written_with_the_cache() {
        use crate::sqfs::{WriterOptions, write_image};
        use crate::tree::Node;
        let dir = tempfile::tempdir().unwrap();
        let mut block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        block.iter_mut().step_by(97).for_each(|b| *b = 0xE8);
        let root = Node::flat((0..12).map(|i| (format!("f{i:02}"), block.repeat(2))));
        let mut opts = WriterOptions::with_block_size(1 << 20);
        opts.xz.flags = crate::sqfs::compress::xz_flags::X86;
        opts.threads = 2;
        let write = |cache: Option<Arc<BlockCache>>| {
            let mut o = opts.clone();
            o.cache = cache;
            let out = tempfile::tempfile().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let root = root.clone();
            std::thread::spawn(move || {
                let r = write_image(&root, &o, &out, &crate::NoProgress).map(|_| {
                    let mut v = Vec::new();
                    (&out).read_to_end(&mut v).unwrap();
                    v
                });
                let _ = tx.send(r);
            });
            rx.recv_timeout(std::time::Duration::from_secs(300))
                .expect("the writer hangs")
                .unwrap()
        };
        let cache = Arc::new(BlockCache::open(dir.path(), 1 << 30).unwrap());
        let plain = write(None);
        assert_eq!(write(Some(cache.clone())), plain);
        assert_eq!(write(Some(cache)), plain);
    }

    /// A farm store for tests: honest, or giving a wrong form for every
    /// block it holds.
    #[derive(Debug, Default)]
    struct Store {
        blocks: Mutex<HashMap<BlockKey, Cached>>,
        lie: bool,
        rejected: AtomicU64,
    }

    impl SharedBlocks for Store {
        fn get(&self, _: &BlockId, key: &BlockKey) -> Option<Cached> {
            let v = self.blocks.lock().unwrap().get(key).cloned()?;
            Some(match v {
                Cached::Compressed(mut b) if self.lie => {
                    let n = b.len() / 2;
                    b[n] ^= 1;
                    Cached::Compressed(b)
                }
                v => v,
            })
        }
        fn put(&self, id: &BlockId, key: &BlockKey, value: &Cached) {
            assert!(id.admits(None, value));
            assert_eq!(id.key(), *key);
            self.blocks.lock().unwrap().insert(*key, value.clone());
        }
        fn rejected(&self, _: &BlockId, _: &BlockKey) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_shared_store_saves_work_and_its_wrong_forms_are_not_used() {
        use crate::sqfs::{WriterOptions, write_image};
        use crate::tree::Node;
        let root = Node::flat((0..6u8).map(|i| {
            (
                format!("f{i}"),
                [sample(i), sample(i + 10)[..5000].to_vec()].concat(),
            )
        }));
        let write = |shared: Option<Arc<dyn SharedBlocks>>, cache: Option<Arc<BlockCache>>| {
            let mut o = WriterOptions::with_block_size(131072);
            o.threads = 2;
            o.shared = shared;
            o.cache = cache;
            let out = tempfile::tempfile().unwrap();
            let r = write_image(&root, &o, &out, &crate::NoProgress).unwrap();
            let mut v = Vec::new();
            (&out).read_to_end(&mut v).unwrap();
            (v, r.data)
        };
        let (plain, _) = write(None, None);
        let store = Arc::new(Store::default());
        let (first, s1) = write(Some(store.clone()), None);
        assert_eq!(first, plain);
        let n = s1.compressed_blocks;
        assert!(n > 6 && s1.shared_hits == 0, "{s1:?}");
        let (second, s2) = write(Some(store.clone()), None);
        assert_eq!(second, plain);
        assert_eq!((s2.shared_hits, s2.compressed_blocks), (n, 0));

        // Behind a local cache: asked only on a local miss; what it gives
        // is used, never kept (only what this worker compressed is).
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlockCache::open(dir.path(), 1 << 30).unwrap());
        let (third, s3) = write(Some(store.clone()), Some(cache.clone()));
        assert_eq!(
            (third, s3.shared_hits, s3.cache_hits),
            (plain.clone(), n, 0)
        );
        let (_, s4) = write(Some(store.clone()), Some(cache.clone()));
        assert_eq!((s4.shared_hits, s4.cache_hits), (n, 0));
        let (_, s5) = write(None, Some(cache.clone()));
        assert_eq!((s5.compressed_blocks, s5.cache_hits), (n, 0));
        let (_, s6) = write(Some(store.clone()), Some(cache));
        assert_eq!((s6.shared_hits, s6.cache_hits), (0, n), "its own, kept");

        let liar = Arc::new(Store {
            blocks: Mutex::new(store.blocks.lock().unwrap().clone()),
            lie: true,
            ..Default::default()
        });
        let (honest, s7) = write(Some(liar.clone()), None);
        assert_eq!(honest, plain);
        assert_eq!((s7.shared_hits, s7.shared_rejected), (0, n));
        assert_eq!(liar.rejected.load(Ordering::Relaxed), n);
    }

    #[test]
    fn a_block_id_admits_only_a_sound_form() {
        let cfg = XzConfig::for_block_size(131072);
        let data = sample(3);
        let id = BlockId::new(&cfg, &data);
        assert_eq!(id.key(), BlockKey::new(&cfg, &data));
        let good = cfg.compress(&data).unwrap().unwrap();
        assert!(id.admits(None, &Cached::Compressed(good.clone())));
        assert!(id.admits(None, &Cached::Uncompressed));
        let mut bad = good.clone();
        let n = bad.len() / 2;
        bad[n] ^= 4;
        assert!(!id.admits(None, &Cached::Compressed(bad)));
        assert!(!id.admits(None, &Cached::Compressed(Vec::new())));
        let other = BlockId::new(&cfg, &sample(4));
        assert!(!other.admits(None, &Cached::Compressed(good)));
        let huge = BlockId {
            len: MAX_BLOCK + 1,
            ..id
        };
        assert!(!huge.admits(None, &Cached::Uncompressed));
    }

    #[test]
    fn uncompressed_marker_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 30).unwrap();
        let cfg = XzConfig::for_block_size(131072);
        let data = vec![7u8; 4096];
        let key = BlockKey::new(&cfg, &data);
        cache.put(&key, &Cached::Uncompressed);
        assert_eq!(cache.get(&key, &data), Some(Cached::Uncompressed));
    }

    #[test]
    fn evicts_least_recently_used_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = XzConfig::for_block_size(1 << 20);
        let blocks: Vec<Vec<u8>> = (0..6u8).map(sample).collect();
        let stored: Vec<(BlockKey, Vec<u8>)> = blocks
            .iter()
            .map(|d| (BlockKey::new(&cfg, d), cfg.compress(d).unwrap().unwrap()))
            .collect();
        let entry = disk_size((HEADER + stored[0].1.len()) as u64);
        assert!(
            stored
                .iter()
                .all(|s| disk_size((HEADER + s.1.len()) as u64) == entry)
        );
        let cap = 3 * entry + 100;
        let cache = BlockCache::open(dir.path(), cap).unwrap();
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for (i, (key, bytes)) in stored.iter().enumerate().take(3) {
            cache.put(key, &Cached::Compressed(bytes.clone()));
            let f = File::options().write(true).open(cache.path(key)).unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        // Using the oldest makes it the most recent.
        assert!(cache.get(&stored[0].0, &blocks[0]).is_some());
        cache.put(&stored[3].0, &Cached::Compressed(stored[3].1.clone()));
        assert!(cache.stats().evicted >= 1);
        assert!(cache.size() <= cap);
        assert!(cache.path(&stored[0].0).exists(), "recently used kept");
        assert!(
            !cache.path(&stored[1].0).exists(),
            "least recently used gone"
        );
        assert!(cache.path(&stored[3].0).exists());

        // Reopening measures what is there and keeps the cap.
        let again = BlockCache::open(dir.path(), cap).unwrap();
        assert!(again.size() <= cap && again.size() > 0);
    }

    #[test]
    fn tail_digests_are_kept_per_image_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlockCache::open(dir.path(), 1 << 20).unwrap();
        let digests: TailDigests = (0..100u32)
            .map(|i| ((i / 10, i * 7, i + 1), [i as u8; 32]))
            .collect();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(cache.tail_digests(&a).is_empty());
        cache.put_tail_digests(&a, &digests);
        assert_eq!(cache.tail_digests(&a), digests);
        assert!(cache.tail_digests(&b).is_empty(), "another image's digests");

        // A file under another image's name, or damaged, is dropped.
        std::fs::copy(cache.tails_path(&a), cache.tails_path(&b)).unwrap();
        assert!(cache.tail_digests(&b).is_empty());
        assert!(!cache.tails_path(&b).exists());
        let mut bytes = std::fs::read(cache.tails_path(&a)).unwrap();
        bytes[60] ^= 1;
        std::fs::write(cache.tails_path(&a), &bytes).unwrap();
        assert!(cache.tail_digests(&a).is_empty());
        assert_eq!(cache.stats().dropped, 2);

        // Only the most recently used images are kept.
        for i in 0..KEEP_TAILS_FILES as u8 + 3 {
            cache.put_tail_digests(&[100 + i; 32], &digests);
        }
        let kept = std::fs::read_dir(dir.path().join("tails")).unwrap().count();
        assert_eq!(kept, KEEP_TAILS_FILES);
    }
}
