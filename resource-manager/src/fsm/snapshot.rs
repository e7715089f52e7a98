//! Snapshots: the stored part of the state in JSON; the derived indexes and
//! usage are rebuilt when one is read.

use super::*;

impl ClusterState {
    /// What a snapshot stores, cheap to take on the raft thread: the stored
    /// fields (the large maps share their nodes with this state), without
    /// the derived indexes, which [`ClusterState::to_snapshot`] skips.
    pub fn stored_part(&self) -> ClusterState {
        ClusterState {
            nodes: self.nodes.clone(),
            apps: self.apps.clone(),
            app_seq: self.app_seq,
            submissions: self.submissions.clone(),
            members: self.members.clone(),
            member_http: self.member_http.clone(),
            containers: self.containers.clone(),
            queues: self.queues.clone(),
            token_keys: self.token_keys.clone(),
            token_group: self.token_group.clone(),
            legacy_token_key: None,
            acl_tokens: self.acl_tokens.clone(),
            acl_bootstrapped: self.acl_bootstrapped,
            // Every field named (no `..`): a field added to the state is a
            // compile error here until it is either stored or derived.
            app_containers: Default::default(),
            node_containers: Default::default(),
            usage: Default::default(),
            queue_usage: Default::default(),
            node_changes: Default::default(),
        }
    }

    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serialises")
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, String> {
        let mut s: ClusterState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if let Some(seed) = s.legacy_token_key.take() {
            s.set_first_token_key(&seed)?;
        }
        s.rebuild_derived();
        Ok(s)
    }

    /// Rebuilds every derived index and usage from `containers` (after a
    /// snapshot is read).
    pub(super) fn rebuild_derived(&mut self) {
        self.app_containers.clear();
        self.node_containers.clear();
        self.usage.clear();
        self.queue_usage.clear();
        // Readers of the old log rebuild.
        self.node_changes = changes::NodeChanges::default();
        for c in self.containers.values() {
            self.app_containers
                .entry(c.alloc.app_id.as_str().into())
                .or_default()
                .insert(c.alloc.container_id.as_str().into());
            self.node_containers
                .entry(c.alloc.node_id.as_str().into())
                .or_default()
                .insert(c.alloc.container_id.as_str().into());
            if c.occupies_node() {
                Self::charge_node(&mut self.usage, &mut self.node_changes, &c.alloc, true);
            }
            if c.phase != ContainerPhase::Completed {
                Self::charge_queue(&mut self.queue_usage, &self.apps, &c.alloc, true);
            }
        }
    }
}
