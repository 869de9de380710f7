//! Helping: while a slot of this worker is free, it compresses blocks that
//! other workers' jobs offer (work sharing), so that a large IUK uses the
//! cores of every idle worker. Batches are taken from the coordinator with
//! the block store's claims on them; each form is put back as soon as it is
//! made, for the job that waits on it.
//!
//! Nothing from the coordinator is taken on trust: the settings must be
//! within bounds and each block must be the block its id names, or the
//! block is skipped (its job compresses it itself once the claim lapses).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iukfarm_engine::blockcache::{BlockId, Cached, MAX_BLOCK};
use iukfarm_engine::sqfs::XzConfig;
use iukfarm_proto::{FarmClient, v1};
use rayon::prelude::*;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::job::JobProgress;

type Running = Arc<Mutex<HashMap<String, Arc<JobProgress>>>>;

/// A checked block of a batch.
struct Task {
    id: BlockId,
    xz: XzConfig,
    data: Vec<u8>,
}

/// Helps until the session ends (the caller aborts it) or the coordinator
/// says this worker may not help.
pub(crate) async fn run(ctx: Arc<Ctx>, client: FarmClient, worker_id: String, running: Running) {
    let threads = ctx.job_threads();
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("helper-{i}"))
        .build()
    {
        Ok(p) => Arc::new(p),
        Err(e) => {
            warn!("cannot start helper threads ({e}): not helping other jobs");
            return;
        }
    };
    let helped = Arc::new(AtomicU64::new(0));
    // Forms made, for the test hook that turns foreign after some.
    let formed = Arc::new(AtomicU64::new(0));
    let mut sending = std::collections::VecDeque::new();
    // The next batch is asked for while this one is compressed, so that
    // its transfer overlaps the compression.
    let mut next: Option<Prefetch> = None;
    loop {
        let busy = running.lock().unwrap_or_else(|p| p.into_inner()).len();
        if busy >= ctx.cfg.slots as usize && next.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let asked = Instant::now();
        let taken = match next.take() {
            Some(mut h) => (&mut h.0).await.unwrap_or(Taken::Retry),
            None => take(client.clone(), worker_id.clone(), threads).await,
        };
        let batch = match taken {
            Taken::Blocks(b) => b,
            Taken::Stop(why) => {
                debug!("not helping other jobs: {why}");
                return;
            }
            Taken::Retry => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let busy = running.lock().unwrap_or_else(|p| p.into_inner()).len();
        if busy < ctx.cfg.slots as usize && !batch.is_empty() {
            next = Some(Prefetch(tokio::spawn(take(
                client.clone(),
                worker_id.clone(),
                threads,
            ))));
        }
        let waited = asked.elapsed();
        let taken: usize = batch.iter().map(|b| b.data.len()).sum();
        (ctx.metrics.received.with_label_values(&["block"])).inc_by(taken as u64);
        let tasks: Vec<Task> = batch.into_iter().filter_map(check).collect();
        if tasks.is_empty() {
            continue;
        }
        let n = tasks.len();
        let bytes: usize = tasks.iter().map(|t| t.data.len()).sum();
        let started = Instant::now();
        ctx.metrics.helping.set(n as i64);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(BlockId, Cached)>(n);
        let pool = pool.clone();
        let (foreign, formed) = (ctx.cfg.test.foreign_forms_after, formed.clone());
        let compressing = tokio::task::spawn_blocking(move || {
            pool.install(|| {
                tasks.into_par_iter().for_each(|t| {
                    let n = formed.fetch_add(1, Ordering::Relaxed);
                    let xz = match foreign {
                        // Presets 4 to 9 differ only in their dictionary,
                        // which the settings fix: another match finder.
                        Some(after) if n >= after => XzConfig {
                            level: if t.xz.level > 3 { 1 } else { 6 },
                            ..t.xz
                        },
                        _ => t.xz,
                    };
                    // Each of the pool's threads compresses a block of its
                    // own, so the trials of one need no other thread.
                    match xz.compress_here(&t.data) {
                        Ok(Some(c)) => {
                            let _ = tx.blocking_send((t.id, Cached::Compressed(c)));
                        }
                        Ok(None) => {
                            let _ = tx.blocking_send((t.id, Cached::Uncompressed));
                        }
                        Err(e) => warn!("compressing a block for another job: {e}"),
                    }
                })
            })
        });
        // The forms go up while the next batch is compressed: a put waits
        // for the coordinator's check, and the cores have better to do.
        let (client2, worker_id2, lie, done, metrics) = (
            client.clone(),
            worker_id.clone(),
            ctx.cfg.test.lie_blocks,
            helped.clone(),
            ctx.metrics.clone(),
        );
        sending.push_back(tokio::spawn(async move {
            let mut client = client2;
            while let Some((id, form)) = rx.recv().await {
                let (uncompressed, mut compressed) = match form {
                    Cached::Uncompressed => (true, Vec::new()),
                    Cached::Compressed(b) => (false, b),
                };
                if lie && !compressed.is_empty() {
                    let at = compressed.len() / 2;
                    compressed[at] ^= 0x20;
                }
                let len = compressed.len() as u64;
                let req = v1::PutBlockRequest {
                    worker_id: worker_id2.clone(),
                    block: Some((&id).into()),
                    uncompressed,
                    compressed,
                };
                (metrics.sent.with_label_values(&["block"])).inc_by(len);
                match client.put_block(req).await {
                    Ok(r) if r.get_ref().accepted => {
                        done.fetch_add(1, Ordering::Relaxed);
                        metrics.helped.inc();
                    }
                    Ok(_) => warn!(
                        "the coordinator refused a block this worker compressed for another job"
                    ),
                    Err(s) => debug!("putting a block: {}", s.message()),
                }
            }
        }));
        let _ = compressing.await;
        ctx.metrics.helping.set(0);
        debug!(
            "compressed {n} blocks ({:.1} MiB) for another job in {:.2}s, after waiting {:.2}s for them",
            bytes as f64 / 1048576.0,
            started.elapsed().as_secs_f64(),
            waited.as_secs_f64()
        );
        // At most one earlier batch still sending: memory stays bounded.
        while sending.len() > 2 {
            if let Some(h) = sending.pop_front() {
                let _ = h.await;
            }
        }
        let helped = helped.load(Ordering::Relaxed);
        if helped > 0 && helped % 256 < n as u64 {
            info!("compressed {helped} blocks for other workers' jobs so far");
        }
    }
}

/// A batch asked for ahead; dropped with the helper (session over), it is
/// dropped too rather than left to take claims nobody honours.
struct Prefetch(tokio::task::JoinHandle<Taken>);

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum Taken {
    Blocks(Vec<v1::TakenBlock>),
    /// The coordinator says this worker may not help.
    Stop(String),
    Retry,
}

async fn take(mut client: FarmClient, worker_id: String, threads: usize) -> Taken {
    let req = v1::TakeBlocksRequest {
        worker_id,
        max_blocks: (2 * threads) as u32,
    };
    match client.take_blocks(req).await {
        Ok(r) => Taken::Blocks(r.into_inner().blocks),
        Err(s) if matches!(s.code(), Code::PermissionDenied | Code::FailedPrecondition) => {
            Taken::Stop(s.message().to_string())
        }
        Err(s) => {
            debug!("taking blocks: {}", s.message());
            Taken::Retry
        }
    }
}

/// A block of a batch if its settings are within bounds and its bytes are
/// what its id names.
fn check(b: v1::TakenBlock) -> Option<Task> {
    let xz = XzConfig::from(&b.xz?);
    let r = b.block?;
    let ok = xz.validate_shared().is_ok()
        && !b.data.is_empty()
        && b.data.len() as u64 <= MAX_BLOCK
        && r.len == b.data.len() as u64;
    if !ok {
        warn!("the coordinator offered a block out of bounds: skipped");
        return None;
    }
    let id = BlockId::new(&xz, &b.data);
    if BlockId::try_from(&r) != Ok(id) {
        warn!("the coordinator offered a block that is not the block its id names: skipped");
        return None;
    }
    Some(Task {
        id,
        xz,
        data: b.data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(xz: &XzConfig, data: Vec<u8>, id_of: &[u8]) -> v1::TakenBlock {
        let id = BlockId::new(xz, id_of);
        v1::TakenBlock {
            block: Some((&id).into()),
            xz: Some(xz.into()),
            data,
        }
    }

    #[test]
    fn a_helper_compresses_only_blocks_that_are_what_their_ids_name() {
        let xz = XzConfig::for_block_size(1 << 20);
        let data = vec![3u8; 5000];
        let t = check(taken(&xz, data.clone(), &data)).expect("a sound block");
        assert_eq!((t.id, t.data.len()), (BlockId::new(&xz, &data), 5000));
        // Bytes other than the id's.
        assert!(check(taken(&xz, vec![4u8; 5000], &data)).is_none());
        // Settings other than the id's.
        let mut x86 = xz;
        x86.flags = iukfarm_engine::sqfs::compress::xz_flags::X86;
        let mut b = taken(&xz, data.clone(), &data);
        b.xz = Some((&x86).into());
        assert!(check(b).is_none());
        // Settings out of bounds: a dictionary that would need gigabytes.
        let mut huge = xz;
        huge.dict_size = 1 << 30;
        assert!(check(taken(&huge, data.clone(), &data)).is_none());
        // Empty, oversized, or without settings.
        assert!(check(taken(&xz, Vec::new(), &[])).is_none());
        let big = vec![1u8; (MAX_BLOCK + 1) as usize];
        assert!(check(taken(&xz, big.clone(), &big)).is_none());
        let mut b = taken(&xz, data.clone(), &data);
        b.xz = None;
        assert!(check(b).is_none());
    }
}
