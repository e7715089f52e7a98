//! One scheduling round: pending asks in, placements out.
//!
//! Queues are served in fairness order (see [`Queues::fairness_key`]); after
//! every placement the served queue's position is recomputed. Within a queue,
//! units (a single ask, or all asks of a gang) go by priority then submission
//! order; a unit that cannot be placed now is passed over for the next
//! (backfill) — a gang that does not fit holds nothing. Node choice comes from
//! indexes kept in step with free resources, so a placement costs a few
//! ordered-set operations, not a scan of the cluster; an ask shape that found
//! no node is not searched again in the same round (resources only shrink
//! within a round).

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use rustc_hash::{FxHashMap, FxHashSet};

use super::model::{Ask, Assignment, GpuAsk, GpuGrant, Node, Placement, Res};
use super::queues::Queues;

/// Nodes examined per search before giving up on an ask for this round.
pub const CANDIDATES: usize = 256;

/// The nodes and the indexes that find a node for an ask quickly.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// (free memory, node) of schedulable nodes.
    by_memory: BTreeSet<(u64, u32)>,
    /// (whole free GPUs, node) of schedulable nodes with GPUs.
    by_whole_gpus: BTreeSet<(u32, u32)>,
    /// (largest free share of one GPU, node) of schedulable nodes with GPUs.
    by_gpu_share: BTreeSet<(u32, u32)>,
    /// label -> schedulable nodes carrying it.
    by_label: HashMap<(String, String), Vec<u32>>,
    /// Nodes held for a starving unit this round: out of the indexes, so
    /// only their owner is placed there.
    reserved: Vec<bool>,
    /// Nodes whose free room [`Cluster::take`] or [`Cluster::give_back`]
    /// changed since [`Cluster::take_touched`] last drained it: a view kept
    /// across rounds refreshes them from the state.
    touched: Vec<u32>,
    /// Spread groups (a service's stage): how many of the group each node
    /// holds. Set before a round from what runs; its takes add to it. A
    /// spread ask of a group goes to a fitting node holding the fewest.
    pub spread: FxHashMap<u64, FxHashMap<u32, u32>>,
}

fn max_share(n: &Node) -> u32 {
    n.gpus.iter().map(|g| g.free_milli).max().unwrap_or(0)
}

impl Cluster {
    pub fn new(nodes: Vec<Node>) -> Cluster {
        let mut c = Cluster {
            nodes,
            by_memory: BTreeSet::new(),
            by_whole_gpus: BTreeSet::new(),
            by_gpu_share: BTreeSet::new(),
            by_label: HashMap::new(),
            reserved: Vec::new(),
            touched: Vec::new(),
            spread: FxHashMap::default(),
        };
        c.reserved = vec![false; c.nodes.len()];
        for i in 0..c.nodes.len() {
            c.index(i);
            let n = &c.nodes[i];
            if n.schedulable {
                for l in n.labels.clone() {
                    c.by_label.entry(l).or_default().push(i as u32);
                }
            }
        }
        c
    }

    fn index(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.schedulable || self.reserved[i] {
            return;
        }
        self.by_memory.insert((n.free_memory, i as u32));
        if !n.gpus.is_empty() {
            self.by_whole_gpus.insert((n.whole_free_gpus(), i as u32));
            self.by_gpu_share.insert((max_share(n), i as u32));
        }
    }

    fn unindex(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.schedulable || self.reserved[i] {
            return;
        }
        self.by_memory.remove(&(n.free_memory, i as u32));
        if !n.gpus.is_empty() {
            self.by_whole_gpus.remove(&(n.whole_free_gpus(), i as u32));
            self.by_gpu_share.remove(&(max_share(n), i as u32));
        }
    }

    /// Puts `node` in place of node `i`, keeping every index in step (a view
    /// kept across rounds patches what changed). Not during a round: no node
    /// is reserved between rounds.
    pub fn replace_node(&mut self, i: usize, node: Node) {
        debug_assert!(!self.reserved[i], "replace_node during a round");
        self.unindex(i);
        let was = &self.nodes[i];
        if was.labels != node.labels || was.schedulable != node.schedulable {
            if was.schedulable {
                for l in &was.labels {
                    if let Some(list) = self.by_label.get_mut(l) {
                        list.retain(|&x| x != i as u32);
                    }
                }
            }
            if node.schedulable {
                for l in &node.labels {
                    self.by_label.entry(l.clone()).or_default().push(i as u32);
                }
            }
        }
        self.nodes[i] = node;
        self.index(i);
    }

    /// Changes node `i`'s free room in place with `f` (which must leave its
    /// schedulability and labels as they are), keeping the indexes in step.
    pub fn update_node(&mut self, i: usize, f: impl FnOnce(&mut Node)) {
        debug_assert!(!self.reserved[i], "update_node during a round");
        self.unindex(i);
        let (schedulable, labels) = (self.nodes[i].schedulable, self.nodes[i].labels.len());
        f(&mut self.nodes[i]);
        debug_assert_eq!(
            (schedulable, labels),
            (self.nodes[i].schedulable, self.nodes[i].labels.len()),
            "update_node changed what the label index depends on"
        );
        self.index(i);
    }

    /// The nodes placed on (or given back to) since the last call.
    pub fn take_touched(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.touched)
    }

    /// Counts node `i` as changed (a kept view refreshes it from the state).
    pub fn touch(&mut self, i: usize) {
        self.touched.push(i as u32);
    }

    /// Holds node `i` out of (or back into) general placement.
    /// Takes node `i` out of searches (held for another unit).
    pub fn reserve(&mut self, i: usize) {
        self.set_reserved(i, true);
    }

    fn set_reserved(&mut self, i: usize, on: bool) {
        if self.reserved[i] == on {
            return;
        }
        if on {
            self.unindex(i);
            self.reserved[i] = true;
        } else {
            self.reserved[i] = false;
            self.index(i);
        }
    }

    /// Total capacity of schedulable nodes.
    pub fn capacity(&self) -> Res {
        self.nodes
            .iter()
            .filter(|n| n.schedulable)
            .fold(Res::ZERO, |a, n| a.plus(n.capacity()))
    }

    /// What is in use on schedulable nodes.
    pub fn used(&self) -> Res {
        self.nodes
            .iter()
            .filter(|n| n.schedulable)
            .fold(Res::ZERO, |a, n| {
                let free_gpu: u64 = n.gpus.iter().map(|g| g.free_milli as u64).sum();
                a.plus(
                    n.capacity()
                        .minus(Res::new(n.free_vcores, n.free_memory, free_gpu)),
                )
            })
    }

    /// The GPUs `ask` would get on node `n`, if it fits there now.
    pub(crate) fn fit(n: &Node, ask: &Ask) -> Option<Vec<GpuGrant>> {
        if !n.schedulable
            || n.free_vcores < ask.vcores
            || n.free_memory < ask.memory
            || n.free_ports < ask.ports
            || !n.has_labels(&ask.labels)
        {
            return None;
        }
        let eligible = |g: &super::model::GpuSlot| {
            ask.gpu_model.as_ref().is_none_or(|m| *m == g.model) && g.memory >= ask.gpu_min_memory
        };
        match ask.gpu {
            GpuAsk::None => Some(Vec::new()),
            GpuAsk::Whole(k) => {
                let grants: Vec<GpuGrant> = n
                    .gpus
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| g.is_whole_free() && eligible(g))
                    .take(k as usize)
                    .map(|(d, g)| GpuGrant {
                        device: d,
                        milli: 1000,
                        memory: g.memory,
                    })
                    .collect();
                (grants.len() == k as usize).then_some(grants)
            }
            GpuAsk::Share { milli, memory } => {
                let fits = n.gpus.iter().enumerate().filter(|(_, g)| {
                    g.free_milli >= milli && g.free_memory >= memory && eligible(g)
                });
                // Pack: the fullest device that fits (keeps whole GPUs free);
                // spread: the emptiest.
                let best = match ask.placement {
                    Placement::Pack => fits.min_by_key(|(d, g)| (g.free_milli, *d)),
                    Placement::Spread => fits.max_by_key(|(d, g)| (g.free_milli, Reverse(*d))),
                };
                best.map(|(d, _)| {
                    vec![GpuGrant {
                        device: d,
                        milli,
                        memory,
                    }]
                })
            }
        }
    }

    /// A node for `ask` by its placement policy, and the GPUs it would get.
    pub fn find(&self, ask: &Ask) -> Option<(usize, Vec<GpuGrant>)> {
        let try_node = |i: u32| Self::fit(&self.nodes[i as usize], ask).map(|g| (i as usize, g));
        if let Some(first) = ask.labels.first() {
            // A node partition: scan it whole, keep the best by policy.
            let list = self.by_label.get(first)?;
            let key = |i: usize| {
                let n = &self.nodes[i];
                (n.free_memory, n.free_vcores, i)
            };
            let fits = list
                .iter()
                .filter(|&&i| !self.reserved[i as usize])
                .filter_map(|&i| try_node(i));
            return match (ask.placement, self.group(ask)) {
                (Placement::Pack, _) => fits.min_by_key(|(i, _)| key(*i)),
                (Placement::Spread, None) => fits.max_by_key(|(i, _)| key(*i)),
                (Placement::Spread, Some(held)) => fits.max_by_key(|(i, _)| {
                    (
                        Reverse(held.get(&(*i as u32)).copied().unwrap_or(0)),
                        key(*i),
                    )
                }),
            };
        }
        // A spread group's ask: among the candidates that fit, the one
        // holding the fewest of its group (the emptiest of those).
        if let (Placement::Spread, Some(held)) = (ask.placement, self.group(ask)) {
            let count = |i: u32| held.get(&i).copied().unwrap_or(0);
            let order: Box<dyn Iterator<Item = u32>> = match ask.gpu {
                GpuAsk::None => {
                    Box::new(self.by_memory.range((ask.memory, 0)..).rev().map(|k| k.1))
                }
                GpuAsk::Whole(k) => Box::new(self.by_whole_gpus.range((k, 0)..).rev().map(|x| x.1)),
                GpuAsk::Share { milli, .. } => {
                    Box::new(self.by_gpu_share.range((milli, 0)..).rev().map(|x| x.1))
                }
            };
            let mut best: Option<(u32, (usize, Vec<GpuGrant>))> = None;
            for i in order.take(CANDIDATES) {
                if best.as_ref().is_some_and(|(c, _)| count(i) >= *c) {
                    continue;
                }
                if let Some(fit) = try_node(i) {
                    let c = count(i);
                    best = Some((c, fit));
                    if c == 0 {
                        break;
                    }
                }
            }
            if let Some((_, fit)) = best {
                return Some(fit);
            }
        }
        let pick = |iter: &mut dyn Iterator<Item = u32>| iter.take(CANDIDATES).find_map(try_node);
        // The index orders nodes by one resource; the fullest ones by it can
        // all be out of another (packed nodes run out of cores while memory
        // is left): when the preferred end has no fit among its candidates,
        // the other end (the emptiest nodes) is tried before giving up.
        let both = |fwd: &mut dyn Iterator<Item = u32>, back: &mut dyn Iterator<Item = u32>| {
            pick(fwd).or_else(|| pick(back))
        };
        match (ask.gpu, ask.placement) {
            (GpuAsk::None, Placement::Pack) => both(
                &mut self.by_memory.range((ask.memory, 0)..).map(|k| k.1),
                &mut self.by_memory.range((ask.memory, 0)..).rev().map(|k| k.1),
            ),
            (GpuAsk::None, Placement::Spread) => both(
                &mut self.by_memory.range((ask.memory, 0)..).rev().map(|k| k.1),
                &mut self.by_memory.range((ask.memory, 0)..).map(|k| k.1),
            ),
            (GpuAsk::Whole(k), Placement::Pack) => both(
                &mut self.by_whole_gpus.range((k, 0)..).map(|x| x.1),
                &mut self.by_whole_gpus.range((k, 0)..).rev().map(|x| x.1),
            ),
            (GpuAsk::Whole(k), Placement::Spread) => both(
                &mut self.by_whole_gpus.range((k, 0)..).rev().map(|x| x.1),
                &mut self.by_whole_gpus.range((k, 0)..).map(|x| x.1),
            ),
            (GpuAsk::Share { milli, .. }, Placement::Pack) => both(
                &mut self.by_gpu_share.range((milli, 0)..).map(|x| x.1),
                &mut self.by_gpu_share.range((milli, 0)..).rev().map(|x| x.1),
            ),
            (GpuAsk::Share { milli, .. }, Placement::Spread) => both(
                &mut self.by_gpu_share.range((milli, 0)..).rev().map(|x| x.1),
                &mut self.by_gpu_share.range((milli, 0)..).map(|x| x.1),
            ),
        }
    }

    /// The counts of `ask`'s spread group, if it is in one.
    fn group(&self, ask: &Ask) -> Option<&FxHashMap<u32, u32>> {
        if ask.spread_group == 0 {
            return None;
        }
        static NONE: std::sync::OnceLock<FxHashMap<u32, u32>> = std::sync::OnceLock::new();
        Some(
            self.spread
                .get(&ask.spread_group)
                .unwrap_or_else(|| NONE.get_or_init(FxHashMap::default)),
        )
    }

    /// Takes `ask`'s resources and `grants` on node `i`.
    pub fn take(&mut self, i: usize, ask: &Ask, grants: &[GpuGrant]) {
        if ask.spread_group != 0 {
            *self
                .spread
                .entry(ask.spread_group)
                .or_default()
                .entry(i as u32)
                .or_default() += 1;
        }
        self.touched.push(i as u32);
        self.unindex(i);
        let n = &mut self.nodes[i];
        n.free_vcores -= ask.vcores;
        n.free_memory -= ask.memory;
        n.free_ports -= ask.ports;
        for g in grants {
            let d = &mut n.gpus[g.device];
            d.free_milli -= g.milli;
            d.free_memory =
                d.free_memory
                    .saturating_sub(if g.milli == 1000 { d.memory } else { g.memory });
        }
        self.index(i);
    }

    /// Gives back what [`Cluster::take`] took.
    pub fn give_back(&mut self, i: usize, ask: &Ask, grants: &[GpuGrant]) {
        if let Some(c) = self
            .spread
            .get_mut(&ask.spread_group)
            .and_then(|g| g.get_mut(&(i as u32)))
        {
            *c = c.saturating_sub(1);
        }
        self.touched.push(i as u32);
        self.unindex(i);
        let n = &mut self.nodes[i];
        n.free_vcores += ask.vcores;
        n.free_memory += ask.memory;
        n.free_ports += ask.ports;
        for g in grants {
            let d = &mut n.gpus[g.device];
            d.free_milli += g.milli;
            d.free_memory += if g.milli == 1000 { d.memory } else { g.memory };
        }
        self.index(i);
    }
}

/// What a round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub placed: usize,
    /// Units (asks or gangs) that found no room this round.
    pub unplaced: usize,
    /// Units held back by a queue maximum or user limit.
    pub limited: usize,
}

/// Identifies a unit across rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitKey {
    Ask(u64),
    /// (queue, gang id)
    Gang(usize, u64),
}

/// Starvation control carried from round to round: how many rounds each
/// unit has waited for room, and the nodes held for units that waited too
/// long. Nothing new is placed on a held node, so it drains, and the unit
/// it is held for is placed within a bounded number of rounds once capacity
/// frees (backfill never delays it).
#[derive(Debug, Clone)]
pub struct Reservations {
    /// Rounds a unit waits before nodes are held for it.
    pub after_rounds: u32,
    /// Most units holding nodes at once (bounds the capacity held idle).
    pub max_held: usize,
    waits: HashMap<UnitKey, u32>,
    held: HashMap<UnitKey, Vec<usize>>,
}

impl Default for Reservations {
    fn default() -> Self {
        // Holding nodes idles them while they drain: few holds, and only for
        // units that waited long (see the scheduler README for figures).
        Reservations {
            after_rounds: 30,
            max_held: 2,
            waits: HashMap::new(),
            held: HashMap::new(),
        }
    }
}

impl Reservations {
    /// Holds nodes for a unit after it waited `after_rounds` rounds, for at
    /// most `max_held` units at once.
    pub fn new(after_rounds: u32, max_held: usize) -> Self {
        Reservations {
            after_rounds,
            max_held,
            ..Reservations::default()
        }
    }

    /// Nodes held now, per unit.
    pub fn held(&self) -> &HashMap<UnitKey, Vec<usize>> {
        &self.held
    }
}

/// Units per queue whose waiting is counted for starvation control (the
/// first ones in the queue's order that found no room, and every unit that
/// has nodes held): the units behind them wait behind them anyway, and a
/// round over a million asks does not keep a million counters.
pub const WAITS_TRACKED: usize = 256;

/// A single ask or a whole gang, placed together or not at all.
struct Unit {
    key: UnitKey,
    asks: Members,
    /// Interned search shape of a lone ask ([`NO_SHAPE`] for a gang), so
    /// a unit whose shape already failed is passed over without reading
    /// its ask.
    shape: u32,
    priority: i32,
    seq: u64,
    res: Res,
}

const NO_SHAPE: u32 = u32::MAX;

/// The asks of a unit: one (most units, no allocation) or a gang's.
enum Members {
    One(usize),
    Gang(Vec<usize>),
}

impl Members {
    fn as_slice(&self) -> &[usize] {
        match self {
            Members::One(i) => std::slice::from_ref(i),
            Members::Gang(v) => v,
        }
    }
}

#[derive(PartialEq)]
struct Key(u8, f64, usize);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0
            .cmp(&o.0)
            .then(self.1.total_cmp(&o.1))
            .then(self.2.cmp(&o.2))
    }
}

/// What makes two asks interchangeable for node search.
#[derive(PartialEq, Eq, Hash)]
struct Shape<'a> {
    vcores: u64,
    memory: u64,
    gpu: GpuAsk,
    model: Option<&'a str>,
    min_memory: u64,
    labels: &'a [(String, String)],
    ports: u32,
}

impl<'a> Shape<'a> {
    fn of(a: &'a Ask) -> Self {
        Shape {
            vcores: a.vcores,
            memory: a.memory,
            gpu: a.gpu,
            model: a.gpu_model.as_deref(),
            min_memory: a.gpu_min_memory,
            labels: &a.labels,
            ports: a.ports,
        }
    }
}

/// Runs one round over `asks` without starvation control carried between
/// rounds (see [`schedule_with`]).
pub fn schedule(
    cluster: &mut Cluster,
    queues: &mut Queues,
    asks: &[Ask],
) -> (Vec<Assignment>, RoundStats) {
    schedule_with(cluster, queues, asks, &mut Reservations::default())
}

/// Runs one round over `asks` (each names its leaf queue), updating
/// `cluster` and `queues` with what it places and `reservations` with who
/// waits and which nodes are held. Asks must reference valid leaf queues
/// (see [`super::validate_ask`]).
pub fn schedule_with(
    cluster: &mut Cluster,
    queues: &mut Queues,
    asks: &[Ask],
    reservations: &mut Reservations,
) -> (Vec<Assignment>, RoundStats) {
    let nq = queues.confs.len();
    let mut units: Vec<Vec<Unit>> = (0..nq)
        .map(|_| Vec::with_capacity(asks.len() / nq.max(1) + 16))
        .collect();
    let mut gangs: FxHashMap<(usize, u64), (usize, usize)> = FxHashMap::default();
    let mut shapes: FxHashMap<Shape, u32> = FxHashMap::default();
    // Every ask's interned search shape (gang members' too).
    let mut ask_shape: Vec<u32> = Vec::with_capacity(asks.len());
    for (i, a) in asks.iter().enumerate() {
        let shape = {
            let next = shapes.len() as u32;
            *shapes.entry(Shape::of(a)).or_insert(next)
        };
        ask_shape.push(shape);
        match a.gang {
            Some(g) => match gangs.get(&(a.queue, g)) {
                Some(&(q, u)) => {
                    let unit = &mut units[q][u];
                    match &mut unit.asks {
                        Members::Gang(v) => v.push(i),
                        Members::One(_) => unreachable!("gang units are made as gangs"),
                    }
                    unit.priority = unit.priority.max(a.priority);
                    unit.seq = unit.seq.min(a.seq);
                    unit.res = unit.res.plus(a.res());
                }
                None => {
                    gangs.insert((a.queue, g), (a.queue, units[a.queue].len()));
                    units[a.queue].push(Unit {
                        key: UnitKey::Gang(a.queue, g),
                        asks: Members::Gang(vec![i]),
                        shape: NO_SHAPE,
                        priority: a.priority,
                        seq: a.seq,
                        res: a.res(),
                    });
                }
            },
            None => units[a.queue].push(Unit {
                key: UnitKey::Ask(a.unit_key()),
                asks: Members::One(i),
                shape,
                priority: a.priority,
                seq: a.seq,
                res: a.res(),
            }),
        }
    }
    // Each queue's units in order (priority, then submission), as indexes:
    // the units themselves are not moved.
    let order: Vec<Vec<u32>> = units.iter().map(|u| unit_order(u)).collect();
    // Holds of units no longer asked for go (waits are counted afresh
    // below for the units still waiting).
    if !reservations.held.is_empty() {
        let mut present: FxHashSet<UnitKey> = FxHashSet::default();
        for u in units.iter().flatten() {
            if reservations.held.contains_key(&u.key) {
                present.insert(u.key);
            }
        }
        reservations.held.retain(|k, _| present.contains(k));
    }
    for nodes in reservations.held.values() {
        for &n in nodes {
            cluster.set_reserved(n, true);
        }
    }
    let mut unplaced_keys: Vec<(usize, usize)> = Vec::new();
    let mut unplaced_per_queue = vec![0usize; nq];

    let total = cluster.capacity();
    let mut heap: BinaryHeap<Reverse<Key>> = (0..nq)
        .filter(|&q| !units[q].is_empty())
        .map(|q| {
            let (a, b) = queues.fairness_key(q, total);
            Reverse(Key(a, b, q))
        })
        .collect();
    let mut cursor = vec![0usize; nq];
    // Shapes that found no node this round (free room only shrinks).
    let mut failed = vec![false; shapes.len()];
    drop(shapes);
    let mut out = Vec::new();
    let mut stats = RoundStats::default();
    let mut taken: Vec<(usize, usize, Vec<GpuGrant>)> = Vec::new();

    while let Some(Reverse(Key(_, _, q))) = heap.pop() {
        while cursor[q] < order[q].len() {
            let ui = order[q][cursor[q]] as usize;
            let unit = &units[q][ui];
            cursor[q] += 1;
            let held = !reservations.held.is_empty() && reservations.held.contains_key(&unit.key);
            // A shape that found no node finds none later in the round
            // (room only shrinks): a lone ask, or a gang with a member of
            // that shape, is passed over without a search.
            let dead = !held
                && match &unit.asks {
                    Members::One(_) => failed[unit.shape as usize],
                    Members::Gang(v) => v.iter().any(|&ai| failed[ask_shape[ai] as usize]),
                };
            if dead {
                stats.unplaced += 1;
                if unplaced_per_queue[q] < WAITS_TRACKED {
                    unplaced_per_queue[q] += 1;
                    unplaced_keys.push((q, ui));
                }
                continue;
            }
            let members = unit.asks.as_slice();
            let first = &asks[members[0]];
            if !queues.can_take(q, &first.user, unit.res) {
                stats.limited += 1;
                continue;
            }
            taken.clear();
            let mut ok = true;
            let mine = reservations.held.get(&unit.key);
            for &ai in members {
                let a = &asks[ai];
                let on_held = mine.and_then(|nodes| {
                    nodes
                        .iter()
                        .find_map(|&n| Cluster::fit(&cluster.nodes[n], a).map(|g| (n, g)))
                });
                match on_held.or_else(|| cluster.find(a)) {
                    Some((node, grants)) => {
                        cluster.take(node, a, &grants);
                        taken.push((ai, node, grants));
                    }
                    None => {
                        ok = false;
                        // Only a search over the round's true room counts
                        // (not one made while this gang held some of it).
                        if taken.is_empty() && !held {
                            failed[ask_shape[ai] as usize] = true;
                        }
                        break;
                    }
                }
            }
            if !ok {
                // All or nothing: a gang that does not fit holds nothing.
                for (ai, node, grants) in taken.drain(..) {
                    cluster.give_back(node, &asks[ai], &grants);
                }
                stats.unplaced += 1;
                if unplaced_per_queue[q] < WAITS_TRACKED || held {
                    unplaced_per_queue[q] += 1;
                    unplaced_keys.push((q, ui));
                }
                continue;
            }
            reservations.held.remove(&unit.key);
            queues.charge(q, &first.user, unit.res);
            for (ai, node, grants) in taken.drain(..) {
                out.push(Assignment {
                    ask: asks[ai].id,
                    node,
                    gpus: grants,
                });
                stats.placed += 1;
            }
            if cursor[q] < order[q].len() {
                let (a, b) = queues.fairness_key(q, total);
                heap.push(Reverse(Key(a, b, q)));
            }
            break;
        }
    }

    // Units the loop never reached (the queue ran dry of chances) wait too.
    for (q, list) in units.iter().enumerate() {
        let rest = &order[q][cursor[q]..];
        let room = WAITS_TRACKED.saturating_sub(unplaced_per_queue[q]);
        unplaced_keys.extend(rest.iter().take(room).map(|&i| (q, i as usize)));
        if !reservations.held.is_empty() {
            unplaced_keys.extend(
                rest.iter()
                    .skip(room)
                    .filter(|&&i| reservations.held.contains_key(&list[i as usize].key))
                    .map(|&i| (q, i as usize)),
            );
        }
    }
    for n in 0..cluster.nodes.len() {
        cluster.set_reserved(n, false);
    }
    // Waits counted afresh: a placed unit, or one no longer tracked, starts
    // again from zero.
    let mut before = std::mem::take(&mut reservations.waits);
    for (q, i) in unplaced_keys {
        let unit = &units[q][i];
        let w = before.remove(&unit.key).unwrap_or(0) + 1;
        reservations.waits.insert(unit.key, w);
        if w >= reservations.after_rounds
            && !reservations.held.contains_key(&unit.key)
            && reservations.held.len() < reservations.max_held
        {
            let members: Vec<&Ask> = unit.asks.as_slice().iter().map(|&a| &asks[a]).collect();
            if let Some(nodes) = hold_nodes(cluster, &members, reservations) {
                reservations.held.insert(unit.key, nodes);
            }
        }
    }
    (out, stats)
}

/// The order a queue's units are served in: priority (higher first), then
/// submission order, as indexes into `units`.
fn unit_order(units: &[Unit]) -> Vec<u32> {
    if units.is_sorted_by_key(|x| (Reverse(x.priority), x.seq)) {
        return (0..units.len() as u32).collect();
    }
    if units.is_sorted_by_key(|x| x.seq) {
        // In submission order with a few priorities: one bucket per
        // priority keeps that order, in O(n).
        let mut by_priority: BTreeMap<Reverse<i32>, Vec<u32>> = BTreeMap::new();
        for (i, x) in units.iter().enumerate() {
            by_priority
                .entry(Reverse(x.priority))
                .or_default()
                .push(i as u32);
        }
        return by_priority.into_values().flatten().collect();
    }
    let mut keys: Vec<(Reverse<i32>, u64, u32)> = units
        .iter()
        .enumerate()
        .map(|(i, x)| (Reverse(x.priority), x.seq, i as u32))
        .collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| k.2).collect()
}

/// Nodes that could hold all of `members` once they drain: the least busy
/// nodes not held for anyone else, enough for every member to fit their
/// capacity.
fn hold_nodes(
    cluster: &Cluster,
    members: &[&Ask],
    reservations: &Reservations,
) -> Option<Vec<usize>> {
    let taken: HashSet<usize> = reservations.held.values().flatten().copied().collect();
    let mut candidates: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| cluster.nodes[i].schedulable && !taken.contains(&i))
        .collect();
    // Least busy first (free GPUs first when the unit needs GPUs): they
    // drain soonest.
    let wants_gpus = members.iter().any(|a| a.gpu != GpuAsk::None);
    candidates.sort_by_key(|&i| {
        let n = &cluster.nodes[i];
        let free_gpu: u64 = if wants_gpus {
            n.gpus.iter().map(|g| g.free_milli as u64).sum()
        } else {
            0
        };
        Reverse((
            free_gpu,
            n.free_vcores * 1000 / n.capacity_vcores.max(1),
            n.free_memory >> 20,
        ))
    });
    let mut chosen: Vec<usize> = Vec::new();
    let mut empty: Vec<Node> = Vec::new();
    let mut next = candidates.into_iter();
    for a in members {
        loop {
            if let Some(k) = (0..empty.len()).find(|&k| Cluster::fit(&empty[k], a).is_some()) {
                let grants = Cluster::fit(&empty[k], a).expect("just fitted");
                let n = &mut empty[k];
                n.free_vcores -= a.vcores;
                n.free_memory -= a.memory;
                n.free_ports = n.free_ports.saturating_sub(a.ports);
                for g in grants {
                    n.gpus[g.device].free_milli -= g.milli;
                    n.gpus[g.device].free_memory =
                        n.gpus[g.device].free_memory.saturating_sub(g.memory);
                }
                break;
            }
            let i = next
                .by_ref()
                .find(|&i| Cluster::fit(&cluster.nodes[i].emptied(), a).is_some())?;
            let e = cluster.nodes[i].emptied();
            chosen.push(i);
            empty.push(e);
        }
    }
    Some(chosen)
}
