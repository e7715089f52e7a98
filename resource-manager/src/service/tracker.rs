//! ResourceTracker: node agents register and heartbeat (capacity, container
//! states, busy ports); answered with what to stop and the token key.

use std::collections::HashSet;

use tonic::{Request, Response, Status};
use weft_proto::v1 as pb;

use crate::error::Error;
use crate::fsm::{Command, Completion, ContainerEnd, ContainerPhase, Gpu, NodeState, Outcome};

use super::*;

/// With TLS on, a node registers and reports only as itself: the caller
/// shows an agent certificate whose name is the node id (so no one else can
/// take over a node's address or speak for its containers).
fn node_speaks_as_itself<T>(req: &Request<T>, node_id: &str) -> Result<(), Status> {
    use weft_common::tls;
    match tls::require_role(req, tls::Role::Agent, "a node's registration and heartbeats")? {
        Some(p) if p.name != node_id => Err(Status::permission_denied(format!(
            "node_id: {node_id:?} is not this agent's: its certificate names node {:?}, and a node registers and reports only as itself",
            p.name
        ))),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl pb::resource_tracker_server::ResourceTracker for RmService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        node_speaks_as_itself(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        check_registration(&r)?;
        // The group's token key exists before any node can register, so
        // every registered agent can check container tokens.
        self.scheduling.ensure_signer().await?;
        let keys = self.scheduling.keys();
        let ports = match (
            u16::try_from(r.port_range_first),
            u16::try_from(r.port_range_last),
        ) {
            (Ok(0), Ok(0)) => crate::fsm::PortRange::default(),
            (Ok(first), Ok(last)) if first > 0 && first <= last => {
                crate::fsm::PortRange { first, last }
            }
            _ => {
                return Err(Error::InvalidArgument {
                    field: "port_range_first",
                    reason: format!(
                        "{}-{} is not a port range (1-65535, first at most last)",
                        r.port_range_first, r.port_range_last
                    ),
                }
                .into())
            }
        };
        self.scheduling
            .note_ports_in_use(&r.node_id, &r.ports_in_use);
        self.scheduling.node_heard(&r.node_id);
        let cap = r.capacity.unwrap_or_default();
        let cmd = Command::RegisterNode {
            node_id: r.node_id.clone(),
            address: r.container_manager_address,
            vcores_milli: cap.vcores_milli,
            memory_bytes: cap.memory_bytes,
            gpus: cap
                .gpus
                .into_iter()
                .map(|g| Gpu {
                    index: g.index,
                    uuid: g.uuid,
                    model: g.model,
                    memory_bytes: g.memory_bytes,
                })
                .collect(),
            labels: r.labels.into_iter().collect(),
            ports,
            ready: !r.token_public_key.is_empty() && r.token_public_key == keys.newest_public_key(),
            running: r
                .containers
                .iter()
                .filter(|c| is_running(c))
                .map(|c| c.container_id.clone())
                .collect(),
            // Ends the agent holds (it kept them while no RM answered):
            // they count as it saw them, not as lost.
            // Only those the state has not ended yet go in the log.
            ended: {
                let st = self.raft.state();
                r.containers
                    .iter()
                    .filter(|c| !is_running(c))
                    .filter(|c| {
                        st.containers
                            .get(c.container_id.as_str())
                            .is_some_and(|mine| {
                                mine.alloc.node_id == r.node_id
                                    && mine.phase != ContainerPhase::Completed
                            })
                    })
                    .map(completion_of)
                    .collect()
            },
            at_ms: now_ms(),
        };
        if let Outcome::Rejected(why) = self.raft.propose(cmd).await? {
            return Err(Status::failed_precondition(why));
        }
        self.scheduling.poke();
        self.heard_from(&r.node_id);
        Ok(Response::new(pb::RegisterNodeResponse {
            token_public_key: keys.newest_public_key(),
            token_keys: keys.public_keys(),
            token_group: keys.group.clone(),
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            node_expiry_ms: self.node_expiry.as_millis() as u64,
            leader_clock_ms: crate::tokens::token_clock_ms(),
            leader_address: self
                .raft
                .address_of(self.raft.status().id)
                .unwrap_or_default(),
        }))
    }

    async fn node_heartbeat(
        &self,
        req: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        node_speaks_as_itself(&req, &req.get_ref().node_id)?;
        // Heartbeats only need to reach the leader, not a linearizable read.
        self.raft.ensure_leader()?;
        let r = req.into_inner();
        // A node declared lost must register again (and report its containers).
        let (known, unready) = self
            .raft
            .state()
            .nodes
            .get(r.node_id.as_str())
            .filter(|n| n.state != NodeState::Lost)
            .map_or((false, false), |n| (true, !n.ready));
        let keys = self.scheduling.keys();
        // The agent now holds the group's key: the node can be offered work.
        if unready
            && !r.token_public_key.is_empty()
            && r.token_public_key == keys.newest_public_key()
        {
            self.raft
                .propose(Command::NodeReady {
                    node_id: r.node_id.clone(),
                    at_ms: now_ms(),
                })
                .await?;
            self.scheduling.poke();
        } else if known
            && !unready
            && !r.token_public_key.is_empty()
            && !keys.holds_signing(&r.token_public_key, crate::tokens::token_clock_ms())
        {
            tracing::warn!(node_id = %r.node_id, "the node's agent does not hold the token key that signs now (it pins an older one, or missed a rotation): no work for it until it does");
            self.raft
                .propose(Command::NodeUnready {
                    node_id: r.node_id.clone(),
                    at_ms: now_ms(),
                })
                .await?;
        }
        if known {
            self.scheduling
                .note_ports_in_use(&r.node_id, &r.ports_in_use);
            self.scheduling.node_heard(&r.node_id);
            self.heard_from(&r.node_id);
        }
        // Reconcile the agent's containers with the replicated ones.
        // Ends stored in the replicated state are acknowledged: the agent
        // stops reporting them.
        let mut acknowledged = Vec::new();
        // Containers the RM ended that the agent now reports stopped.
        let mut stopped = Vec::new();
        let status = self.raft.status();
        // Preempted ones among them: stopped with their grace and notice.
        let mut preempt = Vec::new();
        let (launched, completed, to_stop) = if known {
            let st = self.raft.state();
            let mut launched = Vec::new();
            let mut completed = Vec::new();
            let mut to_stop = Vec::new();
            for c in &r.containers {
                let running = is_running(c);
                let Some(mine) = st.containers.get(c.container_id.as_str()) else {
                    // Not in the state: an agent can only have started it
                    // after its grant was committed, so it was pruned (its
                    // application finished long ago) and nothing may run
                    // for it; unless this state is not the newest: a leader
                    // not yet caught up with what was committed before its
                    // term, or a deposed one that does not know it yet (the
                    // container was granted in a later term than its own).
                    // Those leave it to a leader that knows.
                    if !may_judge_unknown(&status, &c.container_id) {
                        tracing::debug!(
                            container_id = %c.container_id,
                            term = status.term,
                            "a container this state does not know yet; left to a caught-up leader"
                        );
                        continue;
                    }
                    if running {
                        to_stop.push(c.container_id.clone());
                    } else {
                        acknowledged.push(c.container_id.clone());
                    }
                    continue;
                };
                if mine.alloc.node_id != r.node_id {
                    // Granted to another node: this one can neither run it
                    // (its token names that node) nor say how it ended.
                    // Nothing of the report reaches the state; whatever runs
                    // under that id here is stopped, an end is acknowledged
                    // so that it is not sent again.
                    tracing::warn!(
                        node_id = %r.node_id,
                        container_id = %c.container_id,
                        granted_to = %mine.alloc.node_id,
                        "a heartbeat reported another node's container; ignored"
                    );
                    if running {
                        to_stop.push(c.container_id.clone());
                    } else {
                        acknowledged.push(c.container_id.clone());
                    }
                    continue;
                }
                match mine.phase {
                    ContainerPhase::Completed if running => {
                        if let (Some(p), Some(end)) = (&mine.preempted, &mine.end) {
                            preempt.push(pb::Preempt {
                                container_id: c.container_id.clone(),
                                grace_period_ms: p.grace_ms,
                                diagnostic: end.diagnostic.clone(),
                            });
                        }
                        to_stop.push(c.container_id.clone())
                    }
                    ContainerPhase::Completed => {
                        if mine.holding {
                            stopped.push(c.container_id.clone());
                        }
                        acknowledged.push(c.container_id.clone());
                    }
                    phase if running => {
                        if phase == ContainerPhase::Allocated {
                            launched.push(c.container_id.clone());
                        }
                    }
                    _ => completed.push(completion_of(c)),
                }
            }
            // Ended by the RM while it may have been starting, and the agent
            // does not have it: nothing holds its resources any more.
            let listed: HashSet<&str> = r
                .containers
                .iter()
                .map(|c| c.container_id.as_str())
                .collect();
            for c in st.containers_on(&r.node_id) {
                if c.phase == ContainerPhase::Completed
                    && c.holding
                    && !listed.contains(c.alloc.container_id.as_str())
                {
                    stopped.push(c.alloc.container_id.clone());
                }
            }
            (launched, completed, to_stop)
        } else {
            Default::default()
        };
        if !launched.is_empty() {
            self.raft
                .propose(Command::ContainersLaunched {
                    container_ids: launched,
                    at_ms: now_ms(),
                })
                .await?;
        }
        if !completed.is_empty() {
            let ids: Vec<String> = completed.iter().map(|c| c.container_id.clone()).collect();
            self.raft
                .propose(Command::ContainersCompleted {
                    completions: completed,
                    still_running: false,
                    at_ms: now_ms(),
                })
                .await?;
            acknowledged.extend(ids);
            self.scheduling.poke();
        }
        if !stopped.is_empty() {
            self.raft
                .propose(Command::ContainersStopped {
                    container_ids: stopped,
                })
                .await?;
            self.scheduling.poke();
        }
        Ok(Response::new(pb::NodeHeartbeatResponse {
            containers_to_stop: to_stop,
            preempt,
            containers_acknowledged: acknowledged,
            leader_address: self
                .raft
                .address_of(self.raft.status().id)
                .unwrap_or_default(),
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            reregister: !known,
            token_public_key: keys.newest_public_key(),
            token_keys: keys.public_keys(),
            token_group: keys.group.clone(),
            node_expiry_ms: self.node_expiry.as_millis() as u64,
            leader_clock_ms: crate::tokens::token_clock_ms(),
        }))
    }
}

/// Whether a leader with `status` may take a container it does not know
/// for one pruned long ago (and stop it): only once it has caught up, and
/// only for a grant of its own term or an earlier one (ids are
/// `c<term in hex>-<n>`).
fn may_judge_unknown(status: &crate::raft_node::RaftStatus, container_id: &str) -> bool {
    let granted_in = container_id
        .strip_prefix('c')
        .and_then(|r| r.split_once('-'))
        .and_then(|(t, _)| u64::from_str_radix(t, 16).ok());
    status.caught_up && granted_in.is_none_or(|t| t <= status.term)
}

/// The agent reports the container as starting, running or stopping.
fn is_running(c: &pb::ContainerStatus) -> bool {
    matches!(
        c.state(),
        pb::ContainerState::Starting | pb::ContainerState::Running | pb::ContainerState::Stopping
    )
}

/// How the agent says a container ended.
fn completion_of(c: &pb::ContainerStatus) -> Completion {
    let exit = c.exit.clone().unwrap_or_default();
    Completion {
        container_id: c.container_id.clone(),
        state: match c.state() {
            pb::ContainerState::Succeeded => ContainerEnd::Succeeded,
            pb::ContainerState::Failed => ContainerEnd::Failed,
            pb::ContainerState::Lost => ContainerEnd::Lost,
            _ => ContainerEnd::Killed,
        },
        exit_status: exit.exit_status,
        diagnostic: exit.diagnostic,
    }
}

/// The most a registration may claim: far above any machine, so that a
/// wrong unit or a corrupted request is refused instead of stored and
/// scheduled against.
pub const MAX_NODE_VCORES_MILLI: u64 = 100_000_000; // 100,000 cores
pub const MAX_NODE_MEMORY_BYTES: u64 = 1 << 50; // 1 PiB
pub const MAX_NODE_GPUS: usize = 256;
pub const MAX_NODE_LABELS: usize = 64;
pub const MAX_LABEL_BYTES: usize = 256;
pub const MAX_NODE_ID_BYTES: usize = 253;
/// Containers a registration may list (running and ended ones kept).
pub const MAX_REGISTERED_CONTAINERS: usize = 100_000;

/// Refuses a registration that cannot describe a real node, naming the
/// field and the bound.
pub fn check_registration(r: &pb::RegisterNodeRequest) -> Result<(), Error> {
    let bad = |field: &'static str, reason: String| Err(Error::InvalidArgument { field, reason });
    if r.node_id.is_empty() {
        return bad("node_id", "must not be empty".into());
    }
    if r.node_id.len() > MAX_NODE_ID_BYTES || r.node_id.chars().any(|c| c.is_control()) {
        return bad(
            "node_id",
            format!("at most {MAX_NODE_ID_BYTES} bytes, no control characters"),
        );
    }
    let none = pb::NodeCapacity::default();
    let cap = r.capacity.as_ref().unwrap_or(&none);
    if cap.vcores_milli > MAX_NODE_VCORES_MILLI {
        return bad(
            "capacity.vcores_milli",
            format!(
                "{} is over {MAX_NODE_VCORES_MILLI} (100,000 cores)",
                cap.vcores_milli
            ),
        );
    }
    if cap.memory_bytes > MAX_NODE_MEMORY_BYTES {
        return bad(
            "capacity.memory_bytes",
            format!(
                "{} is over {MAX_NODE_MEMORY_BYTES} (1 PiB)",
                cap.memory_bytes
            ),
        );
    }
    if cap.gpus.len() > MAX_NODE_GPUS {
        return bad(
            "capacity.gpus",
            format!("{} GPUs, at most {MAX_NODE_GPUS}", cap.gpus.len()),
        );
    }
    for (i, g) in cap.gpus.iter().enumerate() {
        if g.index as usize != i {
            return bad(
                "capacity.gpus.index",
                format!(
                    "GPU {i} says it is index {}: indexes run 0, 1, ... in order",
                    g.index
                ),
            );
        }
    }
    if r.labels.len() > MAX_NODE_LABELS {
        return bad(
            "labels",
            format!("{} labels, at most {MAX_NODE_LABELS}", r.labels.len()),
        );
    }
    if let Some((k, _)) = r
        .labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
    {
        return bad(
            "labels",
            format!(
                "label {k:?}: names 1 to {MAX_LABEL_BYTES} bytes, values at most {MAX_LABEL_BYTES}"
            ),
        );
    }
    if r.containers.len() > MAX_REGISTERED_CONTAINERS {
        return bad(
            "containers",
            format!(
                "{} containers, at most {MAX_REGISTERED_CONTAINERS}",
                r.containers.len()
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_caught_up_leader_takes_an_unknown_container_of_its_term_or_before_for_pruned() {
        let st = |caught_up, term| crate::raft_node::RaftStatus {
            is_leader: true,
            caught_up,
            term,
            ..Default::default()
        };
        // Term 0x1a: grants c1a-N and earlier are its own or before it.
        assert!(may_judge_unknown(&st(true, 0x1a), "c1a-7"));
        assert!(may_judge_unknown(&st(true, 0x1a), "c3-1"));
        // Granted by a later leader: this one was deposed (the fault
        // harness saw a leader cut off one way stop two masters the next
        // leader had just started, each job FAILED).
        assert!(!may_judge_unknown(&st(true, 0x1a), "c1b-1"));
        // Elected, not yet applied what came before its term.
        assert!(!may_judge_unknown(&st(false, 0x1a), "c3-1"));
        // An id of no term (not one the leader makes): judged as before.
        assert!(may_judge_unknown(&st(true, 4), "other"));
    }

    #[test]
    fn registrations_no_node_could_send_are_refused_naming_the_field() {
        let good = pb::RegisterNodeRequest {
            node_id: "n1".into(),
            capacity: Some(pb::NodeCapacity {
                vcores_milli: 64_000,
                memory_bytes: 512 << 30,
                gpus: (0..8)
                    .map(|i| pb::GpuDevice {
                        index: i,
                        ..Default::default()
                    })
                    .collect(),
            }),
            labels: [("gpu".to_string(), "h100".to_string())].into(),
            ..Default::default()
        };
        check_registration(&good).unwrap();
        let refused = |f: &dyn Fn(&mut pb::RegisterNodeRequest)| {
            let mut r = good.clone();
            f(&mut r);
            check_registration(&r).unwrap_err().to_string()
        };
        for (e, field) in [
            (refused(&|r| r.node_id.clear()), "node_id"),
            (refused(&|r| r.node_id = "x".repeat(254)), "node_id"),
            (refused(&|r| r.node_id = "a\nb".into()), "node_id"),
            (
                refused(&|r| r.capacity.as_mut().unwrap().vcores_milli = MAX_NODE_VCORES_MILLI + 1),
                "capacity.vcores_milli",
            ),
            (
                refused(&|r| r.capacity.as_mut().unwrap().memory_bytes = u64::MAX),
                "capacity.memory_bytes",
            ),
            (
                refused(&|r| {
                    r.capacity.as_mut().unwrap().gpus = vec![pb::GpuDevice::default(); 257]
                }),
                "capacity.gpus",
            ),
            (
                refused(&|r| r.capacity.as_mut().unwrap().gpus[3].index = 7),
                "capacity.gpus.index",
            ),
            (
                refused(&|r| {
                    r.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect()
                }),
                "labels",
            ),
            (
                refused(&|r| {
                    r.labels.insert("k".into(), "v".repeat(257));
                }),
                "labels",
            ),
            (
                refused(&|r| {
                    r.containers =
                        vec![pb::ContainerStatus::default(); MAX_REGISTERED_CONTAINERS + 1]
                }),
                "containers",
            ),
        ] {
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
