//! Write throughput and latency of a 3-member RM group of real processes on
//! loopback (sled flush + fdatasync on this machine's disk): submissions acknowledged
//! per second and per-write latency, at several numbers of concurrent
//! clients. One client shows the cost of a commit round (fsync + a network
//! round trip); many show what batching proposals per round buys.
//!
//! `cargo bench -p weft-resource-manager --bench raft` prints the figures
//! (`cargo test` runs a short version). `WEFT_BENCH_RM_CONFIG` gives the
//! members a config (TOML), e.g. `[masters]\nlaunch = false`;
//! `WEFT_BENCH_ROWS` the rows' client counts (default `1,8,64`), e.g.
//! `1,1,1,1,1` to watch one client's rate as the state grows;
//! `WEFT_BENCH_WRITES` the writes per row (default 3,000);
//! `WEFT_BENCH_TLS=1` runs the group and its clients over mutual TLS.

use std::sync::Arc;
use std::time::Duration;

use weft_client::RmClient;

mod support;

fn start() -> support::Group {
    support::start_group(&std::env::var("WEFT_BENCH_RM_CONFIG").unwrap_or_default())
}

const SPEC: &str = "name: bench\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: { vcores: 1, memory: 64MiB }\n";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let total = match std::env::var("WEFT_BENCH_WRITES") {
        Ok(n) => n.parse().expect("WEFT_BENCH_WRITES: a number of writes"),
        Err(_) if full => 3000,
        Err(_) => 150,
    };
    let group = start();
    let client = Arc::new(RmClient::new(group.addrs.clone()).unwrap());
    // Wait for a leader (the first write goes through once there is one).
    client.submit(SPEC, "yaml", "bench").await.unwrap();
    println!(
        "RM group of 3 (raft tick 100 ms, one sled flush + fdatasync per round){}, {total} submissions per row",
        if support::tls_on() { ", mutual TLS" } else { "" }
    );
    let rows: Vec<usize> = std::env::var("WEFT_BENCH_ROWS")
        .unwrap_or_else(|_| "1,8,64".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .expect("WEFT_BENCH_ROWS: client counts, comma-separated")
        })
        .collect();
    for concurrency in rows {
        let c = client.clone();
        let (rate, p50, p99) = support::round(concurrency, total, move |_, _| {
            let c = c.clone();
            async move {
                c.submit(SPEC, "yaml", "bench").await.unwrap();
            }
        })
        .await;
        println!(
            "  {concurrency:>3} concurrent clients: {rate:>7.0} writes/s   latency p50 {p50:>6.2} ms  p99 {p99:>6.2} ms"
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}
