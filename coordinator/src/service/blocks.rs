//! GetBlock, PutBlock, OfferBlocks, TakeBlocks: the block store and work
//! sharing, every block checked against the id it claims.

use std::time::Instant;

use iukfarm_engine::blockcache::{BlockId, Cached, MAX_BLOCK};
use iukfarm_engine::sqfs::XzConfig;
use iukfarm_proto::Role;
use iukfarm_proto::v1;
use tonic::{Request, Response, Status};

use super::FarmService;
use super::workers::seen;
use crate::audit::Verdict;
use crate::blocks::Answer;

pub(super) fn no_store() -> Status {
    Status::failed_precondition("this coordinator runs without a block store")
}

/// A block id as the wire gives it, its digests checked for length.
pub(super) fn block_id(b: Option<v1::BlockRef>) -> Result<BlockId, Status> {
    let b = b.ok_or_else(|| Status::invalid_argument("no block"))?;
    BlockId::try_from(&b).map_err(Status::invalid_argument)
}

/// xz settings from the wire, for work sharing.
pub(super) fn xz_config(x: Option<v1::XzSettings>) -> Result<XzConfig, Status> {
    let x = x.ok_or_else(|| Status::invalid_argument("no xz settings"))?;
    let cfg = XzConfig::from(&x);
    cfg.validate_shared()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(cfg)
}

/// The blocks of an offer, each checked to be the block its id names
/// (helpers compress what is here, and the job's id must name it).
pub(super) async fn offered_blocks(
    xz: Option<v1::XzSettings>,
    offered: Vec<v1::OfferedBlock>,
) -> Result<Vec<(BlockId, XzConfig, Vec<u8>)>, Status> {
    if offered.is_empty() {
        return Ok(Vec::new());
    }
    if offered.len() > crate::offers::MAX_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "at most {} blocks per offer",
            crate::offers::MAX_BLOCKS
        )));
    }
    let xz = xz_config(xz)?;
    let mut blocks = Vec::with_capacity(offered.len());
    for b in offered {
        let id = block_id(b.block)?;
        if b.data.is_empty() || b.data.len() as u64 > MAX_BLOCK {
            return Err(Status::invalid_argument("a block of 1 byte to 1 MiB"));
        }
        blocks.push((id, xz, b.data));
    }
    tokio::task::spawn_blocking(move || {
        (blocks.iter())
            .all(|(id, xz, data)| BlockId::new(xz, data) == *id)
            .then_some(blocks)
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .ok_or_else(|| Status::invalid_argument("an offered block is not the block its id names"))
}

impl FarmService {
    pub(super) async fn get_block(
        &self,
        req: Request<v1::GetBlockRequest>,
    ) -> Result<Response<v1::GetBlockReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "get blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        let id = block_id(r.block)?;
        let asked = Instant::now();
        let answer = if r.unless_busy {
            store.get_unless_busy(&name, &id).await
        } else {
            store.get(&name, &id).await
        };
        let waited_ms = asked.elapsed().as_millis().min(u32::MAX as u128) as u32;
        let reply = match answer {
            Answer::Compress => v1::GetBlockReply::default(),
            Answer::Busy => v1::GetBlockReply {
                busy: true,
                ..Default::default()
            },
            Answer::Found(Cached::Uncompressed) => v1::GetBlockReply {
                found: true,
                uncompressed: true,
                waited_ms,
                ..Default::default()
            },
            Answer::Found(Cached::Compressed(b)) => v1::GetBlockReply {
                found: true,
                compressed: b,
                waited_ms,
                ..Default::default()
            },
        };
        Ok(Response::new(reply))
    }

    pub(super) async fn put_block(
        &self,
        req: Request<v1::PutBlockRequest>,
    ) -> Result<Response<v1::PutBlockReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "put blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        if self.sh.blocks.is_none() {
            return Err(no_store());
        }
        let id = block_id(r.block)?;
        let form = match (r.uncompressed, r.compressed.is_empty()) {
            (true, true) => Cached::Uncompressed,
            (false, false) => Cached::Compressed(r.compressed),
            _ => {
                return Err(Status::invalid_argument(
                    "a block is either compressed or not",
                ));
            }
        };
        let sh = self.sh.clone();
        // Checking a form decompresses it, an audit compresses the block
        // again: off the async threads. An audit comes first, so that a
        // form it refuses is never stored.
        let accepted = tokio::task::spawn_blocking(move || {
            let Some(store) = sh.blocks.as_ref() else {
                return false;
            };
            store.arrived(&name, &id);
            // Audited only while not banned: one failure acts on it.
            let audit = match store.bad_blocks(&name) {
                0 => sh.audits.check(&name, &id, &form),
                _ => Verdict::NotAudited,
            };
            if audit == Verdict::Differs {
                store.checked(&name);
                let to = store.ban_worker(
                    &name,
                    "a form it compressed for another job is not what our encoder makes",
                );
                sh.lock().audit_failed.push((name, to));
                sh.bump();
                return false;
            }
            store.keep(&name, &id, &form)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::PutBlockReply { accepted }))
    }

    pub(super) async fn offer_blocks(
        &self,
        req: Request<v1::OfferBlocksRequest>,
    ) -> Result<Response<v1::OfferBlocksReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "offer blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        let blocks = offered_blocks(r.xz, r.blocks).await?;
        let (job, priority) = {
            let st = self.sh.lock();
            let mine = st.table.by_lease(&r.lease_id).filter(|&i| {
                let j = &st.table.jobs[i];
                j.reproduction_of.is_none()
                    && j.lease.as_ref().is_some_and(|l| l.worker_id == r.worker_id)
            });
            let Some(i) = mine else {
                return Err(Status::failed_precondition(format!(
                    "lease {} is not a running job of yours that may share blocks",
                    r.lease_id
                )));
            };
            (st.table.jobs[i].id.clone(), st.table.jobs[i].priority)
        };
        if store.bad_blocks(&name) > 0 {
            return Err(Status::permission_denied(
                "this worker sent wrong blocks: it takes no part in sharing in this release",
            ));
        }
        if blocks.is_empty() {
            let wanted = self.sh.offers.wanted(&name).await;
            return Ok(Response::new(v1::OfferBlocksReply {
                wanted: wanted.min(crate::offers::MAX_BLOCKS) as u32,
                taken: Vec::new(),
            }));
        }
        let keys = self.sh.offers.offer(&name, &job, priority, blocks);
        let taken = self.sh.offers.settle(&keys).await;
        Ok(Response::new(v1::OfferBlocksReply { wanted: 0, taken }))
    }

    pub(super) async fn take_blocks(
        &self,
        req: Request<v1::TakeBlocksRequest>,
    ) -> Result<Response<v1::TakeBlocksReply>, Status> {
        let caller = self.sh.auth.check(&req, &[Role::Worker], "take blocks")?;
        let r = req.into_inner();
        let name = seen(&mut self.sh.lock(), &r.worker_id, &caller)?;
        let store = self.sh.blocks.as_ref().ok_or_else(no_store)?;
        if store.bad_blocks(&name) > 0 {
            return Err(Status::permission_denied(
                "this worker sent wrong blocks: it takes no part in sharing in this release",
            ));
        }
        let batch = self
            .sh
            .offers
            .take(&name, r.max_blocks as usize, |id| store.claim(&name, id))
            .await;
        for o in &batch {
            (self.sh.audits).taken(&name, &o.job, &o.id, &o.xz, &o.data);
        }
        let blocks = batch
            .into_iter()
            .map(|o| v1::TakenBlock {
                block: Some((&o.id).into()),
                xz: Some((&o.xz).into()),
                data: o.data,
            })
            .collect();
        Ok(Response::new(v1::TakeBlocksReply { blocks }))
    }
}
