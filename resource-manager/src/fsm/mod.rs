//! The replicated state machine: the cluster's truth as a pure function of the
//! raft log. Commands carry their own time and ids; applying one reads no clock
//! and no randomness, so every member computes the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod changes;
mod verify;
pub use verify::{Refusal, Verdict};

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
        at_ms: u64,
    },
    KillApplication {
        app_id: String,
        at_ms: u64,
    },
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
    /// Drops the ended containers of applications that finished before
    /// this time (ones still holding a node's resources stay).
    PruneContainers {
        finished_before_ms: u64,
    },
    /// The key the RM group signs tokens with (the first one proposed wins).
    SetTokenKey {
        seed_hex: String,
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
    /// Agents reported these RM-ended containers stopped: their resources
    /// are free.
    ContainersStopped {
        container_ids: Vec<String>,
    },
    SetQueues {
        queues: Vec<QueueSpec>,
    },
}

/// A container granted on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub container_id: String,
    pub app_id: String,
    pub node_id: String,
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    /// GPU indices on the node, given whole.
    pub gpus: Vec<u32>,
    /// A share of one GPU (with a GPU-memory quota), for fractional asks.
    #[serde(default)]
    pub gpu_share: Option<GpuShare>,
    /// The master's ask this allocation answers.
    #[serde(default)]
    pub ask_id: String,
    /// Gang key: the allocations of one gang are granted together or not
    /// at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<String>,
    /// Ports of the node given to it (from the node's range).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// An inclusive range of ports a node hands to containers (`first` 0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// How many ports it holds.
    pub fn len(&self) -> u32 {
        if self.first == 0 || self.last < self.first {
            0
        } else {
            (self.last - self.first) as u32 + 1
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, port: u16) -> bool {
        !self.is_empty() && (self.first..=self.last).contains(&port)
    }
}

/// Part of one device: `milli` thousandths of it and `memory_bytes` of its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuShare {
    pub device: u32,
    pub milli: u32,
    pub memory_bytes: u64,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub container_id: String,
    pub state: ContainerEnd,
    pub exit_status: i32,
    pub diagnostic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerEnd {
    Succeeded,
    Failed,
    Killed,
    Lost,
    NodeLost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerPhase {
    Allocated,
    Running,
    Completed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub alloc: Allocation,
    pub phase: ContainerPhase,
    pub end: Option<Completion>,
    pub allocated_at_ms: u64,
    pub changed_at_ms: u64,
    /// Ended in the state by the RM while its process ran: it holds its
    /// node's resources until the agent reports it stopped (or the node is
    /// lost, or registers again without it).
    #[serde(default)]
    pub holding: bool,
}

impl Container {
    /// Whether it counts against its node's resources.
    pub fn occupies_node(&self) -> bool {
        self.phase != ContainerPhase::Completed || self.holding
    }
}

/// A queue's configuration (the scheduler reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSpec {
    /// Dotted path, e.g. `root.research.vision`.
    pub name: String,
    pub guaranteed_vcores_milli: u64,
    pub guaranteed_memory_bytes: u64,
    pub guaranteed_gpus: u32,
    /// 0 = no maximum.
    pub max_vcores_milli: u64,
    pub max_memory_bytes: u64,
    pub max_gpus: u32,
    pub weight: u32,
    /// Users allowed to submit; empty = everyone.
    pub submit_acl: Vec<String>,
    /// Most one user may use in the queue; 0 = no limit.
    #[serde(default)]
    pub user_limit_vcores_milli: u64,
    #[serde(default)]
    pub user_limit_memory_bytes: u64,
    #[serde(default)]
    pub user_limit_gpus: u32,
}

impl QueueSpec {
    /// A queue with no guarantee, no maximum, no limits, weight 1, open to
    /// everyone.
    pub fn named(name: &str) -> QueueSpec {
        QueueSpec {
            name: name.to_string(),
            guaranteed_vcores_milli: 0,
            guaranteed_memory_bytes: 0,
            guaranteed_gpus: 0,
            max_vcores_milli: 0,
            max_memory_bytes: 0,
            max_gpus: 0,
            weight: 1,
            submit_acl: vec![],
            user_limit_vcores_milli: 0,
            user_limit_memory_bytes: 0,
            user_limit_gpus: 0,
        }
    }
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Running,
    Unhealthy,
    Lost,
    Draining,
    Decommissioned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    /// Its agent can start work (it holds the group's token key): only a
    /// ready node is offered work.
    #[serde(default)]
    pub ready: bool,
    /// Ports it hands to containers.
    #[serde(default)]
    pub ports: PortRange,
    pub registered_at_ms: u64,
    pub state_changed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    Submitted,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Killed,
}

impl AppState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            AppState::Succeeded | AppState::Failed | AppState::Killed
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub name: String,
    pub queue: String,
    pub user: String,
    pub state: AppState,
    pub spec: String,
    pub spec_format: String,
    pub submitted_at_ms: u64,
    pub finished_at_ms: u64,
    pub diagnostics: String,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub am_container: Option<String>,
    /// The submitter runs the master itself: the RM launches none.
    #[serde(default)]
    pub unmanaged: bool,
    /// Attempts whose master ended through no fault of its own (its node
    /// was lost): they do not count against `max_attempts`.
    #[serde(default)]
    pub free_attempts: u32,
    /// Latest per-stage progress from the master.
    #[serde(default)]
    pub stages: Vec<StageProgress>,
}

/// Tasks done out of the total of one stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    pub name: String,
    pub done: u32,
    pub total: u32,
    #[serde(default)]
    pub running: u32,
    #[serde(default)]
    pub failed: u32,
}

impl From<&weft_proto::v1::StageProgress> for StageProgress {
    fn from(p: &weft_proto::v1::StageProgress) -> Self {
        StageProgress {
            name: p.name.clone(),
            done: p.done,
            total: p.total,
            running: p.running,
            failed: p.failed,
        }
    }
}

impl From<&StageProgress> for weft_proto::v1::StageProgress {
    fn from(p: &StageProgress) -> Self {
        weft_proto::v1::StageProgress {
            name: p.name.clone(),
            done: p.done,
            total: p.total,
            running: p.running,
            failed: p.failed,
        }
    }
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub apps: BTreeMap<String, App>,
    /// Number of the last application id handed out.
    pub app_seq: u64,
    /// Submission request id -> application id, for idempotent retries.
    pub submissions: BTreeMap<String, String>,
    /// RM group members: raft id -> address. Changed only by applied conf
    /// changes, and carried in snapshots so a new member learns everyone.
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
    /// Every container granted, running or ended: an id is never granted twice.
    #[serde(default)]
    pub containers: BTreeMap<String, Container>,
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSpec>,
    /// Seed (hex) of the ed25519 key tokens are signed with; set once by the
    /// first leader.
    #[serde(default)]
    pub token_key: Option<String>,
    /// Derived index: application id -> its containers' ids (not stored;
    /// rebuilt from `containers` when a snapshot is read).
    #[serde(skip)]
    pub app_containers: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Derived index: node id -> its containers' ids (not stored; rebuilt
    /// like `app_containers`), so per-node work costs that node's share.
    #[serde(skip)]
    pub node_containers: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Derived: node id -> what its containers that occupy it use, kept on
    /// apply (O(change)); `check_invariants` recomputes it from scratch.
    #[serde(skip)]
    pub usage: BTreeMap<String, NodeUse>,
    /// Derived: queue -> user -> what their unfinished containers use, kept
    /// like `usage`.
    #[serde(skip)]
    pub queue_usage: BTreeMap<String, BTreeMap<String, QueueUse>>,
    /// Derived: which nodes changed, in apply order (see [`changes`]).
    #[serde(skip)]
    pub node_changes: changes::NodeChanges,
}

/// What one user's unfinished containers in one queue use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueUse {
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    /// Thousandths of a GPU (a whole one counts 1000).
    pub gpu_milli: u64,
    pub containers: u32,
}

/// Resources in use on a node by its containers that have not ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeUse {
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    /// Devices given whole.
    pub gpus: Vec<u32>,
    /// Shares given: device -> (thousandths, memory).
    pub shares: BTreeMap<u32, (u32, u64)>,
    pub containers: u32,
    /// Ports given.
    pub ports: std::collections::BTreeSet<u16>,
}

impl NodeUse {
    /// Adds (`add`) or takes away what `a` uses. Whole GPUs stay
    /// sorted, and empty shares are dropped, so equal use compares equal.
    fn charge(&mut self, a: &Allocation, add: bool) {
        if add {
            self.vcores_milli += a.vcores_milli;
            self.memory_bytes += a.memory_bytes;
            for &g in &a.gpus {
                let at = self.gpus.partition_point(|&x| x <= g);
                self.gpus.insert(at, g);
            }
            if let Some(sh) = a.gpu_share {
                let e = self.shares.entry(sh.device).or_insert((0, 0));
                e.0 += sh.milli;
                e.1 += sh.memory_bytes;
            }
            self.containers += 1;
            self.ports.extend(&a.ports);
        } else {
            self.vcores_milli -= a.vcores_milli;
            self.memory_bytes -= a.memory_bytes;
            for g in &a.gpus {
                let at = self
                    .gpus
                    .iter()
                    .position(|x| x == g)
                    .expect("a charged GPU is in the use");
                self.gpus.remove(at);
            }
            if let Some(sh) = a.gpu_share {
                let e = self
                    .shares
                    .get_mut(&sh.device)
                    .expect("a charged share is in the use");
                e.0 -= sh.milli;
                e.1 -= sh.memory_bytes;
                if *e == (0, 0) {
                    self.shares.remove(&sh.device);
                }
            }
            self.containers -= 1;
            for p in &a.ports {
                self.ports.remove(p);
            }
        }
    }

    /// GPU use in thousandths of a device (whole devices count 1000).
    pub fn gpu_milli(&self) -> u64 {
        1000 * self.gpus.len() as u64 + self.shares.values().map(|s| s.0 as u64).sum::<u64>()
    }

    /// Adds a share; false when the device cannot take it (given whole, or
    /// its thousandths or memory would run over).
    fn take_share(&mut self, s: &GpuShare, device_memory: u64) -> bool {
        if self.gpus.contains(&s.device) {
            return false;
        }
        let e = self.shares.entry(s.device).or_insert((0, 0));
        if e.0 + s.milli > 1000 || e.1 + s.memory_bytes > device_memory {
            return false;
        }
        e.0 += s.milli;
        e.1 += s.memory_bytes;
        true
    }
}

impl ClusterState {
    /// Applies one command. Deterministic: the same state and command give the
    /// same result on every member.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::RegisterNode {
                node_id,
                address,
                vcores_milli,
                memory_bytes,
                gpus,
                labels,
                running,
                ready,
                ports,
                at_ms,
            } => {
                // Containers the agent no longer runs ended while it was away.
                for id in self.end_containers_on(node_id, running, ContainerEnd::Lost, *at_ms) {
                    self.note_master_end(&id);
                }
                let u = self.node_use(node_id);
                if u.vcores_milli > *vcores_milli
                    || u.memory_bytes > *memory_bytes
                    || u.gpus.iter().any(|&g| g as usize >= gpus.len())
                {
                    return Outcome::Rejected(format!(
                        "capacity: below what the node's running containers use ({} vcores_milli, {} bytes, GPUs {:?})",
                        u.vcores_milli, u.memory_bytes, u.gpus
                    ));
                }
                let registered_at_ms = self
                    .nodes
                    .get(node_id)
                    .map_or(*at_ms, |n| n.registered_at_ms);
                self.node_changes.mark(node_id);
                self.nodes.insert(
                    node_id.clone(),
                    Node {
                        id: node_id.clone(),
                        address: address.clone(),
                        vcores_milli: *vcores_milli,
                        memory_bytes: *memory_bytes,
                        gpus: gpus.clone(),
                        labels: labels.clone(),
                        state: NodeState::Running,
                        ready: *ready,
                        ports: *ports,
                        registered_at_ms,
                        state_changed_at_ms: *at_ms,
                    },
                );
                Outcome::Done
            }
            Command::NodeReady { node_id, at_ms } => match self.nodes.get_mut(node_id) {
                Some(n) if n.state == NodeState::Lost => Outcome::Rejected(format!(
                    "node_id: {node_id} is lost: it must register again"
                )),
                Some(n) => {
                    if !n.ready {
                        n.ready = true;
                        n.state_changed_at_ms = *at_ms;
                        self.node_changes.mark(node_id);
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::SetNodeState {
                node_id,
                state,
                at_ms,
            } => match self.nodes.get_mut(node_id) {
                Some(n) => {
                    if n.state != *state {
                        n.state = *state;
                        n.state_changed_at_ms = *at_ms;
                        self.node_changes.mark(node_id);
                    }
                    if *state == NodeState::Lost {
                        let ended =
                            self.end_containers_on(node_id, &[], ContainerEnd::NodeLost, *at_ms);
                        for id in ended {
                            self.note_master_end(&id);
                        }
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::SubmitApplication {
                request_id,
                name,
                queue,
                user,
                spec,
                spec_format,
                unmanaged,
                at_ms,
            } => {
                if !request_id.is_empty() {
                    if let Some(id) = self.submissions.get(request_id) {
                        return Outcome::Submitted { app_id: id.clone() };
                    }
                }
                self.app_seq += 1;
                let id = format!("app-{:06}", self.app_seq);
                self.apps.insert(
                    id.clone(),
                    App {
                        id: id.clone(),
                        name: name.clone(),
                        queue: queue.clone(),
                        user: user.clone(),
                        state: AppState::Submitted,
                        spec: spec.clone(),
                        spec_format: spec_format.clone(),
                        submitted_at_ms: *at_ms,
                        finished_at_ms: 0,
                        diagnostics: String::new(),
                        attempt: 0,
                        am_container: None,
                        unmanaged: *unmanaged,
                        free_attempts: 0,
                        stages: Vec::new(),
                    },
                );
                if !request_id.is_empty() {
                    self.submissions.insert(request_id.clone(), id.clone());
                }
                Outcome::Submitted { app_id: id }
            }
            Command::KillApplication { app_id, at_ms } => match self.apps.get_mut(app_id) {
                Some(a) if a.state.is_terminal() => Outcome::Done,
                Some(a) => {
                    a.state = AppState::Killed;
                    a.finished_at_ms = *at_ms;
                    a.diagnostics = "killed on request".into();
                    self.end_app_containers(app_id, *at_ms, "its application was killed");
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ApplicationAccepted { app_id, .. } => match self.apps.get_mut(app_id) {
                Some(a) if a.state == AppState::Submitted => {
                    a.state = AppState::Accepted;
                    Outcome::Done
                }
                Some(a) => Outcome::Rejected(format!(
                    "application_id: {app_id} is {:?}, not submitted",
                    a.state
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::AttemptStarted {
                app_id,
                attempt,
                am_container,
                keep_containers,
                previous_lost,
                ..
            } => match self.apps.get_mut(app_id) {
                Some(a) if a.state.is_terminal() => {
                    Outcome::Rejected(format!("application_id: {app_id} already ended"))
                }
                Some(a) if *attempt <= a.attempt => Outcome::Rejected(format!(
                    "attempt: {attempt} is not after attempt {} of {app_id}",
                    a.attempt
                )),
                Some(a) => {
                    if *previous_lost && a.attempt > 0 {
                        a.free_attempts += 1;
                    }
                    a.attempt = *attempt;
                    a.am_container = am_container.clone();
                    a.state = AppState::Running;
                    // The previous attempt's running task containers: kept
                    // for the new attempt to adopt (work-preserving), or
                    // ended. Ones not known to run yet end either way (the
                    // new attempt cannot tell whether they were started).
                    let keep = am_container.clone().unwrap_or_default();
                    let ids = self.app_containers.get(app_id).cloned().unwrap_or_default();
                    for id in &ids {
                        self.touch(id, |c| {
                            if c.phase != ContainerPhase::Completed
                                && c.alloc.container_id != keep
                                && !(*keep_containers
                                    && c.alloc.ask_id != MASTER_ASK
                                    && c.phase == ContainerPhase::Running)
                            {
                                c.holding = true; // it may run (or be starting) until its agent says not
                                c.phase = ContainerPhase::Completed;
                                c.end = Some(Completion {
                                    container_id: c.alloc.container_id.clone(),
                                    state: ContainerEnd::Killed,
                                    exit_status: -105,
                                    diagnostic: format!(
                                        "attempt {attempt} replaced the attempt that ran it"
                                    ),
                                });
                            }
                        });
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ApplicationFinished {
                app_id,
                state,
                diagnostics,
                stages,
                at_ms,
            } => {
                if !state.is_terminal() {
                    return Outcome::Rejected(format!("state: {state:?} is not a final state"));
                }
                match self.apps.get_mut(app_id) {
                    Some(a) if a.state.is_terminal() => Outcome::Done,
                    Some(a) => {
                        a.state = *state;
                        a.diagnostics = diagnostics.clone();
                        a.finished_at_ms = *at_ms;
                        if !stages.is_empty() {
                            a.stages = stages.clone();
                        }
                        self.end_app_containers(app_id, *at_ms, "its application ended");
                        Outcome::Done
                    }
                    None => Outcome::Rejected(format!("application_id: no application {app_id}")),
                }
            }
            Command::ContainersAllocated { allocations, at_ms } => {
                let verdict = self.verify_plan(allocations);
                for a in &verdict.accepted {
                    self.app_containers
                        .entry(a.app_id.clone())
                        .or_default()
                        .insert(a.container_id.clone());
                    self.node_containers
                        .entry(a.node_id.clone())
                        .or_default()
                        .insert(a.container_id.clone());
                    self.containers.insert(
                        a.container_id.clone(),
                        Container {
                            alloc: a.clone(),
                            phase: ContainerPhase::Allocated,
                            end: None,
                            allocated_at_ms: *at_ms,
                            changed_at_ms: *at_ms,
                            holding: false,
                        },
                    );
                    Self::charge_node(&mut self.usage, &mut self.node_changes, a, true);
                    Self::charge_queue(&mut self.queue_usage, &self.apps, a, true);
                }
                if verdict.refused.is_empty() {
                    Outcome::Done
                } else {
                    Outcome::PartlyApplied {
                        refused: verdict.refused,
                    }
                }
            }
            Command::ContainersLaunched {
                container_ids,
                at_ms,
            } => {
                for id in container_ids {
                    if let Some(c) = self.containers.get_mut(id) {
                        if c.phase == ContainerPhase::Allocated {
                            c.phase = ContainerPhase::Running;
                            c.changed_at_ms = *at_ms;
                        }
                    }
                }
                Outcome::Done
            }
            Command::ContainersCompleted {
                completions,
                still_running,
                at_ms,
            } => {
                for done in completions {
                    let ended = self.touch(&done.container_id, |c| {
                        let ends = c.phase != ContainerPhase::Completed;
                        if ends {
                            c.holding = *still_running;
                            c.phase = ContainerPhase::Completed;
                            c.end = Some(done.clone());
                            c.changed_at_ms = *at_ms;
                        }
                        ends
                    });
                    if ended == Some(true) {
                        self.note_master_end(&done.container_id);
                    }
                }
                Outcome::Done
            }
            Command::ReportProgress {
                app_id,
                attempt,
                stages,
            } => match self.apps.get_mut(app_id) {
                Some(a) if !a.state.is_terminal() && a.attempt == *attempt => {
                    a.stages = stages.clone();
                    Outcome::Done
                }
                Some(_) => Outcome::Rejected(format!(
                    "attempt: {attempt} of {app_id} is not its live attempt"
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ContainersStopped { container_ids } => {
                for id in container_ids {
                    self.touch(id, |c| {
                        if c.phase == ContainerPhase::Completed {
                            c.holding = false;
                        }
                    });
                }
                Outcome::Done
            }
            Command::PruneContainers { finished_before_ms } => {
                let done: Vec<String> = self
                    .apps
                    .values()
                    .filter(|a| a.state.is_terminal() && a.finished_at_ms < *finished_before_ms)
                    .map(|a| a.id.clone())
                    .collect();
                for app in done {
                    let Some(ids) = self.app_containers.get_mut(&app) else {
                        continue;
                    };
                    ids.retain(|id| match self.containers.get(id) {
                        Some(c) if !c.occupies_node() => {
                            if let Some(on) = self.node_containers.get_mut(&c.alloc.node_id) {
                                on.remove(id);
                                if on.is_empty() {
                                    self.node_containers.remove(&c.alloc.node_id);
                                }
                            }
                            self.containers.remove(id);
                            false
                        }
                        _ => true,
                    });
                    if ids.is_empty() {
                        self.app_containers.remove(&app);
                    }
                }
                Outcome::Done
            }
            Command::SetTokenKey { seed_hex } => {
                if self.token_key.is_none() {
                    self.token_key = Some(seed_hex.clone());
                }
                Outcome::Done
            }
            Command::SetQueues { queues } => {
                let mut names = std::collections::BTreeSet::new();
                for q in queues {
                    if q.name != "root" && !q.name.starts_with("root.") {
                        return Outcome::Rejected(format!(
                            "queues.name: {:?} must be root or start with \"root.\"",
                            q.name
                        ));
                    }
                    if !names.insert(q.name.as_str()) {
                        return Outcome::Rejected(format!("queues.name: {} appears twice", q.name));
                    }
                }
                self.queues = queues.iter().map(|q| (q.name.clone(), q.clone())).collect();
                Outcome::Done
            }
        }
    }

    /// Changes container `id` with `f`, keeping the derived usage in step
    /// (O(change)). None when there is no such container.
    fn touch<R>(&mut self, id: &str, f: impl FnOnce(&mut Container) -> R) -> Option<R> {
        let c = self.containers.get_mut(id)?;
        let (occupied, active) = (c.occupies_node(), c.phase != ContainerPhase::Completed);
        let r = f(c);
        let c = &self.containers[id];
        let (now_occupied, now_active) = (c.occupies_node(), c.phase != ContainerPhase::Completed);
        if occupied != now_occupied {
            Self::charge_node(
                &mut self.usage,
                &mut self.node_changes,
                &c.alloc,
                now_occupied,
            );
        }
        if active != now_active {
            Self::charge_queue(&mut self.queue_usage, &self.apps, &c.alloc, now_active);
        }
        Some(r)
    }

    fn charge_node(
        usage: &mut BTreeMap<String, NodeUse>,
        changes: &mut changes::NodeChanges,
        a: &Allocation,
        add: bool,
    ) {
        changes.mark(&a.node_id);
        let u = usage.entry(a.node_id.clone()).or_default();
        u.charge(a, add);
        if u.containers == 0 {
            usage.remove(&a.node_id);
        }
    }

    fn charge_queue(
        usage: &mut BTreeMap<String, BTreeMap<String, QueueUse>>,
        apps: &BTreeMap<String, App>,
        a: &Allocation,
        add: bool,
    ) {
        let Some(app) = apps.get(&a.app_id) else {
            return;
        };
        let gpu = 1000 * a.gpus.len() as u64 + a.gpu_share.map_or(0, |sh| sh.milli as u64);
        let users = usage.entry(app.queue.clone()).or_default();
        let u = users.entry(app.user.clone()).or_default();
        if add {
            u.vcores_milli += a.vcores_milli;
            u.memory_bytes += a.memory_bytes;
            u.gpu_milli += gpu;
            u.containers += 1;
        } else {
            u.vcores_milli -= a.vcores_milli;
            u.memory_bytes -= a.memory_bytes;
            u.gpu_milli -= gpu;
            u.containers -= 1;
        }
        if u.containers == 0 {
            users.remove(&app.user);
            if users.is_empty() {
                usage.remove(&app.queue);
            }
        }
    }

    /// Rebuilds every derived index and usage from `containers` (after a
    /// snapshot is read).
    fn rebuild_derived(&mut self) {
        self.app_containers.clear();
        self.node_containers.clear();
        self.usage.clear();
        self.queue_usage.clear();
        // Readers of the old log rebuild.
        self.node_changes = changes::NodeChanges::default();
        for c in self.containers.values() {
            self.app_containers
                .entry(c.alloc.app_id.clone())
                .or_default()
                .insert(c.alloc.container_id.clone());
            self.node_containers
                .entry(c.alloc.node_id.clone())
                .or_default()
                .insert(c.alloc.container_id.clone());
            if c.occupies_node() {
                Self::charge_node(&mut self.usage, &mut self.node_changes, &c.alloc, true);
            }
            if c.phase != ContainerPhase::Completed {
                Self::charge_queue(&mut self.queue_usage, &self.apps, &c.alloc, true);
            }
        }
    }

    /// A master that ended through no fault of its own (its node lost or
    /// unreachable, its agent gone or shutting down) does not use one of
    /// its application's `max_attempts`.
    fn note_master_end(&mut self, container_id: &str) {
        let Some(c) = self.containers.get(container_id) else {
            return;
        };
        let Some(end) = &c.end else {
            return;
        };
        let not_its_fault = matches!(end.state, ContainerEnd::NodeLost | ContainerEnd::Lost)
            || end.exit_status == weft_proto::exit_codes::AGENT_SHUTDOWN;
        if c.alloc.ask_id != MASTER_ASK || !not_its_fault {
            return;
        }
        if let Some(a) = self.apps.get_mut(&c.alloc.app_id) {
            if a.am_container.as_deref() == Some(container_id) {
                a.free_attempts += 1;
            }
        }
    }

    /// Ends every unfinished container of `app_id` (agents stop them at their
    /// next heartbeat).
    fn end_app_containers(&mut self, app_id: &str, at_ms: u64, why: &str) {
        let ids = self.app_containers.get(app_id).cloned().unwrap_or_default();
        for id in &ids {
            self.touch(id, |c| {
                if c.phase != ContainerPhase::Completed {
                    c.holding = true; // it may run (or be starting) until its agent says not
                    c.phase = ContainerPhase::Completed;
                    c.changed_at_ms = at_ms;
                    c.end = Some(Completion {
                        container_id: c.alloc.container_id.clone(),
                        state: ContainerEnd::Killed,
                        exit_status: -105,
                        diagnostic: why.to_string(),
                    });
                }
            });
        }
    }

    /// Ends every unfinished container on `node_id` except those in `keep`.
    /// Returns the ids of the containers it ended.
    fn end_containers_on(
        &mut self,
        node_id: &str,
        keep: &[String],
        end: ContainerEnd,
        at_ms: u64,
    ) -> Vec<String> {
        let mut ended = Vec::new();
        let on = self
            .node_containers
            .get(node_id)
            .cloned()
            .unwrap_or_default();
        for id in &on {
            if keep.contains(id) {
                continue;
            }
            self.touch(id, |c| {
                // Whatever the RM ended there no longer runs either.
                c.holding = false;
                if c.phase != ContainerPhase::Completed {
                    c.phase = ContainerPhase::Completed;
                    c.changed_at_ms = at_ms;
                    c.end = Some(Completion {
                        container_id: c.alloc.container_id.clone(),
                        state: end,
                        exit_status: match end {
                            ContainerEnd::NodeLost => -100,
                            _ => -109,
                        },
                        diagnostic: match end {
                            ContainerEnd::NodeLost => {
                                format!("node {node_id} was lost (no heartbeat)")
                            }
                            _ => format!("node {node_id} registered again without it"),
                        },
                    });
                    ended.push(c.alloc.container_id.clone());
                }
            });
        }
        ended
    }

    /// What the containers that occupy `node_id` use (kept on apply).
    pub fn node_use(&self, node_id: &str) -> NodeUse {
        self.usage.get(node_id).cloned().unwrap_or_default()
    }

    /// [`ClusterState::node_use`] without a copy (None: nothing in use).
    pub fn node_use_ref(&self, node_id: &str) -> Option<&NodeUse> {
        self.usage.get(node_id)
    }

    /// What the containers that occupy `node_id` use, counted from scratch
    /// (the check of the kept usage).
    fn scan_node_use(&self, node_id: &str) -> NodeUse {
        let mut u = NodeUse::default();
        for c in self.containers_on(node_id) {
            if c.occupies_node() {
                u.vcores_milli += c.alloc.vcores_milli;
                u.memory_bytes += c.alloc.memory_bytes;
                u.gpus.extend(&c.alloc.gpus);
                if let Some(sh) = c.alloc.gpu_share {
                    let e = u.shares.entry(sh.device).or_insert((0, 0));
                    e.0 += sh.milli;
                    e.1 += sh.memory_bytes;
                }
                u.containers += 1;
                u.ports.extend(&c.alloc.ports);
            }
        }
        u.gpus.sort_unstable();
        u
    }

    /// DESIGN §4's invariants: no node over-committed (per resource, per
    /// GPU); containers belong to known applications and nodes; application
    /// ids within the handed-out sequence. Returns the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        // Each derived index holds every container once, under its owner.
        let agrees = |index: &BTreeMap<String, std::collections::BTreeSet<String>>,
                      owner: fn(&Allocation) -> &str| {
            index.values().map(|s| s.len()).sum::<usize>() == self.containers.len()
                && index.iter().all(|(key, ids)| {
                    ids.iter().all(|id| {
                        self.containers
                            .get(id)
                            .is_some_and(|c| owner(&c.alloc) == key)
                    })
                })
        };
        if !agrees(&self.app_containers, |a| &a.app_id) {
            return Err("the application -> containers index disagrees with the containers".into());
        }
        if !agrees(&self.node_containers, |a| &a.node_id) {
            return Err("the node -> containers index disagrees with the containers".into());
        }
        for (node, kept) in &self.usage {
            if *kept != self.scan_node_use(node) {
                return Err(format!(
                    "node {node}: kept usage {kept:?} is not what its containers use {:?}",
                    self.scan_node_use(node)
                ));
            }
        }
        for node in self.node_containers.keys() {
            if !self.usage.contains_key(node) && self.scan_node_use(node) != NodeUse::default() {
                return Err(format!("node {node}: no usage kept for its containers"));
            }
        }
        let mut queues: BTreeMap<String, BTreeMap<String, QueueUse>> = BTreeMap::new();
        for c in self.containers.values() {
            if c.phase != ContainerPhase::Completed {
                Self::charge_queue(&mut queues, &self.apps, &c.alloc, true);
            }
        }
        if queues != self.queue_usage {
            return Err(format!(
                "queue usage kept {:?} is not what the containers use {queues:?}",
                self.queue_usage
            ));
        }
        for (id, n) in &self.nodes {
            let u = self.node_use(id);
            let given: usize = self
                .containers_on(id)
                .filter(|c| c.occupies_node())
                .map(|c| c.alloc.ports.len())
                .sum();
            if given != u.ports.len() || u.ports.iter().any(|&p| !n.ports.contains(p)) {
                return Err(format!(
                    "node {id}: ports given twice or outside its range {:?}: {:?}",
                    n.ports, u.ports
                ));
            }
            if u.vcores_milli > n.vcores_milli || u.memory_bytes > n.memory_bytes {
                return Err(format!(
                    "node {id} over-committed: {u:?} of {} vcores_milli, {} bytes",
                    n.vcores_milli, n.memory_bytes
                ));
            }
            let mut g = u.gpus.clone();
            g.sort_unstable();
            g.dedup();
            let bad_share = u.shares.iter().any(|(d, (milli, mem))| {
                n.gpus
                    .get(*d as usize)
                    .is_none_or(|dev| *milli > 1000 || *mem > dev.memory_bytes)
                    || u.gpus.contains(d)
            });
            if bad_share || g.len() != u.gpus.len() || g.iter().any(|&i| i as usize >= n.gpus.len())
            {
                return Err(format!(
                    "node {id}: GPUs given twice or not on the node: {:?}",
                    u.gpus
                ));
            }
        }
        for (id, c) in &self.containers {
            if *id != c.alloc.container_id {
                return Err(format!("container {id} stored under another id"));
            }
            if !self.apps.contains_key(&c.alloc.app_id) {
                return Err(format!(
                    "container {id} of unknown application {}",
                    c.alloc.app_id
                ));
            }
            if !self.nodes.contains_key(&c.alloc.node_id) {
                return Err(format!(
                    "container {id} on unknown node {}",
                    c.alloc.node_id
                ));
            }
        }
        for id in self.apps.keys() {
            let n: u64 = id
                .strip_prefix("app-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(u64::MAX);
            if n == 0 || n > self.app_seq {
                return Err(format!(
                    "application id {id} outside the sequence 1..={}",
                    self.app_seq
                ));
            }
        }
        for (req, app) in &self.submissions {
            if !self.apps.contains_key(app) {
                return Err(format!("submission {req} points at missing {app}"));
            }
        }
        Ok(())
    }

    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serialises")
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, String> {
        let mut s: ClusterState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        s.rebuild_derived();
        Ok(s)
    }

    /// The containers granted on `node_id` that the state still holds.
    pub fn containers_on<'a>(&'a self, node_id: &str) -> impl Iterator<Item = &'a Container> + 'a {
        self.node_containers
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.containers.get(id))
    }

    /// The containers of `app_id`, granted under any attempt.
    pub fn containers_of<'a>(&'a self, app_id: &str) -> impl Iterator<Item = &'a Container> + 'a {
        self.app_containers
            .get(app_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.containers.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn submit(req: &str, at: u64) -> Command {
        Command::SubmitApplication {
            request_id: req.into(),
            name: "n".into(),
            queue: "root".into(),
            user: "u".into(),
            spec: "s".into(),
            spec_format: "yaml".into(),
            unmanaged: false,
            at_ms: at,
        }
    }

    #[test]
    fn submissions_get_sequential_ids_and_retries_are_idempotent() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&submit("r1", 10)),
            Outcome::Submitted {
                app_id: "app-000001".into()
            }
        );
        assert_eq!(
            s.apply(&submit("r2", 11)),
            Outcome::Submitted {
                app_id: "app-000002".into()
            }
        );
        assert_eq!(
            s.apply(&submit("r1", 12)),
            Outcome::Submitted {
                app_id: "app-000001".into()
            }
        );
        assert_eq!(s.apps.len(), 2);
        assert_eq!(
            s.apply(&submit("", 13)),
            Outcome::Submitted {
                app_id: "app-000003".into()
            }
        );
    }

    #[test]
    fn apply_is_deterministic_and_snapshots_round_trip() {
        let cmds = [
            submit("a", 1),
            Command::RegisterNode {
                node_id: "n1".into(),
                address: "h:1".into(),
                vcores_milli: 4000,
                memory_bytes: 1 << 30,
                gpus: vec![],
                labels: BTreeMap::new(),
                running: vec![],
                ready: false,
                ports: PortRange::default(),
                at_ms: 2,
            },
            Command::NodeReady {
                node_id: "n1".into(),
                at_ms: 2,
            },
            Command::KillApplication {
                app_id: "app-000001".into(),
                at_ms: 3,
            },
            Command::SetNodeState {
                node_id: "n1".into(),
                state: NodeState::Draining,
                at_ms: 4,
            },
            Command::KillApplication {
                app_id: "app-999999".into(),
                at_ms: 5,
            },
        ];
        let (mut a, mut b) = (ClusterState::default(), ClusterState::default());
        let ra: Vec<Outcome> = cmds.iter().map(|c| a.apply(c)).collect();
        let rb: Vec<Outcome> = cmds.iter().map(|c| b.apply(c)).collect();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_eq!(
            ra[5],
            Outcome::Rejected("application_id: no application app-999999".into())
        );
        assert_eq!(a.apps["app-000001"].state, AppState::Killed);
        assert_eq!(a.nodes["n1"].state, NodeState::Draining);
        assert!(a.nodes["n1"].ready);
        assert_eq!(ClusterState::from_snapshot(&a.to_snapshot()).unwrap(), a);
    }

    pub(super) fn node(id: &str, vcores: u64, mem: u64, gpus: u32) -> Command {
        Command::RegisterNode {
            node_id: id.into(),
            address: format!("{id}:7200"),
            vcores_milli: vcores,
            memory_bytes: mem,
            gpus: (0..gpus)
                .map(|i| Gpu {
                    index: i,
                    uuid: format!("GPU-{id}-{i}"),
                    model: "H100".into(),
                    memory_bytes: 80 << 30,
                })
                .collect(),
            labels: BTreeMap::new(),
            running: vec![],
            ready: true,
            ports: PortRange {
                first: 20000,
                last: 20009,
            },
            at_ms: 0,
        }
    }

    pub(super) fn alloc(
        id: &str,
        app: &str,
        node: &str,
        vcores: u64,
        mem: u64,
        gpus: &[u32],
    ) -> Allocation {
        Allocation {
            container_id: id.into(),
            app_id: app.into(),
            node_id: node.into(),
            vcores_milli: vcores,
            memory_bytes: mem,
            gpus: gpus.to_vec(),
            gpu_share: None,
            ask_id: String::new(),
            gang: None,
            ports: vec![],
        }
    }

    fn share(id: &str, device: u32, milli: u32, mem: u64) -> Allocation {
        Allocation {
            gpu_share: Some(GpuShare {
                device,
                milli,
                memory_bytes: mem,
            }),
            ..alloc(id, "app-000001", "n1", 100, 1 << 20, &[])
        }
    }

    #[test]
    fn gpu_shares_add_up_per_device() {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 4000, 8 << 30, 2)); // two 80 GiB GPUs
        s.apply(&submit("r", 1));
        assert_eq!(
            allocate(
                &mut s,
                vec![share("s1", 0, 500, 40 << 30), share("s2", 0, 250, 20 << 30)]
            ),
            Outcome::Done
        );
        assert_eq!(s.node_use("n1").gpu_milli(), 750);
        // Over the device's thousandths, or its memory: refused.
        assert!(matches!(
            allocate(&mut s, vec![share("s3", 0, 500, 1 << 30)]),
            Outcome::PartlyApplied { .. }
        ));
        assert!(matches!(
            allocate(&mut s, vec![share("s4", 0, 100, 30 << 30)]),
            Outcome::PartlyApplied { .. }
        ));
        // A shared device cannot be given whole; a whole one cannot be shared.
        assert!(matches!(
            allocate(
                &mut s,
                vec![alloc("w1", "app-000001", "n1", 100, 1 << 20, &[0])]
            ),
            Outcome::PartlyApplied { .. }
        ));
        assert_eq!(
            allocate(
                &mut s,
                vec![alloc("w2", "app-000001", "n1", 100, 1 << 20, &[1])]
            ),
            Outcome::Done
        );
        assert!(matches!(
            allocate(&mut s, vec![share("s5", 1, 100, 1 << 20)]),
            Outcome::PartlyApplied { .. }
        ));
        assert_eq!(
            allocate(&mut s, vec![share("s6", 0, 250, 20 << 30)]),
            Outcome::Done
        );
        s.check_invariants().unwrap();
    }

    fn allocate(s: &mut ClusterState, a: Vec<Allocation>) -> Outcome {
        s.apply(&Command::ContainersAllocated {
            allocations: a,
            at_ms: 1,
        })
    }

    #[test]
    fn allocations_are_verified_against_current_state() {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 4000, 8 << 30, 2));
        s.apply(&submit("r", 1));
        assert_eq!(
            allocate(
                &mut s,
                vec![alloc("c1", "app-000001", "n1", 2000, 4 << 30, &[0])]
            ),
            Outcome::Done
        );
        // Over-commit within one round: what no longer fits is refused, the
        // rest is granted.
        let r = allocate(
            &mut s,
            vec![
                alloc("c2", "app-000001", "n1", 1000, 1 << 30, &[]),
                alloc("c3", "app-000001", "n1", 2000, 1 << 30, &[]),
            ],
        );
        assert_eq!(
            r,
            Outcome::PartlyApplied {
                refused: vec![Refusal {
                    container_id: "c3".into(),
                    reason: "node_id: n1 would be over-committed".into()
                }]
            }
        );
        assert!(s.containers.contains_key("c2") && !s.containers.contains_key("c3"));
        let refused = |o: Outcome| match o {
            Outcome::PartlyApplied { refused } if refused.len() == 1 => refused[0].reason.clone(),
            o => panic!("not one refusal: {o:?}"),
        };
        assert_eq!(
            refused(allocate(
                &mut s,
                vec![alloc("c4", "app-000001", "n1", 100, 1 << 20, &[0])]
            )),
            "gpus: GPU 0 of node n1 is already given"
        );
        assert_eq!(
            refused(allocate(
                &mut s,
                vec![alloc("c1", "app-000001", "n1", 1, 1, &[])]
            )),
            "container_id: c1 was already granted"
        );
        assert_eq!(
            refused(allocate(
                &mut s,
                vec![alloc("c5", "app-000009", "n1", 1, 1, &[])]
            )),
            "app_id: no application app-000009"
        );
        s.apply(&Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "c2".into(),
                state: ContainerEnd::Succeeded,
                exit_status: 0,
                diagnostic: String::new(),
            }],
            still_running: false,
            at_ms: 2,
        });
        // Completion frees the resources; the id stays taken.
        s.apply(&Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "c1".into(),
                state: ContainerEnd::Succeeded,
                exit_status: 0,
                diagnostic: String::new(),
            }],
            still_running: false,
            at_ms: 2,
        });
        assert_eq!(s.node_use("n1"), NodeUse::default());
        assert_eq!(
            allocate(
                &mut s,
                vec![alloc("c6", "app-000001", "n1", 4000, 8 << 30, &[0, 1])]
            ),
            Outcome::Done
        );
        assert_eq!(
            refused(allocate(
                &mut s,
                vec![alloc("c1", "app-000001", "n1", 1, 1, &[])]
            )),
            "container_id: c1 was already granted"
        );
        // A lost node's containers end as NodeLost and free the node.
        s.apply(&Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Lost,
            at_ms: 3,
        });
        assert_eq!(
            s.containers["c6"].end.as_ref().unwrap().state,
            ContainerEnd::NodeLost
        );
        assert_eq!(
            refused(allocate(
                &mut s,
                vec![alloc("c7", "app-000001", "n1", 1, 1, &[])]
            )),
            "node_id: n1 is Lost, not running"
        );
        s.check_invariants().unwrap();
    }

    #[test]
    fn application_life_cycle() {
        let mut s = ClusterState::default();
        s.apply(&submit("r", 1));
        let id = "app-000001".to_string();
        assert_eq!(
            s.apply(&Command::ApplicationAccepted {
                app_id: id.clone(),
                at_ms: 2
            }),
            Outcome::Done
        );
        let start = |attempt| Command::AttemptStarted {
            app_id: id.clone(),
            attempt,
            am_container: Some(format!("am-{attempt}")),
            keep_containers: false,
            previous_lost: false,
            at_ms: 3,
        };
        assert_eq!(s.apply(&start(1)), Outcome::Done);
        assert_eq!(s.apps[&id].state, AppState::Running);
        assert!(
            matches!(s.apply(&start(1)), Outcome::Rejected(_)),
            "attempts only move forward"
        );
        assert_eq!(s.apply(&start(2)), Outcome::Done);
        assert_eq!(s.apps[&id].am_container.as_deref(), Some("am-2"));
        let finish = |state| Command::ApplicationFinished {
            app_id: id.clone(),
            state,
            diagnostics: "task t3 over its memory quota".into(),
            stages: vec![],
            at_ms: 9,
        };
        assert!(matches!(
            s.apply(&finish(AppState::Running)),
            Outcome::Rejected(_)
        ));
        assert_eq!(s.apply(&finish(AppState::Failed)), Outcome::Done);
        assert_eq!(s.apps[&id].state, AppState::Failed);
        assert_eq!(s.apps[&id].finished_at_ms, 9);
        // Final is final.
        s.apply(&finish(AppState::Succeeded));
        assert_eq!(s.apps[&id].state, AppState::Failed);
        assert!(matches!(s.apply(&start(3)), Outcome::Rejected(_)));
    }

    #[test]
    fn a_new_attempt_keeps_or_ends_the_previous_attempts_tasks() {
        for keep in [true, false] {
            let mut s = ClusterState::default();
            s.apply(&node("n1", 8000, 8 << 30, 0));
            s.apply(&submit("r", 1));
            let id = "app-000001";
            let mut am = alloc("am-1", id, "n1", 500, 1 << 20, &[]);
            am.ask_id = MASTER_ASK.into();
            let mut task = alloc("t-1", id, "n1", 500, 1 << 20, &[]);
            task.ask_id = "work/0".into();
            let mut idle = alloc("t-2", id, "n1", 500, 1 << 20, &[]);
            idle.ask_id = "work/1".into();
            assert_eq!(allocate(&mut s, vec![am, task, idle]), Outcome::Done);
            s.apply(&Command::ContainersLaunched {
                container_ids: vec!["am-1".into(), "t-1".into()],
                at_ms: 2,
            });
            let start = |attempt: u32, am: &str| Command::AttemptStarted {
                app_id: id.into(),
                attempt,
                am_container: Some(am.into()),
                keep_containers: keep,
                previous_lost: false,
                at_ms: 3,
            };
            assert_eq!(s.apply(&start(1, "am-1")), Outcome::Done);
            // Attempt 1's master dies; attempt 2 starts in a new container.
            s.apply(&Command::ContainersCompleted {
                completions: vec![Completion {
                    container_id: "am-1".into(),
                    state: ContainerEnd::Failed,
                    exit_status: 1,
                    diagnostic: "crashed".into(),
                }],
                still_running: false,
                at_ms: 4,
            });
            let mut am2 = alloc("am-2", id, "n1", 500, 1 << 20, &[]);
            am2.ask_id = MASTER_ASK.into();
            assert_eq!(allocate(&mut s, vec![am2]), Outcome::Done);
            assert_eq!(s.apply(&start(2, "am-2")), Outcome::Done);
            assert_eq!(
                s.containers["t-1"].phase != ContainerPhase::Completed,
                keep,
                "keep_containers={keep}"
            );
            assert_eq!(
                s.containers["t-2"].phase,
                ContainerPhase::Completed,
                "never known to run: ended"
            );
            assert_eq!(s.containers["am-2"].phase, ContainerPhase::Allocated);
            s.check_invariants().unwrap();
        }
    }

    #[test]
    fn a_container_the_rm_ended_holds_its_node_until_the_agent_stops_it() {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 1000, 1 << 30, 0));
        s.apply(&submit("r", 1));
        let id = "app-000001";
        let a = |c: &str| alloc(c, id, "n1", 500, 1 << 20, &[]);
        assert_eq!(allocate(&mut s, vec![a("run"), a("idle")]), Outcome::Done);
        s.apply(&Command::ContainersLaunched {
            container_ids: vec!["run".into()],
            at_ms: 2,
        });
        let release = |c: &str| Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: c.into(),
                state: ContainerEnd::Killed,
                exit_status: -105,
                diagnostic: "released".into(),
            }],
            still_running: true,
            at_ms: 3,
        };
        // Released: both hold their shares until the agent reports them
        // stopped (or reports not having the one never known to run: it may
        // have been starting).
        s.apply(&release("idle"));
        s.apply(&release("run"));
        assert_eq!(s.node_use("n1").vcores_milli, 1000);
        s.apply(&Command::ContainersStopped {
            container_ids: vec!["idle".into()],
        });
        assert_eq!(s.node_use("n1").vcores_milli, 500);
        // Room for one more, not two: the second is refused, the first granted.
        assert!(matches!(
            allocate(&mut s, vec![a("x"), a("y")]),
            Outcome::PartlyApplied { refused } if refused.len() == 1 && refused[0].container_id == "y"
        ));
        s.apply(&release("x"));
        s.apply(&Command::ContainersStopped {
            container_ids: vec!["run".into(), "x".into()],
        });
        assert_eq!(s.node_use("n1").vcores_milli, 0);
        // Ended with its application while running: held until the node is
        // lost (or the agent reports it stopped).
        assert_eq!(allocate(&mut s, vec![a("z")]), Outcome::Done);
        s.apply(&Command::ContainersLaunched {
            container_ids: vec!["z".into()],
            at_ms: 4,
        });
        s.apply(&Command::KillApplication {
            app_id: id.into(),
            at_ms: 5,
        });
        assert!(s.containers["z"].holding);
        assert_eq!(s.node_use("n1").vcores_milli, 500);
        s.apply(&Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Lost,
            at_ms: 6,
        });
        assert_eq!(s.node_use("n1").vcores_milli, 0);
        s.check_invariants().unwrap();
    }

    #[test]
    fn containers_of_long_finished_applications_are_pruned() {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 8000, 8 << 30, 0));
        s.apply(&submit("a", 1));
        s.apply(&submit("b", 1));
        let (a, b) = ("app-000001", "app-000002");
        let c = |id: &str, app: &str| alloc(id, app, "n1", 500, 1 << 20, &[]);
        assert_eq!(
            allocate(&mut s, vec![c("a1", a), c("a2", a), c("b1", b)]),
            Outcome::Done
        );
        s.apply(&Command::ContainersLaunched {
            container_ids: vec!["a2".into()],
            at_ms: 2,
        });
        // a ends at 5 while a2 still runs (it holds its node until stopped).
        s.apply(&Command::ApplicationFinished {
            app_id: a.into(),
            state: AppState::Succeeded,
            diagnostics: String::new(),
            stages: vec![],
            at_ms: 5,
        });
        let prune = |before| Command::PruneContainers {
            finished_before_ms: before,
        };
        s.apply(&prune(5));
        assert_eq!(s.containers.len(), 3, "not finished before 5");
        // a1 was never reported running: it holds too, until its agent is
        // heard not to have it.
        s.apply(&prune(10));
        assert_eq!(s.containers.len(), 3, "both of a's still hold the node");
        s.apply(&Command::ContainersStopped {
            container_ids: vec!["a1".into()],
        });
        s.apply(&prune(10));
        assert!(!s.containers.contains_key("a1"));
        assert!(s.containers.contains_key("a2"), "still holding its node");
        assert!(s.containers.contains_key("b1"), "b has not finished");
        s.check_invariants().unwrap();
        s.apply(&Command::ContainersStopped {
            container_ids: vec!["a2".into()],
        });
        s.apply(&prune(10));
        assert_eq!(s.containers.keys().collect::<Vec<_>>(), vec!["b1"]);
        assert!(!s.app_containers.contains_key(a));
        s.check_invariants().unwrap();
        // The state read back from a snapshot is the same.
        assert_eq!(ClusterState::from_snapshot(&s.to_snapshot()).unwrap(), s);
    }

    #[test]
    fn a_master_lost_with_its_node_is_a_free_attempt() {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 8000, 8 << 30, 0));
        s.apply(&submit("r", 1));
        let id = "app-000001";
        let mut am = alloc("am-1", id, "n1", 500, 1 << 20, &[]);
        am.ask_id = MASTER_ASK.into();
        assert_eq!(allocate(&mut s, vec![am]), Outcome::Done);
        s.apply(&Command::AttemptStarted {
            app_id: id.into(),
            attempt: 1,
            am_container: Some("am-1".into()),
            keep_containers: true,
            previous_lost: false,
            at_ms: 3,
        });
        assert_eq!(s.apps[id].free_attempts, 0);
        s.apply(&Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Lost,
            at_ms: 5,
        });
        assert_eq!(s.apps[id].free_attempts, 1);
        assert_eq!(
            s.containers["am-1"].end.as_ref().unwrap().state,
            ContainerEnd::NodeLost
        );
    }

    #[test]
    fn progress_is_kept_for_the_live_attempt_and_the_token_key_is_set_once() {
        let mut s = ClusterState::default();
        s.apply(&submit("r", 1));
        let id = "app-000001";
        s.apply(&Command::AttemptStarted {
            app_id: id.into(),
            attempt: 2,
            am_container: None,
            keep_containers: true,
            previous_lost: false,
            at_ms: 3,
        });
        let stages = vec![StageProgress {
            name: "prep".into(),
            done: 3,
            total: 4,
            running: 1,
            failed: 0,
        }];
        let report = |attempt| Command::ReportProgress {
            app_id: id.into(),
            attempt,
            stages: stages.clone(),
        };
        assert!(matches!(s.apply(&report(1)), Outcome::Rejected(_)));
        assert!(s.apps[id].stages.is_empty());
        assert_eq!(s.apply(&report(2)), Outcome::Done);
        assert_eq!(s.apps[id].stages, stages);

        s.apply(&Command::SetTokenKey {
            seed_hex: "aa".into(),
        });
        s.apply(&Command::SetTokenKey {
            seed_hex: "bb".into(),
        });
        assert_eq!(s.token_key.as_deref(), Some("aa"), "the first key wins");
    }

    #[test]
    fn queue_configuration_is_validated() {
        let q = QueueSpec::named;
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&Command::SetQueues {
                queues: vec![q("root"), q("root.a")]
            }),
            Outcome::Done
        );
        assert_eq!(s.queues.len(), 2);
        assert!(matches!(
            s.apply(&Command::SetQueues {
                queues: vec![q("other")]
            }),
            Outcome::Rejected(_)
        ));
        assert!(matches!(
            s.apply(&Command::SetQueues {
                queues: vec![q("root.a"), q("root.a")]
            }),
            Outcome::Rejected(_)
        ));
        assert_eq!(s.queues.len(), 2, "a refused change changes nothing");
    }

    /// Random command streams (a small deterministic generator): after every
    /// command the invariants hold, whatever was accepted or refused.
    #[test]
    fn invariants_hold_under_random_command_streams() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _run in 0..50 {
            let mut s = ClusterState::default();
            let mut accepted = 0;
            for step in 0..300 {
                let cmd = match rnd(12) {
                    0 => node(
                        &format!("n{}", rnd(4)),
                        1000 * (1 + rnd(8)),
                        (1 + rnd(16)) << 30,
                        rnd(4) as u32,
                    ),
                    1 => submit(&format!("r{}", rnd(50)), step),
                    2 => Command::SetNodeState {
                        node_id: format!("n{}", rnd(4)),
                        state: if rnd(2) == 0 {
                            NodeState::Lost
                        } else {
                            NodeState::Running
                        },
                        at_ms: step,
                    },
                    3 => Command::ContainersCompleted {
                        completions: vec![Completion {
                            container_id: format!("c{}", rnd(200)),
                            state: ContainerEnd::Succeeded,
                            exit_status: 0,
                            diagnostic: String::new(),
                        }],
                        still_running: false,
                        at_ms: step,
                    },
                    // The RM ends one that may run: it holds its node.
                    4 => Command::ContainersCompleted {
                        completions: vec![Completion {
                            container_id: format!("c{}", rnd(200)),
                            state: ContainerEnd::Killed,
                            exit_status: -105,
                            diagnostic: String::new(),
                        }],
                        still_running: true,
                        at_ms: step,
                    },
                    5 => Command::ContainersLaunched {
                        container_ids: vec![format!("c{}", rnd(200))],
                        at_ms: step,
                    },
                    6 => Command::ContainersStopped {
                        container_ids: vec![format!("c{}", rnd(200))],
                    },
                    7 => Command::KillApplication {
                        app_id: format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                        at_ms: step,
                    },
                    8 => Command::AttemptStarted {
                        app_id: format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                        attempt: 1 + rnd(3) as u32,
                        am_container: None,
                        keep_containers: rnd(2) == 0,
                        previous_lost: false,
                        at_ms: step,
                    },
                    9 => Command::PruneContainers {
                        finished_before_ms: step,
                    },
                    _ => Command::ContainersAllocated {
                        allocations: (0..1 + rnd(3))
                            .map(|_| {
                                let gpus: Vec<u32> = if rnd(3) == 0 {
                                    vec![rnd(4) as u32]
                                } else {
                                    vec![]
                                };
                                alloc(
                                    &format!("c{}", rnd(200)),
                                    &format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                                    &format!("n{}", rnd(4)),
                                    500 * (1 + rnd(4)),
                                    (1 + rnd(4)) << 30,
                                    &gpus,
                                )
                            })
                            .collect(),
                        at_ms: step,
                    },
                };
                let before = s.containers.len();
                s.apply(&cmd);
                if matches!(cmd, Command::ContainersAllocated { .. }) && s.containers.len() > before
                {
                    accepted += 1;
                }
                s.check_invariants()
                    .unwrap_or_else(|e| panic!("after {cmd:?}: {e}"));
            }
            assert!(
                accepted > 0,
                "the generator exercises successful allocations"
            );
        }
    }

    #[test]
    fn envelope_round_trip_and_version_check() {
        let e = Envelope {
            version: COMMAND_VERSION,
            origin: 2,
            request: 7,
            command: submit("x", 1),
        };
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        let mut v2 = e.clone();
        v2.version = 99;
        assert!(Envelope::decode(&v2.encode())
            .unwrap_err()
            .contains("version 99"));
    }
}
