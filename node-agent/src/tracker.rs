//! Client side of the RM's ResourceTracker: register, then heartbeat with the
//! status of every container; stop what the RM says to stop. While no RM
//! answers, the agent keeps serving its containers and retries with backoff.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{info, warn};
use weft_common::backoff::Backoff;
use weft_common::leader::{leader_hint, LeaderClient};
use weft_proto::v1 as pb;
use weft_proto::v1::resource_tracker_client::ResourceTrackerClient;

use crate::fence;
use crate::manager::Manager;

/// What the tracker needs to know about this node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_id: String,
    pub hostname: String,
    pub address: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Settings of the tracker loop.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub rm_addresses: Vec<String>,
    pub interval: Duration,
    pub max_backoff: Duration,
    /// The port range reported at registration, and scanned for bound ports.
    pub ports: crate::config::PortsConfig,
}

/// How long the tracker waits after a container ends before its early
/// heartbeat, so that ends close together share one.
const EARLY_HEARTBEAT_DELAY: Duration = Duration::from_millis(5);

/// Runs until `cancel` fires.
pub async fn run(mgr: Manager, node: NodeIdentity, cfg: TrackerConfig, cancel: CancellationToken) {
    // Registration retries for good (jittered backoff, one warning when it
    // takes a while), following NotLeader answers to the leader.
    let rm = match LeaderClient::new(cfg.rm_addresses.clone()) {
        Ok(c) => c
            .with_deadline(None)
            .with_connect_timeout(Duration::from_secs(2))
            .with_request_timeout(Duration::from_secs(5))
            .with_backoff(Duration::from_millis(200), cfg.max_backoff)
            .warn_after(3),
        Err(e) => {
            warn!(error = %e, "no valid resource-manager address; the agent runs unregistered");
            cancel.cancelled().await;
            return;
        }
    };
    let mut refused = Backoff::new(Duration::from_millis(200), cfg.max_backoff);
    let mut interval = cfg.interval;
    let mut sequence = 0u64;
    let keeper = tokio::spawn(keep_lease(
        mgr.clone(),
        cfg.rm_addresses.clone(),
        cfg.interval,
        cancel.clone(),
    ));
    let _keeper = AbortOnDrop(keeper);
    'outer: loop {
        let sent = fence::now_ms();
        let registered = tokio::select! {
            r = rm.call(|ch| register(ResourceTrackerClient::new(ch), &mgr, &node, &cfg.ports)) => r,
            _ = cancel.cancelled() => return,
        };
        let resp = match registered {
            Ok(resp) => resp,
            Err(e) => {
                let wait = refused.next_wait();
                warn!(error = %e, ?wait, "the resource manager refused registration; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        refused.reset();
        let addr = rm.leader().unwrap_or_default();
        info!(rm = %addr, node_id = %node.node_id, "registered with the resource manager");
        mgr.lease().set_expiry(resp.node_expiry_ms);
        mgr.lease().renew(sent);
        mgr.tokens()
            .learn(&resp.token_keys, &resp.token_group, &resp.token_public_key);
        mgr.tokens().observe_leader_clock(resp.leader_clock_ms);
        if resp.heartbeat_interval_ms > 0 {
            interval = Duration::from_millis(resp.heartbeat_interval_ms);
        }
        let Ok(channel) = rm.channel(&addr) else {
            rm.forget_leader();
            continue;
        };
        let mut client = ResourceTrackerClient::new(channel);
        // Ended containers the RM has stored: not reported again.
        let mut acknowledged: HashSet<String> = HashSet::new();
        let mut ports = PortScan::default();
        // The first heartbeat goes at once: it tells the RM this agent holds
        // the token key, which is when the node is first offered work.
        let mut first = true;
        loop {
            let wait = if std::mem::take(&mut first) {
                Duration::ZERO
            } else {
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // A container ended: report it now (after a moment, so
                // ends close together go in one heartbeat).
                _ = mgr.container_ended() => {
                    tokio::time::sleep(EARLY_HEARTBEAT_DELAY).await;
                }
                _ = cancel.cancelled() => return,
            }
            sequence += 1;
            let (containers, used) = mgr.heartbeat_report(&mut acknowledged);
            let ports_in_use = ports
                .read(&cfg.ports, interval, mgr.ports_may_linger())
                .await;
            let req = pb::NodeHeartbeatRequest {
                node_id: node.node_id.clone(),
                containers,
                utilization: Some(used),
                sequence,
                token_public_key: mgr.tokens().public_key(),
                ports_in_use,
            };
            let sent = fence::now_ms();
            match client.node_heartbeat(req).await {
                Ok(resp) => {
                    let r = resp.into_inner();
                    // The leader heard this node (it knows it): the lease
                    // runs from the moment the heartbeat left.
                    mgr.lease().set_expiry(r.node_expiry_ms);
                    if !r.reregister {
                        mgr.lease().renew(sent);
                    }
                    mgr.tokens()
                        .learn(&r.token_keys, &r.token_group, &r.token_public_key);
                    mgr.tokens().observe_leader_clock(r.leader_clock_ms);
                    acknowledged.extend(r.containers_acknowledged.iter().cloned());
                    // Preempted ones first: the plain stop below then
                    // finds them stopping and leaves them be.
                    for p in &r.preempt {
                        let grace = Duration::from_millis(p.grace_period_ms);
                        let _ = mgr.preempt(&p.container_id, grace, &p.diagnostic).await;
                    }
                    for id in &r.containers_to_stop {
                        info!(container_id = %id, "resource manager asks to stop container");
                        let _ = mgr.stop(id, None, false).await;
                    }
                    if r.heartbeat_interval_ms > 0 {
                        interval = Duration::from_millis(r.heartbeat_interval_ms);
                    }
                    if !r.leader_address.is_empty() && r.leader_address != addr {
                        rm.follow(r.leader_address);
                        continue 'outer;
                    }
                    if r.reregister {
                        continue 'outer;
                    }
                }
                Err(e) => {
                    warn!(rm = %addr, error = %e.message(), "heartbeat failed; finding the resource manager leader again");
                    match leader_hint(&e).filter(|l| *l != addr) {
                        Some(leader) => rm.follow(leader),
                        None => rm.forget_leader(),
                    }
                    continue 'outer;
                }
            }
        }
    }
}

/// Renews the node's lease while no RM answers but a majority of the
/// members refuse connections: the whole group is down, and nothing can
/// declare the node lost (see [`crate::fence`]). Looks every quarter of the
/// lease (at most every `interval`) once the lease has gone unrenewed for
/// two such periods.
async fn keep_lease(
    mgr: Manager,
    members: Vec<String>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut warned = false;
    loop {
        let lease = mgr.lease().current();
        let period = lease
            .map(|l| Duration::from_millis(l.deadline_ms.saturating_sub(l.renewed_ms) / 4))
            .unwrap_or(interval)
            .min(interval)
            .max(Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = cancel.cancelled() => return,
        }
        let Some(lease) = lease else {
            continue;
        };
        let now = fence::now_ms();
        if now.saturating_sub(lease.renewed_ms) < 2 * period.as_millis() as u64 {
            warned = false;
            continue;
        }
        let probe = fence::probe(&members, period).await;
        if probe.no_quorum_possible() {
            mgr.lease().renew(now);
            if !warned {
                warned = true;
                warn!(
                    refused = probe.refused,
                    members = probe.members,
                    "most resource manager members refuse connections (the group is down): containers keep running"
                );
            }
        } else if !warned && mgr.lease().fenced().is_none() {
            warned = true;
            warn!(
                refused = probe.refused,
                members = probe.members,
                deadline_in_ms = lease.deadline_ms.saturating_sub(now),
                "no answer from the resource manager: the node fences itself (kills its containers) when its lease runs out"
            );
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn register(
    mut client: ResourceTrackerClient<Channel>,
    mgr: &Manager,
    node: &NodeIdentity,
    ports: &crate::config::PortsConfig,
) -> Result<tonic::Response<pb::RegisterNodeResponse>, tonic::Status> {
    let (range, closing) = (ports.clone(), mgr.ports_may_linger());
    let ports_in_use = tokio::task::spawn_blocking(move || crate::ports::in_use(&range, closing))
        .await
        .unwrap_or_default();
    let cap = mgr.capacity();
    let req = pb::RegisterNodeRequest {
        node_id: node.node_id.clone(),
        hostname: node.hostname.clone(),
        container_manager_address: node.address.clone(),
        capacity: Some(pb::NodeCapacity {
            vcores_milli: cap.vcores_milli,
            memory_bytes: cap.memory_bytes,
            gpus: mgr
                .gpus()
                .iter()
                .map(|g| pb::GpuDevice {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_bytes: g.memory_bytes,
                })
                .collect(),
        }),
        labels: node.labels.clone().into_iter().collect(),
        containers: mgr.list(true).iter().map(|r| r.to_proto()).collect(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        token_public_key: mgr.tokens().public_key(),
        port_range_first: ports.first as u32,
        port_range_last: ports.last as u32,
        ports_in_use,
    };
    client.register_node(req).await
}

/// The ports of the range bound on the node, as the last scan found them.
/// Reading `/proc/net` walks every socket's hash bucket, so a heartbeat
/// sent early (a container just ended) reuses a scan younger than the
/// heartbeat interval; the regular heartbeat scans again. A port bound in
/// between is still caught when a container is started on it (the agent
/// refuses, and the RM gives another).
#[derive(Default)]
struct PortScan {
    last: Option<(tokio::time::Instant, Vec<u32>)>,
}

impl PortScan {
    /// `closing`: every TCP socket counts (see [`crate::ports::in_use`]).
    async fn read(
        &mut self,
        range: &crate::config::PortsConfig,
        interval: Duration,
        closing: bool,
    ) -> Vec<u32> {
        if let Some((at, ports)) = &self.last {
            if at.elapsed() < interval {
                return ports.clone();
            }
        }
        let range = range.clone();
        let ports = tokio::task::spawn_blocking(move || crate::ports::in_use(&range, closing))
            .await
            .unwrap_or_default();
        self.last = Some((tokio::time::Instant::now(), ports.clone()));
        ports
    }
}
