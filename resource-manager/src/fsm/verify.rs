//! Plan verification (nomad's `plan_apply.go`): a scheduling round was made
//! from a view that may be older than the state it lands on. The leader
//! checks each plan against the latest applied state before proposing it,
//! and apply checks it again; both keep the part that still fits and refuse
//! the rest, one allocation at a time, except that a gang is kept whole or
//! refused whole. A stale allocation never throws a round away.
//!
//! The check is a pure function of the state and the plan, so every member
//! that applies the same command keeps the same part.

use rustc_hash::{FxHashMap, FxHashSet};

use super::{Allocation, ClusterState, Node, NodeState, NodeUse};

/// One allocation of a plan that was not granted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub container_id: String,
    pub reason: String,
}

/// A plan split into the part that fits and the refused rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// In the plan's order.
    pub accepted: Vec<Allocation>,
    pub refused: Vec<Refusal>,
}

impl Verdict {
    /// Whether `container_id` was refused.
    pub fn is_refused(&self, container_id: &str) -> bool {
        self.refused.iter().any(|r| r.container_id == container_id)
    }
}

/// What a plan's allocations on one node are checked against: the node
/// (None: the state has no such node) and its use so far.
struct Slot<'a> {
    node: Option<&'a Node>,
    used: NodeUse,
}

impl ClusterState {
    /// Splits `plan` into what fits the current state and what does not:
    /// each allocation needs a new container id, a live application, a
    /// running node that can start work, and room on that node (vcores,
    /// memory, whole GPUs not given, shares that fit their device) after
    /// everything accepted before it. Allocations sharing a `gang` key are
    /// accepted together or refused together.
    ///
    /// Each node the plan names is looked up once (its record and its use),
    /// and a lone allocation is checked against it in place: the cost is one
    /// container-id search per allocation and one node search per node.
    pub fn verify_plan(&self, plan: &[Allocation]) -> Verdict {
        // Units in the plan's order: a lone allocation, or a whole gang
        // (placed where its first member stands).
        let mut units: Vec<Unit> = Vec::with_capacity(plan.len());
        let mut gang_unit: FxHashMap<&str, usize> = FxHashMap::default();
        for (i, a) in plan.iter().enumerate() {
            match a.gang.as_deref() {
                Some(g) => match gang_unit.get(g) {
                    Some(&u) => match &mut units[u] {
                        Unit::Gang(members) => members.push(i),
                        Unit::One(_) => unreachable!("a gang's unit is a gang"),
                    },
                    None => {
                        gang_unit.insert(g, units.len());
                        units.push(Unit::Gang(vec![i]));
                    }
                },
                None => units.push(Unit::One(i)),
            }
        }
        let mut slots: FxHashMap<&str, Slot> = FxHashMap::default();
        let mut ids: FxHashSet<&str> = FxHashSet::default();
        let mut v = Verdict {
            accepted: Vec::with_capacity(plan.len()),
            refused: Vec::new(),
        };
        for unit in units {
            match unit {
                Unit::One(i) => {
                    let a = &plan[i];
                    let slot = slots
                        .entry(a.node_id.as_str())
                        .or_insert_with(|| self.slot(&a.node_id));
                    let fresh = !ids.contains(a.container_id.as_str());
                    match self.check_one(a, fresh, slot.node, &slot.used) {
                        Ok(()) => {
                            slot.used.charge(a, true);
                            ids.insert(a.container_id.as_str());
                            v.accepted.push(a.clone());
                        }
                        Err(reason) => v.refused.push(Refusal {
                            container_id: a.container_id.clone(),
                            reason,
                        }),
                    }
                }
                Unit::Gang(members) => {
                    // Tentative use of the nodes the gang touches.
                    let mut trial: Vec<(&str, Slot)> = Vec::new();
                    let mut trial_ids: FxHashSet<&str> = FxHashSet::default();
                    let mut failure: Option<(usize, String)> = None;
                    for &i in &members {
                        let a = &plan[i];
                        let at = match trial.iter().position(|(n, _)| *n == a.node_id) {
                            Some(at) => at,
                            None => {
                                let slot = match slots.get(a.node_id.as_str()) {
                                    Some(s) => Slot {
                                        node: s.node,
                                        used: s.used.clone(),
                                    },
                                    None => self.slot(&a.node_id),
                                };
                                trial.push((a.node_id.as_str(), slot));
                                trial.len() - 1
                            }
                        };
                        let slot = &mut trial[at].1;
                        let fresh = !ids.contains(a.container_id.as_str())
                            && trial_ids.insert(a.container_id.as_str());
                        if let Err(why) = self.check_one(a, fresh, slot.node, &slot.used) {
                            failure = Some((i, why));
                            break;
                        }
                        slot.used.charge(a, true);
                    }
                    match failure {
                        None => {
                            slots.extend(trial);
                            ids.extend(trial_ids);
                            v.accepted.extend(members.iter().map(|&i| plan[i].clone()));
                        }
                        Some((k, why)) => {
                            let culprit = &plan[k].container_id;
                            for &i in &members {
                                let a = &plan[i];
                                let reason = if i == k {
                                    why.clone()
                                } else {
                                    format!("gang: member {culprit} was refused ({why})")
                                };
                                v.refused.push(Refusal {
                                    container_id: a.container_id.clone(),
                                    reason,
                                });
                            }
                        }
                    }
                }
            }
        }
        v
    }

    fn slot(&self, node_id: &str) -> Slot<'_> {
        Slot {
            node: self.nodes.get(node_id),
            used: self.node_use(node_id),
        }
    }

    /// Checks one allocation against the state and `u`, the node's use so
    /// far (to which the caller adds the allocation when it fits).
    fn check_one(
        &self,
        a: &Allocation,
        fresh_id: bool,
        node: Option<&Node>,
        u: &NodeUse,
    ) -> Result<(), String> {
        if !fresh_id || self.containers.contains_key(a.container_id.as_str()) {
            return Err(format!(
                "container_id: {} was already granted",
                a.container_id
            ));
        }
        match self.apps.get(a.app_id.as_str()) {
            Some(app) if !app.state.is_terminal() => {}
            Some(_) => return Err(format!("app_id: {} already ended", a.app_id)),
            None => return Err(format!("app_id: no application {}", a.app_id)),
        }
        let node = node.ok_or_else(|| format!("node_id: no node {}", a.node_id))?;
        if node.state != NodeState::Running {
            return Err(format!(
                "node_id: {} is {:?}, not running",
                a.node_id, node.state
            ));
        }
        if !node.ready {
            return Err(format!(
                "node_id: {} cannot start work yet (its agent has not confirmed the token key)",
                a.node_id
            ));
        }
        if u.vcores_milli + a.vcores_milli > node.vcores_milli
            || u.memory_bytes + a.memory_bytes > node.memory_bytes
        {
            return Err(format!("node_id: {} would be over-committed", a.node_id));
        }
        for (k, g) in a.gpus.iter().enumerate() {
            if *g as usize >= node.gpus.len() {
                return Err(format!("gpus: node {} has no GPU {g}", a.node_id));
            }
            if u.gpus.contains(g) || u.shares.contains_key(g) || a.gpus[..k].contains(g) {
                return Err(format!(
                    "gpus: GPU {g} of node {} is already given",
                    a.node_id
                ));
            }
        }
        if let Some(sh) = &a.gpu_share {
            let Some(dev) = node.gpus.get(sh.device as usize) else {
                return Err(format!(
                    "gpu_share: node {} has no GPU {}",
                    a.node_id, sh.device
                ));
            };
            let (milli, memory) = u.shares.get(&sh.device).copied().unwrap_or((0, 0));
            if sh.milli == 0
                || u.gpus.contains(&sh.device)
                || a.gpus.contains(&sh.device)
                || milli + sh.milli > 1000
                || memory + sh.memory_bytes > dev.memory_bytes
            {
                return Err(format!(
                    "gpu_share: GPU {} of node {} cannot take {}/1000 and {} bytes more",
                    sh.device, a.node_id, sh.milli, sh.memory_bytes
                ));
            }
        }
        for (k, &p) in a.ports.iter().enumerate() {
            if !node.ports.contains(p) {
                return Err(format!(
                    "ports: {p} is outside node {}'s port range",
                    a.node_id
                ));
            }
            if u.ports.contains(&p) || a.ports[..k].contains(&p) {
                return Err(format!(
                    "ports: port {p} of node {} is already given",
                    a.node_id
                ));
            }
        }
        Ok(())
    }
}

/// A lone allocation or a whole gang, by plan index.
enum Unit {
    One(usize),
    Gang(Vec<usize>),
}

#[cfg(test)]
mod tests {
    use super::super::tests::{alloc, node, submit};
    use super::super::*;

    fn gang(mut a: Allocation, g: &str) -> Allocation {
        a.gang = Some(g.into());
        a
    }

    fn ids(v: &[Allocation]) -> Vec<&str> {
        v.iter().map(|a| a.container_id.as_str()).collect()
    }

    fn two_nodes() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 4000, 8 << 30, 2));
        s.apply(&node("n2", 4000, 8 << 30, 0));
        s.apply(&submit("r1", 1));
        s.apply(&submit("r2", 2));
        s
    }

    #[test]
    fn a_stale_node_loses_only_its_own_allocations() {
        let mut s = two_nodes();
        s.apply(&Command::SetNodeState {
            node_id: "n2".into(),
            state: NodeState::Lost,
            at_ms: 5,
        });
        let plan = vec![
            alloc("c1", "app-000001", "n1", 1000, 1 << 30, &[]),
            alloc("c2", "app-000001", "n2", 1000, 1 << 30, &[]),
            alloc("c3", "app-000002", "n1", 1000, 1 << 30, &[]),
        ];
        let v = s.verify_plan(&plan);
        assert_eq!(ids(&v.accepted), ["c1", "c3"]);
        assert_eq!(
            v.refused,
            [Refusal {
                container_id: "c2".into(),
                reason: "node_id: n2 is Lost, not running".into()
            }]
        );
        // Apply keeps the same part and says what it refused.
        let out = s.apply(&Command::ContainersAllocated {
            allocations: plan,
            at_ms: 6,
        });
        assert_eq!(out, Outcome::PartlyApplied { refused: v.refused });
        assert!(s.containers.contains_key("c1") && s.containers.contains_key("c3"));
        assert!(!s.containers.contains_key("c2"));
        s.check_invariants().unwrap();
    }

    #[test]
    fn an_ended_application_loses_its_allocations_and_nobody_else_does() {
        let mut s = two_nodes();
        s.apply(&Command::KillApplication {
            app_id: "app-000001".into(),
            at_ms: 5,
        });
        let plan = vec![
            alloc("c1", "app-000001", "n1", 1000, 1 << 30, &[]),
            alloc("c2", "app-000002", "n1", 1000, 1 << 30, &[]),
            alloc("c3", "app-000001", "n2", 1000, 1 << 30, &[]),
        ];
        let v = s.verify_plan(&plan);
        assert_eq!(ids(&v.accepted), ["c2"]);
        assert_eq!(v.refused.len(), 2);
        assert!(v
            .refused
            .iter()
            .all(|r| r.reason == "app_id: app-000001 already ended"));
    }

    #[test]
    fn a_double_booked_gpu_is_refused_once_and_the_rest_commits() {
        let mut s = two_nodes();
        assert_eq!(
            s.apply(&Command::ContainersAllocated {
                allocations: vec![alloc("c0", "app-000001", "n1", 100, 1 << 20, &[0])],
                at_ms: 3,
            }),
            Outcome::Done
        );
        // GPU 0 is taken in the state, GPU 1 twice within the plan.
        let plan = vec![
            alloc("c1", "app-000002", "n1", 100, 1 << 20, &[0]),
            alloc("c2", "app-000002", "n1", 100, 1 << 20, &[1]),
            alloc("c3", "app-000002", "n1", 100, 1 << 20, &[1]),
            alloc("c4", "app-000002", "n1", 100, 1 << 20, &[]),
        ];
        let v = s.verify_plan(&plan);
        assert_eq!(ids(&v.accepted), ["c2", "c4"]);
        assert_eq!(
            v.refused,
            [
                Refusal {
                    container_id: "c1".into(),
                    reason: "gpus: GPU 0 of node n1 is already given".into()
                },
                Refusal {
                    container_id: "c3".into(),
                    reason: "gpus: GPU 1 of node n1 is already given".into()
                },
            ]
        );
        // Over-commit within a plan refuses only what no longer fits.
        let plan = vec![
            alloc("c5", "app-000002", "n2", 3000, 1 << 30, &[]),
            alloc("c6", "app-000002", "n2", 2000, 1 << 30, &[]),
            alloc("c7", "app-000002", "n2", 1000, 1 << 30, &[]),
        ];
        let v = s.verify_plan(&plan);
        assert_eq!(ids(&v.accepted), ["c5", "c7"]);
        assert_eq!(v.refused[0].reason, "node_id: n2 would be over-committed");
        // A container id taken in the state or twice in the plan.
        let v = s.verify_plan(&[
            alloc("c0", "app-000002", "n2", 1, 1, &[]),
            alloc("c8", "app-000002", "n2", 1, 1, &[]),
            alloc("c8", "app-000002", "n2", 1, 1, &[]),
        ]);
        assert_eq!(ids(&v.accepted), ["c8"]);
        assert!(v
            .refused
            .iter()
            .all(|r| r.reason.ends_with("was already granted")));
    }

    #[test]
    fn a_partly_stale_gang_is_refused_whole_and_frees_what_it_held() {
        let mut s = two_nodes();
        s.apply(&Command::SetNodeState {
            node_id: "n2".into(),
            state: NodeState::Draining,
            at_ms: 5,
        });
        // The gang's first member fits on n1, its second lands on the
        // draining n2: both are refused, and the first member's room on n1
        // goes to the lone allocation after it.
        let plan = vec![
            gang(alloc("g1", "app-000001", "n1", 3000, 1 << 30, &[]), "a/g"),
            gang(alloc("g2", "app-000001", "n2", 1000, 1 << 30, &[]), "a/g"),
            alloc("c1", "app-000002", "n1", 3000, 1 << 30, &[]),
            // A whole gang that fits is kept.
            gang(alloc("h1", "app-000002", "n1", 500, 1 << 30, &[0]), "b/h"),
            gang(alloc("h2", "app-000002", "n1", 500, 1 << 30, &[1]), "b/h"),
        ];
        let v = s.verify_plan(&plan);
        assert_eq!(ids(&v.accepted), ["c1", "h1", "h2"]);
        assert_eq!(
            v.refused,
            [
                Refusal {
                    container_id: "g1".into(),
                    reason: "gang: member g2 was refused (node_id: n2 is Draining, not running)"
                        .into()
                },
                Refusal {
                    container_id: "g2".into(),
                    reason: "node_id: n2 is Draining, not running".into()
                },
            ]
        );
        let out = s.apply(&Command::ContainersAllocated {
            allocations: plan,
            at_ms: 6,
        });
        assert!(matches!(out, Outcome::PartlyApplied { ref refused } if refused.len() == 2));
        assert_eq!(s.node_use("n1").vcores_milli, 4000);
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_port_given_twice_or_outside_the_range_is_refused() {
        let mut s = two_nodes();
        let with_ports = |id: &str, node: &str, ports: &[u16]| Allocation {
            ports: ports.to_vec(),
            ..alloc(id, "app-000001", node, 100, 1 << 20, &[])
        };
        assert_eq!(
            s.apply(&Command::ContainersAllocated {
                allocations: vec![with_ports("c0", "n1", &[20000])],
                at_ms: 3,
            }),
            Outcome::Done
        );
        let v = s.verify_plan(&[
            with_ports("c1", "n1", &[20000]),
            with_ports("c2", "n1", &[20001, 20002]),
            with_ports("c3", "n1", &[20002]),
            with_ports("c4", "n1", &[30000]),
            // The same number on another node is another port.
            with_ports("c5", "n2", &[20000]),
        ]);
        assert_eq!(ids(&v.accepted), ["c2", "c5"]);
        let reasons: Vec<&str> = v.refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "ports: port 20000 of node n1 is already given",
                "ports: port 20002 of node n1 is already given",
                "ports: 30000 is outside node n1's port range",
            ]
        );
        // Ended, and stopped: the port is free again.
        s.apply(&Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "c0".into(),
                state: ContainerEnd::Succeeded,
                exit_status: 0,
                diagnostic: String::new(),
            }],
            still_running: false,
            at_ms: 4,
        });
        assert!(s
            .verify_plan(&[with_ports("c1", "n1", &[20000])])
            .refused
            .is_empty());
        s.check_invariants().unwrap();
    }

    #[test]
    fn a_node_that_cannot_start_work_yet_is_refused() {
        let mut s = two_nodes();
        s.apply(&Command::RegisterNode {
            node_id: "n3".into(),
            address: "127.0.0.1:1".into(),
            vcores_milli: 1000,
            memory_bytes: 1 << 30,
            gpus: vec![],
            labels: Default::default(),
            running: vec![],
            ended: vec![],
            ready: false,
            ports: PortRange::default(),
            at_ms: 7,
        });
        assert!(!s.nodes["n3"].ready);
        let a = vec![alloc("c1", "app-000001", "n3", 100, 1 << 20, &[])];
        assert!(s.verify_plan(&a).refused[0]
            .reason
            .contains("cannot start work yet"));
        s.apply(&Command::NodeReady {
            node_id: "n3".into(),
            at_ms: 8,
        });
        assert_eq!(s.verify_plan(&a).accepted.len(), 1);
    }
}
