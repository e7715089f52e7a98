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

/// The metadata key under which a master shows its application token (hex)
/// when it asks after, stops or reads the logs of its own containers.
pub const APPLICATION_TOKEN_HEADER: &str = "weft-application-token";

/// With TLS on, who may stop, look at or read the logs of a container: the
/// resource manager (its member certificate), or the master of the
/// container's application (that application's token, `container` given).
/// Listing every container is the RM's alone. Without TLS (loopback or
/// `insecure`), anyone who reaches the port.
fn may_act<T>(
    mgr: &Manager,
    req: &Request<T>,
    container: Option<&str>,
    what: &str,
) -> Result<(), Status> {
    use weft_common::tls;
    if tls::installed().is_none() {
        return Ok(());
    }
    let peer = tls::peer(req);
    if peer.as_ref().is_some_and(|p| p.role == Some(tls::Role::Rm)) {
        return Ok(());
    }
    let shown = match &peer {
        Some(p) => p.to_string(),
        None => "no certificate".to_string(),
    };
    let token = req
        .metadata()
        .get(APPLICATION_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|t| hex::decode(t.trim()));
    match (container, token) {
        (Some(id), Some(Ok(token))) => mgr.owned_by(id, &token).map_err(|why| {
            Status::permission_denied(format!(
                "{what} of {id} needs the resource manager's certificate or the token of the container's application: {why}"
            ))
        }),
        (_, Some(Err(_))) => Err(Status::invalid_argument(format!(
            "{APPLICATION_TOKEN_HEADER}: not hex"
        ))),
        (Some(id), None) => Err(Status::permission_denied(format!(
            "{what} of {id} needs the resource manager's certificate or the token of the container's application ({APPLICATION_TOKEN_HEADER}); this connection showed {shown}"
        ))),
        (None, _) => Err(Status::permission_denied(format!(
            "{what} needs the resource manager's certificate; this connection showed {shown}"
        ))),
    }
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
        may_act(
            &self.mgr,
            &req,
            Some(&req.get_ref().container_id),
            "stopping a container",
        )?;
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
        may_act(
            &self.mgr,
            &req,
            Some(&req.get_ref().container_id),
            "the status",
        )?;
        Ok(Response::new(self.mgr.status(&req.get_ref().container_id)?))
    }

    async fn list_containers(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        may_act(&self.mgr, &req, None, "listing this node's containers")?;
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
        may_act(
            &self.mgr,
            &req,
            Some(&req.get_ref().container_id),
            "the logs",
        )?;
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
