//! Node liveness of one leadership (started and stopped by the supervisor):
//! declares nodes not heard from within `node_expiry` LOST (counting from the
//! election at the earliest), prunes the containers of long-finished
//! applications, and seeds the queue configuration once per leadership.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::fsm::{Command, NodeState, Outcome, QueueSpec};

use crate::service::RmService;

/// How long users' expired tokens stay listed before the leader drops them.
pub const EXPIRED_TOKENS_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Liveness bookkeeping of the leader (not replicated: a new leader rebuilds
/// it from the next heartbeats).
#[derive(Default)]
pub struct Liveness {
    pub last_heartbeat: HashMap<String, Instant>,
    /// When this member last became leader; none while it follows.
    pub leader_since: Option<Instant>,
}

/// Nodes to declare lost: RUNNING, DRAINING or UNHEALTHY nodes not heard
/// from for `expiry`, counting from when this leader took over at the
/// earliest (the grace period after an election). Pure, for testing.
pub fn expired_nodes(
    nodes: &[(String, NodeState)],
    last_heartbeat: &HashMap<String, Instant>,
    leader_since: Instant,
    now: Instant,
    expiry: Duration,
) -> Vec<String> {
    nodes
        .iter()
        .filter(|(_, s)| {
            matches!(
                s,
                NodeState::Running | NodeState::Draining | NodeState::Unhealthy
            )
        })
        .filter(|(id, _)| {
            let seen = last_heartbeat
                .get(id)
                .copied()
                .unwrap_or(leader_since)
                .max(leader_since);
            now.saturating_duration_since(seen) > expiry
        })
        .map(|(id, _)| id.clone())
        .collect()
}

impl RmService {
    /// Leader-only: drops the containers of applications that finished
    /// more than `container_retention` ago from the state (its size, and
    /// every scan over containers, then follow what runs, not history).
    async fn prune_containers(&self) {
        let before = self
            .clock
            .wall_ms()
            .saturating_sub(self.container_retention.as_millis() as u64);
        let due = {
            let st = self.raft.state();
            st.apps.values().any(|a| {
                a.state.is_terminal()
                    && a.finished_at_ms < before
                    && st.containers_of(&a.id).any(|c| !c.occupies_node())
            })
        };
        if due {
            match self
                .raft
                .propose(Command::PruneContainers {
                    finished_before_ms: before,
                })
                .await
            {
                Ok(_) => tracing::debug!("containers of finished applications pruned"),
                Err(e) => tracing::debug!(error = %e, "pruning not committed"),
            }
        }
    }

    /// Leader-only: drops finished applications older than the retention,
    /// and the oldest beyond the most kept, from the state.
    async fn prune_applications(&self) {
        let (age, keep) = self.app_retention;
        let before = self.clock.wall_ms().saturating_sub(age.as_millis() as u64);
        let due = {
            let st = self.raft.state();
            let mut finished = 0u64;
            let mut old = false;
            for a in st.apps.values().filter(|a| a.state.is_terminal()) {
                finished += 1;
                old |= a.finished_at_ms < before;
            }
            old || finished > keep
        };
        if due {
            match self
                .raft
                .propose(Command::PruneApplications {
                    finished_before_ms: before,
                    keep,
                })
                .await
            {
                Ok(_) => tracing::debug!("finished applications pruned"),
                Err(e) => tracing::debug!(error = %e, "pruning not committed"),
            }
        }
    }

    /// Leader-only: drops users' tokens that expired more than
    /// [`EXPIRED_TOKENS_KEPT`] ago (until then `rmctl acl token list`
    /// shows them as expired).
    async fn prune_acl_tokens(&self) {
        let before = self
            .clock
            .wall_ms()
            .saturating_sub(EXPIRED_TOKENS_KEPT.as_millis() as u64);
        let due = self
            .raft
            .state()
            .acl_tokens
            .values()
            .any(|t| t.expires_at_ms != 0 && t.expires_at_ms < before);
        if due {
            match self
                .raft
                .propose(Command::AclTokensPrune {
                    expired_before_ms: before,
                })
                .await
            {
                Ok(_) => tracing::debug!("expired tokens pruned"),
                Err(e) => tracing::debug!(error = %e, "pruning not committed"),
            }
        }
    }

    /// Leader-only: makes the admin token `[acl] initial_admin_token_file`
    /// names, once (as `rmctl acl bootstrap` with that secret would).
    async fn make_initial_admin_token(&self) {
        let Some(secret) = &self.acl.initial_admin_secret else {
            return;
        };
        if !self.acl.enabled || self.raft.state().acl_bootstrapped {
            return;
        }
        let (_, token) = crate::service::auth::token_with(
            secret.clone(),
            "admin",
            true,
            "initial admin token (acl.initial_admin_token_file)",
            self.clock.wall_ms(),
            0,
        );
        let accessor = token.accessor.clone();
        match self.raft.propose(Command::AclBootstrap { token }).await {
            Ok(Outcome::Rejected(why)) => {
                tracing::warn!(%why, "the initial admin token was not made")
            }
            Ok(_) => {
                tracing::info!(%accessor, "the initial admin token (acl.initial_admin_token_file) is made")
            }
            Err(e) => tracing::debug!(error = %e, "the initial admin token is not made yet"),
        }
    }

    /// Leader-only: records where this member serves its HTTP API (or that
    /// it serves none) when the state says otherwise, so that followers
    /// send REST writes here. Retried every round until it is in.
    async fn publish_http_url(&self) {
        let me = self.raft.status().id;
        let want = self.http_url.clone().unwrap_or_default();
        if self
            .raft
            .state()
            .member_http
            .get(&me)
            .cloned()
            .unwrap_or_default()
            == want
        {
            return;
        }
        let cmd = Command::SetMemberHttp {
            member: me,
            url: want.clone(),
        };
        match self.raft.propose(cmd).await {
            Ok(_) => tracing::info!(url = %want, "this member's HTTP API is recorded"),
            Err(e) => tracing::debug!(error = %e, "this member's HTTP API is not recorded yet"),
        }
    }

    /// Leader-only: drops the token keys replaced by a rotation once their
    /// time is up (every token they signed has expired by then, unless the
    /// rotation asked for less).
    async fn drop_token_keys(&self) {
        // The clock the rotation dated the keys by.
        let now = crate::tokens::token_clock_ms();
        let due: Vec<u32> = {
            let st = self.raft.state();
            let newest = st.token_keys.last().map(|k| k.id);
            st.token_keys
                .iter()
                .filter(|k| Some(k.id) != newest && k.drop_at_ms != 0 && k.drop_at_ms <= now)
                .map(|k| k.id)
                .collect()
        };
        if due.is_empty() {
            return;
        }
        match self
            .raft
            .propose(Command::DropTokenKeys { before_ms: now })
            .await
        {
            Ok(_) => {
                tracing::info!(keys = ?due, "replaced token keys dropped: tokens they signed are refused from now on")
            }
            Err(e) => tracing::debug!(error = %e, "token keys not dropped"),
        }
    }

    /// Leader-only, once per leadership: makes the replicated queue
    /// configuration match this member's config.
    async fn apply_queue_config(&self) {
        // The config seeds the queue tree; once the state has one, runtime
        // changes (SetQueues) win over any member's file.
        if self.queues.is_empty() || !self.raft.state().queues.is_empty() {
            return;
        }
        let mut want: Vec<QueueSpec> = self.queues.to_vec();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        let have: Vec<QueueSpec> = self.raft.state().queues.values().cloned().collect();
        if have == want {
            return;
        }
        match self
            .raft
            .propose(Command::SetQueues {
                queues: self.queues.to_vec(),
            })
            .await
        {
            Ok(Outcome::Rejected(why)) => {
                tracing::error!(reason = %why, "queue configuration refused")
            }
            Ok(_) => tracing::info!(queues = self.queues.len(), "queue configuration applied"),
            Err(e) => tracing::debug!(error = %e, "queue configuration not applied yet"),
        }
    }

    /// A later leadership starts from nothing (and a grace period).
    pub fn forget_heartbeats(&self) {
        let mut l = self.liveness.lock().expect("liveness lock");
        l.leader_since = None;
        l.last_heartbeat.clear();
    }

    /// Node liveness of one leadership (the leader supervisor starts and
    /// stops it): declares silent nodes LOST and prunes old containers,
    /// until `cancel` fires. It first brings the queue configuration in line.
    pub async fn run_liveness(self, cancel: tokio_util::sync::CancellationToken) {
        let every = (self.node_expiry / 8).max(Duration::from_millis(50));
        let mut last_prune = self.clock.now();
        self.start_liveness();
        self.apply_queue_config().await;
        self.make_initial_admin_token().await;
        self.publish_http_url().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
            let now = self.clock.now();
            if now.saturating_duration_since(last_prune)
                >= (self.container_retention / 10).min(Duration::from_secs(60))
            {
                last_prune = now;
                self.prune_containers().await;
                self.prune_applications().await;
                self.prune_acl_tokens().await;
            }
            self.drop_token_keys().await;
            self.make_initial_admin_token().await;
            self.publish_http_url().await;
            self.expire_silent_nodes().await;
        }
    }

    /// This leadership's grace period starts now (plus the time a deposed
    /// leader may still have answered heartbeats).
    pub fn start_liveness(&self) {
        self.liveness.lock().expect("liveness lock").leader_since =
            Some(self.clock.now() + self.deposed_leader_grace);
    }

    /// Records a heartbeat of `node_id` now.
    pub fn heard_from(&self, node_id: &str) {
        let now = self.clock.now();
        self.liveness
            .lock()
            .expect("liveness lock")
            .last_heartbeat
            .insert(node_id.to_string(), now);
    }

    /// Declares LOST every node silent for `node_expiry` (counting from
    /// this leadership's start at the earliest); returns them.
    pub async fn expire_silent_nodes(&self) -> Vec<String> {
        let lost = {
            let l = self.liveness.lock().expect("liveness lock");
            let Some(since) = l.leader_since else {
                return Vec::new();
            };
            let nodes: Vec<(String, NodeState)> = self
                .raft
                .state()
                .nodes
                .values()
                .map(|n| (n.id.clone(), n.state))
                .collect();
            expired_nodes(
                &nodes,
                &l.last_heartbeat,
                since,
                self.clock.now(),
                self.node_expiry,
            )
        };
        for node_id in &lost {
            tracing::warn!(node_id = %node_id, expiry = ?self.node_expiry, "node lost: no heartbeat");
            let cmd = Command::SetNodeState {
                node_id: node_id.clone(),
                state: NodeState::Lost,
                at_ms: self.clock.wall_ms(),
            };
            if let Err(e) = self.raft.propose(cmd).await {
                tracing::debug!(error = %e, "could not record a lost node");
            }
            self.scheduling.poke();
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_counts_from_the_later_of_heartbeat_and_leadership() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(10);
        let nodes = vec![
            ("a".to_string(), NodeState::Running),
            ("b".to_string(), NodeState::Running),
            ("c".to_string(), NodeState::Lost),
            ("d".to_string(), NodeState::Draining),
        ];
        let mut hb = HashMap::new();
        hb.insert("a".to_string(), t0 + Duration::from_secs(5));
        // A fresh leader at t0: nobody expires before t0 + 10 s, heard from or not.
        assert!(expired_nodes(&nodes, &hb, t0, t0 + Duration::from_secs(9), exp).is_empty());
        // At t0 + 11 s: b and d were never heard from; a was, 6 s ago.
        assert_eq!(
            expired_nodes(&nodes, &hb, t0, t0 + Duration::from_secs(11), exp),
            vec!["b", "d"]
        );
        // Lost nodes are not lost again; a expires 10 s after its heartbeat.
        assert_eq!(
            expired_nodes(&nodes, &hb, t0, t0 + Duration::from_secs(16), exp),
            vec!["a", "b", "d"]
        );
    }

    fn register(id: &str) -> Command {
        Command::RegisterNode {
            node_id: id.into(),
            address: format!("{id}:1"),
            vcores_milli: 1000,
            memory_bytes: 1 << 30,
            gpus: vec![],
            labels: Default::default(),
            running: vec![],
            ended: vec![],
            ready: true,
            ports: Default::default(),
            at_ms: 1,
        }
    }

    /// Liveness on the leader's clock (a manual one): a one-member group
    /// over the in-memory network, no sleeping through the expiry.
    #[tokio::test]
    async fn a_silent_node_is_lost_once_the_leaders_clock_passes_its_expiry() {
        use crate::raft_node::{self, RaftSettings};
        use crate::transport::memory::MemoryNetwork;
        use weft_common::clock::ManualClock;

        let dir = tempfile::tempdir().unwrap();
        let net = MemoryNetwork::new();
        let settings = RaftSettings {
            id: 1,
            peers: [(1, "mem-1".to_string())].into_iter().collect(),
            tick: Duration::from_millis(10),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 1000,
            join: false,
        };
        let storage = crate::storage::SledStorage::open(&dir.path().join("m1")).unwrap();
        let (raft, thread) = raft_node::start(settings, storage, net.endpoint(1)).unwrap();
        net.attach(1, raft.clone());
        let mut role = raft.leadership();
        tokio::time::timeout(Duration::from_secs(10), role.wait_for(|r| r.is_leader))
            .await
            .expect("a one-member group elects itself")
            .unwrap();
        let clock = std::sync::Arc::new(ManualClock::new());
        let expiry = Duration::from_secs(10);
        let svc = RmService::new(raft.clone(), Duration::from_secs(1), expiry, vec![], None)
            .with_clock(clock.clone());
        for id in ["a", "b"] {
            raft.propose(register(id)).await.unwrap();
        }
        let state_of = |id: &str| raft.state().nodes[id].state;

        svc.start_liveness();
        clock.advance(Duration::from_secs(6));
        svc.heard_from("a");
        // The election's grace: nobody is lost before the expiry has passed.
        assert!(svc.expire_silent_nodes().await.is_empty());
        clock.advance(Duration::from_secs(5));
        // t = 11 s: b was never heard from; a was, 5 s ago.
        assert_eq!(svc.expire_silent_nodes().await, ["b"]);
        assert_eq!(state_of("b"), NodeState::Lost);
        assert_eq!(state_of("a"), NodeState::Running);
        clock.advance(Duration::from_secs(6));
        assert_eq!(svc.expire_silent_nodes().await, ["a"]);
        assert_eq!(state_of("a"), NodeState::Lost);
        // A lost node is not declared lost again.
        assert!(svc.expire_silent_nodes().await.is_empty());

        drop(svc);
        drop(raft);
        net.shutdown();
        thread.join().unwrap();
    }
}
