//! Clients an application master uses: the RM's ApplicationMasterService
//! (following the leader across failovers) and node agents' ContainerManager.

use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Status;
use weft_common::leader::LeaderClient;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_relay_client::AgentRelayClient;
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
    /// The node's agent: calls go through it where it passes them on to
    /// the RM leader.
    local: Option<LocalAgent>,
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
        Ok(RmAmClient {
            rm,
            local: None,
            token,
        })
    }

    /// How long one call keeps retrying while no RM leader answers.
    pub fn with_retry_for(mut self, retry_for: Duration) -> Self {
        self.rm = self.rm.with_deadline(Some(retry_for));
        self
    }

    /// Calls go through `local` where it passes them on to the RM leader
    /// (a master in a container, [`LocalAgent::from_env`]): no connection
    /// of the master's own to the RM, while the agent's socket answers.
    pub fn through(mut self, local: Option<LocalAgent>) -> Self {
        self.local = local;
        self
    }

    /// The master's own node's agent given to [`RmAmClient::through`] (its
    /// task starts share it).
    pub fn local_agent(&self) -> Option<LocalAgent> {
        self.local.clone()
    }

    /// Calls `f` on the leader, following NotLeader hints and retrying
    /// retryable errors with backoff until the deadline: through the local
    /// agent where it relays, directly where that fails.
    pub async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, Status>
    where
        F: Fn(ApplicationMasterServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if let Some(local) = self.local.as_ref().filter(|l| l.inner.relays && l.usable()) {
            match f(ApplicationMasterServiceClient::new(
                local.inner.channel.clone(),
            ))
            .await
            {
                Ok(r) => return Ok(r.into_inner()),
                Err(e) if LocalAgent::go_around(&e) => local.failed(&e),
                Err(e) => return Err(e),
            }
        }
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
    // Pings while a call waits, so a frozen agent is left within about two
    // seconds (a long poll's answer may take 10 s; a passed-on call's up to
    // the relay's 30 s).
    tonic::transport::Endpoint::from_static("http://weft-agent.local")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(40))
        .http2_keep_alive_interval(weft_common::net::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(weft_common::net::KEEPALIVE_TIMEOUT)
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
}

/// How long calls go around the local agent once its socket failed (an
/// agent restarting, say), before it is tried again.
const LOCAL_OFF_FOR: Duration = Duration::from_secs(10);

/// The master's own node's agent, as its environment names it
/// (`WEFT_NODE_ID`, `WEFT_AGENT_SOCKET`, and `WEFT_AGENT_RELAY=1` where the
/// agent passes calls on): reached over its Unix socket, without a TLS
/// handshake; where it relays, the master's calls to the RM and its starts
/// on other nodes go through it too, over the connections the agent keeps.
#[derive(Clone)]
pub struct LocalAgent {
    inner: std::sync::Arc<LocalInner>,
}

struct LocalInner {
    node: String,
    channel: Channel,
    relays: bool,
    /// The socket failed: calls go around it until then.
    off_until: std::sync::Mutex<Option<Instant>>,
}

impl LocalAgent {
    /// The agent the environment names, if it names one.
    pub fn from_env() -> Option<Self> {
        let node = std::env::var("WEFT_NODE_ID")
            .ok()
            .filter(|n| !n.is_empty())?;
        let path = std::env::var_os("WEFT_AGENT_SOCKET").filter(|p| !p.is_empty())?;
        let relays = std::env::var("WEFT_AGENT_RELAY").is_ok_and(|v| v == "1");
        Some(LocalAgent {
            inner: std::sync::Arc::new(LocalInner {
                node,
                channel: unix_channel(path.into()),
                relays,
                off_until: Default::default(),
            }),
        })
    }

    /// Whether calls may go through it now.
    fn usable(&self) -> bool {
        let mut off = self.inner.off_until.lock().expect("off_until lock");
        match *off {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *off = None;
                true
            }
            None => true,
        }
    }

    /// Calls go around it for a while: `why` came from its socket.
    fn failed(&self, why: &Status) {
        tracing::warn!(error = %why.message(), "a call through the node's agent failed: calling directly for {LOCAL_OFF_FOR:?}");
        *self.inner.off_until.lock().expect("off_until lock") =
            Some(Instant::now() + LOCAL_OFF_FOR);
    }

    /// Whether a call that failed with `s` through the agent should be made
    /// directly instead: the socket failed (no answer from the agent: a
    /// transport error), the agent does not serve the relay, or it said it
    /// could not pass the call on (`weft-relay: unreachable`). An answer of
    /// the RM or the other agent, passed back, is the answer.
    fn go_around(s: &Status) -> bool {
        std::error::Error::source(s).is_some()
            || s.code() == tonic::Code::Unimplemented
            || s.metadata()
                .get(weft_common::net::RELAY_HEADER)
                .is_some_and(|v| v == weft_common::net::RELAY_UNREACHABLE)
    }

    /// Whether `s` says the agent or its socket cannot serve at all (not
    /// that it could not reach what it was to call).
    fn broken(s: &Status) -> bool {
        std::error::Error::source(s).is_some() || s.code() == tonic::Code::Unimplemented
    }
}

/// Node agents' ContainerManagers, one shared connection per address; the
/// master's own node's agent over its Unix socket where the environment
/// names one ([`LocalAgent`]), and through it the other nodes' agents where
/// it relays.
#[derive(Default)]
pub struct NodeClients {
    channels: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
    local: Option<LocalAgent>,
}

impl NodeClients {
    /// With the master's own node's agent, where its environment names one.
    pub fn from_env() -> Self {
        Self::with_local(LocalAgent::from_env())
    }

    /// With `local` as the master's own node's agent.
    pub fn with_local(local: Option<LocalAgent>) -> Self {
        NodeClients {
            local,
            ..NodeClients::default()
        }
    }

    /// Starts `req` on `node`'s agent (at `addr`): through the local agent
    /// where it is that node's or relays, else (and where that fails, see
    /// [`LocalAgent`]) directly over TCP.
    pub async fn start(
        &self,
        node: &str,
        addr: &str,
        req: pb::StartContainerRequest,
    ) -> Result<(), Status> {
        let local = self
            .local
            .as_ref()
            .filter(|l| (l.inner.node == node || l.inner.relays) && l.usable());
        let Some(local) = local else {
            return self.get(addr)?.start_container(req).await.map(|_| ());
        };
        let channel = local.inner.channel.clone();
        let through = if local.inner.node == node {
            ContainerManagerClient::new(channel)
                .start_container(req.clone())
                .await
        } else {
            AgentRelayClient::new(channel)
                .start_container_on(pb::RelayedStartRequest {
                    agent_address: addr.to_string(),
                    node_id: node.to_string(),
                    start: Some(req.clone()),
                })
                .await
        };
        match through {
            Ok(_) => Ok(()),
            Err(e) if LocalAgent::go_around(&e) => {
                if LocalAgent::broken(&e) {
                    local.failed(&e);
                } else {
                    tracing::debug!(error = %e.message(), node, "a start could not be passed on; directly");
                }
                // The first try may have started it (its answer lost):
                // then the container is there already.
                match self.get(addr)?.start_container(req).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code() == tonic::Code::AlreadyExists => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The agent at `addr`, over TCP.
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
