//! Node-agent figures, measured against the real `node-agent` binary on
//! loopback (as root it uses cgroups; otherwise the procfs monitor):
//!
//! - StartContainer to process running: the RPC returns once the process has
//!   exec'd; also the time until the container's first output reaches a FIFO;
//! - memory overrun to kill reported: a container waits on a FIFO, then runs a
//!   memory hog (`tail /dev/zero`, which reaches the limit in a few ms); the
//!   time from the go signal until GetContainerStatus reports
//!   OverMemoryQuota (polled every millisecond);
//! - agent RSS idle and with 50 running containers.
//!
//! `cargo bench -p weft-node-agent --bench agent` prints the figures.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_proto::v1 as pb;
use weft_proto::v1::container_exit::Reason;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

type Client = ContainerManagerClient<tonic::transport::Channel>;

struct Agent {
    child: Child,
    parent: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = &self.parent;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn mkfifo(path: &std::path::Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// The key the bench's agent trusts, standing in for the RM's.
fn signer() -> weft_proto::token::TokenSigner {
    weft_proto::token::TokenSigner::from_seed([9; 32])
}

/// A request with the container token an RM would sign for it.
fn req(id: &str, script: &str, memory: u64) -> pb::StartContainerRequest {
    let now = weft_proto::token::now_ms();
    pb::StartContainerRequest {
        container_id: id.into(),
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        resources: Some(pb::ContainerResources {
            memory_bytes: memory,
            ..Default::default()
        }),
        token: signer().sign_container(&pb::ContainerTokenBody {
            container_id: id.into(),
            node_id: "bench".into(),
            memory_bytes: memory,
            issued_at_ms: now,
            expires_at_ms: now + 600_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn status(c: &mut Client, id: &str) -> pb::ContainerStatus {
    c.get_container_status(pb::GetContainerStatusRequest {
        container_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn stop(c: &mut Client, id: &str) {
    c.stop_container(pb::StopContainerRequest {
        container_id: id.into(),
        grace_period_ms: 100,
        wait: true,
    })
    .await
    .unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists benchmarks; nothing to list.
    }
    // `cargo bench` passes --bench; `cargo test` runs a short version.
    let quick =
        std::env::var("WEFT_BENCH_QUICK").is_ok() || !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 5 } else { 50 };
    let work = tempfile::tempdir().unwrap();
    let parent = format!("weft-bench-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "work_dir = {:?}\nnode_id = \"bench\"\n[resources]\nmemory = \"64GiB\"\nvcores = 64.0\n[containers]\ncgroup_parent = {parent:?}\n[gpu]\nprobe = \"none\"\n[security]\ntoken_public_key = {:?}\n",
            work.path().join("agent").display().to_string(),
            hex::encode(signer().public_key()),
        ),
    )
    .unwrap();
    let agent_log = work.path().join("agent.log");
    let child = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--log-format", "json"])
        .env("RUST_LOG", "warn,weft_node_agent::manager=info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let agent = Agent { child, parent };
    let pid = agent.child.id();
    let mut c = loop {
        match Client::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(pid);

    // StartContainer to running.
    let (mut rpc, mut first_output) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let fifo = work.path().join(format!("start-{i}"));
        mkfifo(&fifo);
        let f2 = fifo.clone();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::fs::File::open(f2)
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            Instant::now()
        });
        let id = format!("start-{i}");
        let t0 = Instant::now();
        c.start_container(req(&id, &format!("echo up > {}", fifo.display()), 16 << 20))
            .await
            .unwrap();
        rpc.push(t0.elapsed().as_secs_f64() * 1e3);
        let seen = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        first_output.push((seen - t0).as_secs_f64() * 1e3);
        while status(&mut c, &id).await.exit.is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // Memory overrun to kill reported.
    let mut kill = Vec::new();
    let mut driver_peak = Vec::new();
    for i in 0..rounds {
        let fifo = work.path().join(format!("go-{i}"));
        mkfifo(&fifo);
        let id = format!("hog-{i}");
        c.start_container(req(
            &id,
            &format!("read x < {}; exec tail /dev/zero", fifo.display()),
            32 << 20,
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let t0 = Instant::now();
        w.write_all(b"go\n").unwrap();
        drop(w);
        let s = loop {
            let s = status(&mut c, &id).await;
            if s.exit.is_some() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        kill.push(t0.elapsed().as_secs_f64() * 1e3);
        match s.exit.unwrap().reason {
            Some(Reason::OverMemoryQuota(m)) => {
                driver_peak.push(m.peak_bytes as f64 / (1 << 20) as f64)
            }
            other => panic!("hog {i} ended with {other:?}"),
        }
    }

    // 50 running containers.
    for i in 0..50 {
        c.start_container(req(&format!("idle-{i}"), "exec sleep 1000", 16 << 20))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_rss = rss_kib(pid);
    let t0 = Instant::now();
    for i in 0..50 {
        stop(&mut c, &format!("idle-{i}")).await;
    }
    let stop50 = t0.elapsed();
    drop(c);
    tokio::task::spawn_blocking(move || drop(agent))
        .await
        .unwrap();

    // The agent's own share of a memory kill: from the decision (OOM event)
    // until every process is gone and the end is recorded.
    let mut teardown: Vec<f64> = std::fs::read_to_string(&agent_log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["container_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("hog-"))
        })
        .filter_map(|v| v["fields"]["teardown_us"].as_u64())
        .map(|us| us as f64 / 1e3)
        .collect();
    assert_eq!(teardown.len(), rounds, "one teardown figure per hog");
    let kib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    println!("node-agent benchmark ({rounds} rounds per figure)");
    println!(
        "  StartContainer RPC (process exec'd):     p50 {:.2} ms  p99 {:.2} ms",
        percentile(&mut rpc, 0.5),
        percentile(&mut rpc, 0.99)
    );
    println!(
        "  StartContainer to first output:          p50 {:.2} ms  p99 {:.2} ms",
        percentile(&mut first_output, 0.5),
        percentile(&mut first_output, 0.99)
    );
    println!(
        "  memory overrun to kill reported:         p50 {:.2} ms  p99 {:.2} ms  (go signal -> OverMemoryQuota in status; includes exec of the hog, filling 32 MiB and the kernel's reclaim before OOM)",
        percentile(&mut kill, 0.5),
        percentile(&mut kill, 0.99)
    );
    println!(
        "    of which the agent (OOM event -> all killed, end recorded): p50 {:.2} ms  p99 {:.2} ms",
        percentile(&mut teardown, 0.5),
        percentile(&mut teardown, 0.99)
    );
    println!(
        "  reported peak of a 32 MiB hog:           p50 {:.1} MiB  max {:.1} MiB",
        percentile(&mut driver_peak, 0.5),
        percentile(&mut driver_peak, 1.0)
    );
    println!(
        "  agent RSS idle:                          {}",
        kib(idle_rss)
    );
    println!(
        "  agent RSS with 50 running containers:    {}",
        kib(busy_rss)
    );
    println!(
        "  stopping 50 containers one by one:       {:.0} ms",
        stop50.as_secs_f64() * 1e3
    );
}
