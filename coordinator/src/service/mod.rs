//! The gRPC service: what workers and the RM's client may ask.

mod blocks;
mod client;
mod transfer;
mod workers;

use std::pin::Pin;
use std::sync::Arc;

use iukfarm_proto::v1::{self, farm_server::Farm};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::state::Shared;

pub(crate) use client::status;

type Chunks = Pin<Box<dyn Stream<Item = Result<v1::Chunk, Status>> + Send>>;

type Statuses = Pin<Box<dyn Stream<Item = Result<v1::ReleaseStatus, Status>> + Send>>;

pub(crate) struct FarmService {
    sh: Arc<Shared>,
}

impl FarmService {
    pub fn new(sh: Arc<Shared>) -> Self {
        FarmService { sh }
    }
}

// Each RPC lives in the module of its group; the inherent methods (found
// before the trait's) hold the bodies.
#[tonic::async_trait]
impl Farm for FarmService {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterReply>, Status> {
        FarmService::register(self, req).await
    }

    async fn lease(
        &self,
        req: Request<v1::LeaseRequest>,
    ) -> Result<Response<v1::LeaseReply>, Status> {
        FarmService::lease(self, req).await
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        FarmService::heartbeat(self, req).await
    }

    type FetchIsoStream = Chunks;

    async fn fetch_iso(
        &self,
        req: Request<v1::FetchIsoRequest>,
    ) -> Result<Response<Chunks>, Status> {
        FarmService::fetch_iso(self, req).await
    }

    async fn upload(
        &self,
        req: Request<Streaming<v1::UploadMessage>>,
    ) -> Result<Response<v1::UploadReply>, Status> {
        FarmService::upload(self, req).await
    }

    async fn fail(&self, req: Request<v1::FailRequest>) -> Result<Response<v1::FailReply>, Status> {
        FarmService::fail(self, req).await
    }

    async fn get_block(
        &self,
        req: Request<v1::GetBlockRequest>,
    ) -> Result<Response<v1::GetBlockReply>, Status> {
        FarmService::get_block(self, req).await
    }

    async fn put_block(
        &self,
        req: Request<v1::PutBlockRequest>,
    ) -> Result<Response<v1::PutBlockReply>, Status> {
        FarmService::put_block(self, req).await
    }

    async fn offer_blocks(
        &self,
        req: Request<v1::OfferBlocksRequest>,
    ) -> Result<Response<v1::OfferBlocksReply>, Status> {
        FarmService::offer_blocks(self, req).await
    }

    async fn take_blocks(
        &self,
        req: Request<v1::TakeBlocksRequest>,
    ) -> Result<Response<v1::TakeBlocksReply>, Status> {
        FarmService::take_blocks(self, req).await
    }

    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ReleaseStatus>, Status> {
        FarmService::status(self, req).await
    }

    type WatchStream = Statuses;

    async fn watch(&self, req: Request<v1::StatusRequest>) -> Result<Response<Statuses>, Status> {
        FarmService::watch(self, req).await
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelReply>, Status> {
        FarmService::cancel(self, req).await
    }

    type DownloadStream = Chunks;

    async fn download(
        &self,
        req: Request<v1::DownloadRequest>,
    ) -> Result<Response<Chunks>, Status> {
        FarmService::download(self, req).await
    }
}
