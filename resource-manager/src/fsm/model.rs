//! The replicated model: nodes, applications, containers, queues, and the
//! derived usage kept on apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

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
    /// Its ask's priority (preemption takes lower priorities first).
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub priority: i32,
    /// Time between SIGTERM and SIGKILL when it is preempted (0: the
    /// default, [`DEFAULT_PREEMPTION_GRACE_MS`]).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub preemption_grace_ms: u64,
    /// Of its stage (a service's), the fewest replicas preemption leaves
    /// running.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub min_available: u32,
}

/// The window of the preemption limit per hour.
pub const PREEMPTION_WINDOW_MS: u64 = 3_600_000;

/// A preempted container's time to checkpoint when its stage names none.
pub const DEFAULT_PREEMPTION_GRACE_MS: u64 = 30_000;

fn is_zero_i32(x: &i32) -> bool {
    *x == 0
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

fn is_zero_u32(x: &u32) -> bool {
    *x == 0
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
    /// Preempted: its agent stops it with this grace (SIGTERM, then
    /// SIGKILL after it), telling it why in its notice file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted: Option<PreemptedStop>,
}

/// How a preempted container is stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptedStop {
    pub grace_ms: u64,
    pub at_ms: u64,
}

/// One container to preempt (the leader's plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    pub container_id: String,
    pub grace_ms: u64,
    /// Why, for its end's diagnostic.
    pub diagnostic: String,
}

impl Container {
    /// Whether it counts against its node's resources.
    pub fn occupies_node(&self) -> bool {
        self.phase != ContainerPhase::Completed || self.holding
    }
}

/// A user's bearer token as the state keeps it: its secret's hash, never
/// the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclToken {
    /// The first 16 hex digits of `secret_sha256`: names the token in
    /// lists and revocations.
    pub accessor: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub user: String,
    /// May do anything: queues, members, drains, tokens, every application.
    pub admin: bool,
    pub description: String,
    pub created_at_ms: u64,
    /// 0: never expires.
    pub expires_at_ms: u64,
}

/// A key the group signs tokens with (see [`ClusterState::token_keys`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenKey {
    /// Named by the tokens it signs; the group's first key is 0.
    pub id: u32,
    /// The ed25519 seed, hex: a secret only the members hold.
    pub seed_hex: String,
    pub created_at_ms: u64,
    /// From when it signs: a rotation hands the new key to the agents
    /// first, and its predecessor signs until then.
    pub signs_from_ms: u64,
    /// When it stops verifying and leaves the state (0: not planned; set
    /// when a newer key is made, to when every token it signed has expired
    /// unless the rotation said sooner).
    pub drop_at_ms: u64,
    /// The rotation request that made it: a retry of it changes nothing.
    pub request_id: String,
}

/// The most keys the state holds at once (a rotation past it waits until
/// replaced keys are dropped).
pub const MAX_TOKEN_KEYS: usize = 16;

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
    /// Users who administer the queue (and the queues under it): they see
    /// and kill every application in it. Empty = only cluster admins.
    #[serde(default)]
    pub admin_acl: Vec<String>,
    /// A higher priority in this queue may preempt a lower one of it.
    #[serde(default)]
    pub priority_preemption: bool,
    /// The longest grace this queue's preempted containers get (0: as
    /// their stage asks).
    #[serde(default)]
    pub max_preemption_grace_ms: u64,
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
            admin_acl: vec![],
            priority_preemption: false,
            max_preemption_grace_ms: 0,
        }
    }
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
    /// An operator drained it: it stays DRAINING when its agent registers
    /// again (a restart) and when it comes back after being lost, until
    /// drained nodes can be resumed.
    #[serde(default)]
    pub drain: bool,
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
    /// A service (`kind: service`): runs until killed.
    #[serde(default)]
    pub service: bool,
    /// Its spec's priority.
    #[serde(default)]
    pub priority: u32,
    /// Its containers preempted, all told.
    #[serde(default)]
    pub preempted: u32,
    /// When its containers were preempted within the last hour, per ask
    /// (the limit per hour counts these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub preempted_recently: BTreeMap<String, Vec<u64>>,
    /// A service's healthy replicas, as its master last reported them.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// A service's stages scaled since submit: their replicas now.
    #[serde(default)]
    pub replicas: BTreeMap<String, u32>,
    /// Updates of its spec so far (0: the spec submitted).
    #[serde(default)]
    pub spec_revision: u32,
    /// A service's rollout of its latest revision, as its master said.
    #[serde(default)]
    pub rollout: String,
    /// The revision whose rollout stopped (a new replica of it failed;
    /// 0: none): a new attempt does not try it again.
    #[serde(default)]
    pub rollout_stopped: u32,
    /// The specs updates replaced, newest first (at most
    /// [`PRIOR_SPECS`]): replicas may still run them.
    #[serde(default)]
    pub prior_specs: Vec<PriorSpec>,
}

/// Spec revisions an application keeps besides its latest.
pub const PRIOR_SPECS: usize = 2;

/// A spec an update replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorSpec {
    pub revision: u32,
    pub spec: String,
    pub spec_format: String,
}

/// A service's replica that passes its health check: where to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub stage: String,
    pub index: u32,
    pub container_id: String,
    pub node_id: String,
    pub host: String,
    pub ports: BTreeMap<String, u32>,
}

impl From<&weft_proto::v1::Endpoint> for Endpoint {
    fn from(e: &weft_proto::v1::Endpoint) -> Self {
        Endpoint {
            stage: e.stage.clone(),
            index: e.index,
            container_id: e.container_id.clone(),
            node_id: e.node_id.clone(),
            host: e.host.clone(),
            ports: e.ports.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

impl From<&Endpoint> for weft_proto::v1::Endpoint {
    fn from(e: &Endpoint) -> Self {
        weft_proto::v1::Endpoint {
            stage: e.stage.clone(),
            index: e.index,
            container_id: e.container_id.clone(),
            node_id: e.node_id.clone(),
            host: e.host.clone(),
            ports: e.ports.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

/// The id of the `seq`th submitted application (`app-000042`).
pub fn app_id(seq: u64) -> String {
    format!("app-{seq:06}")
}

impl App {
    /// The order in which the group took the job (its id's number: one per
    /// submission, in log order). Jobs wait in this order, not by their
    /// `submitted_at_ms`: that is the leader's wall clock, which can step
    /// (an hour ahead would put every job submitted meanwhile behind the
    /// next hour's) and differs between members.
    pub fn seq(&self) -> u64 {
        self.id
            .strip_prefix("app-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    }
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

/// The key of the state's maps of nodes, applications and containers: a
/// string kept inline when short (ids are), so that a map search compares
/// keys inside the tree's nodes instead of following a pointer per key.
/// Serialized as a plain string.
pub type Id = compact_str::CompactString;

/// The whole replicated state. Its largest maps (applications, containers,
/// submissions) are persistent maps: a clone shares their nodes, so the raft
/// thread hands a snapshot its own copy of the state in O(1) instead of
/// copying every job (a deep copy of a state of 10,000 jobs stalled every
/// write in flight; the maps copy a node only when it changes after).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<Id, Node>,
    pub apps: imbl::OrdMap<Id, App>,
    /// Number of the last application id handed out.
    pub app_seq: u64,
    /// Submission request id -> application id, for idempotent retries.
    pub submissions: imbl::OrdMap<String, String>,
    /// RM group members: raft id -> address. Changed only by applied conf
    /// changes, and carried in snapshots so a new member learns everyone.
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
    /// Members' HTTP API base URLs (raft id -> URL), each set by the member
    /// itself when it leads (see `Command::SetMemberHttp`).
    #[serde(default)]
    pub member_http: BTreeMap<u64, String>,
    /// Every container granted, running or ended: an id is never granted twice.
    #[serde(default)]
    pub containers: imbl::OrdMap<Id, Container>,
    #[serde(default)]
    pub queues: BTreeMap<String, QueueSpec>,
    /// The keys tokens are signed with, by ascending id: the first made by
    /// the first leader, the others by rotations. The newest whose
    /// `signs_from_ms` has come signs; every one held verifies.
    #[serde(default)]
    pub token_keys: Vec<TokenKey>,
    /// The group's identity to agents: the public key (hex) of its first
    /// token key, kept when keys rotate and that key is dropped.
    #[serde(default)]
    pub token_group: String,
    /// States stored before keys rotated held one seed here: read into
    /// `token_keys` as key 0 when such a state is read.
    #[serde(default, rename = "token_key", skip_serializing)]
    pub legacy_token_key: Option<String>,
    /// Users' bearer tokens by accessor id (the first 16 hex digits of the
    /// secret's SHA-256); the secrets themselves are never stored.
    #[serde(default)]
    pub acl_tokens: BTreeMap<String, AclToken>,
    /// The first admin token was made (`rmctl acl bootstrap` works once).
    #[serde(default)]
    pub acl_bootstrapped: bool,
    /// Derived index: application id -> its containers' ids (not stored;
    /// rebuilt from `containers` when a snapshot is read).
    #[serde(skip)]
    pub app_containers: BTreeMap<Id, std::collections::BTreeSet<Id>>,
    /// Derived index: node id -> its containers' ids (not stored; rebuilt
    /// like `app_containers`), so per-node work costs that node's share.
    #[serde(skip)]
    pub node_containers: BTreeMap<Id, std::collections::BTreeSet<Id>>,
    /// Derived: node id -> what its containers that occupy it use, kept on
    /// apply (O(change)); `check_invariants` recomputes it from scratch.
    #[serde(skip)]
    pub usage: BTreeMap<Id, NodeUse>,
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
    pub(super) fn charge(&mut self, a: &Allocation, add: bool) {
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
}

/// Queries.
impl ClusterState {
    /// What the containers that occupy `node_id` use (kept on apply).
    pub fn node_use(&self, node_id: &str) -> NodeUse {
        self.usage.get(node_id).cloned().unwrap_or_default()
    }

    /// [`ClusterState::node_use`] without a copy (None: nothing in use).
    pub fn node_use_ref(&self, node_id: &str) -> Option<&NodeUse> {
        self.usage.get(node_id)
    }

    /// The containers granted on `node_id` that the state still holds.
    pub fn containers_on<'a>(&'a self, node_id: &str) -> impl Iterator<Item = &'a Container> + 'a {
        self.node_containers
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.containers.get(id))
    }

    /// The master container of `app`'s live attempt, when the RM launched
    /// one and it has ended (the attempt is over; its master is being
    /// stopped if it still runs).
    pub fn ended_master(&self, app: &App) -> Option<&Container> {
        app.am_container
            .as_ref()
            .and_then(|c| self.containers.get(c.as_str()))
            .filter(|c| c.phase == ContainerPhase::Completed)
    }

    /// The token key that signs at `now_ms`: the newest whose time has
    /// come (the first key if, by a clock far behind, none has).
    pub fn signing_key(&self, now_ms: u64) -> Option<&TokenKey> {
        self.token_keys
            .iter()
            .rev()
            .find(|k| k.signs_from_ms <= now_ms)
            .or_else(|| self.token_keys.first())
    }

    /// Makes `seed_hex` the group's first token key (id 0) and the group's
    /// identity its public key.
    pub fn set_first_token_key(&mut self, seed_hex: &str) -> Result<(), String> {
        let signer = weft_proto::token::TokenSigner::from_seed_hex(seed_hex)
            .map_err(|e| format!("seed_hex: {e}"))?;
        self.token_group = hex::encode(signer.public_key());
        self.token_keys = vec![TokenKey {
            id: 0,
            seed_hex: seed_hex.to_string(),
            created_at_ms: 0,
            signs_from_ms: 0,
            drop_at_ms: 0,
            request_id: String::new(),
        }];
        Ok(())
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
