//! The steady state users live in: 10,000 nodes with 100,000 containers
//! running, and 1,000 new asks arriving per round while 1,000 containers end.
//! Each round is what the leader does: bring its kept scheduler view up to
//! the replicated state (`View::refresh`: the nodes changed since the last
//! round are patched) and build the queue view (`queue_view`), schedule,
//! verify the plan against the state (`verify_plan`), and apply it as the
//! raft thread would (`ContainersAllocated`, `ContainersCompleted`). Prints
//! p50 / p99 / max of the round (view + schedule + verify) and of the apply,
//! over 300 rounds, and, for comparison, of a view built from every node
//! (`cluster_view_with`, what each round did before the view was kept) (`cargo bench -p weft-resource-manager --bench steady`). Under
//! `cargo test` it runs a few rounds on a small cluster.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use weft_resource_manager::fsm::{
    Allocation, ClusterState, Command, Completion, ContainerEnd, PortRange, QueueSpec,
};
use weft_resource_manager::scheduler::{schedule_with, Ask, Reservations};
use weft_resource_manager::view::{cluster_view_with, queue_view, View};

const GIB: u64 = 1 << 30;

/// Container `c{seq}` of a plain task.
fn task(
    seq: u64,
    app_id: String,
    node_id: String,
    vcores_milli: u64,
    memory_bytes: u64,
) -> Allocation {
    Allocation {
        container_id: format!("c{seq}"),
        app_id,
        node_id,
        vcores_milli,
        memory_bytes,
        gpus: vec![],
        gpu_share: None,
        ask_id: "task".into(),
        gang: None,
        ports: vec![],
        priority: 0,
        preemption_grace_ms: 0,
        min_available: 0,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (nodes, running, per_round, rounds) = if full {
        (10_000, 100_000, 1_000, 300)
    } else {
        (100, 1_000, 50, 5)
    };
    let mut st = ClusterState::default();
    let queues: Vec<QueueSpec> = std::iter::once("root".to_string())
        .chain((0..4).map(|i| format!("root.q{i}")))
        .map(|name| QueueSpec::named(&name))
        .collect();
    st.apply(&Command::SetQueues { queues });
    for i in 0..nodes {
        st.apply(&Command::RegisterNode {
            node_id: format!("n{i:05}"),
            address: format!("10.0.{}.{}:7200", i / 250, i % 250),
            vcores_milli: 64_000,
            memory_bytes: 256 * GIB,
            gpus: vec![],
            labels: BTreeMap::new(),
            running: vec![],
            ended: vec![],
            ready: true,
            ports: PortRange {
                first: 20000,
                last: 32000,
            },
            at_ms: 1,
        });
    }
    for q in 0..4 {
        st.apply(&Command::SubmitApplication {
            request_id: String::new(),
            name: format!("job{q}"),
            queue: format!("root.q{q}"),
            user: format!("user{q}"),
            spec: String::new(),
            spec_format: "yaml".into(),
            unmanaged: true,
            accepted: false,
            service: false,
            priority: 0,
            at_ms: 2,
        });
    }
    let app = |k: usize| format!("app-{:06}", 1 + k % 4);
    let mut seq = 0u64;
    let mut live: Vec<String> = Vec::with_capacity(running);
    let fill: Vec<Allocation> = (0..running)
        .map(|k| {
            seq += 1;
            task(seq, app(k), format!("n{:05}", k % nodes), 1000, 2 * GIB)
        })
        .collect();
    live.extend(fill.iter().map(|a| a.container_id.clone()));
    st.apply(&Command::ContainersAllocated {
        allocations: fill,
        at_ms: 3,
    });
    let busy = HashMap::new();
    let mut reservations = Reservations::default();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut round_t, mut apply_t) = (Vec::new(), Vec::new());
    let (mut view_t, mut sched_t, mut verify_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut rebuild_t = Vec::new();
    let mut view = View::new();
    view.refresh(&st, &busy);
    let mut placed_total = 0usize;
    for r in 0..rounds {
        // 1,000 containers end, as agents' heartbeats report.
        let done: Vec<Completion> = (0..per_round.min(live.len()))
            .map(|_| {
                let i = (next() % live.len() as u64) as usize;
                Completion {
                    container_id: live.swap_remove(i),
                    state: ContainerEnd::Succeeded,
                    exit_status: 0,
                    diagnostic: String::new(),
                }
            })
            .collect();
        let t = Instant::now();
        st.apply(&Command::ContainersCompleted {
            completions: done,
            still_running: false,
            at_ms: 10 + r as u64,
        });
        let completed = t.elapsed();
        // The leader's round.
        let t = Instant::now();
        view.refresh(&st, &busy);
        let mut qv = queue_view(&st);
        view_t.push(t.elapsed());
        let asks: Vec<Ask> = (0..per_round)
            .map(|k| {
                let q = qv.index(&format!("root.q{}", k % 4)).expect("queue exists");
                let mut a = Ask::new(k as u64, q, 500 * (1 + next() % 4), GIB * (1 + next() % 4));
                a.user = format!("user{}", k % 4);
                a
            })
            .collect();
        let s0 = Instant::now();
        let (out, _) = schedule_with(view.cluster(), &mut qv, &asks, &mut reservations);
        sched_t.push(s0.elapsed());
        let ids = view.ids();
        let plan: Vec<Allocation> = out
            .iter()
            .map(|p| {
                seq += 1;
                let a = &asks[p.ask as usize];
                task(
                    seq,
                    app(p.ask as usize),
                    ids[p.node].clone(),
                    a.vcores,
                    a.memory,
                )
            })
            .collect();
        let v0 = Instant::now();
        let verdict = st.verify_plan(&plan);
        verify_t.push(v0.elapsed());
        round_t.push(t.elapsed());
        // For comparison only: the view built from every node.
        let b0 = Instant::now();
        std::hint::black_box(cluster_view_with(&st, &busy));
        rebuild_t.push(b0.elapsed());
        assert!(verdict.refused.is_empty(), "a fresh plan fits");
        placed_total += verdict.accepted.len();
        live.extend(verdict.accepted.iter().map(|a| a.container_id.clone()));
        let t = Instant::now();
        st.apply(&Command::ContainersAllocated {
            allocations: verdict.accepted,
            at_ms: 10 + r as u64,
        });
        apply_t.push(t.elapsed() + completed);
    }
    let show = |name: &str, v: &mut Vec<Duration>| {
        v.sort();
        let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
        println!(
            "{name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            v.last().expect("rounds ran").as_secs_f64() * 1e3
        );
    };
    println!(
        "{nodes} nodes, {} containers running, {per_round} asks and {per_round} ends per round, {rounds} rounds ({placed_total} placed)",
        live.len()
    );
    show("leader round (view + schedule + verify)", &mut round_t);
    show("  of which the view", &mut view_t);
    show("  of which schedule", &mut sched_t);
    show("  of which verify", &mut verify_t);
    show("apply (ends + allocations)", &mut apply_t);
    show(
        "for comparison: a view built from every node",
        &mut rebuild_t,
    );
}
