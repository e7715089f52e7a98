//! What the agent passes on for the node's own containers, on its Unix
//! socket only: an application master's calls to the RM leader
//! ([`AmRelay`], YARN's AMRMProxy) and its task starts on other nodes'
//! agents ([`StartRelay`]), over connections the agent keeps. A master is a
//! new process for every job; through the relays it makes no connection
//! (with TLS, no handshake) of its own, and the RM and the other agents
//! see none per job either.
//!
//! The RM checks the application token in every master call, the other
//! agent the container token of every start, as over a direct connection.
//! What the agent lends is its reach, and only so far: a start is passed on
//! only with a container token of this RM group, unexpired, granting the
//! node it names, to a plain `host:port` (over TLS where the cluster runs
//! TLS, to a server showing an agent certificate). Over TCP both relays
//! refuse; each has a bound on the calls it carries at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use weft_common::leader::LeaderClient;
use weft_proto::v1 as pb;
use weft_proto::v1::agent_relay_server::AgentRelay;
use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
use weft_proto::v1::application_master_service_server::ApplicationMasterService;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

use crate::manager::Manager;

pub use weft_common::net::{RELAY_HEADER, RELAY_UNREACHABLE};

/// How long the relay follows the RM group for one master call before it
/// answers UNAVAILABLE (`weft-relay: unreachable`: the master then calls
/// the RM itself): past an election, and past an Allocate long poll (at
/// most 10 s) with room to spare.
const RM_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// Master calls passed on at once (each master has at most one long poll
/// waiting, and a call or two beside it).
const MAX_RM_CALLS: usize = 1024;

/// Starts passed on at once.
const MAX_STARTS: usize = 64;

/// Other agents' connections kept at most (the least recently used goes
/// first), and how long one unused is kept (swept every minute).
const MAX_PEERS: usize = 256;
pub const PEER_IDLE: Duration = Duration::from_secs(300);

/// The longest agent address taken.
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

/// UNAVAILABLE from the relay itself (not from what it called): the
/// caller may call directly instead.
fn relay_failed(msg: String) -> Status {
    let mut s = Status::unavailable(msg);
    s.metadata_mut().insert(
        RELAY_HEADER,
        tonic::metadata::MetadataValue::from_static(RELAY_UNREACHABLE),
    );
    s
}

/// The ApplicationMasterService on the agent's socket: each call passed on
/// to the RM leader as it came (the token in it checked there), following
/// the leader across failovers for up to [`RM_CALL_DEADLINE`].
pub struct AmRelay {
    rm: LeaderClient,
    mgr: Manager,
    calls: Arc<tokio::sync::Semaphore>,
}

impl AmRelay {
    pub fn new(
        rm_addresses: Vec<String>,
        mgr: Manager,
    ) -> Result<Self, weft_common::leader::Error> {
        Ok(AmRelay {
            rm: LeaderClient::new(rm_addresses)?
                .with_deadline(Some(RM_CALL_DEADLINE))
                .with_request_timeout(Duration::from_secs(15))
                .with_backoff(Duration::from_millis(50), Duration::from_secs(1)),
            mgr,
            calls: Arc::new(tokio::sync::Semaphore::new(MAX_RM_CALLS)),
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
        let Ok(_permit) = self.calls.clone().try_acquire_owned() else {
            let r = Err(relay_failed(format!(
                "the agent passes on at most {MAX_RM_CALLS} calls to the resource manager at once"
            )));
            self.mgr.metrics().count_relayed(what, &r);
            return r;
        };
        let q = req.into_inner();
        let r = match self
            .rm
            .call(|ch| f(ApplicationMasterServiceClient::new(ch), q.clone()))
            .await
        {
            Ok(t) => Ok(Response::new(t)),
            // The RM's own answer, as it gave it.
            Err(weft_common::leader::Error::Rpc(s)) => Err(s),
            Err(e) => Err(relay_failed(e.to_string())),
        };
        self.mgr.metrics().count_relayed(what, &r);
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

/// Other nodes' agents' connections, one per address, at most
/// [`MAX_PEERS`], each dropped once unused for [`PEER_IDLE`] and all when
/// the TLS settings are reloaded.
#[derive(Default)]
pub struct Peers {
    peers: Mutex<(u64, HashMap<String, Peer>)>,
}

impl Peers {
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
        if let Some(p) = peers.get_mut(addr) {
            p.used = now;
            return Ok(p.channel.clone());
        }
        peers.retain(|_, p| now.duration_since(p.used) < PEER_IDLE);
        if peers.len() >= MAX_PEERS {
            if let Some(oldest) = peers
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(a, _)| a.clone())
            {
                peers.remove(&oldest);
            }
        }
        // `addr` is a checked host:port: the scheme is ours (https where
        // this agent runs TLS).
        let channel = weft_common::net::endpoint(
            addr,
            weft_common::tls::Role::Agent,
            Duration::from_secs(1),
            Some(Duration::from_secs(30)),
        )
        .map_err(|e| Status::invalid_argument(format!("agent_address {addr:?}: {e}")))?
        // No pings on an idle kept connection (the sweep drops it).
        .keep_alive_while_idle(false)
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

    /// Drops the connections unused for [`PEER_IDLE`].
    pub fn sweep(&self) {
        let now = Instant::now();
        self.peers
            .lock()
            .expect("peers lock")
            .1
            .retain(|_, p| now.duration_since(p.used) < PEER_IDLE);
    }

    /// How many other agents' connections are kept.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.peers.lock().expect("peers lock").1.len()
    }
}

/// Whether `addr` is a plain `host:port`: a DNS name or an IP address (v6
/// in brackets) and a port, nothing else (no scheme, path, user or Unix
/// socket).
fn plain_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) || host.is_empty() {
        return false;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The AgentRelay service: starts on other nodes passed on.
pub struct StartRelay {
    mgr: Manager,
    peers: Arc<Peers>,
    starts: Arc<tokio::sync::Semaphore>,
}

impl StartRelay {
    pub fn new(mgr: Manager, peers: Arc<Peers>) -> Self {
        StartRelay {
            mgr,
            peers,
            starts: Arc::new(tokio::sync::Semaphore::new(MAX_STARTS)),
        }
    }

    async fn pass_on(
        &self,
        req: Request<pb::RelayedStartRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        local_only(&req, "StartContainerOn")?;
        let r = req.into_inner();
        let addr = r.agent_address.trim();
        if addr.len() > MAX_ADDRESS_LEN || !plain_host_port(addr) {
            return Err(Status::invalid_argument(format!(
                "agent_address: {:?} is not an agent's host:port (a name or IP address and a port, at most {MAX_ADDRESS_LEN} characters)",
                addr.chars().take(80).collect::<String>()
            )));
        }
        let Some(start) = r.start else {
            return Err(Status::invalid_argument("start: missing"));
        };
        // Only a start the RM granted, on the node it names, is passed on.
        let node = self
            .mgr
            .tokens()
            .node_of(&start.token)
            .map_err(Status::from)?;
        if node != r.node_id {
            return Err(Status::permission_denied(format!(
                "node_id: the token grants node {node}, not {}",
                r.node_id
            )));
        }
        let Ok(_permit) = self.starts.clone().try_acquire_owned() else {
            return Err(relay_failed(format!(
                "the agent passes on at most {MAX_STARTS} starts at once"
            )));
        };
        let channel = self.peers.channel(addr)?;
        match ContainerManagerClient::new(channel)
            .start_container(start)
            .await
        {
            Ok(r) => Ok(r),
            // Not the other agent's answer: it could not be reached.
            Err(e) if std::error::Error::source(&e).is_some() => Err(relay_failed(format!(
                "the agent of {node} at {addr} could not be reached from this node's agent: {}",
                e.message()
            ))),
            Err(e) => Err(e),
        }
    }
}

#[tonic::async_trait]
impl AgentRelay for StartRelay {
    async fn start_container_on(
        &self,
        req: Request<pb::RelayedStartRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let r = self.pass_on(req).await;
        self.mgr.metrics().count_relayed("start", &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peers_are_kept_one_per_address_and_at_most_the_bound() {
        let p = Peers::default();
        p.channel("127.0.0.1:1").unwrap();
        p.channel("127.0.0.1:1").unwrap();
        assert_eq!(p.kept(), 1);
        for i in 0..MAX_PEERS + 10 {
            p.channel(&format!("127.0.0.2:{}", 1000 + i)).unwrap();
        }
        assert_eq!(p.kept(), MAX_PEERS);
        // The least recently used went first: the first address is gone,
        // the last ones are there.
        {
            let peers = p.peers.lock().unwrap();
            assert!(!peers.1.contains_key("127.0.0.1:1"));
            assert!(peers
                .1
                .contains_key(&format!("127.0.0.2:{}", 1000 + MAX_PEERS + 9)));
        }
        p.sweep();
        assert_eq!(p.kept(), MAX_PEERS, "none idle yet");
    }

    #[test]
    fn only_a_plain_host_and_port_is_an_agent_address() {
        for ok in [
            "127.0.0.1:7070",
            "node-a.example:1",
            "[::1]:8080",
            "n_1:65535",
        ] {
            assert!(plain_host_port(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "http://127.0.0.1:80",
            "https://node:443",
            "unix:///run/docker.sock",
            "unix:/x:1",
            "user@host:22",
            "host/path:80",
            "host :80",
            "[::1:80",
            "a..b:80",
            ":80",
        ] {
            assert!(!plain_host_port(bad), "{bad}");
        }
    }
}
