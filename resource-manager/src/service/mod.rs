//! The gRPC services of a member, one file each: [`client`] (ClientService,
//! for users), [`tracker`] (ResourceTracker, for node agents) and [`am`]
//! (ApplicationMasterService, for masters). Writes go through raft and are
//! answered once committed; followers answer NotLeader with the leader's
//! address (message and the `weft-leader` metadata), and clients follow it.
//! The member's raft messages arrive through [`crate::transport`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_proto::v1 as pb;

use crate::error::Error;
use crate::fsm::{App, AppState, NodeState, QueueSpec};
pub use crate::leader::liveness::{expired_nodes, Liveness};
use crate::raft_node::RaftHandle;

pub mod am;
pub mod audit_log;
pub mod auth;
pub mod client;
pub mod oidc;
pub mod tracker;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct RmService {
    pub(crate) raft: RaftHandle,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) node_expiry: Duration,
    pub(crate) liveness: Arc<Mutex<Liveness>>,
    /// Queue configuration from this member's config file.
    pub(crate) queues: Arc<Vec<QueueSpec>>,
    /// The scheduling loop, poked when containers end or nodes change.
    pub scheduling: crate::leader::scheduling::Scheduling,
    /// How long containers of finished applications stay in the state.
    pub(crate) container_retention: Duration,
    /// How long, and how many, finished applications stay in the state.
    pub(crate) app_retention: (Duration, u64),
    /// Time for liveness (heartbeat ages, the election grace, pruning's
    /// cut-off): the system's, or a test's manual clock.
    pub(crate) clock: Arc<dyn weft_common::clock::Clock>,
    /// Added to a new leadership's grace before it declares any node lost:
    /// how long a deposed leader may still have answered heartbeats (two
    /// election timeouts, check-quorum's bound), so that a node's own
    /// count (see the agent's fence) always ends first.
    pub(crate) deposed_leader_grace: Duration,
    /// Users and what they may do.
    pub(crate) acl: Arc<crate::config::AclConfig>,
    /// Where this member writes a line for every write asked of it.
    pub(crate) audit: audit_log::AuditLog,
    /// This member's HTTP API base URL, if it serves one.
    pub(crate) http_url: Option<String>,
    /// Where agents copy ended containers' logs (`[logs] aggregate_dir`).
    pub(crate) log_store: Option<std::path::PathBuf>,
}

impl RmService {
    pub fn new(
        raft: RaftHandle,
        heartbeat_interval: Duration,
        node_expiry: Duration,
        queues: Vec<QueueSpec>,
        masters: Option<crate::config::MastersConfig>,
    ) -> Self {
        RmService {
            heartbeat_interval,
            node_expiry,
            liveness: Arc::default(),
            queues: Arc::new(queues),
            scheduling: crate::leader::scheduling::Scheduling::new(raft.clone(), masters),
            raft,
            container_retention: Duration::from_secs(3600),
            app_retention: (Duration::from_secs(7 * 24 * 3600), 10_000),
            clock: Arc::new(weft_common::clock::SystemClock),
            deposed_leader_grace: Duration::ZERO,
            acl: Arc::default(),
            audit: audit_log::AuditLog::default(),
            http_url: None,
            log_store: None,
        }
    }

    /// Preempts as `cfg` says (off by default).
    pub fn with_preemption(mut self, cfg: crate::config::PreemptionConfig) -> Self {
        self.scheduling.preemption = Arc::new(cfg);
        self
    }

    /// Reads ended tasks' logs from `dir` when their nodes cannot give them.
    pub fn with_log_store(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.log_store = dir;
        self
    }

    /// Serves the REST API at `url` (recorded in the state when it leads).
    pub fn with_http_url(mut self, url: String) -> Self {
        self.http_url = Some(url);
        self
    }

    /// Turns users and their rights on (see [`crate::config::AclConfig`]).
    pub fn with_acl(mut self, acl: crate::config::AclConfig) -> Self {
        self.acl = Arc::new(acl);
        self
    }

    /// Writes the audit log to `log`.
    pub fn with_audit_log(mut self, log: audit_log::AuditLog) -> Self {
        self.audit = log;
        self
    }

    /// See [`RmService::deposed_leader_grace`].
    pub fn with_deposed_leader_grace(mut self, grace: Duration) -> Self {
        self.deposed_leader_grace = grace;
        self
    }

    /// Liveness on `clock` instead of the system's.
    pub fn with_clock(mut self, clock: Arc<dyn weft_common::clock::Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn with_container_retention(mut self, d: Duration) -> Self {
        self.container_retention = d;
        self
    }

    /// Finished applications are dropped after `age`, and beyond the
    /// newest `max`.
    pub fn with_app_retention(mut self, age: Duration, max: u64) -> Self {
        self.app_retention = (age, max);
        self
    }

    /// The raft handle (the leader supervisor watches its role).
    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    pub(crate) fn app_report(
        &self,
        st: &crate::fsm::ClusterState,
        a: &App,
    ) -> pb::ApplicationReport {
        pb::ApplicationReport {
            preempted: a.preempted,
            am_container_id: a.am_container.clone().unwrap_or_default(),
            am_node_id: a
                .am_container
                .as_ref()
                .and_then(|c| st.containers.get(c.as_str()))
                .map(|c| c.alloc.node_id.clone())
                .unwrap_or_default(),
            application_id: a.id.clone(),
            name: a.name.clone(),
            queue: a.queue.clone(),
            user: a.user.clone(),
            state: app_state(a.state) as i32,
            attempt: a.attempt,
            progress: if a.state == AppState::Succeeded {
                1.0
            } else {
                let (done, total) = a
                    .stages
                    .iter()
                    .fold((0u32, 0u32), |(d, t), p| (d + p.done, t + p.total));
                done as f32 / total.max(1) as f32
            },
            stages: a.stages.iter().map(Into::into).collect(),
            diagnostics: a.diagnostics.clone(),
            submitted_at_ms: a.submitted_at_ms,
            finished_at_ms: a.finished_at_ms,
            endpoints: a.endpoints.iter().map(Into::into).collect(),
            replicas: a.replicas.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            kind: if a.service { "service" } else { "batch" }.into(),
            spec_revision: a.spec_revision,
            rollout: a.rollout.clone(),
        }
    }

    pub(crate) async fn get_app(&self, id: &str) -> Result<pb::ApplicationReport, Error> {
        self.raft.read_barrier().await?;
        let st = self.raft.state();
        st.apps
            .get(id)
            .map(|a| self.app_report(&st, a))
            .ok_or_else(|| Error::NotFound(format!("application_id: no application {id}")))
    }
}

pub(crate) fn app_state(s: AppState) -> pb::ApplicationState {
    match s {
        AppState::Submitted => pb::ApplicationState::Submitted,
        AppState::Accepted => pb::ApplicationState::Accepted,
        AppState::Running => pb::ApplicationState::Running,
        AppState::Succeeded => pb::ApplicationState::Succeeded,
        AppState::Failed => pb::ApplicationState::Failed,
        AppState::Killed => pb::ApplicationState::Killed,
    }
}

pub(crate) fn node_state(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Running => pb::NodeState::Running,
        NodeState::Unhealthy => pb::NodeState::Unhealthy,
        NodeState::Lost => pb::NodeState::Lost,
        NodeState::Draining => pb::NodeState::Draining,
        NodeState::Decommissioned => pb::NodeState::Decommissioned,
    }
}
