//! DESIGN section 4's invariants, checked from scratch (debug and test builds
//! check them after every applied batch).

use std::collections::BTreeMap;

use super::*;

impl ClusterState {
    /// What the containers that occupy `node_id` use, counted from scratch
    /// (the check of the kept usage).
    pub(super) fn scan_node_use(&self, node_id: &str) -> NodeUse {
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
        let agrees = |index: &BTreeMap<Id, std::collections::BTreeSet<Id>>,
                      owner: fn(&Allocation) -> &str| {
            index.values().map(|s| s.len()).sum::<usize>() == self.containers.len()
                && index.iter().all(|(key, ids)| {
                    ids.iter().all(|id| {
                        self.containers
                            .get(id.as_str())
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
            if !self.apps.contains_key(c.alloc.app_id.as_str()) {
                return Err(format!(
                    "container {id} of unknown application {}",
                    c.alloc.app_id
                ));
            }
            if !self.nodes.contains_key(c.alloc.node_id.as_str()) {
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
            if !self.apps.contains_key(app.as_str()) {
                return Err(format!("submission {req} points at missing {app}"));
            }
        }
        Ok(())
    }
}
