//! Scheduler throughput: one round over 1,000,000 pending asks of mixed sizes
//! (10% GPU, 5% in gangs) on 10,000 nodes (10% GPU nodes), four queues.
//! Criterion reports the round latency and placements per second
//! (`cargo bench -p weft-resource-manager --bench scheduler`). Under
//! `cargo test` it runs once on a small cluster.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use weft_resource_manager::scheduler::{schedule, workload, Cluster};

fn round(c: &mut Criterion) {
    let full = std::env::args().any(|a| a == "--bench");
    let (nodes_n, asks_n) = if full {
        (10_000, 1_000_000)
    } else {
        (200, 10_000)
    };
    let mut rng = workload::Rng::new(42);
    let nodes = workload::cluster(nodes_n, 0.10, &mut rng);
    let asks = workload::asks(asks_n, 4, 0.10, 0.05, &mut rng);
    let base = Cluster::new(nodes);
    let queues = workload::queues(base.capacity(), &[4, 3, 2, 1]);
    // One untimed round to learn how many placements a round makes.
    let (placed, stats) = {
        let (mut c, mut q) = (base.clone(), queues.clone());
        let (out, stats) = schedule(&mut c, &mut q, &asks);
        (out.len(), stats)
    };
    println!(
        "{nodes_n} nodes, {asks_n} pending asks: a round places {placed} containers ({} units unplaced, {} held by limits)",
        stats.unplaced, stats.limited
    );
    let mut g = c.benchmark_group("scheduler");
    g.sample_size(10);
    g.throughput(Throughput::Elements(placed as u64));
    g.bench_function(format!("round_{nodes_n}_nodes_{asks_n}_asks"), |b| {
        b.iter_batched(
            || (base.clone(), queues.clone()),
            |(mut c, mut q)| schedule(&mut c, &mut q, &asks),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, round);
criterion_main!(benches);
