//! The scheduler: a pure, synchronous function from the cluster view and the
//! pending asks to placements. No I/O, no clock, no locks: it is tested with
//! tables and properties and benchmarked on its own (see `README.md` beside
//! this file for its goals and rules).
//!
//! - [`model`]: resources, nodes with per-device GPU accounting, asks;
//! - [`queues`]: the queue tree, limits, usage, fairness order;
//! - [`round`]: one scheduling round and the node indexes it uses;
//! - [`validate_ask`]: refuses at submit what could never be placed;
//! - [`explain`]: why a waiting unit is not placed now;
//! - [`workload`]: synthetic clusters and asks for benchmarks and simulations.

pub mod explain;
pub mod model;
pub mod preempt;
pub mod queues;
pub mod round;
pub mod workload;

pub use model::{Ask, Assignment, GpuAsk, GpuGrant, GpuSlot, Node, Placement, Res};
pub use queues::{QueueConf, Queues};
pub use round::{schedule, schedule_with, Cluster, Reservations, RoundStats, UnitKey};

/// Checks that `ask` could be placed on an empty cluster of `nodes` within its
/// queue's limits; otherwise says which field makes it impossible, so it is
/// refused at submit instead of waiting forever.
pub fn validate_ask(nodes: &[Node], queues: &Queues, ask: &Ask) -> Result<(), String> {
    let q = ask.queue;
    let Some(conf) = queues.confs.get(q) else {
        return Err(format!("queue: no queue with index {q}"));
    };
    if !queues.is_leaf(q) {
        return Err(format!(
            "queue: {} has sub-queues; submit to a leaf queue",
            conf.name
        ));
    }
    if !queues.may_submit(q, &ask.user) {
        return Err(format!(
            "queue: user {} may not submit to {}",
            ask.user, conf.name
        ));
    }
    if !ask.res().fits_in(queues.effective_maximum(q)) {
        return Err(format!(
            "resources: more than queue {} (or its parents, or its user limit) allows",
            conf.name
        ));
    }
    if let GpuAsk::Share { milli, .. } = ask.gpu {
        if milli == 0 || milli > 1000 {
            return Err(format!(
                "resources.gpus: a GPU share must be above 0 and at most 1 (got {milli}/1000)"
            ));
        }
    }
    if let GpuAsk::Whole(0) = ask.gpu {
        return Err("resources.gpus: ask for at least one GPU or none".into());
    }
    let labelled: Vec<&Node> = nodes.iter().filter(|n| n.has_labels(&ask.labels)).collect();
    if labelled.is_empty() {
        let want: Vec<String> = ask.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(format!("node_labels: no node has {}", want.join(",")));
    }
    let largest = |f: fn(&Node) -> u64| labelled.iter().map(|n| f(n)).max().unwrap_or(0);
    if !labelled.iter().any(|n| n.capacity_vcores >= ask.vcores) {
        return Err(format!(
            "resources.vcores: {} is more than any node has (largest {})",
            ask.vcores as f64 / 1000.0,
            largest(|n| n.capacity_vcores) as f64 / 1000.0
        ));
    }
    if !labelled.iter().any(|n| n.capacity_memory >= ask.memory) {
        return Err(format!(
            "resources.memory: {} bytes is more than any node has (largest {})",
            ask.memory,
            largest(|n| n.capacity_memory)
        ));
    }
    // On an empty node, with every GPU free.
    let empty: Vec<Node> = labelled.into_iter().map(Node::emptied).collect();
    if empty.iter().any(|n| Cluster::fit(n, ask).is_some()) {
        return Ok(());
    }
    Err(match (&ask.gpu_model, ask.gpu) {
        (Some(m), _) => format!("gpu_model: no node has enough {m} GPUs for this ask together with its other resources"),
        (None, GpuAsk::Whole(k)) => format!("resources.gpus: no node has {k} GPUs (with the asked memory) together with the other resources"),
        (None, GpuAsk::Share { .. }) => "resources.gpu_memory: no GPU has that much memory".into(),
        (None, GpuAsk::None) => "resources: no node has all of them at once".into(),
    })
}

#[cfg(test)]
mod tests;
