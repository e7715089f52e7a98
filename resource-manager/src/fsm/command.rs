//! Commands (what the raft log holds) and their encoding: every entry is an
//! [`Envelope`] (version, proposer, request, command) in JSON; a member that
//! cannot decode an entry stops rather than skip it (members would diverge).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// Ask id of an application master's own container.
pub const MASTER_ASK: &str = "__master__";

/// Version of the command encoding written into every entry.
pub const COMMAND_VERSION: u32 = 1;

/// One replicated command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    RegisterNode {
        node_id: String,
        address: String,
        vcores_milli: u64,
        memory_bytes: u64,
        gpus: Vec<Gpu>,
        labels: BTreeMap<String, String>,
        /// Containers the agent reports still running; the node's other
        /// unfinished containers end as lost.
        #[serde(default)]
        running: Vec<String>,
        /// How the agent's ended containers ended (they ended while it
        /// could not report them, or before it restarted): those of this
        /// node end so rather than as lost.
        #[serde(default)]
        ended: Vec<Completion>,
        /// The agent already holds the group's token key (it registered
        /// before, or has it configured): it can start work at once.
        #[serde(default)]
        ready: bool,
        /// Ports the agent hands to containers.
        #[serde(default)]
        ports: PortRange,
        at_ms: u64,
    },
    /// The node's agent confirmed it holds the group's token key: from now
    /// on it can be offered work.
    NodeReady {
        node_id: String,
        at_ms: u64,
    },
    /// The node's agent does not hold the key that signs now (it pins an
    /// older one, or missed a rotation): no work for it until it does.
    NodeUnready {
        node_id: String,
        at_ms: u64,
    },
    SetNodeState {
        node_id: String,
        state: NodeState,
        at_ms: u64,
    },
    SubmitApplication {
        /// Client-chosen id making retried submissions idempotent (may be empty).
        request_id: String,
        name: String,
        queue: String,
        user: String,
        spec: String,
        spec_format: String,
        /// The submitter runs the master itself (the RM launches none).
        #[serde(default)]
        unmanaged: bool,
        /// Accepted as it is submitted: the leader launches its master
        /// (entries written before this field existed were accepted by a
        /// later `ApplicationAccepted` of their own).
        #[serde(default)]
        accepted: bool,
        /// A service (`kind: service`): runs until killed.
        #[serde(default)]
        service: bool,
        /// The spec's priority (checked at submit): what its containers
        /// are scheduled and preempted by, whatever its master asks.
        #[serde(default)]
        priority: u32,
        at_ms: u64,
    },
    KillApplication {
        app_id: String,
        at_ms: u64,
    },
    /// Accepts a job submitted without `accepted` (kept for entries
    /// written before submissions carried it).
    ApplicationAccepted {
        app_id: String,
        at_ms: u64,
    },
    AttemptStarted {
        app_id: String,
        attempt: u32,
        /// Container running the attempt's application master, if any.
        am_container: Option<String>,
        /// Work-preserving: the previous attempt's task containers keep
        /// running for the new attempt to adopt (else they end).
        #[serde(default)]
        keep_containers: bool,
        /// The previous attempt ended through no fault of its own (its RM
        /// stopped while running it in-process): it does not count.
        #[serde(default)]
        previous_lost: bool,
        at_ms: u64,
    },
    /// Per-stage progress an application master reported.
    ReportProgress {
        app_id: String,
        attempt: u32,
        stages: Vec<StageProgress>,
    },
    /// A service's healthy replicas, as its master reported them, and how
    /// the rollout of its latest revision goes.
    ReportEndpoints {
        app_id: String,
        attempt: u32,
        endpoints: Vec<Endpoint>,
        #[serde(default)]
        rollout: String,
        /// The revision whose rollout stopped (0: none).
        #[serde(default)]
        rollout_stopped: u32,
    },
    /// A running service's new spec (checked before this was proposed):
    /// its revision goes up by one, and scaled counts give way to the
    /// spec's replicas.
    UpdateSpec {
        app_id: String,
        spec: String,
        spec_format: String,
    },
    /// How many replicas a service's stage keeps (the service was checked
    /// to have that stage before this was proposed).
    ScaleStage {
        app_id: String,
        stage: String,
        replicas: u32,
    },
    /// Drops the ended containers of applications that finished before
    /// this time (ones still holding a node's resources stay).
    PruneContainers {
        finished_before_ms: u64,
    },
    /// Drops finished applications with their ended containers and their
    /// submission request ids: those that finished before
    /// `finished_before_ms`, and the oldest finished ones beyond the newest
    /// `keep`. An application whose containers still hold a node's
    /// resources stays. Application ids are never handed out again.
    PruneApplications {
        finished_before_ms: u64,
        keep: u64,
    },
    /// The group's first token key (the first one proposed wins).
    SetTokenKey {
        seed_hex: String,
    },
    /// A new token key (`rmctl acl rotate-signing-key`): it signs from
    /// `signs_from_ms` (agents learn it first); the key signing now is
    /// dropped `keep_previous_ms` after that. Refused while an earlier
    /// rotation's key does not sign yet, or when [`MAX_TOKEN_KEYS`] are
    /// held; a retry of the same `request_id` changes nothing.
    RotateTokenKey {
        seed_hex: String,
        request_id: String,
        at_ms: u64,
        signs_from_ms: u64,
        keep_previous_ms: u64,
    },
    /// Drops the replaced token keys whose drop time is before this.
    DropTokenKeys {
        before_ms: u64,
    },
    ApplicationFinished {
        app_id: String,
        /// Succeeded, Failed or Killed.
        state: AppState,
        diagnostics: String,
        /// Final per-stage progress (empty: keep the last reported).
        #[serde(default)]
        stages: Vec<StageProgress>,
        at_ms: u64,
    },
    /// One scheduling round's placements. Apply verifies them again and
    /// grants the part that fits (a gang whole or not at all), answering
    /// `Outcome::PartlyApplied` with what it refused.
    ContainersAllocated {
        allocations: Vec<Allocation>,
        at_ms: u64,
    },
    ContainersLaunched {
        container_ids: Vec<String>,
        at_ms: u64,
    },
    /// Ends reported by node agents (batched per heartbeat), or decided by
    /// the RM (released, a master expired, a launch failed).
    ContainersCompleted {
        completions: Vec<Completion>,
        /// Decided by the RM: a container known to run keeps holding its
        /// node's resources until its agent reports it stopped.
        #[serde(default)]
        still_running: bool,
        at_ms: u64,
    },
    /// Preempts running containers (the leader's plan): each ends at once
    /// as PREEMPTED (its master hears of it and asks again; it does not
    /// count as a failure) and keeps holding its node until its agent
    /// reports it stopped, which the agent does after the grace (SIGTERM,
    /// its notice file, then SIGKILL). One no longer running is refused
    /// (`Outcome::PartlyApplied`).
    PreemptContainers {
        preemptions: Vec<Preemption>,
        at_ms: u64,
    },
    /// Agents reported these RM-ended containers stopped: their resources
    /// are free.
    ContainersStopped {
        container_ids: Vec<String>,
    },
    SetQueues {
        queues: Vec<QueueSpec>,
    },
    /// The first admin token; refused once the cluster was bootstrapped.
    AclBootstrap {
        token: AclToken,
    },
    /// A user's token (made by an admin); refused if its accessor exists.
    AclTokenCreate {
        token: AclToken,
    },
    /// Revokes the token with this accessor.
    AclTokenRevoke {
        accessor: String,
    },
    /// Drops the tokens that expired before this time.
    AclTokensPrune {
        expired_before_ms: u64,
    },
    /// Where member `member` serves its HTTP API (its base URL, e.g.
    /// `https://rm1:8080`; empty: it serves none), so that followers send
    /// REST writes on to the leader's.
    SetMemberHttp {
        member: u64,
        url: String,
    },
}

/// What the raft log holds: a command plus who proposed it, so the proposer
/// (and only it) can answer its waiting caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    /// Raft id of the member that proposed it.
    pub origin: u64,
    /// The proposer's request number.
    pub request: u64,
    pub command: Command,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let e: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if e.version != COMMAND_VERSION {
            return Err(format!(
                "command version {} (this member knows {COMMAND_VERSION})",
                e.version
            ));
        }
        Ok(e)
    }
}

/// The result of applying a command, handed back to its proposer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// A scheduling round of which these allocations were refused (the
    /// rest was granted).
    PartlyApplied {
        refused: Vec<Refusal>,
    },
    Submitted {
        app_id: String,
    },
    Rejected(String),
}
