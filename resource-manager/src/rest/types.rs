//! What the REST API answers, in JSON: the gRPC reports with their states
//! as lower-case names, an absent time or id as `null` rather than 0 or "".

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;
use weft_proto::v1 as pb;

/// Why a call failed: the same message gRPC gives.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The gRPC code's name, in lower case: invalid_argument, not_found,
    /// unauthenticated, permission_denied, unavailable, ...
    pub code: String,
    /// The input field at fault, where the message names one (a query
    /// parameter, `spec`, or a path into the spec such as
    /// `stages[0].resources.memory`).
    pub field: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    Submitted,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Killed,
}

impl AppState {
    pub const ALL: [AppState; 6] = [
        AppState::Submitted,
        AppState::Accepted,
        AppState::Running,
        AppState::Succeeded,
        AppState::Failed,
        AppState::Killed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AppState::Submitted => "submitted",
            AppState::Accepted => "accepted",
            AppState::Running => "running",
            AppState::Succeeded => "succeeded",
            AppState::Failed => "failed",
            AppState::Killed => "killed",
        }
    }

    pub fn pb(self) -> pb::ApplicationState {
        match self {
            AppState::Submitted => pb::ApplicationState::Submitted,
            AppState::Accepted => pb::ApplicationState::Accepted,
            AppState::Running => pb::ApplicationState::Running,
            AppState::Succeeded => pb::ApplicationState::Succeeded,
            AppState::Failed => pb::ApplicationState::Failed,
            AppState::Killed => pb::ApplicationState::Killed,
        }
    }

    fn of(s: i32) -> AppState {
        AppState::ALL
            .into_iter()
            .find(|a| a.pb() as i32 == s)
            .unwrap_or(AppState::Submitted)
    }

    pub fn finished(self) -> bool {
        matches!(
            self,
            AppState::Succeeded | AppState::Failed | AppState::Killed
        )
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Stage {
    pub name: String,
    /// Tasks that succeeded.
    pub done: u32,
    pub total: u32,
    /// Tasks running now.
    pub running: u32,
    /// Task failures so far (retried or not).
    pub failed: u32,
}

/// An application: what `GET /v1/apps/{id}` answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct App {
    pub application_id: String,
    pub name: String,
    pub queue: String,
    pub user: String,
    pub state: AppState,
    /// Its master's attempt (1 for the first).
    pub attempt: u32,
    /// Tasks done over tasks, 0 to 1.
    pub progress: f32,
    pub stages: Vec<Stage>,
    /// Why it failed or was killed, or what it waits for.
    pub diagnostics: String,
    pub submitted_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// Its master's container and node, once launched.
    pub am_container_id: Option<String>,
    pub am_node_id: Option<String>,
    /// `batch` or `service`.
    pub kind: String,
    /// A service's stages scaled since submit: their replicas now.
    pub replicas: std::collections::BTreeMap<String, u32>,
    /// A service's healthy replicas.
    pub endpoints: Vec<Endpoint>,
    /// Updates of its spec so far (0: as submitted).
    pub spec_revision: u32,
    /// A service's rollout of its latest revision, in words.
    pub rollout: Option<String>,
    /// Its containers preempted so far (each requeued, no retry used).
    pub preempted: u32,
}

/// A service's healthy replica: where to reach it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Endpoint {
    pub stage: String,
    /// The replica's number in its stage.
    pub index: u32,
    pub container_id: String,
    pub node_id: String,
    /// The node's host.
    pub host: String,
    /// Its named ports.
    pub ports: std::collections::BTreeMap<String, u32>,
}

impl From<pb::Endpoint> for Endpoint {
    fn from(e: pb::Endpoint) -> Self {
        Endpoint {
            stage: e.stage,
            index: e.index,
            container_id: e.container_id,
            node_id: e.node_id,
            host: e.host,
            ports: e.ports.into_iter().collect(),
        }
    }
}

/// A service's healthy replicas.
#[derive(Debug, Serialize, ToSchema)]
pub struct EndpointList {
    pub application_id: String,
    pub endpoints: Vec<Endpoint>,
}

/// What `POST /v1/apps/{id}/update` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Updated {
    pub application_id: String,
    /// The new spec's revision (the submitted one is 0).
    pub spec_revision: u32,
}

/// What `POST /v1/apps/{id}/scale` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Scaled {
    pub application_id: String,
    pub stage: String,
    pub replicas: u32,
    /// Before this call.
    pub previous: u32,
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::ApplicationReport> for App {
    fn from(r: pb::ApplicationReport) -> Self {
        App {
            state: AppState::of(r.state),
            application_id: r.application_id,
            name: r.name,
            queue: r.queue,
            user: r.user,
            attempt: r.attempt,
            progress: r.progress,
            stages: r
                .stages
                .into_iter()
                .map(|s| Stage {
                    name: s.name,
                    done: s.done,
                    total: s.total,
                    running: s.running,
                    failed: s.failed,
                })
                .collect(),
            diagnostics: r.diagnostics,
            submitted_at_ms: r.submitted_at_ms,
            finished_at_ms: (r.finished_at_ms != 0).then_some(r.finished_at_ms),
            am_container_id: some(r.am_container_id),
            am_node_id: some(r.am_node_id),
            kind: if r.kind.is_empty() {
                "batch".into()
            } else {
                r.kind
            },
            replicas: r.replicas.into_iter().collect(),
            endpoints: r.endpoints.into_iter().map(Into::into).collect(),
            spec_revision: r.spec_revision,
            rollout: some(r.rollout),
            preempted: r.preempted,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AppList {
    pub applications: Vec<App>,
    /// Pass as `page_token` for the next page; absent on the last.
    pub next_page_token: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    pub application_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Killed {
    pub application_id: String,
}

/// Amounts of each resource.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Resources {
    /// Thousandths of a core.
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
    /// Thousandths of one shared GPU.
    pub gpu_share_milli: u32,
    /// GPU memory of a shared GPU.
    pub gpu_memory_bytes: u64,
}

impl From<Option<pb::Resources>> for Resources {
    fn from(r: Option<pb::Resources>) -> Self {
        let r = r.unwrap_or_default();
        Resources {
            vcores_milli: r.vcores_milli,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            gpu_share_milli: r.gpu_share_milli,
            gpu_memory_bytes: r.gpu_memory_bytes,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeCapacity {
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Running,
    Unhealthy,
    Lost,
    Draining,
    Decommissioned,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Node {
    pub node_id: String,
    /// Its agent's gRPC address.
    pub address: String,
    pub state: NodeState,
    pub capacity: NodeCapacity,
    pub used: Resources,
    pub labels: BTreeMap<String, String>,
    /// Containers running on it.
    pub containers: u32,
    pub last_heartbeat_ms: u64,
    /// It holds the cluster's token key and can be given work.
    pub ready: bool,
    /// Each GPU's use, by index.
    pub gpu_use: Vec<GpuUse>,
}

/// One GPU's use.
#[derive(Debug, Serialize, ToSchema)]
pub struct GpuUse {
    pub index: u32,
    /// Given whole to one container.
    pub whole: bool,
    /// Thousandths of it given as shares.
    pub share_milli: u32,
    /// GPU memory those shares promise.
    pub share_memory_bytes: u64,
}

impl From<pb::NodeReport> for Node {
    fn from(n: pb::NodeReport) -> Self {
        let cap = n.capacity.unwrap_or_default();
        Node {
            state: match pb::NodeState::try_from(n.state).unwrap_or_default() {
                pb::NodeState::Unhealthy => NodeState::Unhealthy,
                pb::NodeState::Lost => NodeState::Lost,
                pb::NodeState::Draining => NodeState::Draining,
                pb::NodeState::Decommissioned => NodeState::Decommissioned,
                pb::NodeState::Running | pb::NodeState::Unspecified => NodeState::Running,
            },
            node_id: n.node_id,
            address: n.address,
            capacity: NodeCapacity {
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
            },
            used: n.used.into(),
            labels: n.labels.into_iter().collect(),
            containers: n.containers,
            last_heartbeat_ms: n.last_heartbeat_ms,
            ready: n.ready,
            gpu_use: n
                .gpu_use
                .into_iter()
                .map(|g| GpuUse {
                    index: g.index,
                    whole: g.whole,
                    share_milli: g.share_milli,
                    share_memory_bytes: g.share_memory_bytes,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Queue {
    /// Its full name (`root.ml.train`).
    pub name: String,
    pub guaranteed: Resources,
    pub maximum: Resources,
    pub used: Resources,
    pub pending_applications: u32,
    pub running_applications: u32,
    pub weight: u32,
    /// What one user may use of it at most, where limited.
    pub user_limit: Option<Resources>,
    /// Who may submit (empty: anyone).
    pub submit_acl: Vec<String>,
    /// Who administers it: sees, reads and kills every application in it.
    pub admin_acl: Vec<String>,
}

impl From<pb::QueueReport> for Queue {
    fn from(q: pb::QueueReport) -> Self {
        Queue {
            name: q.name,
            guaranteed: q.guaranteed.into(),
            maximum: q.maximum.into(),
            used: q.used.into(),
            pending_applications: q.pending_applications,
            running_applications: q.running_applications,
            weight: q.weight,
            user_limit: q.user_limit.map(|r| Some(r).into()),
            submit_acl: q.submit_acl,
            admin_acl: q.admin_acl,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    pub queues: Vec<Queue>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    /// Its raft id.
    pub id: u64,
    /// Its gRPC address.
    pub address: String,
    /// Its HTTP API, where it serves one and has led since.
    pub http_url: Option<String>,
    pub is_leader: bool,
    /// Added, not voting yet (catching up).
    pub is_learner: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulerStats {
    pub rounds: u64,
    /// Rounds whose plan was committed.
    pub committed: u64,
    /// Containers placed.
    pub placed: u64,
    pub refused_at_verify: u64,
    pub refused_at_apply: u64,
}

/// The RM group and the cluster's size, as the answering member sees them.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cluster {
    pub members: Vec<Member>,
    /// 0 while none is known.
    pub leader_id: u64,
    /// The member that answered.
    pub member_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Nodes running.
    pub nodes: u32,
    pub capacity: Resources,
    pub used: Resources,
    /// This member's scheduler, where it leads.
    pub scheduler: Option<SchedulerStats>,
}

impl From<pb::ClusterStatusResponse> for Cluster {
    fn from(c: pb::ClusterStatusResponse) -> Self {
        Cluster {
            members: c
                .members
                .into_iter()
                .map(|m| Member {
                    id: m.id,
                    address: m.address,
                    http_url: some(m.http_url),
                    is_leader: m.is_leader,
                    is_learner: m.is_learner,
                })
                .collect(),
            leader_id: c.leader_id,
            member_id: c.member_id,
            term: c.term,
            commit_index: c.commit_index,
            applied_index: c.applied_index,
            snapshot_index: c.snapshot_index,
            nodes: c.nodes,
            capacity: c.capacity.into(),
            used: c.used.into(),
            scheduler: c.scheduler.map(|s| SchedulerStats {
                rounds: s.rounds,
                committed: s.committed,
                placed: s.placed,
                refused_at_verify: s.refused_at_verify,
                refused_at_apply: s.refused_at_apply,
            }),
        }
    }
}

/// Who the caller is to this cluster.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub user: String,
    pub admin: bool,
    /// token, certificate, oidc, member, or none (users are off).
    pub method: String,
    /// The token's accessor, where a token was used.
    pub accessor: Option<String>,
    pub acl_enabled: bool,
}

impl From<pb::WhoAmIResponse> for WhoAmI {
    fn from(w: pb::WhoAmIResponse) -> Self {
        WhoAmI {
            user: w.user,
            admin: w.admin,
            method: w.method,
            accessor: some(w.accessor),
            acl_enabled: w.acl_enabled,
        }
    }
}

/// One waiting part of an application and what keeps it from being placed.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitingPart {
    /// `master`, `stage prep`, `gang train`.
    pub what: String,
    /// Tasks it stands for.
    pub tasks: u32,
    /// queue_maximum, user_limit, never_fits, no_room, held, placeable,
    /// starting.
    pub reason: String,
    pub detail: String,
    /// Tasks of other applications ahead of it in its queue.
    pub ahead: u32,
}

/// A failed application's first failing task.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskFailure {
    pub task: String,
    pub container_id: String,
    pub node_id: String,
    /// failed, killed, lost, node_lost.
    pub reason: String,
    pub diagnostic: String,
    pub exit_status: i32,
}

/// Why an application waits, or why it failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Why {
    pub application_id: String,
    pub state: AppState,
    /// One line: the first reason, or how it ended.
    pub summary: String,
    pub waiting: Vec<WaitingPart>,
    pub failure: Option<TaskFailure>,
}

impl From<pb::ApplicationExplanation> for Why {
    fn from(x: pb::ApplicationExplanation) -> Self {
        Why {
            state: AppState::of(x.state),
            application_id: x.application_id,
            summary: x.summary,
            waiting: x
                .waiting
                .into_iter()
                .map(|w| WaitingPart {
                    what: w.what,
                    tasks: w.tasks,
                    reason: w.reason,
                    detail: w.detail,
                    ahead: w.ahead,
                })
                .collect(),
            failure: x.failure.map(|f| TaskFailure {
                task: f.task,
                container_id: f.container_id,
                node_id: f.node_id,
                reason: f.reason,
                diagnostic: f.diagnostic,
                exit_status: f.exit_status,
            }),
        }
    }
}

/// One container of an application: a task's run, where and how it ended.
#[derive(Debug, Serialize, ToSchema)]
pub struct Task {
    /// `stage/index` (`stage.role/index`), or `master`.
    pub task: String,
    pub container_id: String,
    pub node_id: String,
    /// allocated, running, succeeded, failed, killed, lost, node_lost.
    pub state: String,
    pub exit_status: i32,
    /// How it ended: the kill reason with its figures, the exit, the loss.
    pub diagnostic: String,
    pub allocated_at_ms: u64,
    pub changed_at_ms: u64,
    pub resources: Resources,
    /// GPU indices on its node, given whole.
    pub gpus: Vec<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

impl From<pb::ListTasksResponse> for TaskList {
    fn from(r: pb::ListTasksResponse) -> Self {
        TaskList {
            tasks: r
                .tasks
                .into_iter()
                .map(|t| Task {
                    task: t.task,
                    container_id: t.container_id,
                    node_id: t.node_id,
                    state: t.state,
                    exit_status: t.exit_status,
                    diagnostic: t.diagnostic,
                    allocated_at_ms: t.allocated_at_ms,
                    changed_at_ms: t.changed_at_ms,
                    resources: t.resources.into(),
                    gpus: t.gpus,
                })
                .collect(),
        }
    }
}
