//! What the agent passes on for the node's own containers, on its Unix
//! socket only: an application master's calls to the RM leader
//! ([`AmRelay`], YARN's AMRMProxy) and its task starts on other nodes'
//! agents ([`PeerStarts`]), over connections the agent keeps. A master is a
//! new process for every job; through the relay it makes no TLS handshake
//! of its own, and the RM and the other agents see none per job either.
//!
//! Nothing is trusted more for coming through here: the RM checks the
//! application token in every master call, the other agent the container
//! token of every start, as over a direct connection. Over TCP both relays
//! refuse (the agent passes on nothing for the network).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use weft_common::leader::LeaderClient;
use weft_proto::v1 as pb;
use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
use weft_proto::v1::application_master_service_server::ApplicationMasterService;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

use crate::metrics::AgentMetrics;

pub use weft_common::net::RELAY_TO_HEADER;

/// How long the relay follows the RM group for one master call before it
/// answers UNAVAILABLE (the master then calls the RM itself): past an
/// election, and past an Allocate long poll (5 s) with room to spare.
const RM_CALL_DEADLINE: Duration = Duration::from_secs(20);

/// Other agents' connections kept at most (the least recently used goes
/// first), and how long one unused is kept.
const MAX_PEERS: usize = 256;
const PEER_IDLE: Duration = Duration::from_secs(300);

/// The longest `weft-relay-to` address taken.
const MAX_ADDRESS_LEN: usize = 256;

/// Refuses a call that did not come over the agent's Unix socket.
fn local_only<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    let local = req
        .extensions()
        .get::<weft_common::net::ConnInfo>()
        .is_some_and(|i| i.local_uid.is_some());
    if local {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what}: the agent passes calls on only for the node's own containers, over its Unix socket"
        )))
    }
}

/// The ApplicationMasterService on the agent's socket: each call passed on
/// to the RM leader as it came (the token in it checked there), following
/// the leader across failovers for up to [`RM_CALL_DEADLINE`].
pub struct AmRelay {
    rm: LeaderClient,
    metrics: Arc<AgentMetrics>,
}

impl AmRelay {
    pub fn new(
        rm_addresses: Vec<String>,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, weft_common::leader::Error> {
        Ok(AmRelay {
            metrics,
            rm: LeaderClient::new(rm_addresses)?
                .with_deadline(Some(RM_CALL_DEADLINE))
                .with_request_timeout(Duration::from_secs(30))
                .with_backoff(Duration::from_millis(50), Duration::from_secs(1)),
        })
    }

    async fn pass_on<Q, T, F, Fut>(
        &self,
        req: Request<Q>,
        what: &'static str,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        Q: Clone,
        F: Fn(ApplicationMasterServiceClient<Channel>, Q) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        local_only(&req, "a master's call to the resource manager")?;
        let q = req.into_inner();
        let r = self
            .rm
            .call(|ch| f(ApplicationMasterServiceClient::new(ch), q.clone()))
            .await
            .map(Response::new)
            .map_err(|e| e.into_status());
        self.metrics.count_relayed(what, &r);
        r
    }
}

#[tonic::async_trait]
impl ApplicationMasterService for AmRelay {
    async fn register_application_master(
        &self,
        req: Request<pb::RegisterApplicationMasterRequest>,
    ) -> Result<Response<pb::RegisterApplicationMasterResponse>, Status> {
        self.pass_on(req, "register", |mut c, q| async move {
            c.register_application_master(q).await
        })
        .await
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        self.pass_on(
            req,
            "allocate",
            |mut c, q| async move { c.allocate(q).await },
        )
        .await
    }

    async fn finish_application_master(
        &self,
        req: Request<pb::FinishApplicationMasterRequest>,
    ) -> Result<Response<pb::FinishApplicationMasterResponse>, Status> {
        self.pass_on(req, "finish", |mut c, q| async move {
            c.finish_application_master(q).await
        })
        .await
    }
}

struct Peer {
    channel: Channel,
    used: Instant,
}

/// Connections to other nodes' agents that starts are passed on over, one
/// per address, at most [`MAX_PEERS`], each dropped once unused for
/// [`PEER_IDLE`] and all when the TLS settings are reloaded.
#[derive(Default)]
pub struct PeerStarts {
    peers: Mutex<(u64, HashMap<String, Peer>)>,
}

impl PeerStarts {
    /// Whether `req` asks for its start to be passed on (it names another
    /// agent in [`RELAY_TO_HEADER`]).
    pub fn wanted<T>(req: &Request<T>) -> bool {
        req.metadata().contains_key(RELAY_TO_HEADER)
    }

    /// Passes a start on to the agent `req` names, as it came; that agent's
    /// answer (its refusal too) is the answer.
    pub async fn start(
        &self,
        req: Request<pb::StartContainerRequest>,
        metrics: &AgentMetrics,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        local_only(&req, "StartContainer on another node")?;
        let r = self.pass_on(req).await;
        metrics.count_relayed("start", &r);
        r
    }

    async fn pass_on(
        &self,
        req: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let to = req
            .metadata()
            .get(RELAY_TO_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        if to.is_empty() || to.len() > MAX_ADDRESS_LEN {
            return Err(Status::invalid_argument(format!(
                "{RELAY_TO_HEADER}: must be an agent's host:port of at most {MAX_ADDRESS_LEN} characters"
            )));
        }
        let channel = self.channel(&to)?;
        ContainerManagerClient::new(channel)
            .start_container(req.into_inner())
            .await
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut guard = self.peers.lock().expect("peers lock");
        let (generation, peers) = &mut *guard;
        let now = Instant::now();
        // A reload (a renewed certificate, a new CA) makes new connections.
        let current = weft_common::tls::generation();
        if *generation != current {
            peers.clear();
            *generation = current;
        }
        peers.retain(|_, p| now.duration_since(p.used) < PEER_IDLE);
        if let Some(p) = peers.get_mut(addr) {
            p.used = now;
            return Ok(p.channel.clone());
        }
        if peers.len() >= MAX_PEERS {
            if let Some(oldest) = peers
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(a, _)| a.clone())
            {
                peers.remove(&oldest);
            }
        }
        let channel = weft_common::net::endpoint(
            addr,
            weft_common::tls::Role::Agent,
            Duration::from_secs(1),
            Some(Duration::from_secs(30)),
        )
        .map_err(|e| Status::invalid_argument(format!("{RELAY_TO_HEADER}: {addr:?}: {e}")))?
        .connect_lazy();
        peers.insert(
            addr.to_string(),
            Peer {
                channel: channel.clone(),
                used: now,
            },
        );
        Ok(channel)
    }

    /// How many other agents' connections are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.peers.lock().expect("peers lock").1.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peers_are_kept_one_per_address_and_at_most_the_bound() {
        let p = PeerStarts::default();
        let a = p.channel("127.0.0.1:1").unwrap();
        drop(a);
        p.channel("127.0.0.1:1").unwrap();
        assert_eq!(p.kept(), 1);
        for i in 0..MAX_PEERS + 10 {
            p.channel(&format!("127.0.0.2:{}", 1000 + i)).unwrap();
        }
        assert_eq!(p.kept(), MAX_PEERS);
        // The least recently used went first: the first address is gone,
        // the last ones are there.
        let peers = p.peers.lock().unwrap();
        assert!(!peers.1.contains_key("127.0.0.1:1"));
        assert!(peers
            .1
            .contains_key(&format!("127.0.0.2:{}", 1000 + MAX_PEERS + 9)));
    }

    #[tokio::test]
    async fn over_tcp_nothing_is_passed_on() {
        let p = PeerStarts::default();
        let mut req = Request::new(pb::StartContainerRequest::default());
        req.metadata_mut()
            .insert(RELAY_TO_HEADER, "127.0.0.1:1".parse().unwrap());
        assert!(PeerStarts::wanted(&req));
        let m = AgentMetrics::default();
        let e = p.start(req, &m).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("Unix socket"), "{e:?}");
        assert_eq!(p.kept(), 0);
    }
}
