//! Preemption: which running containers to stop so that waiting units fit.
//!
//! A pure function over the cluster as a round left it, like the round
//! itself. Two reasons to preempt:
//!
//! - reclaim: a unit of a queue under its guarantee (that stays within its
//!   guarantee with the unit) takes room from queues running above theirs
//!   (shares measured as the round's fairness measures them: dominant
//!   share of the cluster against the guarantee's);
//! - priority: where a queue allows it, a unit takes room from lower
//!   priorities of its own queue.
//!
//! The plan is simulated first: containers already stopping count as free
//! (their room is coming), a unit that then fits takes that room and
//! preempts nothing; otherwise, for each member of the unit, the node where
//! the cheapest set of allowed victims makes room is chosen; a unit
//! (a gang: every member) that cannot be made to fit preempts nothing.
//! Victims go by least loss: lowest priority first, then the most recently
//! started, then the fewest gang members; a victim in a gang brings its
//! whole gang; a keep group (a service's stage) keeps its minimum running.

use std::cmp::Reverse;

use rustc_hash::{FxHashMap, FxHashSet};

use super::model::{Ask, GpuGrant, Node, Res};
use super::queues::Queues;
use super::round::Cluster;

/// A running container the planner may choose as a victim.
#[derive(Debug, Clone)]
pub struct Running {
    /// Node index in the cluster.
    pub node: usize,
    pub queue: usize,
    pub user: String,
    pub priority: i32,
    /// When it started running (ms); the later, the less work is lost.
    pub started_ms: u64,
    pub res: Res,
    /// Its GPUs, as granted.
    pub grants: Vec<GpuGrant>,
    pub ports: u32,
    /// Its gang: every member goes with it.
    pub gang: Option<u64>,
    /// Its keep group (a service's stage; 0: none).
    pub group: u64,
    /// Never a victim (an application master, too young to preempt,
    /// preempted too often lately).
    pub protected: bool,
}

/// A container already being stopped: its room on its node is coming
/// (its queue no longer counts it).
#[derive(Debug, Clone)]
pub struct Stopping {
    pub node: usize,
    pub res: Res,
    pub grants: Vec<GpuGrant>,
    pub ports: u32,
}

/// What the planner may do.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Per queue: a higher priority may preempt a lower one of the queue.
    pub within_queue: Vec<bool>,
    /// Keep groups: the fewest of the group left running.
    pub keep: FxHashMap<u64, u32>,
    /// Most victims one plan names.
    pub max_victims: usize,
    /// Most waiting units one plan looks at.
    pub max_units: usize,
    /// Most victims one plan examines (over every node, unit and member):
    /// a plan over a large cluster stops early rather than hold the
    /// leader's loop.
    pub max_work: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            within_queue: Vec::new(),
            keep: FxHashMap::default(),
            max_victims: 64,
            max_units: 32,
            max_work: 2_000_000,
        }
    }
}

/// Why a victim is preempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its queue runs above its guarantee; the unit's queue is under its own.
    Reclaim,
    /// A higher priority of its own queue.
    Priority,
}

/// One container to preempt, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    /// Index into the `running` list.
    pub running: usize,
    /// The waiting ask (its id) whose unit it makes room for.
    pub for_ask: u64,
    pub reason: Reason,
}

/// Gives `res`, `grants` and `ports` back to node `n` (never past its
/// capacity).
fn free(n: &mut Node, res: Res, grants: &[GpuGrant], ports: u32) {
    n.free_vcores = (n.free_vcores + res.vcores).min(n.capacity_vcores);
    n.free_memory = (n.free_memory + res.memory).min(n.capacity_memory);
    n.free_ports = n.free_ports.saturating_add(ports);
    for g in grants {
        if let Some(d) = n.gpus.get_mut(g.device) {
            d.free_milli = (d.free_milli + g.milli).min(1000);
            let mem = if g.milli == 1000 { d.memory } else { g.memory };
            d.free_memory = (d.free_memory + mem).min(d.memory);
        }
    }
}

/// Takes back what [`free`] gave (a victim spared after all).
fn unfree(n: &mut Node, res: Res, grants: &[GpuGrant], ports: u32) {
    n.free_vcores = n.free_vcores.saturating_sub(res.vcores);
    n.free_memory = n.free_memory.saturating_sub(res.memory);
    n.free_ports = n.free_ports.saturating_sub(ports);
    for g in grants {
        if let Some(d) = n.gpus.get_mut(g.device) {
            d.free_milli = d.free_milli.saturating_sub(g.milli);
            let mem = if g.milli == 1000 { d.memory } else { g.memory };
            d.free_memory = d.free_memory.saturating_sub(mem);
        }
    }
}

/// Takes `ask` with `grants` on node `n`.
fn take(n: &mut Node, ask: &Ask, grants: &[GpuGrant]) {
    n.free_vcores -= ask.vcores;
    n.free_memory -= ask.memory;
    n.free_ports = n.free_ports.saturating_sub(ask.ports);
    for g in grants {
        let d = &mut n.gpus[g.device];
        d.free_milli -= g.milli;
        d.free_memory =
            d.free_memory
                .saturating_sub(if g.milli == 1000 { d.memory } else { g.memory });
    }
}

/// The simulated cluster and usage, with an undo log for a unit's trial.
struct Sim<'a> {
    nodes: Vec<Node>,
    queues: Queues,
    running: &'a [Running],
    keep: &'a FxHashMap<u64, u32>,
    taken: Vec<bool>,
    /// Keep group -> how many still run.
    left: FxHashMap<u64, u32>,
    /// Gang -> its members (indexes into `running`).
    gangs: FxHashMap<u64, Vec<usize>>,
    /// Node -> its possible victims, least loss first.
    by_node: Vec<Vec<usize>>,
    undo: Vec<(usize, Node)>,
    /// Victims examined so far (bounded by [`Settings::max_work`]).
    work: std::cell::Cell<usize>,
}

/// A unit's trial: what it took, to commit or roll back.
#[derive(Default)]
struct Trial {
    victims: Vec<usize>,
    refunds: Vec<(usize, String, Res)>,
}

impl<'a> Sim<'a> {
    fn save(&mut self, i: usize) {
        if !self.undo.iter().any(|(k, _)| *k == i) {
            self.undo.push((i, self.nodes[i].clone()));
        }
    }

    /// A set of victims that lets `ask` fit on node `i`, and its cost
    /// (highest priority, how many, the youngest's start reversed).
    #[allow(clippy::type_complexity)]
    fn victims_on(
        &self,
        i: usize,
        ask: &Ask,
        allowed: &dyn Fn(&Running, &FxHashMap<usize, Res>) -> Option<Reason>,
    ) -> Option<((i32, usize, Reverse<u64>), Vec<(usize, Reason)>)> {
        // (A node with nothing to preempt was already found full.)
        let n = &self.nodes[i];
        if self.by_node[i].is_empty()
            || n.capacity_vcores < ask.vcores
            || n.capacity_memory < ask.memory
            || !n.has_labels(&ask.labels)
        {
            return None;
        }
        let mut trial = n.clone();
        let mut chosen: Vec<(usize, Reason)> = Vec::new();
        // Each set added (a victim, or a gang whole), in the order added.
        let mut sets: Vec<std::ops::Range<usize>> = Vec::new();
        let mut refunded: FxHashMap<usize, Res> = FxHashMap::default();
        let mut groups: FxHashMap<u64, u32> = FxHashMap::default();
        for &v in &self.by_node[i] {
            self.work.set(self.work.get() + 1);
            if chosen.iter().any(|(c, _)| *c == v) || self.taken[v] {
                continue;
            }
            let r = &self.running[v];
            let Some(reason) = allowed(r, &refunded) else {
                continue;
            };
            let set: Vec<usize> = match r.gang {
                Some(g) => self.gangs[&g].clone(),
                None => vec![v],
            };
            if set
                .iter()
                .any(|&m| self.taken[m] || self.running[m].protected)
            {
                continue;
            }
            // A keep group keeps its minimum.
            let mut fewer: FxHashMap<u64, u32> = FxHashMap::default();
            for &m in &set {
                let g = self.running[m].group;
                if g != 0 {
                    *fewer.entry(g).or_default() += 1;
                }
            }
            let keeps = fewer.iter().all(|(g, n)| {
                let gone = groups.get(g).copied().unwrap_or(0) + n;
                let left = self.left.get(g).copied().unwrap_or(0);
                left.saturating_sub(gone) >= self.keep.get(g).copied().unwrap_or(0)
            });
            if !keeps {
                continue;
            }
            for (g, n) in fewer {
                *groups.entry(g).or_default() += n;
            }
            let first = chosen.len();
            for &m in &set {
                let x = &self.running[m];
                if x.node == i {
                    free(&mut trial, x.res, &x.grants, x.ports);
                }
                let e = refunded.entry(x.queue).or_default();
                *e = e.plus(x.res);
                chosen.push((m, reason));
            }
            sets.push(first..chosen.len());
            if Cluster::fit(&trial, ask).is_some() {
                // Spared: each set, the costliest first, whose room the
                // ask turns out not to need (one taken early for a
                // resource the later ones freed enough of).
                let mut spared: Vec<usize> = Vec::new();
                for r in sets.iter().rev() {
                    let mine: Vec<usize> = chosen[r.clone()]
                        .iter()
                        .map(|(m, _)| *m)
                        .filter(|&m| self.running[m].node == i)
                        .collect();
                    for &m in &mine {
                        let x = &self.running[m];
                        unfree(&mut trial, x.res, &x.grants, x.ports);
                    }
                    if Cluster::fit(&trial, ask).is_some() {
                        spared.extend(chosen[r.clone()].iter().map(|(m, _)| *m));
                    } else {
                        for &m in &mine {
                            let x = &self.running[m];
                            free(&mut trial, x.res, &x.grants, x.ports);
                        }
                    }
                }
                chosen.retain(|(m, _)| !spared.contains(m));
                let cost = chosen.iter().fold(
                    (i32::MIN, chosen.len(), Reverse(0u64)),
                    |(p, n, Reverse(s)), (m, _)| {
                        let x = &self.running[*m];
                        (p.max(x.priority), n, Reverse(s.max(x.started_ms)))
                    },
                );
                return Some((cost, chosen));
            }
        }
        None
    }
}

/// The victims to preempt so that waiting units fit (see the module's
/// documentation). `cluster` and `queues` are as the round left them;
/// `waiting` are the asks it did not place.
pub fn plan(
    cluster: &Cluster,
    queues: &Queues,
    waiting: &[Ask],
    running: &[Running],
    stopping: &[Stopping],
    settings: &Settings,
) -> Vec<Victim> {
    let total = cluster.capacity();
    let nq = queues.confs.len();
    let within = |q: usize| settings.within_queue.get(q).copied().unwrap_or(false);
    // Units: a lone ask or a gang's members, each queue's by priority then
    // submission order.
    let mut units: Vec<Vec<usize>> = Vec::new();
    let mut gang_unit: FxHashMap<(usize, u64), usize> = FxHashMap::default();
    for (i, a) in waiting.iter().enumerate() {
        if a.queue >= nq {
            continue;
        }
        match a.gang {
            Some(g) => match gang_unit.get(&(a.queue, g)) {
                Some(&u) => units[u].push(i),
                None => {
                    gang_unit.insert((a.queue, g), units.len());
                    units.push(vec![i]);
                }
            },
            None => units.push(vec![i]),
        }
    }
    if units.is_empty() || running.is_empty() {
        return Vec::new();
    }
    let mut sim = Sim {
        nodes: cluster.nodes.clone(),
        queues: queues.clone(),
        running,
        keep: &settings.keep,
        taken: vec![false; running.len()],
        left: FxHashMap::default(),
        gangs: FxHashMap::default(),
        by_node: vec![Vec::new(); cluster.nodes.len()],
        undo: Vec::new(),
        work: std::cell::Cell::new(0),
    };
    // Room already being freed is free.
    for s in stopping {
        if let Some(n) = sim.nodes.get_mut(s.node) {
            free(n, s.res, &s.grants, s.ports);
        }
    }
    for (k, r) in running.iter().enumerate() {
        if r.group != 0 {
            *sim.left.entry(r.group).or_default() += 1;
        }
        if let Some(g) = r.gang {
            sim.gangs.entry(g).or_default().push(k);
        }
        if !r.protected && r.node < sim.by_node.len() {
            sim.by_node[r.node].push(k);
        }
    }
    for list in &mut sim.by_node {
        list.sort_by_key(|&k| {
            let r = &running[k];
            let members = r.gang.map_or(1, |g| sim.gangs[&g].len());
            (r.priority, Reverse(r.started_ms), members, k)
        });
    }
    let unit_res = |u: &[usize]| u.iter().fold(Res::ZERO, |s, &i| s.plus(waiting[i].res()));
    // The most under-served queues first, then priority, then submission.
    let key = |u: &Vec<usize>| {
        let a = &waiting[u[0]];
        let (under, share) = queues.fairness_key(a.queue, total);
        let prio = u.iter().map(|&i| waiting[i].priority).max().unwrap_or(0);
        let seq = u.iter().map(|&i| waiting[i].seq).min().unwrap_or(0);
        (under, ordered(share), a.queue, Reverse(prio), seq)
    };
    units.sort_by_key(key);

    let mut out: Vec<Victim> = Vec::new();
    let mut looked = 0;
    // Queues that gave victims in this plan take none back in it (a
    // victim's queue can fall under its guarantee by a container's worth;
    // its own waiting units wait for the next round's view).
    let mut donors: FxHashSet<usize> = FxHashSet::default();
    for unit in &units {
        if looked == settings.max_units
            || out.len() >= settings.max_victims
            || sim.work.get() >= settings.max_work
        {
            break;
        }
        let first = &waiting[unit[0]];
        let q = first.queue;
        let res = unit_res(unit);
        let reclaims = !donors.contains(&q) && sim.queues.within_guarantee(q, res, total);
        if !reclaims && !within(q) {
            continue;
        }
        // (Priority victims of its own queue may make room under its
        // maximum: checked again once they are chosen.)
        if !within(q) && !sim.queues.can_take(q, &first.user, res) {
            continue;
        }
        looked += 1;
        let prio = unit.iter().map(|&i| waiting[i].priority).max().unwrap_or(0);
        let mut trial = Trial::default();
        let mut gave: Vec<usize> = Vec::new();
        sim.undo.clear();
        let mut ok = true;
        for &ai in unit {
            let ask = &waiting[ai];
            // Room free (or being freed) first.
            if let Some((i, grants)) =
                (0..sim.nodes.len()).find_map(|i| Cluster::fit(&sim.nodes[i], ask).map(|g| (i, g)))
            {
                sim.save(i);
                take(&mut sim.nodes[i], ask, &grants);
                continue;
            }
            let usage = &sim.queues;
            let allowed = |r: &Running, refunded: &FxHashMap<usize, Res>| -> Option<Reason> {
                if r.queue == q {
                    return (within(q) && r.priority < prio).then_some(Reason::Priority);
                }
                if !reclaims {
                    return None;
                }
                let less = refunded.get(&r.queue).copied().unwrap_or_default();
                usage
                    .above_guarantee(r.queue, less, total)
                    .then_some(Reason::Reclaim)
            };
            let best = (0..sim.nodes.len())
                .filter_map(|i| sim.victims_on(i, ask, &allowed).map(|(c, v)| (c, i, v)))
                .min_by_key(|(c, i, _)| (*c, *i));
            let Some((_, i, chosen)) = best else {
                ok = false;
                break;
            };
            for (m, reason) in chosen {
                let x = &running[m];
                if reason == Reason::Reclaim {
                    gave.push(x.queue);
                }
                sim.taken[m] = true;
                if x.group != 0 {
                    if let Some(l) = sim.left.get_mut(&x.group) {
                        *l = l.saturating_sub(1);
                    }
                }
                sim.save(x.node);
                free(&mut sim.nodes[x.node], x.res, &x.grants, x.ports);
                sim.queues.refund(x.queue, &x.user, x.res);
                trial.refunds.push((x.queue, x.user.clone(), x.res));
                trial.victims.push(m);
                out.push(Victim {
                    running: m,
                    for_ask: first.id,
                    reason,
                });
            }
            let grants = Cluster::fit(&sim.nodes[i], ask).expect("the victims made room");
            sim.save(i);
            take(&mut sim.nodes[i], ask, &grants);
        }
        if ok && !sim.queues.can_take(q, &first.user, res) {
            ok = false;
        }
        if !ok {
            // Nothing for a unit that does not fit whole.
            for (i, n) in sim.undo.drain(..).rev() {
                sim.nodes[i] = n;
            }
            for m in &trial.victims {
                let x = &running[*m];
                sim.taken[*m] = false;
                if x.group != 0 {
                    *sim.left.entry(x.group).or_default() += 1;
                }
            }
            for (q, user, r) in trial.refunds.drain(..) {
                sim.queues.charge(q, &user, r);
            }
            out.retain(|v| !trial.victims.contains(&v.running));
            continue;
        }
        sim.queues.charge(q, &first.user, res);
        donors.extend(gave);
    }
    out
}

/// An `f64` share as an ordered key (shares are finite and non-negative).
fn ordered(x: f64) -> u64 {
    (x.max(0.0) * 1e9) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::model::{GpuAsk, Res};

    const GIB: u64 = 1 << 30;

    /// Two queues, a and b, each guaranteed half of `nodes` nodes of 4
    /// cores and 8 GiB.
    fn setup(nodes: usize) -> (Cluster, Queues, usize, usize) {
        let c = Cluster::new(
            (0..nodes)
                .map(|i| Node::new(&format!("n{i}"), 4000, 8 * GIB))
                .collect(),
        );
        let half = Res::new(2000 * nodes as u64, 4 * GIB * nodes as u64, 0);
        let mut q = Queues::root_only();
        let a = q.add("root.a", half, Res::UNLIMITED, 1).unwrap();
        let b = q.add("root.b", half, Res::UNLIMITED, 1).unwrap();
        (c, q, a, b)
    }

    /// Fills every node with `per_node` containers of queue `queue`, each
    /// started at `start + its index`.
    fn fill(
        c: &mut Cluster,
        q: &mut Queues,
        queue: usize,
        per_node: u64,
        start: u64,
    ) -> Vec<Running> {
        let mut out = Vec::new();
        let (vc, mem) = (4000 / per_node, 8 * GIB / per_node);
        for i in 0..c.nodes.len() {
            for _ in 0..per_node {
                let ask = Ask::new(0, queue, vc, mem);
                c.take(i, &ask, &[]);
                q.charge(queue, "u", ask.res());
                out.push(Running {
                    node: i,
                    queue,
                    user: "u".into(),
                    priority: 0,
                    started_ms: start + out.len() as u64,
                    res: ask.res(),
                    grants: vec![],
                    ports: 0,
                    gang: None,
                    group: 0,
                    protected: false,
                });
            }
        }
        out
    }

    #[test]
    fn a_queue_under_its_guarantee_reclaims_the_youngest_of_a_borrowing_queue() {
        let (mut c, mut q, a, b) = setup(3);
        let running = fill(&mut c, &mut q, a, 2, 100);
        // b asks for one container of 2 cores: one of a's goes, the
        // youngest (started last), on the node it ran on.
        let ask = Ask::new(7, b, 2000, 4 * GIB);
        let v = plan(&c, &q, &[ask], &running, &[], &Settings::default());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].running, 5, "the most recently started");
        assert_eq!(v[0].for_ask, 7);
        assert_eq!(v[0].reason, Reason::Reclaim);
    }

    #[test]
    fn nothing_is_preempted_when_the_ask_would_not_fit_anyway() {
        let (mut c, mut q, a, b) = setup(3);
        let running = fill(&mut c, &mut q, a, 2, 0);
        // Bigger than any node.
        let big = Ask::new(1, b, 6000, GIB);
        assert!(plan(&c, &q, &[big], &running, &[], &Settings::default()).is_empty());
        // Over b's guarantee (6 cores) in one unit: a gang of four 2-core
        // asks, 8 cores.
        let gang: Vec<Ask> = (0..4)
            .map(|i| {
                let mut x = Ask::new(i, b, 2000, GIB);
                x.gang = Some(9);
                x
            })
            .collect();
        assert!(plan(&c, &q, &gang, &running, &[], &Settings::default()).is_empty());
        // A queue at its guarantee takes nothing back from one above.
        let (mut c, mut q, a, b) = setup(2);
        let mut running = fill(&mut c, &mut q, a, 2, 0);
        running.truncate(2);
        q.refund(a, "u", Res::new(4000, 8 * GIB, 0));
        q.charge(b, "u", Res::new(4000, 8 * GIB, 0));
        let ask = Ask::new(3, b, 1000, GIB);
        assert!(plan(&c, &q, &[ask], &running, &[], &Settings::default()).is_empty());
    }

    #[test]
    fn a_gang_is_preempted_whole_and_a_waiting_gang_only_if_it_all_fits() {
        let (mut c, mut q, a, b) = setup(4);
        let mut running = fill(&mut c, &mut q, a, 1, 0);
        // Nodes 0 and 1 run one gang; 2 and 3 lone containers started
        // earlier (more work to lose).
        running[0].gang = Some(5);
        running[1].gang = Some(5);
        running[0].started_ms = 50;
        running[1].started_ms = 50;
        // b needs one node's worth: a lone victim is cheaper than a gang
        // of two (fewer members), though older.
        let ask = Ask::new(1, b, 4000, 8 * GIB);
        let v = plan(
            &c,
            &q,
            std::slice::from_ref(&ask),
            &running,
            &[],
            &Settings::default(),
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].running >= 2);
        // With only the gang's nodes to choose from, the whole gang goes.
        running[2].protected = true;
        running[3].protected = true;
        let v = plan(&c, &q, &[ask], &running, &[], &Settings::default());
        let mut ids: Vec<usize> = v.iter().map(|x| x.running).collect();
        ids.sort();
        assert_eq!(ids, vec![0, 1], "the gang whole");
        // A waiting gang of two node-sized members where only one node can
        // be freed: nothing.
        running[1].gang = None;
        running[1].protected = true;
        running[0].gang = None;
        let gang: Vec<Ask> = (0..2)
            .map(|i| {
                let mut x = Ask::new(10 + i, b, 4000, 8 * GIB);
                x.gang = Some(3);
                x
            })
            .collect();
        assert!(plan(&c, &q, &gang, &running, &[], &Settings::default()).is_empty());
    }

    #[test]
    fn stopping_containers_count_as_room_coming() {
        let (mut c, mut q, a, b) = setup(2);
        let running = fill(&mut c, &mut q, a, 2, 0);
        // One of a's is already being stopped (preempted last round): b's
        // ask waits for its room, nothing more is preempted.
        q.refund(a, "u", running[3].res);
        let stopping = vec![Stopping {
            node: 1,
            res: running[3].res,
            grants: vec![],
            ports: 0,
        }];
        let rest = &running[..3];
        let ask = Ask::new(1, b, 2000, 4 * GIB);
        assert!(plan(
            &c,
            &q,
            std::slice::from_ref(&ask),
            rest,
            &stopping,
            &Settings::default()
        )
        .is_empty());
        // Two such asks: the second needs one more victim.
        let mut second = ask.clone();
        second.id = 2;
        let v = plan(
            &c,
            &q,
            &[ask, second],
            rest,
            &stopping,
            &Settings::default(),
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].for_ask, 2);
    }

    #[test]
    fn priorities_within_a_queue_only_where_the_queue_allows_it() {
        let (mut c, mut q, a, _) = setup(2);
        let mut running = fill(&mut c, &mut q, a, 1, 0);
        running[0].priority = 5;
        running[1].priority = 1;
        let mut urgent = Ask::new(1, a, 4000, 8 * GIB);
        urgent.priority = 3;
        // Off: a is above its guarantee anyway, nothing.
        assert!(plan(
            &c,
            &q,
            std::slice::from_ref(&urgent),
            &running,
            &[],
            &Settings::default()
        )
        .is_empty());
        let settings = Settings {
            within_queue: vec![false, true, false],
            ..Settings::default()
        };
        let v = plan(
            &c,
            &q,
            std::slice::from_ref(&urgent),
            &running,
            &[],
            &settings,
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].running, 1, "only the lower priority");
        assert_eq!(v[0].reason, Reason::Priority);
        // Not for an equal or higher priority.
        urgent.priority = 1;
        assert!(plan(&c, &q, &[urgent], &running, &[], &settings).is_empty());
    }

    #[test]
    fn a_keep_group_keeps_its_minimum_and_protected_ones_stay() {
        let (mut c, mut q, a, b) = setup(3);
        let mut running = fill(&mut c, &mut q, a, 1, 0);
        for r in &mut running {
            r.group = 42;
        }
        // b may take the whole cluster back.
        q.confs[b].guaranteed = Res::new(12_000, 24 * GIB, 0);
        let mut settings = Settings::default();
        settings.keep.insert(42, 2);
        let asks: Vec<Ask> = (0..2).map(|i| Ask::new(i, b, 4000, 8 * GIB)).collect();
        let v = plan(&c, &q, &asks, &running, &[], &settings);
        assert_eq!(v.len(), 1, "3 replicas, keep 2: one goes ({v:?})");
        settings.keep.insert(42, 1);
        assert_eq!(plan(&c, &q, &asks, &running, &[], &settings).len(), 2);
        settings.keep.insert(42, 3);
        assert!(plan(&c, &q, &asks, &running, &[], &settings).is_empty());
        settings.keep.clear();
        for r in &mut running {
            r.protected = true;
        }
        assert!(plan(&c, &q, &asks, &running, &[], &settings).is_empty());
    }

    #[test]
    fn a_victim_whose_room_the_ask_does_not_need_is_spared() {
        let mut c = Cluster::new(vec![Node::new("g", 8000, 64 * GIB).with_gpus(
            1,
            "A100",
            80 * GIB,
        )]);
        let mut q = Queues::root_only();
        let a = q
            .add("root.a", Res::new(4000, 32 * GIB, 500), Res::UNLIMITED, 1)
            .unwrap();
        let b = q
            .add("root.b", Res::new(4000, 32 * GIB, 500), Res::UNLIMITED, 1)
            .unwrap();
        let mut running = Vec::new();
        // The youngest (cheapest) uses no GPU; the GPU's holder is older.
        for (gpu, started) in [(true, 1u64), (false, 2)] {
            let mut ask = Ask::new(0, a, 3000, 8 * GIB);
            if gpu {
                ask.gpu = GpuAsk::Whole(1);
            }
            let g = Cluster::fit(&c.nodes[0], &ask).unwrap();
            c.take(0, &ask, &g);
            q.charge(a, "u", ask.res());
            running.push(Running {
                node: 0,
                queue: a,
                user: "u".into(),
                priority: 0,
                started_ms: started,
                res: ask.res(),
                grants: g,
                ports: 0,
                gang: None,
                group: 0,
                protected: false,
            });
        }
        // b asks for a GPU share and a core: 2 cores are free, the GPU is
        // not. Only the GPU's holder goes.
        let mut ask = Ask::new(1, b, 1000, GIB);
        ask.gpu = GpuAsk::Share {
            milli: 500,
            memory: GIB,
        };
        let v = plan(&c, &q, &[ask], &running, &[], &Settings::default());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].running, 0);
    }

    #[test]
    fn a_priority_may_preempt_in_a_queue_at_its_maximum() {
        let (mut c, mut q, a, _) = setup(1);
        let mut running = fill(&mut c, &mut q, a, 2, 0);
        running[0].priority = 5;
        running[1].priority = 1;
        // a at its maximum: nothing more without preempting within it.
        q.confs[a].maximum = Res::new(4000, 8 * GIB, 0);
        let mut urgent = Ask::new(1, a, 2000, 4 * GIB);
        urgent.priority = 2;
        let settings = Settings {
            within_queue: vec![false, true, false],
            ..Settings::default()
        };
        let v = plan(
            &c,
            &q,
            std::slice::from_ref(&urgent),
            &running,
            &[],
            &settings,
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].running, 1);
    }

    #[test]
    fn gpus_are_given_back_device_by_device() {
        let mut c = Cluster::new(vec![Node::new("g", 8000, 64 * GIB).with_gpus(
            2,
            "A100",
            80 * GIB,
        )]);
        let mut q = Queues::root_only();
        let a = q
            .add("root.a", Res::new(4000, 32 * GIB, 1000), Res::UNLIMITED, 1)
            .unwrap();
        let b = q
            .add("root.b", Res::new(4000, 32 * GIB, 1000), Res::UNLIMITED, 1)
            .unwrap();
        let mut running = Vec::new();
        for d in 0..2 {
            let mut ask = Ask::new(0, a, 1000, GIB);
            ask.gpu = GpuAsk::Whole(1);
            let g = Cluster::fit(&c.nodes[0], &ask).unwrap();
            assert_eq!(g[0].device, d);
            c.take(0, &ask, &g);
            q.charge(a, "u", ask.res());
            running.push(Running {
                node: 0,
                queue: a,
                user: "u".into(),
                priority: 0,
                started_ms: d as u64,
                res: ask.res(),
                grants: g,
                ports: 0,
                gang: None,
                group: 0,
                protected: false,
            });
        }
        let mut ask = Ask::new(1, b, 1000, GIB);
        ask.gpu = GpuAsk::Whole(1);
        let v = plan(
            &c,
            &q,
            std::slice::from_ref(&ask),
            &running,
            &[],
            &Settings::default(),
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].running, 1);
        // Two GPUs: over b's guarantee of one.
        ask.gpu = GpuAsk::Whole(2);
        assert!(plan(&c, &q, &[ask], &running, &[], &Settings::default()).is_empty());
    }
}
