//! The ContainerManager gRPC service: a thin layer over [`Manager`].

use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use weft_proto::v1 as pb;
use weft_proto::v1::container_manager_server::ContainerManager;

use crate::logs;
use crate::manager::Manager;

pub struct ContainerService {
    mgr: Manager,
}

impl ContainerService {
    pub fn new(mgr: Manager) -> Self {
        ContainerService { mgr }
    }
}

#[tonic::async_trait]
impl ContainerManager for ContainerService {
    #[instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn start_container(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let status = self.mgr.start(req.into_inner()).await?;
        Ok(Response::new(pb::StartContainerResponse {
            status: Some(status),
        }))
    }

    #[instrument(skip_all, fields(container_id = %req.get_ref().container_id))]
    async fn stop_container(
        &self,
        req: Request<pb::StopContainerRequest>,
    ) -> Result<Response<pb::StopContainerResponse>, Status> {
        let r = req.into_inner();
        let grace = (r.grace_period_ms > 0).then(|| Duration::from_millis(r.grace_period_ms));
        let status = self.mgr.stop(&r.container_id, grace, r.wait).await?;
        Ok(Response::new(pb::StopContainerResponse {
            status: Some(status),
        }))
    }

    async fn get_container_status(
        &self,
        req: Request<pb::GetContainerStatusRequest>,
    ) -> Result<Response<pb::ContainerStatus>, Status> {
        Ok(Response::new(self.mgr.status(&req.get_ref().container_id)?))
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let containers = self
            .mgr
            .list(req.get_ref().include_finished)
            .iter()
            .map(|r| r.to_proto())
            .collect();
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    type ReadLogsStream = ReceiverStream<Result<pb::LogChunk, Status>>;

    async fn read_logs(
        &self,
        req: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        let r = req.into_inner();
        let stream = pb::LogStream::try_from(r.stream).map_err(|_| {
            Status::invalid_argument(format!(
                "stream: {} is not stdout (0) or stderr (1)",
                r.stream
            ))
        })?;
        let rx = logs::read(&self.mgr, &r.container_id, stream, r.offset, r.follow).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
