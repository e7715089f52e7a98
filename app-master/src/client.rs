//! Clients an application master uses: the RM's ApplicationMasterService
//! (following the leader across failovers) and node agents' ContainerManager.

use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;
use weft_common::leader::LeaderClient;
use weft_proto::v1 as pb;
use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

/// A connection to the node agent at `addr`.
fn channel(addr: &str) -> Result<Channel, Status> {
    Ok(weft_common::net::endpoint(
        addr,
        weft_common::tls::Role::Agent,
        Duration::from_secs(1),
        Some(Duration::from_secs(30)),
    )
    .map_err(|e| Status::invalid_argument(format!("address {addr:?}: {e}")))?
    .connect_lazy())
}

/// How long a master keeps retrying the RM group by default before it gives
/// up its attempt (YARN's AM resync): its tasks keep running on their nodes
/// through an outage this long, and the job goes on when a leader answers.
pub const DEFAULT_RM_RETRY_FOR: Duration = Duration::from_secs(15 * 60);

/// The RM as an application master sees it: calls go through the shared
/// leader-following loop (retrying for `retry_for`; 30 s per request for
/// long polls).
pub struct RmAmClient {
    rm: LeaderClient,
    /// The application token every call carries.
    token: Vec<u8>,
}

impl RmAmClient {
    /// `token`: the application token the RM issued for this attempt (to
    /// masters it starts, in `WEFT_APP_TOKEN`; to an unmanaged master's
    /// submitter, in the SubmitApplication answer). Calls retry for
    /// [`DEFAULT_RM_RETRY_FOR`]; see [`RmAmClient::with_retry_for`].
    pub fn new(addresses: Vec<String>, token: Vec<u8>) -> Result<Self, weft_common::leader::Error> {
        let rm = LeaderClient::new(addresses)?
            .with_deadline(Some(DEFAULT_RM_RETRY_FOR))
            .warn_after(5)
            .with_request_timeout(Duration::from_secs(30))
            .with_backoff(Duration::from_millis(50), Duration::from_secs(1));
        Ok(RmAmClient { rm, token })
    }

    /// How long one call keeps retrying while no RM leader answers.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.rm = self.rm.with_deadline(Some(retry_for));
        self
    }

    /// Calls `f` on the leader, following NotLeader hints and retrying
    /// retryable errors with backoff until the deadline.
    pub async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, Status>
    where
        F: Fn(ApplicationMasterServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.rm
            .call(|ch| f(ApplicationMasterServiceClient::new(ch)))
            .await
            .map_err(|e| e.into_status())
    }

    /// Registers this attempt; the answer lists what earlier attempts left
    /// running and what they finished.
    pub async fn register(
        &mut self,
        app: &str,
        attempt: u32,
    ) -> Result<pb::RegisterApplicationMasterResponse, Status> {
        let req = pb::RegisterApplicationMasterRequest {
            application_id: app.into(),
            attempt,
            application_token: self.token.clone(),
            ..Default::default()
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.register_application_master(req).await }
        })
        .await
    }

    /// One Allocate call (the token is filled in).
    pub async fn allocate(
        &mut self,
        mut req: pb::AllocateRequest,
    ) -> Result<pb::AllocateResponse, Status> {
        req.application_token = self.token.clone();
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.allocate(req).await }
            })
            .await?;
        // A renewed token (past half its life, or its key being replaced
        // by a rotation): later calls carry it.
        if !resp.application_token.is_empty() && resp.application_token != self.token {
            tracing::debug!("application token renewed by the resource manager");
            self.token = resp.application_token.clone();
        }
        Ok(resp)
    }

    pub async fn finish(
        &mut self,
        app: &str,
        attempt: u32,
        status: pb::FinalStatus,
        diagnostics: &str,
        stages: Vec<pb::StageProgress>,
    ) -> Result<(), Status> {
        let req = pb::FinishApplicationMasterRequest {
            application_id: app.into(),
            attempt,
            final_status: status as i32,
            diagnostics: diagnostics.into(),
            application_token: self.token.clone(),
            stages,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.finish_application_master(req).await }
        })
        .await
        .map(|_| ())
    }
}

/// A node agent's ContainerManager.
pub async fn node(addr: &str) -> Result<ContainerManagerClient<Channel>, Status> {
    Ok(ContainerManagerClient::new(channel(addr)?))
}

/// A connection to the node agent serving the Unix socket at `path`.
fn unix_channel(path: std::path::PathBuf) -> Channel {
    tonic::transport::Endpoint::from_static("http://weft-agent.local")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(30))
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
}

/// Node agents' ContainerManagers, one shared connection per address; the
/// master's own node's agent over its Unix socket where the agent said
/// where (`WEFT_NODE_ID`, `WEFT_AGENT_SOCKET`): no TLS handshake for the
/// tasks that land beside their master.
#[derive(Default)]
pub struct NodeClients {
    channels: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
    /// This master's node and its agent's socket.
    local: Option<(String, std::path::PathBuf)>,
    /// The socket failed once: the node's agent over TCP from then on.
    local_failed: std::sync::atomic::AtomicBool,
}

impl NodeClients {
    /// With the master's own node's agent's socket, where its agent named
    /// one in the environment.
    pub fn from_env() -> Self {
        let local = match (
            std::env::var("WEFT_NODE_ID"),
            std::env::var_os("WEFT_AGENT_SOCKET"),
        ) {
            (Ok(node), Some(path)) if !node.is_empty() && !path.is_empty() => {
                Some((node, std::path::PathBuf::from(path)))
            }
            _ => None,
        };
        NodeClients {
            local,
            ..NodeClients::default()
        }
    }

    /// Whether calls to `node`'s agent go over the local socket.
    pub fn is_local(&self, node: &str) -> bool {
        !self.local_failed.load(std::sync::atomic::Ordering::Relaxed)
            && self.local.as_ref().is_some_and(|(n, _)| n == node)
    }

    /// Calls to `node`'s agent over TCP from now on (its socket failed).
    pub fn local_failed(&self) {
        self.local_failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The agent of `node` (at `addr`): over its Unix socket when it is
    /// this master's own node.
    pub fn get_on(
        &self,
        node: &str,
        addr: &str,
    ) -> Result<ContainerManagerClient<Channel>, Status> {
        let Some((_, path)) = self.local.as_ref().filter(|_| self.is_local(node)) else {
            return self.get(addr);
        };
        let key = format!("unix:{}", path.display());
        let mut map = self.channels.lock().expect("channels lock");
        let ch = map
            .entry(key)
            .or_insert_with(|| unix_channel(path.clone()))
            .clone();
        Ok(ContainerManagerClient::new(ch))
    }

    pub fn get(&self, addr: &str) -> Result<ContainerManagerClient<Channel>, Status> {
        let mut map = self.channels.lock().expect("channels lock");
        if let Some(ch) = map.get(addr) {
            return Ok(ContainerManagerClient::new(ch.clone()));
        }
        let ch = channel(addr)?;
        map.insert(addr.to_string(), ch.clone());
        Ok(ContainerManagerClient::new(ch))
    }
}
