//! From the replicated state to the scheduler's input.
//!
//! [`cluster_view_with`] builds the scheduler's [`scheduler::Cluster`] from
//! every node (O(nodes)); [`View`] keeps one across rounds and patches only
//! the nodes that changed since the last round: those the state's change log
//! names ([`crate::fsm::changes`]), those the last round placed on, and those
//! whose busy ports changed. A round at 10k nodes with 1,000 changes then
//! costs 1,000 node updates, not 10,000 node builds. Debug builds check the
//! patched view against a fresh build every round.

use std::collections::{BTreeSet, HashMap};

use crate::fsm::changes::Cursor;
use crate::fsm::{ClusterState, NodeUse};
use crate::scheduler::{self, Queues};

/// Ports bound on each node by anything but Weft's containers.
pub type Busy = HashMap<String, BTreeSet<u16>>;

/// The scheduler's view of the running nodes: free = capacity minus what
/// unfinished containers hold. Returns the nodes and their ids by index.
pub fn cluster_view(state: &ClusterState) -> (scheduler::Cluster, Vec<String>) {
    cluster_view_with(state, &HashMap::new())
}

/// [`cluster_view`], with each node's ports bound by anything (`busy`)
/// counted as taken.
pub fn cluster_view_with(state: &ClusterState, busy: &Busy) -> (scheduler::Cluster, Vec<String>) {
    let mut nodes = Vec::with_capacity(state.nodes.len());
    let mut ids = Vec::with_capacity(state.nodes.len());
    let mut usage = UsageWalk::new(state);
    for n in state.nodes.values() {
        let u = usage.of(&n.id);
        nodes.push(node_view(n, u, busy));
        ids.push(n.id.clone());
    }
    (scheduler::Cluster::new(nodes), ids)
}

/// One node as the scheduler sees it, given what its containers use.
fn node_view(n: &crate::fsm::Node, u: &NodeUse, busy: &Busy) -> scheduler::Node {
    let mut node = scheduler::Node::new(&n.id, n.vcores_milli, n.memory_bytes);
    node.gpus = n
        .gpus
        .iter()
        .map(|g| scheduler::GpuSlot::new(&g.model, g.memory_bytes))
        .collect();
    node.labels = n
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    node.labels.sort();
    set_free(&mut node, n, u, busy);
    node
}

/// Whether `view` has `n`'s capacity, GPUs and labels (then only its free
/// room and schedulability can differ, and are set in place).
fn same_shape(view: &scheduler::Node, n: &crate::fsm::Node) -> bool {
    view.capacity_vcores == n.vcores_milli
        && view.capacity_memory == n.memory_bytes
        && view.gpus.len() == n.gpus.len()
        && view
            .gpus
            .iter()
            .zip(&n.gpus)
            .all(|(s, g)| s.model == g.model && s.memory == g.memory_bytes)
        && view.labels.len() == n.labels.len()
        && view
            .labels
            .iter()
            .zip(&n.labels)
            .all(|((a, b), (k, v))| a == k && b == v)
}

/// Sets what is free on `node` (and whether it takes work) from the state.
fn set_free(node: &mut scheduler::Node, n: &crate::fsm::Node, u: &NodeUse, busy: &Busy) {
    let held = busy.get(&n.id).map_or(0, |b| {
        b.iter()
            .filter(|p| n.ports.contains(**p) && !u.ports.contains(p))
            .count() as u32
    });
    node.free_ports = n
        .ports
        .len()
        .saturating_sub(u.ports.len() as u32)
        .saturating_sub(held);
    for (slot, g) in node.gpus.iter_mut().zip(&n.gpus) {
        if u.gpus.contains(&g.index) {
            slot.free_milli = 0;
            slot.free_memory = 0;
        } else if let Some((milli, mem)) = u.shares.get(&g.index) {
            slot.free_milli = 1000u32.saturating_sub(*milli);
            slot.free_memory = g.memory_bytes.saturating_sub(*mem);
        } else {
            slot.free_milli = 1000;
            slot.free_memory = g.memory_bytes;
        }
    }
    node.free_vcores = n.vcores_milli.saturating_sub(u.vcores_milli);
    node.free_memory = n.memory_bytes.saturating_sub(u.memory_bytes);
    node.schedulable = takes_work(n);
}

/// Whether the scheduler may place on `n`: running, and its agent can start work.
fn takes_work(n: &crate::fsm::Node) -> bool {
    n.state == crate::fsm::NodeState::Running && n.ready
}

/// The state's usage looked up for node ids in ascending order: nodes and
/// their usage are both ordered by node id, so one walk serves all, with no
/// search per node.
struct UsageWalk<'a> {
    usage: std::iter::Peekable<std::collections::btree_map::Iter<'a, crate::fsm::Id, NodeUse>>,
    none: NodeUse,
}

impl<'a> UsageWalk<'a> {
    fn new(state: &'a ClusterState) -> Self {
        UsageWalk {
            usage: state.usage.iter().peekable(),
            none: NodeUse::default(),
        }
    }

    /// What node `id` uses; ids must come in ascending order.
    fn of(&mut self, id: &str) -> &NodeUse {
        while self.usage.next_if(|(k, _)| k.as_str() < id).is_some() {}
        match self.usage.next_if(|(k, _)| k.as_str() == id) {
            Some((_, u)) => u,
            None => &self.none,
        }
    }
}

/// The queue tree with each queue's usage from unfinished containers.
pub fn queue_view(state: &ClusterState) -> Queues {
    let mut specs: Vec<crate::fsm::QueueSpec> = state.queues.values().cloned().collect();
    specs.sort_by_key(|q| q.name.matches('.').count());
    let mut q = Queues::from_specs(&specs).unwrap_or_else(|_| Queues::root_only());
    // Kept per queue and user on apply: O(queues x users), not O(containers).
    for (queue, users) in &state.queue_usage {
        let Some(i) = q.index(queue) else {
            continue;
        };
        for (user, u) in users {
            q.charge(
                i,
                user,
                scheduler::Res::new(u.vcores_milli, u.memory_bytes, u.gpu_milli),
            );
        }
    }
    q
}

/// How a [`View::refresh`] brought the view up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Built from every node (first use, a new state, nodes added, or the
    /// change log no longer reaching back far enough).
    Rebuilt,
    /// This many nodes patched.
    Patched(usize),
}

/// The scheduler's view kept across rounds (one per leadership).
#[derive(Default)]
pub struct View {
    cluster: Option<scheduler::Cluster>,
    ids: Vec<String>,
    pos: rustc_hash::FxHashMap<String, usize>,
    at: Option<Cursor>,
    busy: Busy,
}

impl View {
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings the view up to `state` (and `busy`): patches the nodes that
    /// changed since the last refresh, or rebuilds. Call with the state's
    /// lock held; it costs O(changes) in the steady state.
    pub fn refresh(&mut self, state: &ClusterState, busy: &Busy) -> Refresh {
        let how = self.patch(state, busy).unwrap_or_else(|| {
            let (cluster, ids) = cluster_view_with(state, busy);
            self.pos = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect();
            self.ids = ids;
            self.cluster = Some(cluster);
            Refresh::Rebuilt
        });
        self.at = Some(state.node_changes.cursor());
        if self.busy != *busy {
            self.busy = busy.clone();
        }
        #[cfg(debug_assertions)]
        {
            let (fresh, ids) = cluster_view_with(state, busy);
            assert_eq!(ids, self.ids, "the kept view's nodes are not the state's");
            assert_eq!(
                fresh.nodes,
                self.cluster().nodes,
                "the kept view drifted from the state after {how:?}"
            );
        }
        how
    }

    fn patch(&mut self, state: &ClusterState, busy: &Busy) -> Option<Refresh> {
        let at = self.at?;
        let changed = state.node_changes.since(at)?;
        let cluster = self.cluster.as_mut()?;
        if state.nodes.len() != self.ids.len() {
            return None;
        }
        // Each node once: a flag per node, a list of those flagged.
        let mut flagged = vec![false; self.ids.len()];
        let mut dirty: Vec<usize> = Vec::new();
        let mut flag = |i: usize| {
            if !std::mem::replace(&mut flagged[i], true) {
                dirty.push(i);
            }
        };
        for i in cluster.take_touched() {
            flag(i as usize);
        }
        for id in changed {
            flag(*self.pos.get(id)?);
        }
        if self.busy != *busy {
            for id in self.busy.keys().chain(busy.keys()) {
                if self.busy.get(id) != busy.get(id) {
                    if let Some(&i) = self.pos.get(id) {
                        flag(i);
                    }
                }
            }
        }
        // The view's nodes are the state's, in the same (id) order: the
        // flagged ones are found by one walk over both maps, not by a
        // string-keyed search each.
        dirty.sort_unstable();
        let mut nodes = state.nodes.values();
        let mut usage = UsageWalk::new(state);
        let mut next = 0usize;
        for &i in &dirty {
            let n = nodes.nth(i - next)?;
            next = i + 1;
            if n.id != self.ids[i] {
                return None;
            }
            let u = usage.of(&n.id);
            let current = &cluster.nodes[i];
            if current.schedulable == takes_work(n) && same_shape(current, n) {
                cluster.update_node(i, |node| set_free(node, n, u, busy));
            } else {
                cluster.replace_node(i, node_view(n, u, busy));
            }
        }
        Some(Refresh::Patched(dirty.len()))
    }

    /// The view, for a round to place on (what it takes is refreshed from
    /// the state next time).
    pub fn cluster(&mut self) -> &mut scheduler::Cluster {
        self.cluster.as_mut().expect("refresh first")
    }

    /// Holds the nodes `ids` out of the next round (unschedulable in the
    /// view); the refresh after it puts them back as the state has them.
    pub fn hold_out<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        for id in ids {
            let Some(&i) = self.pos.get(id) else {
                continue;
            };
            if cluster.nodes[i].schedulable {
                let mut node = cluster.nodes[i].clone();
                node.schedulable = false;
                cluster.replace_node(i, node);
                cluster.touch(i);
            }
        }
    }

    /// The schedulable nodes' capacity, all told.
    pub fn capacity(&self) -> scheduler::Res {
        self.cluster
            .as_ref()
            .map_or(scheduler::Res::ZERO, |c| c.capacity())
    }

    /// The view's index of node `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.pos.get(id).copied()
    }

    /// Node ids by the view's node index.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::fsm::{Allocation, Command, Completion, ContainerEnd, NodeState, PortRange};

    fn register(st: &mut ClusterState, id: &str) {
        st.apply(&Command::RegisterNode {
            node_id: id.into(),
            address: format!("{id}:1"),
            vcores_milli: 8000,
            memory_bytes: 16 << 30,
            gpus: vec![],
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            running: vec![],
            ended: vec![],
            ready: true,
            ports: PortRange {
                first: 20000,
                last: 20009,
            },
            at_ms: 1,
        });
    }

    fn alloc(id: &str, app: &str, node: &str) -> Allocation {
        Allocation {
            container_id: id.into(),
            app_id: app.into(),
            node_id: node.into(),
            vcores_milli: 1000,
            memory_bytes: 1 << 30,
            gpus: vec![],
            gpu_share: None,
            ask_id: "t".into(),
            gang: None,
            ports: vec![20001],
            priority: 0,
            preemption_grace_ms: 0,
            min_available: 0,
        }
    }

    fn free(v: &mut View, id: &str) -> (u64, u64, u32, bool) {
        let i = v.ids().iter().position(|x| x == id).unwrap();
        let n = &v.cluster().nodes[i];
        (n.free_vcores, n.free_memory, n.free_ports, n.schedulable)
    }

    #[test]
    fn the_kept_view_patches_what_changed_and_rebuilds_when_it_must() {
        let mut st = ClusterState::default();
        for i in 0..5 {
            register(&mut st, &format!("n{i}"));
        }
        st.apply(&Command::SubmitApplication {
            request_id: String::new(),
            name: "j".into(),
            queue: "root".into(),
            user: "u".into(),
            spec: String::new(),
            spec_format: "yaml".into(),
            unmanaged: true,
            accepted: false,
            service: false,
            priority: 0,
            at_ms: 2,
        });
        let mut v = View::new();
        let busy = Busy::new();
        assert_eq!(v.refresh(&st, &busy), Refresh::Rebuilt);
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(0));

        // Allocated on n1, then n3 lost: exactly those two patched.
        st.apply(&Command::ContainersAllocated {
            allocations: vec![alloc("c1", "app-000001", "n1")],
            at_ms: 3,
        });
        st.apply(&Command::SetNodeState {
            node_id: "n3".into(),
            state: NodeState::Lost,
            at_ms: 3,
        });
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(2));
        assert_eq!(free(&mut v, "n1"), (7000, 15 << 30, 9, true));
        assert!(!free(&mut v, "n3").3);

        // A round's placement the state never received is undone next time.
        let ask = scheduler::Ask::new(0, 0, 2000, 1 << 30);
        v.cluster().take(4, &ask, &[]);
        assert_eq!(free(&mut v, "n4").0, 6000);
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(1));
        assert_eq!(free(&mut v, "n4").0, 8000);

        // A port bound on n2 by something else.
        let busy = Busy::from([("n2".to_string(), BTreeSet::from([20005]))]);
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(1));
        assert_eq!(free(&mut v, "n2").2, 9);

        // The container ends: its node gets its room back.
        st.apply(&Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "c1".into(),
                state: ContainerEnd::Succeeded,
                exit_status: 0,
                diagnostic: String::new(),
            }],
            still_running: false,
            at_ms: 4,
        });
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(1));
        assert_eq!(free(&mut v, "n1").0, 8000);

        // A new node, or another state (a snapshot read): rebuilt.
        register(&mut st, "n5");
        assert_eq!(v.refresh(&st, &busy), Refresh::Rebuilt);
        let st = ClusterState::from_snapshot(&st.to_snapshot()).unwrap();
        assert_eq!(v.refresh(&st, &busy), Refresh::Rebuilt);
        assert_eq!(v.refresh(&st, &busy), Refresh::Patched(0));
    }
}
