//! Why a unit (one ask, or a gang's asks together) waits: the first thing
//! that keeps a round from placing it now, in the order a round checks
//! them: its queue's maximum (or an ancestor's), the queue's user limit,
//! whether any node could ever hold it, and whether the nodes have room for
//! it now. Pure, like the rounds: `rmctl why` and `/v1/apps/{id}/why` run
//! it over the leader's view of the moment.

use std::fmt;

use super::model::{Ask, GpuAsk, Node, Res};
use super::queues::Queues;
use super::round::Cluster;

/// What keeps a unit from being placed now.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocker {
    /// Its queue, or an ancestor, would pass its maximum.
    QueueMaximum {
        queue: String,
        resource: &'static str,
        used: u64,
        asked: u64,
        maximum: u64,
    },
    /// Its user would pass the queue's per-user limit.
    UserLimit {
        queue: String,
        user: String,
        resource: &'static str,
        used: u64,
        asked: u64,
        limit: u64,
    },
    /// No node could hold it even empty (nodes left, lost or draining
    /// since it was submitted; labels or a GPU model nobody has now).
    NeverFits(String),
    /// The nodes have no room for it now: `placed` of its `of` members
    /// would fit at once; the first that would not wants `wants`, and the
    /// most free on one schedulable node is `most_free`.
    NoRoom {
        placed: usize,
        of: usize,
        wants: Res,
        gpus: GpuAsk,
        most_free: Res,
        most_whole_gpus: u32,
    },
    /// It would fit, but only on nodes held for units that waited longer
    /// (nothing new is placed there until those start).
    Held {
        nodes: Vec<String>,
        holders: Vec<String>,
    },
    /// It would be placed now: it waits for the next round (rounds run
    /// when asks arrive, containers end or nodes change, and twice a
    /// second), or for nodes held for a unit that waited longer.
    Placeable,
}

impl Blocker {
    /// A stable name for scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Blocker::QueueMaximum { .. } => "queue_maximum",
            Blocker::UserLimit { .. } => "user_limit",
            Blocker::NeverFits(_) => "never_fits",
            Blocker::NoRoom { .. } => "no_room",
            Blocker::Held { .. } => "held",
            Blocker::Placeable => "placeable",
        }
    }
}

fn amount(resource: &str, v: u64) -> String {
    match resource {
        "vcores" => format!("{} vcores", v as f64 / 1000.0),
        "memory" => bytesize::ByteSize::b(v).to_string(),
        _ => format!("{} GPUs", v as f64 / 1000.0),
    }
}

fn res(r: Res, gpus: GpuAsk) -> String {
    let mut s = format!(
        "{} vcores, {}",
        r.vcores as f64 / 1000.0,
        bytesize::ByteSize::b(r.memory)
    );
    match gpus {
        GpuAsk::None => {}
        GpuAsk::Whole(n) => {
            s.push_str(&format!(", {n} whole GPU{}", if n == 1 { "" } else { "s" }))
        }
        GpuAsk::Share { milli, memory } => s.push_str(&format!(
            ", {} of a GPU with {}",
            milli as f64 / 1000.0,
            bytesize::ByteSize::b(memory)
        )),
    }
    s
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::QueueMaximum {
                queue,
                resource,
                used,
                asked,
                maximum,
            } => write!(
                f,
                "queue {queue} is at its maximum: it uses {} of {} and this asks {} more",
                amount(resource, *used),
                amount(resource, *maximum),
                amount(resource, *asked)
            ),
            Blocker::UserLimit {
                queue,
                user,
                resource,
                used,
                asked,
                limit,
            } => write!(
                f,
                "user {user} is at queue {queue}'s user limit: they use {} of {} and this asks {} more",
                amount(resource, *used),
                amount(resource, *limit),
                amount(resource, *asked)
            ),
            Blocker::NeverFits(why) => write!(f, "no node can hold it now even empty: {why}"),
            Blocker::NoRoom {
                placed,
                of,
                wants,
                gpus,
                most_free,
                most_whole_gpus,
            } => {
                if *of > 1 {
                    write!(
                        f,
                        "a gang of {of} starts together: only {placed} of its tasks fit in the free room now; "
                    )?;
                }
                write!(
                    f,
                    "no node has {} free now (the most free on any node: {} vcores, {}",
                    res(*wants, *gpus),
                    most_free.vcores as f64 / 1000.0,
                    bytesize::ByteSize::b(most_free.memory)
                )?;
                if !matches!(gpus, GpuAsk::None) {
                    write!(f, ", {most_whole_gpus} whole GPUs")?;
                }
                write!(f, ")")
            }
            Blocker::Held { nodes, holders } => write!(
                f,
                "it fits only on {} {}, held for {} (waited longer): nothing new is placed there until {} starts",
                if nodes.len() == 1 { "node" } else { "nodes" },
                nodes.join(", "),
                holders.join(", "),
                if holders.len() == 1 { "it" } else { "they" },
            ),
            Blocker::Placeable => write!(f, "it fits now: the next round places it"),
        }
    }
}

/// The resource of `want` that passes `room`, if any: (name, used, asked,
/// bound).
fn over(used: Res, asked: Res, bound: Res) -> Option<(&'static str, u64, u64, u64)> {
    let total = used.plus(asked);
    if total.vcores > bound.vcores {
        Some(("vcores", used.vcores, asked.vcores, bound.vcores))
    } else if total.memory > bound.memory {
        Some(("memory", used.memory, asked.memory, bound.memory))
    } else if total.gpu_milli > bound.gpu_milli {
        Some(("gpus", used.gpu_milli, asked.gpu_milli, bound.gpu_milli))
    } else {
        None
    }
}

/// Why no node could hold `ask` even with every node empty (None: one
/// could).
pub fn never_fits(nodes: &[Node], ask: &Ask) -> Option<String> {
    let schedulable: Vec<&Node> = nodes.iter().filter(|n| n.schedulable).collect();
    if schedulable.is_empty() {
        return Some("no node is running (none registered, or all lost or draining)".into());
    }
    let labelled: Vec<&&Node> = schedulable
        .iter()
        .filter(|n| n.has_labels(&ask.labels))
        .collect();
    if labelled.is_empty() {
        let want: Vec<String> = ask.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Some(format!(
            "node_labels: no running node has {}",
            want.join(",")
        ));
    }
    let largest = |f: fn(&Node) -> u64| labelled.iter().map(|n| f(n)).max().unwrap_or(0);
    if !labelled.iter().any(|n| n.capacity_vcores >= ask.vcores) {
        return Some(format!(
            "resources.vcores: {} is more than any running node has (largest {})",
            ask.vcores as f64 / 1000.0,
            largest(|n| n.capacity_vcores) as f64 / 1000.0
        ));
    }
    if !labelled.iter().any(|n| n.capacity_memory >= ask.memory) {
        return Some(format!(
            "resources.memory: {} is more than any running node has (largest {})",
            bytesize::ByteSize::b(ask.memory),
            bytesize::ByteSize::b(largest(|n| n.capacity_memory))
        ));
    }
    if labelled
        .iter()
        .any(|n| Cluster::fit(&n.emptied(), ask).is_some())
    {
        return None;
    }
    Some(match (&ask.gpu_model, ask.gpu) {
        (Some(m), _) => format!(
            "gpu_model: no running node has enough {m} GPUs for it together with its other resources"
        ),
        (None, GpuAsk::Whole(k)) => format!(
            "resources.gpus: no running node has {k} GPUs (with the asked memory) together with the other resources"
        ),
        (None, GpuAsk::Share { .. }) => {
            "resources.gpu_memory: no running node's GPU has that much memory".into()
        }
        (None, GpuAsk::None) => "resources: no running node has all of them at once".into(),
    })
}

/// Places `unit` member by member on `room`; the index of the first that
/// finds no node.
fn place(room: &mut Cluster, unit: &[Ask]) -> Result<(), usize> {
    for (k, a) in unit.iter().enumerate() {
        match room.find(a) {
            Some((i, grants)) => room.take(i, a, &grants),
            None => return Err(k),
        }
    }
    Ok(())
}

/// Why `unit` (one ask, or every member of a gang; all of one queue and
/// user) is not placed now on `cluster` under `queues`' limits and usage.
/// `held`: nodes (by index) held for other units, and for whom.
pub fn explain(
    cluster: &Cluster,
    queues: &Queues,
    unit: &[Ask],
    held: &[(usize, String)],
) -> Blocker {
    let Some(first) = unit.first() else {
        return Blocker::Placeable;
    };
    let asked = unit.iter().fold(Res::ZERO, |r, a| r.plus(a.res()));
    let q = first.queue;
    for i in queues.chain(q) {
        if let Some((resource, used, asked, maximum)) =
            over(queues.usage[i], asked, queues.confs[i].maximum)
        {
            return Blocker::QueueMaximum {
                queue: queues.confs[i].name.clone(),
                resource,
                used,
                asked,
                maximum,
            };
        }
    }
    let limit = queues.confs[q].user_limit;
    if limit != Res::UNLIMITED {
        let used = queues.user_used(q, &first.user);
        if let Some((resource, used, asked, limit)) = over(used, asked, limit) {
            return Blocker::UserLimit {
                queue: queues.confs[q].name.clone(),
                user: first.user.clone(),
                resource,
                used,
                asked,
                limit,
            };
        }
    }
    // Each shape once (a gang's members are mostly alike).
    let mut checked: Vec<&Ask> = Vec::new();
    for a in unit {
        let same = |b: &&Ask| {
            (
                b.vcores,
                b.memory,
                b.gpu,
                &b.gpu_model,
                b.gpu_min_memory,
                &b.labels,
            ) == (
                a.vcores,
                a.memory,
                a.gpu,
                &a.gpu_model,
                a.gpu_min_memory,
                &a.labels,
            )
        };
        if checked.iter().any(same) {
            continue;
        }
        checked.push(a);
        if let Some(why) = never_fits(&cluster.nodes, a) {
            return Blocker::NeverFits(why);
        }
    }
    let mut room = cluster.clone();
    for (i, _) in held {
        if *i < room.nodes.len() {
            room.reserve(*i);
        }
    }
    if place(&mut room, unit).is_ok() {
        return Blocker::Placeable;
    }
    let mut all = cluster.clone();
    let placed = match place(&mut all, unit) {
        Ok(()) => {
            // It fits once the held nodes count: name those it would use.
            let mut nodes: Vec<String> = Vec::new();
            let mut holders: Vec<String> = Vec::new();
            for (i, who) in held {
                if all.nodes.get(*i).is_some_and(|n| {
                    n.free_vcores < cluster.nodes[*i].free_vcores
                        || n.free_memory < cluster.nodes[*i].free_memory
                }) {
                    nodes.push(cluster.nodes[*i].name.clone());
                    if !holders.contains(who) {
                        holders.push(who.clone());
                    }
                }
            }
            return Blocker::Held { nodes, holders };
        }
        Err(k) => k,
    };
    let a = &unit[placed];
    let up = all.nodes.iter().filter(|n| n.schedulable);
    let most_free = up.clone().fold(Res::ZERO, |m, n| Res {
        vcores: m.vcores.max(n.free_vcores),
        memory: m.memory.max(n.free_memory),
        gpu_milli: 0,
    });
    let most_whole_gpus = up
        .map(|n| n.gpus.iter().filter(|g| g.is_whole_free()).count() as u32)
        .max()
        .unwrap_or(0);
    Blocker::NoRoom {
        placed,
        of: unit.len(),
        wants: a.res(),
        gpus: a.gpu,
        most_free,
        most_whole_gpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn each_reason_in_the_order_a_round_checks_them() {
        let any = Res::UNLIMITED;
        let mut qs = Queues::default();
        qs.add("root", Res::ZERO, any, 1).unwrap();
        let qsmall = qs
            .add(
                "root.small",
                Res::ZERO,
                Res::new(2000, u64::MAX, u64::MAX),
                1,
            )
            .unwrap();
        let qcapped = qs.add("root.capped", Res::ZERO, any, 1).unwrap();
        qs.confs[qcapped].user_limit = Res::new(1000, u64::MAX, u64::MAX);
        let qbig = qs.add("root.big", Res::ZERO, any, 1).unwrap();
        qs.charge(qsmall, "ann", Res::new(1500, GIB, 0));
        qs.charge(qcapped, "bob", Res::new(800, GIB, 0));
        let nodes = vec![
            Node::new("a", 4000, 8 * GIB),
            Node::new("b", 4000, 8 * GIB).with_gpus(2, "A100", 80 * GIB),
        ];
        let mut cluster = Cluster::new(nodes);
        // Node a has 1 vcore free, b 3.
        cluster.take(0, &Ask::new(90, qbig, 3000, GIB), &[]);
        cluster.take(1, &Ask::new(91, qbig, 1000, GIB), &[]);

        let mut a = Ask::new(1, qsmall, 1000, GIB);
        a.user = "ann".into();
        let b = explain(&cluster, &qs, &[a], &[]);
        assert_eq!(b.kind(), "queue_maximum", "{b}");
        assert_eq!(
            b.to_string(),
            "queue root.small is at its maximum: it uses 1.5 vcores of 2 vcores and this asks 1 vcores more"
        );

        let mut a = Ask::new(2, qcapped, 500, GIB);
        a.user = "bob".into();
        let b = explain(&cluster, &qs, &[a.clone()], &[]);
        assert_eq!(b.kind(), "user_limit", "{b}");
        assert!(
            b.to_string().starts_with(
                "user bob is at queue root.capped's user limit: they use 0.8 vcores of 1 vcores"
            ),
            "{b}"
        );
        // Another user of the same queue is not limited by bob's use.
        a.user = "cy".into();
        assert_eq!(explain(&cluster, &qs, &[a], &[]).kind(), "placeable");

        let mut a = Ask::new(3, qbig, 1000, GIB);
        a.gpu = GpuAsk::Whole(1);
        a.gpu_model = Some("H100".into());
        let b = explain(&cluster, &qs, &[a], &[]);
        assert_eq!(b.kind(), "never_fits", "{b}");
        assert!(
            b.to_string()
                .contains("gpu_model: no running node has enough H100 GPUs"),
            "{b}"
        );
        let mut a = Ask::new(4, qbig, 1000, GIB);
        a.labels = vec![("zone".into(), "b".into())];
        assert!(explain(&cluster, &qs, &[a], &[])
            .to_string()
            .contains("node_labels: no running node has zone=b"));

        // Node b held for another unit: what fits only there waits for it;
        // what fits on a does not.
        let held = [(1usize, "app-000009 gang train".to_string())];
        let b = explain(&cluster, &qs, &[Ask::new(20, qbig, 2000, GIB)], &held);
        assert_eq!(b.kind(), "held", "{b}");
        assert_eq!(
            b.to_string(),
            "it fits only on node b, held for app-000009 gang train (waited longer): nothing new is placed there until it starts"
        );
        assert_eq!(
            explain(&cluster, &qs, &[Ask::new(21, qbig, 500, GIB)], &held).kind(),
            "placeable"
        );
        // Room: 1 vcore on a, 3 on b (with its GPUs).
        let b = explain(&cluster, &qs, &[Ask::new(5, qbig, 3500, GIB)], &[]);
        assert_eq!(b.kind(), "no_room", "{b}");
        assert_eq!(
            b.to_string(),
            "no node has 3.5 vcores, 1.0 GiB free now (the most free on any node: 3 vcores, 7.0 GiB)"
        );
        let gang: Vec<Ask> = (0..3)
            .map(|k| {
                let mut a = Ask::new(10 + k, qbig, 1000, GIB);
                a.gang = Some(7);
                a
            })
            .collect();
        // 1 + 3 vcores free: a gang of three 1-vcore tasks fits, four do not.
        assert_eq!(explain(&cluster, &qs, &gang, &[]).kind(), "placeable");
        let mut gang = gang;
        gang.extend(gang.clone());
        let b = explain(&cluster, &qs, &gang, &[]);
        assert_eq!(b.kind(), "no_room", "{b}");
        assert!(
            b.to_string()
                .starts_with("a gang of 6 starts together: only 4 of its tasks fit"),
            "{b}"
        );
        let mut a = Ask::new(6, qbig, 1000, GIB);
        a.gpu = GpuAsk::Whole(2);
        assert_eq!(
            explain(&cluster, &qs, &[a.clone()], &[]).kind(),
            "placeable"
        );
        let (i, g) = cluster.find(&a).unwrap();
        cluster.take(i, &a, &g);
        let b = explain(&cluster, &qs, &[a], &[]);
        assert!(b.to_string().ends_with(", 0 whole GPUs)"), "{b}");

        // Every node gone.
        let down = Cluster::new(
            cluster
                .nodes
                .iter()
                .cloned()
                .map(|mut n| {
                    n.schedulable = false;
                    n
                })
                .collect(),
        );
        let b = explain(&down, &qs, &[Ask::new(8, qbig, 100, GIB)], &[]);
        assert_eq!(b.kind(), "never_fits");
        assert!(b.to_string().contains("no node is running"), "{b}");
    }
}
