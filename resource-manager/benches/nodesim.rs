//! Node simulator: a real 3-member RM group (the `resource-manager` binary,
//! three processes on loopback) and N simulated node agents that this
//! process registers and heartbeats for over the real ResourceTracker gRPC
//! service, then jobs whose masters (unmanaged, also played here over the
//! real ApplicationMasterService) ask for containers until M run. A
//! simulated agent runs nothing: a container it is granted is reported
//! RUNNING in its node's next heartbeat, as a real agent would once started.
//!
//! Prints: registration time; submit -> first and -> last allocation per job
//! (p50 / p99 / max); the containers running by the replicated state; then,
//! over a steady window of heartbeats only, the leader's CPU share (of one
//! core) and resident memory, the followers' resident memory and their lag
//! behind the leader's commit index.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p
//! weft-resource-manager --bench nodesim` (10,000 nodes, 100,000 containers;
//! `-- --bench --nodes N --containers M` to change them). `cargo test` runs a
//! short version (200 nodes, 2,000 containers) on the debug binaries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use weft_client::RmClient;
use weft_proto::v1 as pb;
use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
use weft_proto::v1::resource_tracker_client::ResourceTrackerClient;

const GIB: u64 = 1 << 30;

mod support;
use support::{rss_mib, status_kib};

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn start_group() -> support::Group {
    // Heartbeats every second; a node is lost after 30 s of silence (the
    // simulator shares two cores with the three members).
    support::start_group(
        "heartbeat_interval = \"1s\"\nnode_expiry = \"30s\"\n[masters]\nlaunch = false\n",
    )
}

/// Containers each simulated node runs (reported in its heartbeats).
type Running = Arc<Vec<Mutex<Vec<pb::ContainerStatus>>>>;

fn node_id(i: usize) -> String {
    format!("sim{i:05}")
}

fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .connect_lazy()
}

fn register_request(i: usize, key: &[u8]) -> pb::RegisterNodeRequest {
    pb::RegisterNodeRequest {
        node_id: node_id(i),
        hostname: node_id(i),
        // Never called: the simulated masters start nothing through agents.
        container_manager_address: format!("127.0.0.1:{}", 9),
        capacity: Some(pb::NodeCapacity {
            vcores_milli: 16_000,
            memory_bytes: 64 * GIB,
            ..Default::default()
        }),
        token_public_key: key.to_vec(),
        agent_version: "nodesim".into(),
        ..Default::default()
    }
}

/// Registers every node (`conc` calls in flight); returns the group's key.
async fn register_all(channels: &[Channel], nodes: usize) -> Vec<u8> {
    let key = Arc::new(Mutex::new(Vec::<u8>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..64 {
        let ch = channels[w % channels.len()].clone();
        let (key, next) = (key.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = ResourceTrackerClient::new(ch);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= nodes {
                    return;
                }
                let k = key.lock().unwrap().clone();
                let r = c.register_node(register_request(i, &k)).await.unwrap();
                let r = r.into_inner();
                if !r.token_public_key.is_empty() {
                    *key.lock().unwrap() = r.token_public_key;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let k = key.lock().unwrap().clone();
    k
}

/// Heartbeats for every node once per `every`, spread evenly, until `stop`.
fn heartbeat_all(
    channels: &[Channel],
    nodes: usize,
    running: Running,
    key: Vec<u8>,
    every: Duration,
    sent: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<Vec<(Instant, f64)>>> {
    let shards = 32.min(nodes);
    (0..shards)
        .map(|s| {
            let mut c = ResourceTrackerClient::new(channels[s % channels.len()].clone());
            let (running, key, sent, stop) =
                (running.clone(), key.clone(), sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mine: Vec<usize> = (s..nodes).step_by(shards).collect();
                let gap = every / mine.len().max(1) as u32;
                let mut seq = 0u64;
                // (when sent, how long it took in ms), for every heartbeat.
                let mut took = Vec::new();
                let mut tick = tokio::time::interval(gap);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    seq += 1;
                    for &i in &mine {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = stop.cancelled() => return took,
                        }
                        let containers = running[i].lock().unwrap().clone();
                        let req = pb::NodeHeartbeatRequest {
                            node_id: node_id(i),
                            containers,
                            sequence: seq,
                            token_public_key: key.clone(),
                            ..Default::default()
                        };
                        let t0 = Instant::now();
                        let answer = c.node_heartbeat(req).await;
                        took.push((t0, t0.elapsed().as_secs_f64() * 1e3));
                        match answer {
                            Ok(r) if r.get_ref().reregister => {
                                let _ = c.register_node(register_request(i, &key)).await;
                            }
                            Ok(_) => {}
                            Err(e) => eprintln!("heartbeat of {} failed: {e}", node_id(i)),
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

fn spec(name: &str, tasks: u32) -> String {
    format!(
        "name: {name}\nstages:\n  - name: run\n    instances: {tasks}\n    command: 'true'\n    resources: {{ vcores: 1, memory: 1GiB }}\n"
    )
}

/// One job, played by its own (unmanaged) master: submit, register, ask for
/// `tasks` containers and collect them; each granted container goes to its
/// node's heartbeat as RUNNING. Returns (submit -> first, submit -> last
/// allocation) in ms.
async fn run_job(
    client: Arc<RmClient>,
    am: Channel,
    name: String,
    tasks: u32,
    running: Running,
) -> (f64, f64) {
    let t0 = Instant::now();
    let sub = client
        .submit_with(&spec(&name, tasks), "yaml", "sim", true)
        .await
        .unwrap();
    let (app, token) = (sub.application_id, sub.application_token);
    let mut c = ApplicationMasterServiceClient::new(am);
    c.register_application_master(pb::RegisterApplicationMasterRequest {
        application_id: app.clone(),
        attempt: 1,
        application_token: token.clone(),
        host: "nodesim".into(),
    })
    .await
    .unwrap();
    let mut got = 0u32;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    while got < tasks {
        assert!(
            Instant::now() < deadline,
            "{app}: only {got} of {tasks} allocated"
        );
        let r = c
            .allocate(pb::AllocateRequest {
                application_id: app.clone(),
                attempt: 1,
                application_token: token.clone(),
                asks: vec![pb::ResourceAsk {
                    ask_id: "run".into(),
                    count: tasks - got,
                    resources: Some(pb::Resources {
                        vcores_milli: 1000,
                        memory_bytes: GIB,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                wait_ms: 2000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for a in r.allocations {
            got += 1;
            first.get_or_insert_with(|| t0.elapsed());
            let i: usize = a.node_id.trim_start_matches("sim").parse().unwrap();
            running[i].lock().unwrap().push(pb::ContainerStatus {
                container_id: a.container_id,
                state: pb::ContainerState::Running as i32,
                started_at_ms: weft_proto::token::now_ms(),
                ..Default::default()
            });
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(first.unwrap_or_default()), ms(t0.elapsed()))
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let nodes = arg("--nodes", if full { 10_000 } else { 200 });
    let containers = arg("--containers", if full { 100_000 } else { 2_000 });
    let per_job = 1_000.min(containers);
    let jobs = containers.div_ceil(per_job);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let group = start_group();
    rt.block_on(async {
        let client = Arc::new(
            RmClient::new(group.addrs.clone())
                .unwrap()
                .with_deadline(Duration::from_secs(60)),
        );
        // The agents talk to the leader: find it (bounded).
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let s = client.cluster_status().await.unwrap();
            if s.leader_id != 0 {
                break s;
            }
            assert!(Instant::now() < deadline, "no leader within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let leader_i = (status.leader_id - 1) as usize;
        let leader_addr = group.addrs[leader_i].clone();
        let channels: Vec<Channel> = (0..8).map(|_| channel(&leader_addr)).collect();

        let t = Instant::now();
        let mut key = register_all(&channels, nodes).await;
        let registered = t.elapsed();
        let running: Running = Arc::new((0..nodes).map(|_| Mutex::new(Vec::new())).collect());
        let sent = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        if key.is_empty() {
            // The group makes its key with its first leader's first round.
            let deadline = Instant::now() + Duration::from_secs(30);
            while key.is_empty() {
                assert!(Instant::now() < deadline, "the group never made its token key");
                tokio::time::sleep(Duration::from_millis(200)).await;
                key = register_all(&channels[..1], 1).await;
            }
        }
        let beats = heartbeat_all(
            &channels,
            nodes,
            running.clone(),
            key,
            Duration::from_secs(1),
            sent.clone(),
            stop.clone(),
        );
        println!(
            "{nodes} simulated nodes registered in {:.2} s with a 3-member group (leader member {})",
            registered.as_secs_f64(),
            status.leader_id
        );

        // Jobs arrive one after another (a new one every 100 ms), each with
        // its own master asking for up to 1,000 containers.
        let t = Instant::now();
        let mut handles = Vec::new();
        for j in 0..jobs {
            let tasks = per_job.min(containers - j * per_job) as u32;
            handles.push(tokio::spawn(run_job(
                client.clone(),
                channels[j % channels.len()].clone(),
                format!("sim-{j}"),
                tasks,
                running.clone(),
            )));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (mut first, mut last) = (Vec::new(), Vec::new());
        for h in handles {
            let (f, l) = h.await.unwrap();
            first.push(f);
            last.push(l);
        }
        let all_allocated = t.elapsed();
        // Every granted container reported running by its node's heartbeat.
        let want = containers as u32;
        let deadline = Instant::now() + Duration::from_secs(120);
        let used = loop {
            let s = client.cluster_status().await.unwrap();
            let used = s.used.unwrap_or_default().vcores_milli / 1000;
            if used as u32 >= want || Instant::now() > deadline {
                break used;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        println!(
            "{jobs} jobs, {containers} containers allocated in {:.1} s; vcores in use by the replicated state: {used}",
            all_allocated.as_secs_f64()
        );
        println!(
            "submit -> first allocation: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            pct(&mut first, 0.5),
            pct(&mut first, 0.99),
            pct(&mut first, 1.0)
        );
        println!(
            "submit -> last allocation (job of up to {per_job}): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            pct(&mut last, 0.5),
            pct(&mut last, 0.99),
            pct(&mut last, 1.0)
        );

        // Steady window: heartbeats only.
        let window = if full { Duration::from_secs(20) } else { Duration::from_secs(3) };
        let pids: Vec<u32> = group.children.iter().map(|c| c.id()).collect();
        let ticks0: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
        let sent0 = sent.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut lag = vec![Vec::new(); 3];
        let mut status_ms = Vec::new();
        let mut unanswered = 0;
        let status = |a: String| {
            let client = client.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(2), client.member_status(&a))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
        };
        while t.elapsed() < window {
            let s0 = Instant::now();
            let Some(lead) = status(group.addrs[leader_i].clone()).await else {
                unanswered += 1;
                continue;
            };
            status_ms.push(s0.elapsed().as_secs_f64() * 1e3);
            for (i, a) in group.addrs.iter().enumerate() {
                if i != leader_i {
                    match status(a.clone()).await {
                        Some(s) => {
                            lag[i].push(lead.commit_index.saturating_sub(s.applied_index) as f64)
                        }
                        None => unanswered += 1,
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!(
            "cluster status from the leader during the window: p50 {:.1} ms, max {:.1} ms; {unanswered} status calls unanswered within 2 s",
            pct(&mut status_ms, 0.5),
            pct(&mut status_ms, 1.0)
        );
        let secs = t.elapsed().as_secs_f64();
        let hz = 100.0; // USER_HZ on Linux
        let beats_per_s = (sent.load(Ordering::Relaxed) - sent0) as f64 / secs;
        for (i, &p) in pids.iter().enumerate() {
            let cpu = (cpu_ticks(p) - ticks0[i]) as f64 / hz / secs * 100.0;
            let role = if i == leader_i { "leader" } else { "follower" };
            let lagged = if i == leader_i {
                String::new()
            } else {
                format!(
                    ", behind the leader's commit: p50 {:.0}, max {:.0} entries",
                    pct(&mut lag[i], 0.5),
                    pct(&mut lag[i], 1.0)
                )
            };
            println!(
                "member {} ({role}): {cpu:.1}% of one core over {secs:.0} s of heartbeats only ({beats_per_s:.0}/s), RSS {:.1} MiB, peak {:.1} MiB{lagged}",
                i + 1,
                rss_mib(p),
                status_kib(p, "VmHWM:") / 1024.0
            );
        }
        stop.cancel();
        let mut window_beats = Vec::new();
        for b in beats {
            window_beats.extend(
                b.await
                    .unwrap()
                    .into_iter()
                    .filter(|(at, _)| *at >= t)
                    .map(|(_, ms)| ms),
            );
        }
        println!(
            "heartbeat calls in the window: {}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            window_beats.len(),
            pct(&mut window_beats, 0.5),
            pct(&mut window_beats, 0.99),
            pct(&mut window_beats, 1.0)
        );
        assert!(
            used as usize >= containers,
            "only {used} of {containers} containers' vcores in use"
        );
        // Nothing of the fleet was lost while it heartbeated.
        let listed = client.list_nodes().await.unwrap();
        let lost = listed
            .iter()
            .filter(|n| n.state() == pb::NodeState::Lost)
            .count();
        println!("nodes lost during the run: {lost}");
    });
}
