//! The data area: file blocks, tail-end fragments, sparse blocks and block
//! de-duplication, with compression on a rayon pool.
//!
//! Every decision that shapes the output (which tails share a fragment
//! block, when a fragment block is flushed, which files reuse earlier
//! blocks) is made in input order by one thread, so the bytes never depend
//! on the number of compression threads. The rules are libsquashfs 1.2.0's
//! block processor and block writer, where compression is also parallel but
//! results are consumed in submission order:
//!
//! * a file is cut into full blocks plus a tail; all-zero blocks (and tails)
//!   are sparse: not stored, size 0 in the block list;
//! * tails are packed into fragment blocks in file order; a tail identical to
//!   an earlier one reuses it; a fragment block is flushed (and takes its
//!   place in the data area) when the next tail does not fit;
//! * after a file's last block, if the file's stored blocks equal a run of
//!   earlier stored blocks (fragment blocks included, overlapping runs
//!   allowed), the file points at the earliest such run and its own copy is
//!   truncated away.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::compress::{Codec, XzConfig};
use super::format::{BLOCK_UNCOMPRESSED, NO_FRAGMENT};
use super::reader::ImageFile;
use crate::blockcache::{BlockCache, BlockId, Cached, Lookup, SharedBlocks};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::tree::{FileContent, Source};

/// Where a file's data ended up; everything its inode needs.
#[derive(Debug, Clone)]
pub struct FileLayout {
    pub size: u64,
    pub blocks_start: u64,
    /// On-disk size of each block (bit 24: stored uncompressed; 0: sparse).
    pub block_sizes: Vec<u32>,
    pub fragment_index: u32,
    pub fragment_offset: u32,
    pub sparse: u64,
}

impl FileLayout {
    fn new(size: u64) -> Self {
        FileLayout {
            size,
            blocks_start: 0,
            block_sizes: Vec::new(),
            fragment_index: NO_FRAGMENT,
            fragment_offset: NO_FRAGMENT,
            sparse: 0,
        }
    }
}

/// Output of the data stage.
pub struct DataArea {
    pub files: Vec<FileLayout>,
    /// (absolute position, on-disk size) of every fragment block.
    pub fragments: Vec<(u64, u32)>,
    /// Absolute end of the data area.
    pub end: u64,
    pub stats: DataStats,
}

#[derive(Debug, Default, Clone)]
pub struct DataStats {
    pub bytes_read: u64,
    pub blocks_written: u64,
    pub duplicate_blocks: u64,
    pub sparse_blocks: u64,
    pub fragments: u64,
    pub duplicate_fragments: u64,
    /// Blocks (fragment blocks included) compressed here.
    pub compressed_blocks: u64,
    pub compressed_bytes: u64,
    /// Blocks whose stored form came from the block cache.
    pub cache_hits: u64,
    pub cache_hit_bytes: u64,
    /// Blocks whose stored form came from the farm's shared store.
    pub shared_hits: u64,
    pub shared_hit_bytes: u64,
    /// Forms the shared store offered that failed their check (compressed
    /// here instead).
    pub shared_rejected: u64,
    /// Blocks compressed by helpers on other workers (work sharing).
    pub helped_blocks: u64,
    pub helped_bytes: u64,
    /// Blocks copied as stored from a source image (fast profile).
    pub copied_blocks: u64,
    pub copied_bytes: u64,
    /// Blocks stored uncompressed without trying because they looked
    /// incompressible (fast profile).
    pub skipped_blocks: u64,
    /// Uncompressed bytes of the fragment blocks (however obtained).
    pub fragment_bytes: u64,
    /// Of `compressed_bytes`, those of fragment blocks.
    pub fragment_compressed_bytes: u64,
    /// Fragment blocks taken as stored from a source image (fast profile).
    pub adopted_fragment_blocks: u64,
}

/// How a block's stored form was obtained.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Compressed,
    Cache,
    Shared,
    /// Compressed by a helper elsewhere.
    Helped,
    /// Compressed here after the shared store offered a form that failed
    /// its check.
    CompressedRejected,
    Copied,
    Skipped,
}

struct Stored {
    bytes: Vec<u8>,
    compressed: bool,
    digest: [u8; 32],
    origin: Origin,
}

impl Stored {
    /// The size as block lists and the fragment table store it.
    fn size_field(&self) -> u32 {
        self.bytes.len() as u32
            | if self.compressed {
                0
            } else {
                BLOCK_UNCOMPRESSED
            }
    }
}

/// What compressing a block needs; cloned into every compression task.
#[derive(Clone)]
struct Compressor {
    cfg: Codec,
    cache: Option<Arc<BlockCache>>,
    shared: Option<Arc<dyn SharedBlocks>>,
    skip_incompressible: bool,
    /// How far back in the queue a block another worker is compressing
    /// goes: past what the other threads here take meanwhile.
    defer_by: usize,
}

/// How many times a block may go back in the queue because another
/// worker is compressing it; then the thread waits for that worker's form.
/// Two jobs that need the same blocks in the same order thus split them
/// between them rather than one waiting on the other.
const MAX_DEFERRALS: u8 = 2;

/// What a compression task did with its block.
enum Outcome {
    Stored(Stored),
    /// Another worker is compressing it: do it later.
    Busy(Vec<u8>),
}

/// Why a block got no form.
enum Missed {
    Busy,
    Failed(Error),
}

impl From<Error> for Missed {
    fn from(e: Error) -> Missed {
        Missed::Failed(e)
    }
}

impl Compressor {
    /// The block's stored form; with `may_defer`, [`Outcome::Busy`] rather
    /// than wait for a form another worker is making.
    fn store(&self, data: Vec<u8>, may_defer: bool) -> Result<Outcome> {
        if self.skip_incompressible && looks_incompressible(&data) {
            return Ok(Outcome::Stored(Stored::new(data, false, Origin::Skipped)));
        }
        let xz = match self.cfg.xz() {
            Some(xz) if self.cache.is_some() || self.shared.is_some() => xz,
            _ => {
                return Ok(Outcome::Stored(match self.cfg.compress(&data)? {
                    Some(c) => Stored::new(c, true, Origin::Compressed),
                    None => Stored::new(data, false, Origin::Compressed),
                }));
            }
        };
        let id = BlockId::new(xz, &data);
        let key = id.key();
        let obtain = || -> Result<(Cached, Origin), Missed> {
            let mut origin = Origin::Compressed;
            if let Some(shared) = &self.shared {
                let found = if may_defer {
                    match shared.get_unless_busy(&id, &key) {
                        Lookup::Found(v) => Some(v),
                        Lookup::Compress => None,
                        Lookup::Busy => return Err(Missed::Busy),
                    }
                } else {
                    shared.get(&id, &key)
                };
                if let Some(v) = found {
                    if admitted(&id, xz, &v, &data) {
                        return Ok((v, Origin::Shared));
                    }
                    shared.rejected(&id, &key);
                    origin = Origin::CompressedRejected;
                }
            }
            // Not on rayon: other jobs, here or on other workers, may be
            // waiting for this block (see `XzConfig::compress_here`).
            let c = match self.cfg.compress_here(&data)? {
                Some(c) => Cached::Compressed(c),
                None => Cached::Uncompressed,
            };
            if let Some(shared) = &self.shared {
                shared.put(&id, &key, &c);
            }
            Ok((c, origin))
        };
        let got = match &self.cache {
            None => obtain(),
            Some(cache) => {
                let mut origin = Origin::Cache;
                cache
                    .get_or_insert_with(&key, &data, || {
                        let (form, o) = obtain()?;
                        origin = o;
                        let keep = o != Origin::Shared;
                        Ok(crate::blockcache::Obtained { form, keep })
                    })
                    // A job that waited for another's compression was spared it.
                    .map(|(value, spared)| (value, if spared { Origin::Cache } else { origin }))
            }
        };
        match got {
            Ok((value, origin)) => Ok(Outcome::Stored(Stored::from_cached(value, data, origin))),
            Err(Missed::Busy) => Ok(Outcome::Busy(data)),
            Err(Missed::Failed(e)) => Err(e),
        }
    }

    /// Compresses the block at the front of `queue`. One that another
    /// worker is compressing goes back a little way, and this thread does
    /// the next one first.
    fn take_front(self, queue: Arc<Queue>) {
        let Some(p) = queue.pop_front() else {
            return;
        };
        match self.store(p.data, p.deferred < MAX_DEFERRALS) {
            Ok(Outcome::Stored(s)) => {
                let _ = p.result.send(Ok(s));
            }
            Ok(Outcome::Busy(data)) => {
                let p = Pending {
                    data,
                    result: p.result,
                    deferred: p.deferred + 1,
                };
                queue.insert(self.defer_by, p);
                // A task for it (on this thread's pool): every task takes
                // whatever block is at the front.
                rayon::spawn(move || self.take_front(queue));
            }
            Err(e) => {
                let _ = p.result.send(Err(e));
            }
        }
    }
}

impl Stored {
    fn from_cached(value: Cached, data: Vec<u8>, origin: Origin) -> Stored {
        match value {
            Cached::Compressed(c) => Stored::new(c, true, origin),
            Cached::Uncompressed => Stored::new(data, false, origin),
        }
    }

    fn new(bytes: Vec<u8>, compressed: bool, origin: Origin) -> Stored {
        let digest = Sha256::digest(&bytes).into();
        Stored {
            bytes,
            compressed,
            digest,
            origin,
        }
    }
}

/// Whether a form from elsewhere (the farm's store, a helper) may be used:
/// sound ([`BlockId::admits`], our container included), and stored
/// uncompressed only where verification accepts that (the block looks
/// incompressible); otherwise the job compresses the block itself.
fn admitted(id: &BlockId, xz: &XzConfig, form: &Cached, data: &[u8]) -> bool {
    id.admits(Some(xz), form)
        && (!matches!(form, Cached::Uncompressed) || looks_incompressible(data))
}

/// Order-0 entropy above 7.99 bits per byte: already compressed (or random)
/// data, which xz cannot shrink. Only judged on blocks large enough for the
/// estimate to mean something.
pub(super) fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < 65536 {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    bits > 7.99
}

enum Job {
    Block {
        file: usize,
        index: usize,
        first: bool,
        result: mpsc::Receiver<Result<Stored>>,
        raw_len: u64,
    },
    Sparse {
        file: usize,
        index: usize,
        first: bool,
        len: u32,
    },
    LastBlock {
        file: usize,
    },
    Tail {
        file: usize,
        index: usize,
        place: TailPlace,
        len: u32,
    },
    FragmentBlock {
        index: u32,
        raw_len: u64,
        result: mpsc::Receiver<Result<Stored>>,
    },
}

/// Tails waiting in the current fragment block, and every tail packed so far.
#[derive(Default)]
struct Packer {
    block: Vec<u8>,
    count: u32,
    tails: HashMap<(u32, [u8; 32]), (u32, u32)>,
    /// Fast profile: fragment blocks of source images taken as stored, by
    /// (image, fragment index), with their index here.
    adopted: HashMap<(usize, u32), u32>,
}

/// A fragment block is taken whole from its image when the files written
/// here use at least this share of it (per mille): the rest is waste.
const ADOPT_PER_MILLE: u64 = 900;
/// Files looked at together for tails to read ahead (see `read_tails_ahead`).
const TAIL_READ_AHEAD: usize = 16;

fn send(tx: &mpsc::SyncSender<Job>, job: Job) -> Result<()> {
    tx.send(job)
        .map_err(|_| Error::Compressor("writer stopped".into()))
}

enum TailPlace {
    Sparse,
    Fragment(u32, u32),
}

pub struct DataWriter<'a> {
    pub out: &'a File,
    pub start: u64,
    pub block_size: u32,
    pub cfg: Codec,
    pub cache: Option<Arc<BlockCache>>,
    pub shared: Option<Arc<dyn SharedBlocks>>,
    /// Copy the stored blocks of files read from a compatible image.
    pub copy_image_blocks: bool,
    pub skip_incompressible: bool,
    pub pool: &'a rayon::ThreadPool,
    pub backlog: usize,
    pub progress: &'a dyn Progress,
    /// Blocks waiting for a compression thread (or a helper).
    pub(super) queue: Arc<Queue>,
}

/// A block waiting to be compressed, and where its result goes.
struct Pending {
    data: Vec<u8>,
    result: mpsc::SyncSender<Result<Stored>>,
    /// Times it went back in the queue (see `MAX_DEFERRALS`).
    deferred: u8,
}

/// Blocks not yet started, in output order. The compression threads take
/// from the front (what the writer needs next); helpers elsewhere take
/// from the back (what it needs last), so that both work on different
/// blocks and a slow helper holds up nothing until the threads here have
/// done everything before its blocks. Every block pushed has one pool task
/// that takes the front block when it runs; a task that finds the queue
/// empty (helpers took its block) does nothing.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    blocks: VecDeque<Pending>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_back(&self, p: Pending) {
        self.lock().blocks.push_back(p);
        self.changed.notify_all();
    }

    fn push_front(&self, p: Pending) {
        self.lock().blocks.push_front(p);
        self.changed.notify_all();
    }

    fn pop_front(&self) -> Option<Pending> {
        self.lock().blocks.pop_front()
    }

    /// Puts `p` after the first `at` blocks (at the back if fewer wait).
    fn insert(&self, at: usize, p: Pending) {
        let mut g = self.lock();
        let at = at.min(g.blocks.len());
        g.blocks.insert(at, p);
        drop(g);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Waits until more than `keep` blocks wait (or the queue is closed:
    /// `false`).
    fn wait_for_more_than(&self, keep: usize) -> bool {
        let mut g = self.lock();
        loop {
            if g.closed {
                return false;
            }
            if g.blocks.len() > keep {
                return true;
            }
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Up to `n` blocks from the back, leaving at least `keep`, in output
    /// order.
    fn pop_back(&self, n: usize, keep: usize) -> Vec<Pending> {
        let mut g = self.lock();
        let take = n.min(g.blocks.len().saturating_sub(keep));
        let at = g.blocks.len() - take;
        g.blocks.split_off(at).into()
    }
}

impl DataWriter<'_> {
    /// Writes the data of `files` (in packing order) starting at `start`.
    pub fn write(&self, files: &[&FileContent]) -> Result<DataArea> {
        let lookahead = self.shared.as_ref().map_or(0, |s| s.lookahead());
        let (tx, rx) = mpsc::sync_channel::<Job>(self.backlog.max(2) + lookahead);
        std::thread::scope(|s| {
            let producer = s.spawn(move || self.produce(files, tx));
            let helpers: Vec<_> = match &self.shared {
                // Two, so that one batch is sent while another is out.
                Some(shared) if lookahead > 0 => (0..2)
                    .map(|_| s.spawn(move || self.outsource(shared.as_ref())))
                    .collect(),
                _ => Vec::new(),
            };
            let consumed = self.consume(files, rx);
            self.queue.close();
            for h in helpers {
                let _ = h.join();
            }
            // The producer stops on its own once the receiver is gone.
            let produced = producer
                .join()
                .map_err(|_| Error::Compressor("reader thread panicked".into()))?;
            let (area, frag_count) = consumed?;
            let stats = produced?;
            debug_assert_eq!(area.fragments.len() as u32, frag_count);
            let mut area = area;
            area.stats.fragments = stats.fragments;
            area.stats.duplicate_fragments = stats.duplicate_fragments;
            area.stats.adopted_fragment_blocks = stats.adopted_fragment_blocks;
            area.stats.sparse_blocks += stats.sparse_blocks;
            Ok(area)
        })
    }

    fn compressor(&self) -> Compressor {
        Compressor {
            cfg: self.cfg,
            cache: self.cache.clone(),
            shared: self.shared.clone(),
            skip_incompressible: self.skip_incompressible,
            defer_by: self.pool.current_num_threads(),
        }
    }

    fn spawn_store(&self, data: Vec<u8>) -> mpsc::Receiver<Result<Stored>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.queue.push_back(Pending {
            data,
            result: tx,
            deferred: 0,
        });
        self.spawn_taker();
        rx
    }

    /// A pool task that compresses the block at the front of the queue.
    fn spawn_taker(&self) {
        let (c, queue) = (self.compressor(), self.queue.clone());
        self.pool.spawn(move || c.take_front(queue));
    }

    /// Work sharing: while the writer runs, hands blocks from the back of
    /// the queue to helpers whenever they can take some, and puts back at
    /// the front (for the threads here) whatever they did not compress.
    fn outsource(&self, shared: &dyn SharedBlocks) {
        // Helpers make xz forms only (a zstd writer takes no helpers).
        let Some(xz) = self.cfg.xz() else { return };
        // The blocks the threads here will take next stay here.
        let keep = self.pool.current_num_threads() + 1;
        while self.queue.wait_for_more_than(keep) {
            if self.progress.is_cancelled() {
                return;
            }
            let want = match shared.helpers() {
                None => return,
                Some(0) => continue,
                Some(n) => n,
            };
            let mut batch = Vec::new();
            for p in self.queue.pop_back(want, keep) {
                if self.skip_incompressible && looks_incompressible(&p.data) {
                    self.give_back(p);
                    continue;
                }
                let id = BlockId::new(xz, &p.data);
                match self.cache.as_ref().and_then(|c| c.get(&id.key(), &p.data)) {
                    Some(found) => {
                        let _ =
                            p.result
                                .send(Ok(Stored::from_cached(found, p.data, Origin::Cache)));
                    }
                    None => batch.push((id, p)),
                }
            }
            if batch.is_empty() {
                continue;
            }
            let blocks: Vec<(BlockId, &[u8])> =
                batch.iter().map(|(id, p)| (*id, &p.data[..])).collect();
            let forms = shared.outsource(xz, &blocks);
            drop(blocks);
            let mut back = Vec::new();
            // A short answer leaves the rest to the threads here.
            let forms = forms.into_iter().chain(std::iter::repeat(None));
            for ((id, p), form) in batch.into_iter().zip(forms) {
                match form {
                    // Not kept in the cache: see `blockcache::Obtained`.
                    Some(f) if admitted(&id, xz, &f, &p.data) => {
                        let _ = p
                            .result
                            .send(Ok(Stored::from_cached(f, p.data, Origin::Helped)));
                    }
                    Some(_) => {
                        shared.rejected(&id, &id.key());
                        back.push(p);
                    }
                    None => back.push(p),
                }
            }
            // In output order at the front: needed soonest of all.
            for p in back.into_iter().rev() {
                self.give_back(p);
            }
        }
    }

    fn give_back(&self, p: Pending) {
        self.queue.push_front(p);
        self.spawn_taker();
    }

    fn ready(stored: Stored) -> mpsc::Receiver<Result<Stored>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let _ = tx.send(Ok(stored));
        rx
    }

    /// The image file behind `content` if its stored blocks can be copied.
    fn copyable<'c>(&self, content: &'c FileContent) -> Option<&'c ImageFile> {
        match &content.source {
            Source::Image(f)
                if self.copy_image_blocks
                    && self
                        .cfg
                        .xz()
                        .is_some_and(|xz| f.blocks_copyable(self.block_size, xz)) =>
            {
                Some(f)
            }
            _ => None,
        }
    }

    /// Reads files in order, cuts them into blocks and tails, packs tails
    /// into fragment blocks and hands everything to the consumer in order.
    fn produce(&self, files: &[&FileContent], tx: mpsc::SyncSender<Job>) -> Result<DataStats> {
        let bs = self.block_size as usize;
        let mut stats = DataStats::default();
        let mut packer = Packer::default();
        if self.copy_image_blocks {
            self.adopt_fragments(files, &mut packer, &mut stats, &tx)?;
        }
        let (mut ahead, mut ahead_end) = (HashMap::new(), 0);
        for (file, content) in files.iter().enumerate() {
            if self.progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            if let Some(image) = self.copyable(content) {
                self.copy_file(file, content.size, image, &mut packer, &mut stats, &tx)?;
                continue;
            }
            if file >= ahead_end {
                (ahead, ahead_end) = self.read_tails_ahead(files, file);
            }
            if let Some(tail) = ahead.remove(&file) {
                let buf = tail.map_err(|e| match e {
                    Error::Corrupt(m) => Error::Corrupt(format!("{}: {m}", content.describe())),
                    other => other,
                })?;
                if buf.len() as u64 != content.size {
                    return Err(Error::corrupt("file tail of the wrong length"));
                }
                self.tail(file, 0, buf, &mut packer, &mut stats, &tx)?;
                continue;
            }
            let mut reader = content.open()?;
            let mut remaining = content.size;
            let mut index = 0usize;
            while remaining > 0 {
                if self.progress.is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let want = remaining.min(bs as u64) as usize;
                let mut buf = vec![0u8; want];
                read_full(&mut reader, &mut buf).map_err(|e| match e {
                    Error::RawIo(io) => Error::io(content.describe(), io),
                    other => other,
                })?;
                remaining -= want as u64;
                if want == bs {
                    let first = index == 0;
                    let job = if is_zero(&buf) {
                        stats.sparse_blocks += 1;
                        Job::Sparse {
                            file,
                            index,
                            first,
                            len: want as u32,
                        }
                    } else {
                        Job::Block {
                            file,
                            index,
                            first,
                            raw_len: want as u64,
                            result: self.spawn_store(buf),
                        }
                    };
                    send(&tx, job)?;
                    index += 1;
                    continue;
                }
                // The tail: after the file's last full block is settled.
                if index > 0 {
                    send(&tx, Job::LastBlock { file })?;
                }
                self.tail(file, index, buf, &mut packer, &mut stats, &tx)?;
                index = usize::MAX;
            }
            if index != 0 && index != usize::MAX {
                send(&tx, Job::LastBlock { file })?;
            }
            let mut probe = [0u8; 1];
            if reader
                .read(&mut probe)
                .map_err(|e| Error::io(content.describe(), e))?
                != 0
            {
                return Err(Error::Invalid(format!(
                    "{}: file grew while it was being packed",
                    content.describe()
                )));
            }
        }
        if !packer.block.is_empty() {
            let job = Job::FragmentBlock {
                index: packer.count - 1,
                raw_len: packer.block.len() as u64,
                result: self.spawn_store(std::mem::take(&mut packer.block)),
            };
            send(&tx, job)?;
        }
        Ok(stats)
    }

    /// Reads ahead, in parallel, the contents of the small files among the
    /// next few that live only in source images' fragment blocks: each costs
    /// decompressing its block, which would otherwise happen here one file
    /// after another. Files sharing a block are read by one thread, so that
    /// no block is decompressed twice. Returns the tails by file number (none
    /// when fewer than two blocks are involved) and where the window ends.
    #[allow(clippy::type_complexity)]
    fn read_tails_ahead(
        &self,
        files: &[&FileContent],
        start: usize,
    ) -> (HashMap<usize, Result<Vec<u8>>>, usize) {
        let end = (start + TAIL_READ_AHEAD).min(files.len());
        let mut groups: Vec<((usize, u32), Vec<(usize, &ImageFile)>)> = Vec::new();
        for (i, c) in files.iter().enumerate().take(end).skip(start) {
            let Source::Image(f) = &c.source else {
                continue;
            };
            let inode = f.inode();
            if c.size == 0
                || c.size >= self.block_size as u64
                || inode.fragment_index == NO_FRAGMENT
                || !inode.block_sizes.is_empty()
                || self.copyable(c).is_some()
            {
                continue;
            }
            let key = (Arc::as_ptr(f.archive()) as usize, inode.fragment_index);
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.1.push((i, f)),
                None => groups.push((key, vec![(i, f)])),
            }
        }
        if groups.len() < 2 {
            return (HashMap::new(), end);
        }
        let threads = self.pool.current_num_threads().clamp(1, groups.len());
        let read = |t: usize| -> Vec<(usize, Result<Vec<u8>>)> {
            groups
                .iter()
                .skip(t)
                .step_by(threads)
                .flat_map(|g| g.1.iter().map(|&(i, f)| (i, f.fragment_tail())))
                .collect()
        };
        let tails = std::thread::scope(|s| {
            let others: Vec<_> = (1..threads).map(|t| s.spawn(move || read(t))).collect();
            let mut all = read(0);
            for h in others {
                all.extend(h.join().expect("tail reader panicked"));
            }
            all
        });
        (tails.into_iter().collect(), end)
    }

    /// Packs a file's tail into the fragment blocks (or records it as
    /// sparse), flushing the current fragment block when it is full.
    fn tail(
        &self,
        file: usize,
        index: usize,
        buf: Vec<u8>,
        packer: &mut Packer,
        stats: &mut DataStats,
        tx: &mpsc::SyncSender<Job>,
    ) -> Result<()> {
        let bs = self.block_size as usize;
        let len = buf.len() as u32;
        let place = if is_zero(&buf) {
            stats.sparse_blocks += 1;
            TailPlace::Sparse
        } else {
            stats.fragments += 1;
            let key = (len, Sha256::digest(&buf).into());
            if let Some(&(fi, off)) = packer.tails.get(&key) {
                stats.duplicate_fragments += 1;
                TailPlace::Fragment(fi, off)
            } else {
                if !packer.block.is_empty() && packer.block.len() + buf.len() > bs {
                    let data = std::mem::take(&mut packer.block);
                    let job = Job::FragmentBlock {
                        index: packer.count - 1,
                        raw_len: data.len() as u64,
                        result: self.spawn_store(data),
                    };
                    send(tx, job)?;
                }
                if packer.block.is_empty() {
                    packer.count += 1;
                }
                let loc = (packer.count - 1, packer.block.len() as u32);
                packer.block.extend_from_slice(&buf);
                packer.tails.insert(key, loc);
                TailPlace::Fragment(loc.0, loc.1)
            }
        };
        send(
            tx,
            Job::Tail {
                file,
                index,
                place,
                len,
            },
        )
    }

    /// Fast profile: the fragment blocks of source images that the files
    /// written here (nearly) fill are taken as stored, before any file
    /// data, so their tails need neither decompressing nor compressing.
    fn adopt_fragments(
        &self,
        files: &[&FileContent],
        packer: &mut Packer,
        stats: &mut DataStats,
        tx: &mpsc::SyncSender<Job>,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let mut order = Vec::new();
        // Per (image, fragment): an image file to read it from and the
        // distinct tails (offset -> length) the files here keep in it.
        type Tails = HashMap<u32, u64>;
        let mut used: HashMap<(usize, u32), (&ImageFile, Tails)> = HashMap::new();
        for content in files {
            let Some(image) = self.copyable(content) else {
                continue;
            };
            let inode = image.inode();
            if inode.fragment_index == NO_FRAGMENT {
                continue;
            }
            let key = (Arc::as_ptr(image.archive()) as usize, inode.fragment_index);
            let entry = used.entry(key).or_insert_with(|| {
                order.push(key);
                (image, HashMap::new())
            });
            entry.1.insert(inode.fragment_offset, inode.size % bs);
        }
        for key in order {
            let (image, tails) = &used[&key];
            let all = image.archive().fragment_usage(key.1)?.unwrap_or(u64::MAX);
            let here: u64 = tails.values().sum();
            if here.saturating_mul(1000) < all.saturating_mul(ADOPT_PER_MILLE) {
                continue;
            }
            let (field, bytes) = image.archive().stored_fragment(key.1)?;
            let index = packer.count;
            packer.count += 1;
            packer.adopted.insert(key, index);
            stats.adopted_fragment_blocks += 1;
            let compressed = field & BLOCK_UNCOMPRESSED == 0;
            send(
                tx,
                Job::FragmentBlock {
                    index,
                    raw_len: all,
                    result: Self::ready(Stored::new(bytes, compressed, Origin::Copied)),
                },
            )?;
        }
        Ok(())
    }

    /// The fast path of the fast profile: a file's blocks as its image
    /// stores them (compressed or not, sparse stays sparse), its tail
    /// packed like any other.
    fn copy_file(
        &self,
        file: usize,
        size: u64,
        image: &ImageFile,
        packer: &mut Packer,
        stats: &mut DataStats,
        tx: &mpsc::SyncSender<Job>,
    ) -> Result<()> {
        let bs = self.block_size as u64;
        let inode = image.inode();
        if inode.size != size {
            return Err(Error::corrupt("file size differs from its inode"));
        }
        let adopted = packer
            .adopted
            .get(&(Arc::as_ptr(image.archive()) as usize, inode.fragment_index))
            .copied()
            .filter(|_| inode.fragment_index != NO_FRAGMENT);
        let tail = match adopted {
            Some(_) => Vec::new(),
            None => image.fragment_tail()?,
        };
        let blocks = inode.block_sizes.len();
        if adopted.is_none() && tail.is_empty() && size.div_ceil(bs) != blocks as u64 {
            return Err(Error::corrupt(
                "file without a fragment has a block list of the wrong length",
            ));
        }
        let mut pos = inode.blocks_start;
        for index in 0..blocks {
            if self.progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let raw_len = (size - index as u64 * bs).min(bs);
            let (field, bytes) = image.stored_block(index, pos)?;
            pos += bytes.len() as u64;
            let first = index == 0;
            let job = if field == 0 {
                stats.sparse_blocks += 1;
                Job::Sparse {
                    file,
                    index,
                    first,
                    len: raw_len as u32,
                }
            } else {
                let compressed = field & BLOCK_UNCOMPRESSED == 0;
                Job::Block {
                    file,
                    index,
                    first,
                    raw_len,
                    result: Self::ready(Stored::new(bytes, compressed, Origin::Copied)),
                }
            };
            send(tx, job)?;
        }
        if blocks > 0 {
            send(tx, Job::LastBlock { file })?;
        }
        if let Some(index) = adopted {
            if size.div_ceil(bs) != blocks as u64 + 1 {
                return Err(Error::corrupt(
                    "file with a fragment has a block list of the wrong length",
                ));
            }
            stats.fragments += 1;
            send(
                tx,
                Job::Tail {
                    file,
                    index: blocks,
                    place: TailPlace::Fragment(index, inode.fragment_offset),
                    len: (size % bs) as u32,
                },
            )?;
        } else if !tail.is_empty() {
            self.tail(file, blocks, tail, packer, stats, tx)?;
        }
        Ok(())
    }

    /// Writes blocks in order and de-duplicates whole files' block runs.
    fn consume(&self, files: &[&FileContent], rx: mpsc::Receiver<Job>) -> Result<(DataArea, u32)> {
        let mut layouts: Vec<FileLayout> = files.iter().map(|f| FileLayout::new(f.size)).collect();
        let mut fragments: Vec<(u64, u32)> = Vec::new();
        let mut blocks = BlockList::default();
        let mut pos = self.start;
        let mut file_start = 0usize;
        let mut stats = DataStats::default();
        let recv = |r: mpsc::Receiver<Result<Stored>>| -> Result<Stored> {
            r.recv()
                .map_err(|_| Error::Compressor("compression task lost".into()))?
        };
        for job in rx {
            match job {
                Job::Block {
                    file,
                    index,
                    first,
                    result,
                    raw_len,
                } => {
                    let stored = recv(result)?;
                    count_origin(&mut stats, &stored, raw_len);
                    if first {
                        file_start = blocks.len();
                    }
                    let size = stored.size_field();
                    self.out.write_all_at(&stored.bytes, pos)?;
                    blocks.push(pos, size, stored.digest);
                    pos += stored.bytes.len() as u64;
                    set_block_size(&mut layouts[file], index, size);
                    stats.bytes_read += raw_len;
                    stats.blocks_written += 1;
                    self.progress.advance(raw_len);
                }
                Job::Sparse {
                    file,
                    index,
                    first,
                    len,
                } => {
                    if first {
                        file_start = blocks.len();
                    }
                    set_block_size(&mut layouts[file], index, 0);
                    layouts[file].sparse += len as u64;
                    stats.bytes_read += len as u64;
                    self.progress.advance(len as u64);
                }
                Job::LastBlock { file } => {
                    let (start, truncate_to) = blocks.deduplicate(file_start);
                    layouts[file].blocks_start = start;
                    if let Some((end, removed)) = truncate_to {
                        pos = end;
                        self.out.set_len(pos)?;
                        stats.duplicate_blocks += removed as u64;
                        stats.blocks_written -= removed as u64;
                    }
                }
                Job::Tail {
                    file,
                    index,
                    place,
                    len,
                } => {
                    match place {
                        TailPlace::Sparse => {
                            set_block_size(&mut layouts[file], index, 0);
                            layouts[file].sparse += len as u64;
                        }
                        TailPlace::Fragment(i, off) => {
                            layouts[file].fragment_index = i;
                            layouts[file].fragment_offset = off;
                        }
                    }
                    stats.bytes_read += len as u64;
                    self.progress.advance(len as u64);
                }
                Job::FragmentBlock {
                    index,
                    raw_len,
                    result,
                } => {
                    let stored = recv(result)?;
                    count_origin(&mut stats, &stored, raw_len);
                    stats.fragment_bytes += raw_len;
                    if matches!(
                        stored.origin,
                        Origin::Compressed | Origin::CompressedRejected
                    ) {
                        stats.fragment_compressed_bytes += raw_len;
                    }
                    let size = stored.size_field();
                    self.out.write_all_at(&stored.bytes, pos)?;
                    blocks.push(pos, size, stored.digest);
                    debug_assert_eq!(index as usize, fragments.len());
                    fragments.push((pos, size));
                    pos += stored.bytes.len() as u64;
                    stats.blocks_written += 1;
                }
            }
        }
        let n = fragments.len() as u32;
        Ok((
            DataArea {
                files: layouts,
                fragments,
                end: pos,
                stats,
            },
            n,
        ))
    }
}

fn count_origin(stats: &mut DataStats, stored: &Stored, raw_len: u64) {
    let (n, bytes) = match stored.origin {
        Origin::Compressed => (&mut stats.compressed_blocks, &mut stats.compressed_bytes),
        Origin::CompressedRejected => {
            stats.shared_rejected += 1;
            (&mut stats.compressed_blocks, &mut stats.compressed_bytes)
        }
        Origin::Cache => (&mut stats.cache_hits, &mut stats.cache_hit_bytes),
        Origin::Shared => (&mut stats.shared_hits, &mut stats.shared_hit_bytes),
        Origin::Helped => (&mut stats.helped_blocks, &mut stats.helped_bytes),
        Origin::Copied => (&mut stats.copied_blocks, &mut stats.copied_bytes),
        Origin::Skipped => {
            stats.skipped_blocks += 1;
            return;
        }
    };
    *n += 1;
    *bytes += raw_len;
}

fn set_block_size(layout: &mut FileLayout, index: usize, size: u32) {
    if layout.block_sizes.len() <= index {
        layout.block_sizes.resize(index + 1, 0);
    }
    layout.block_sizes[index] = size;
}

/// Every stored block in image order, for run de-duplication.
#[derive(Default)]
struct BlockList {
    entries: Vec<(u64, u32, [u8; 32])>,
    by_key: HashMap<(u32, [u8; 32]), Vec<usize>>,
}

impl BlockList {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn push(&mut self, offset: u64, size: u32, digest: [u8; 32]) {
        self.by_key
            .entry((size, digest))
            .or_default()
            .push(self.entries.len());
        self.entries.push((offset, size, digest));
    }

    fn key(&self, i: usize) -> (u32, [u8; 32]) {
        (self.entries[i].1, self.entries[i].2)
    }

    /// The file whose stored blocks are `file_start..`: returns where its
    /// blocks start and, if an earlier identical run was found, the new end
    /// of the data area and how many blocks were dropped.
    fn deduplicate(&mut self, file_start: usize) -> (u64, Option<(u64, usize)>) {
        let count = self.len() - file_start;
        if count == 0 {
            return (0, None);
        }
        let candidates = self
            .by_key
            .get(&self.key(file_start))
            .cloned()
            .unwrap_or_default();
        let found = candidates
            .into_iter()
            .take_while(|&i| i < file_start)
            .find(|&i| (0..count).all(|j| self.key(i + j) == self.key(file_start + j)));
        let Some(i) = found else {
            return (self.entries[file_start].0, None);
        };
        let start = self.entries[i].0;
        let new_len = if count >= file_start - i {
            i + count
        } else {
            file_start
        };
        let removed = self.len() - new_len;
        while self.len() > new_len {
            let idx = self.len() - 1;
            let key = self.key(idx);
            let list = self.by_key.get_mut(&key).expect("indexed");
            debug_assert_eq!(list.last(), Some(&idx));
            list.pop();
            if list.is_empty() {
                self.by_key.remove(&key);
            }
            self.entries.pop();
        }
        let (off, size, _) = self.entries[new_len - 1];
        let end = off + (size & !BLOCK_UNCOMPRESSED) as u64;
        (start, Some((end, removed)))
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(Error::RawIo(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while it was being packed",
                )));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::RawIo(e)),
        }
    }
    Ok(())
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks.all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::blockcache::{BlockKey, Cached};
    use crate::sqfs::{WriterOptions, XzConfig, write_image};
    use crate::tree::Node;

    /// Helpers for tests: honest, lying (a bit flipped in every form), or
    /// taking blocks and never compressing them.
    #[derive(Debug)]
    struct Helpers {
        mode: &'static str,
        taken: AtomicU64,
        rejected: AtomicU64,
    }

    impl SharedBlocks for Helpers {
        fn get(&self, _: &BlockId, _: &BlockKey) -> Option<Cached> {
            None
        }
        fn put(&self, _: &BlockId, _: &BlockKey, _: &Cached) {}
        fn rejected(&self, _: &BlockId, _: &BlockKey) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        fn lookahead(&self) -> usize {
            16
        }
        fn helpers(&self) -> Option<usize> {
            Some(3)
        }
        fn outsource(&self, cfg: &XzConfig, blocks: &[(BlockId, &[u8])]) -> Vec<Option<Cached>> {
            self.taken.fetch_add(blocks.len() as u64, Ordering::Relaxed);
            let mut forms: Vec<Option<Cached>> = blocks
                .iter()
                .map(|(_, data)| {
                    let form = match cfg.compress(data).unwrap() {
                        Some(c) => Cached::Compressed(c),
                        None => Cached::Uncompressed,
                    };
                    match (self.mode, form) {
                        ("honest" | "short", f) => Some(f),
                        ("liar", Cached::Compressed(mut b)) => {
                            let n = b.len() / 2;
                            b[n] ^= 1;
                            Some(Cached::Compressed(b))
                        }
                        ("liar", f) => Some(f),
                        // Valid xz that liblzma decompresses right, with a
                        // SHA-256 check, which the kernel refuses.
                        ("foreign", _) => Some(Cached::Compressed(
                            crate::sqfs::xz_form::easy_encode(data, liblzma_sys::LZMA_CHECK_SHA256),
                        )),
                        // "Stored uncompressed", for compressible blocks.
                        ("raw", _) => Some(Cached::Uncompressed),
                        _ => None,
                    }
                })
                .collect();
            if self.mode == "short" {
                forms.truncate(blocks.len() / 2);
            }
            forms
        }
    }

    /// A store where every block is being compressed by another worker,
    /// once (then it is this job's) or for good.
    #[derive(Debug)]
    struct Busy {
        for_good: bool,
        asks: Mutex<HashMap<BlockKey, u8>>,
        waited: AtomicU64,
    }

    impl SharedBlocks for Busy {
        fn get(&self, _: &BlockId, _: &BlockKey) -> Option<Cached> {
            self.waited.fetch_add(1, Ordering::Relaxed);
            None
        }
        fn get_unless_busy(&self, _: &BlockId, key: &BlockKey) -> Lookup {
            let mut asks = self.asks.lock().unwrap();
            let n = asks.entry(*key).or_default();
            *n += 1;
            if self.for_good || *n == 1 {
                Lookup::Busy
            } else {
                Lookup::Compress
            }
        }
        fn put(&self, _: &BlockId, _: &BlockKey, _: &Cached) {}
        fn rejected(&self, _: &BlockId, _: &BlockKey) {}
    }

    #[test]
    fn blocks_another_worker_is_compressing_are_done_later_and_waited_for_at_last() {
        let root = Node::flat((0..4u32).map(|i| (format!("f{i}"), data(i, 6 * 65536 + 3000))));
        for threads in [1, 2] {
            let write =
                |shared: Option<Arc<dyn SharedBlocks>>| write_shared(&root, threads, shared);
            let (plain, p) = write(None);
            for for_good in [false, true] {
                let busy = Arc::new(Busy {
                    for_good,
                    asks: Mutex::new(HashMap::new()),
                    waited: AtomicU64::new(0),
                });
                let (bytes, s) = write(Some(busy.clone()));
                assert!(bytes == plain, "{threads} threads: other bytes");
                assert_eq!(s.compressed_blocks, p.compressed_blocks);
                let asks = busy.asks.lock().unwrap();
                assert_eq!(asks.len() as u64, p.compressed_blocks);
                let (times, waited) = if for_good {
                    (MAX_DEFERRALS, p.compressed_blocks)
                } else {
                    (2, 0)
                };
                assert!(asks.values().all(|&n| n == times), "{asks:?}");
                assert_eq!(busy.waited.load(Ordering::Relaxed), waited);
            }
        }
    }

    /// `root` written with 64 KiB blocks: the image and its data statistics.
    fn write_shared(
        root: &Node,
        threads: usize,
        shared: Option<Arc<dyn SharedBlocks>>,
    ) -> (Vec<u8>, DataStats) {
        let mut o = WriterOptions::with_block_size(65536);
        o.threads = threads;
        o.shared = shared;
        let out = tempfile::tempfile().unwrap();
        let r = write_image(root, &o, &out, &crate::NoProgress).unwrap();
        let mut v = Vec::new();
        (&out).read_to_end(&mut v).unwrap();
        (v, r.data)
    }

    fn data(seed: u32, len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 13) as u8 % 11)
            .collect()
    }

    #[test]
    fn helpers_take_blocks_from_the_back_and_never_change_a_byte() {
        // 40 distinct blocks and tails, in 5 files.
        let root = Node::flat((0..5u32).map(|i| (format!("f{i}"), data(i, 8 * 65536 + 3000))));
        let write = |shared: Option<Arc<dyn SharedBlocks>>| write_shared(&root, 1, shared);
        let (plain, p) = write(None);
        let all = p.compressed_blocks;
        assert!(all >= 40, "{p:?}");
        for mode in ["honest", "liar", "foreign", "raw", "silent", "short"] {
            let h = Arc::new(Helpers {
                mode,
                taken: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
            });
            let (bytes, s) = write(Some(h.clone()));
            assert!(bytes == plain, "{mode}: other bytes");
            let taken = h.taken.load(Ordering::Relaxed);
            assert!(taken > 0, "{mode}: helpers were never given a block");
            match mode {
                "honest" => {
                    assert_eq!(s.helped_blocks, taken, "{s:?}");
                    assert_eq!(s.helped_blocks + s.compressed_blocks, all);
                }
                "liar" | "foreign" | "raw" => {
                    assert_eq!((s.helped_blocks, s.compressed_blocks), (0, all));
                    assert_eq!(h.rejected.load(Ordering::Relaxed), taken);
                }
                "short" => {
                    assert!(s.helped_blocks > 0 && s.helped_blocks < taken, "{s:?}");
                    assert_eq!(s.helped_blocks + s.compressed_blocks, all);
                }
                _ => assert_eq!((s.helped_blocks, s.compressed_blocks), (0, all)),
            }
        }
    }
}
