//! Jobs end to end on a real cluster of processes on loopback: a 3-member RM
//! group launching the `app-master` binary for every job, and 4 node agents
//! (cgroup-limited containers). Prints:
//!
//! - for a 100-task trivial job (p50 over several runs): submit to the
//!   master running, submit to the first task running, submit to the job's
//!   end;
//! - jobs per second for 1,000 one-task jobs submitted at once, with the
//!   CPU time a job cost (the whole machine's, and the RMs', the agents'
//!   and the containers' shares) and how long the masters lived;
//! - tasks per second for one 1,000-task job;
//! - what 200 running jobs that do nothing cost in CPU per second;
//! - resident memory of every daemon afterwards.
//!
//! Times come from the daemons' own clocks (the agents' container start
//! times, the RM's finish time), all on this machine.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p
//! weft-resource-manager --bench e2e` (`cargo test` runs a short version on
//! the debug binaries). `WEFT_BENCH_TLS=1` runs the same over mutual TLS
//! (certificates made for the run; the bench's client verifies with the CA);
//! with `WEFT_BENCH_ACL=1` too, users are on (`[acl] enabled`), every call
//! authenticated (the bench's as the members' certificate).
//! `WEFT_BENCH_ONLY=jobs` runs the 1,000 one-task jobs alone (for many
//! interleaved runs of TLS on and off: `benches/tls-pairs.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_client::proto as pb;
use weft_client::RmClient;

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries of this profile first (cargo build --release --workspace --bins)",
        p.display()
    );
    p
}

mod support;
use support::{rss_mib, status_kib};

fn now_ms() -> u64 {
    weft_proto::token::now_ms()
}

struct Cluster {
    /// Dropped after the agents (fields drop after `drop`).
    rms: support::Group,
    agents: Vec<Child>,
    addrs: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first, with SIGTERM: they stop their containers and remove
        // their cgroups.
        for c in &self.agents {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.agents {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // An agent killed while it had a container's group frozen (to kill
        // a tree that kept forking) leaves it frozen for good: thaw this
        // bench's groups and kill what is left in them, then remove them.
        support::clean_cgroups(&format!("weft-bench-e2e-{}-", std::process::id()));
    }
}

fn start(nodes: usize) -> Cluster {
    let rms = support::start_group(&format!(
        "[masters]\nlaunch = true\ncommand = {:?}\nvcores = 0.1\nmemory = \"64MiB\"\n",
        bin("app-master").display().to_string()
    ));
    let (addrs, dir) = (rms.addrs.clone(), rms.dir.path().to_path_buf());
    let agents = (0..nodes)
        .map(|i| {
            let config = dir.join(format!("agent{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "node_id = \"n{i}\"\nlisten = \"127.0.0.1:0\"\nwork_dir = {:?}\n\
                     [resources]\nvcores = 16.0\nmemory = \"32GiB\"\n\
                     [containers]\ncgroup_parent = \"weft-bench-e2e-{}-{i}\"\n[gpu]\nprobe = \"none\"\n{}",
                    dir.join(format!("agent{i}")).display().to_string(),
                    std::process::id(),
                    support::tls_section(&dir, weft_common::tls::Role::Agent, &format!("n{i}"))
                ),
            )
            .unwrap();
            Command::new(bin("node-agent"))
                .args(["--config", config.to_str().unwrap(), "--rm", &addrs.join(",")])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    Cluster { rms, agents, addrs }
}

/// CPU time spent busy since boot on this machine, all CPUs together
/// (`/proc/stat`), in seconds.
fn busy_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let busy: u64 = ticks
        .iter()
        .enumerate()
        // user, nice, system, irq, softirq (not idle, iowait, steal, nor
        // guest time, which user already counts).
        .filter(|(i, _)| [0, 1, 2, 5, 6].contains(i))
        .map(|(_, t)| t)
        .sum();
    // USER_HZ is 100 on Linux.
    busy as f64 / 100.0
}

/// CPU time (s) used so far by the RMs, by the agents themselves, by the
/// containers (the agents' reaped children: shims and what they ran), and
/// by this process: `/proc/PID/stat`'s utime + stime, and cutime + cstime.
fn cpu_split(cluster: &Cluster) -> [f64; 4] {
    let times = |pid: u32| -> [f64; 2] {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: state is the
        // first (field 3), utime field 14.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<f64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(|v| v.parse::<f64>().unwrap_or(0.0) / 100.0)
            .collect();
        match f[..] {
            [u, s, cu, cs] => [u + s, cu + cs],
            _ => [0.0, 0.0],
        }
    };
    let mut out = [0.0; 4];
    for c in &cluster.rms.children {
        out[0] += times(c.id())[0];
    }
    for c in &cluster.agents {
        let [own, children] = times(c.id());
        out[1] += own;
        out[2] += children;
    }
    out[3] = times(std::process::id())[0];
    out
}

fn p50(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn job(name: &str, tasks: u32) -> String {
    format!(
        "name: {name}\nam: {{ vcores: 0.1, memory: 64MiB }}\nstages:\n  - name: run\n    instances: {tasks}\n    command: 'true'\n    resources: {{ vcores: 0.1, memory: 32MiB }}\n"
    )
}

/// Polls until `app` ended; returns its report.
async fn wait_end(client: &RmClient, app: &str, poll: Duration) -> pb::ApplicationReport {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = client.get_application(app).await.unwrap();
        if r.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            assert_eq!(
                r.state(),
                pb::ApplicationState::Succeeded,
                "{app}: {}",
                r.diagnostics
            );
            return r;
        }
        assert!(Instant::now() < deadline, "{app} did not end");
        tokio::time::sleep(poll).await;
    }
}

/// Every container the agents know (ended ones included).
async fn containers(client: &RmClient) -> Vec<pb::ContainerStatus> {
    let mut out = Vec::new();
    for n in client.list_nodes().await.unwrap() {
        let mut cm = weft_proto::v1::container_manager_client::ContainerManagerClient::new(
            weft_common::net::endpoint(
                &n.address,
                weft_common::tls::Role::Agent,
                Duration::from_secs(2),
                Some(Duration::from_secs(10)),
            )
            .unwrap()
            .connect_lazy(),
        );
        out.extend(
            cm.list_containers(pb::ListContainersRequest {
                include_finished: true,
            })
            .await
            .unwrap()
            .into_inner()
            .containers,
        );
    }
    out
}

fn main() {
    // `cargo bench` passes --bench; `cargo test` runs a short version.
    let quick =
        std::env::var("WEFT_BENCH_QUICK").is_ok() || !std::env::args().any(|a| a == "--bench");
    let (runs, wide, jobs, many, idle) = if quick {
        (1, 10, 10, 50, 5)
    } else {
        (7, 100, 1000, 1000, 200)
    };
    let nodes = 4;
    let cluster = start(nodes);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = std::sync::Arc::new(RmClient::new(cluster.addrs.clone()).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = client
                .list_nodes()
                .await
                .map(|n| {
                    n.iter()
                        .filter(|n| n.state() == pb::NodeState::Running)
                        .count()
                })
                .unwrap_or(0);
            if up == nodes {
                break;
            }
            assert!(Instant::now() < deadline, "only {up} of {nodes} nodes registered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Warm up (connections, page cache of the binaries).
        let app = client.submit(&job("warm", 4), "yaml", "bench").await.unwrap();
        wait_end(&client, &app, Duration::from_millis(20)).await;

        let jobs_only = std::env::var("WEFT_BENCH_ONLY").is_ok_and(|v| v == "jobs");
        // 1. Latency of one job of `wide` trivial tasks, run alone.
        let (mut am, mut first, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..if jobs_only { 0 } else { runs } {
            let t0 = now_ms();
            let app = client
                .submit(&job(&format!("lat{i}"), wide), "yaml", "bench")
                .await
                .unwrap();
            let r = wait_end(&client, &app, Duration::from_millis(5)).await;
            let all = containers(&client).await;
            let am_start = all
                .iter()
                .find(|c| c.container_id == r.am_container_id)
                .expect("the master's container")
                .started_at_ms;
            let first_task = all
                .iter()
                .filter(|c| c.started_at_ms >= t0 && c.container_id != r.am_container_id)
                .map(|c| c.started_at_ms)
                .min()
                .expect("tasks ran");
            am.push(am_start.saturating_sub(t0));
            first.push(first_task.saturating_sub(t0));
            whole.push(r.finished_at_ms.saturating_sub(t0));
        }
        if support::tls_on() {
            println!("over mutual TLS (WEFT_BENCH_TLS=1)");
        }
        if support::acl_on() {
            println!("with users on ([acl] enabled, WEFT_BENCH_ACL=1): every call authenticated");
        }
        if !jobs_only {
            println!("{wide}-task trivial job, {runs} runs, {nodes} nodes (ms: p50 [min..max]):");
        }
        for (name, v) in [
            ("submit -> master running", &mut am),
            ("submit -> first task running", &mut first),
            ("submit -> job finished", &mut whole),
        ] {
            if jobs_only {
                break;
            }
            let med = p50(v);
            println!(
                "  {name:<30} {med:>6} [{}..{}]",
                v.first().unwrap(),
                v.last().unwrap()
            );
        }

        // 2. Many one-task jobs submitted at once.
        let cpu0 = busy_cpu_secs();
        let split0 = cpu_split(&cluster);
        let t0 = now_ms();
        let started = Instant::now();
        let mut ids = Vec::with_capacity(jobs);
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..jobs {
            if pending.len() >= 16 {
                ids.push(pending.join_next().await.unwrap().unwrap());
            }
            let c = client.clone();
            pending.spawn(async move {
                c.submit(&job(&format!("one{i}"), 1), "yaml", "bench")
                    .await
                    .unwrap()
            });
        }
        while let Some(id) = pending.join_next().await {
            ids.push(id.unwrap());
        }
        let submitted_in = started.elapsed();
        let last_finish = loop {
            let apps = client
                .list_applications(pb::ListApplicationsRequest::default())
                .await
                .unwrap();
            let mine: Vec<&pb::ApplicationReport> = apps
                .iter()
                .filter(|a| a.name.starts_with("one"))
                .collect();
            let ended = mine
                .iter()
                .filter(|a| a.state() as i32 >= pb::ApplicationState::Succeeded as i32)
                .count();
            if ended == jobs {
                let failed: Vec<_> = mine
                    .iter()
                    .filter(|a| a.state() != pb::ApplicationState::Succeeded)
                    .map(|a| (a.application_id.clone(), a.diagnostics.clone()))
                    .collect();
                assert!(failed.is_empty(), "failed jobs: {failed:?}");
                let masters: std::collections::HashSet<String> =
                    mine.iter().map(|a| a.am_container_id.clone()).collect();
                break (
                    mine.iter().map(|a| a.finished_at_ms).max().unwrap(),
                    masters,
                );
            }
            assert!(started.elapsed() < Duration::from_secs(900), "{ended}/{jobs} ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let cpu = busy_cpu_secs() - cpu0;
        let split = cpu_split(&cluster);
        let (last_finish, masters) = last_finish;
        let secs = (last_finish - t0) as f64 / 1000.0;
        println!(
            "{jobs} one-task jobs: all submitted in {:.2} s, all finished in {secs:.2} s: {:.1} jobs/s",
            submitted_in.as_secs_f64(),
            jobs as f64 / secs
        );
        // What a job costs the machine (every process on it, busy CPU time
        // from /proc/stat) and how long its master lived: with the CPUs
        // saturated, jobs/s is their number over the CPU time per job.
        let mut lived: Vec<u64> = containers(&client)
            .await
            .iter()
            .filter(|c| masters.contains(&c.container_id))
            .map(|c| c.finished_at_ms.saturating_sub(c.started_at_ms))
            .collect();
        let alive = lived.iter().sum::<u64>() as f64 / 1000.0 / secs;
        let lived_p50 = p50(&mut lived);
        println!(
            "  CPU busy {cpu:.1} s ({:.1} ms per job); masters lived {lived_p50} ms p50 [{}..{}], {alive:.0} alive on average",
            cpu * 1000.0 / jobs as f64,
            lived.first().copied().unwrap_or_default(),
            lived.last().copied().unwrap_or_default(),
        );
        let per_job = |i: usize| (split[i] - split0[i]) * 1000.0 / jobs as f64;
        println!(
            "  CPU per job (ms): RMs {:.1}, agents {:.1}, containers (masters, tasks, their shims) {:.1}, this bench {:.1}",
            per_job(0),
            per_job(1),
            per_job(2),
            per_job(3),
        );

        if jobs_only {
            return;
        }
        // 3. One job of many tasks.
        let t0 = now_ms();
        let app = client
            .submit(&job("many", many), "yaml", "bench")
            .await
            .unwrap();
        let r = wait_end(&client, &app, Duration::from_millis(20)).await;
        let secs = (r.finished_at_ms - t0) as f64 / 1000.0;
        let tasks: Vec<pb::ContainerStatus> = containers(&client)
            .await
            .into_iter()
            .filter(|c| c.started_at_ms >= t0 && c.container_id != r.am_container_id)
            .collect();
        let first = tasks.iter().map(|c| c.started_at_ms).min().unwrap_or(t0);
        let last = tasks.iter().map(|c| c.started_at_ms).max().unwrap_or(t0);
        let ended = tasks.iter().map(|c| c.finished_at_ms).max().unwrap_or(t0);
        println!(
            "one {many}-task job: finished in {secs:.2} s: {:.1} tasks/s (tasks started from {} ms to {} ms, the last ended at {} ms)",
            many as f64 / secs,
            first.saturating_sub(t0),
            last.saturating_sub(t0),
            ended.saturating_sub(t0),
        );

        // 4. What a running job costs while it does nothing: its master's
        // connections (keepalive pings) and long polls, the agents'
        // tracking of its containers. The cluster's CPU use with `idle`
        // jobs whose one task sleeps, over its use with none.
        let window = Duration::from_secs(if quick { 2 } else { 10 });
        let c0 = busy_cpu_secs();
        tokio::time::sleep(window).await;
        let empty = (busy_cpu_secs() - c0) / window.as_secs_f64();
        let mut sleepers = Vec::with_capacity(idle);
        for i in 0..idle {
            let spec = job(&format!("idle{i}"), 1).replace("'true'", "'sleep 600'");
            sleepers.push(client.submit(&spec, "yaml", "bench").await.unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let running = containers(&client)
                .await
                .iter()
                .filter(|c| c.state() == pb::ContainerState::Running)
                .count();
            // Every master and its task.
            if running == 2 * idle {
                break;
            }
            assert!(Instant::now() < deadline, "{running} of {} containers running", 2 * idle);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c0 = busy_cpu_secs();
        tokio::time::sleep(window).await;
        let busy = (busy_cpu_secs() - c0) / window.as_secs_f64();
        println!(
            "{idle} running jobs doing nothing (a master and a sleeping task each): CPU busy {:.0} ms/s, {:.0} ms/s with none: {:.0} us/s per job",
            busy * 1000.0,
            empty * 1000.0,
            (busy - empty) * 1e6 / idle as f64
        );
        for id in &sleepers {
            client.kill_application(id).await.unwrap();
        }
        // Their containers end before the cluster goes: an agent killed
        // while stopping them (the teardown's SIGKILL after 20 s) would
        // leave their shims and tasks behind, as it does by design across
        // an agent restart.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let live = containers(&client)
                .await
                .iter()
                .filter(|c| c.state < pb::ContainerState::Succeeded as i32)
                .count();
            if live == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{live} containers still live after the kills");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let rss: Vec<String> = cluster
            .rms
            .children
            .iter()
            .map(|c| format!("{:.1}", rss_mib(c.id())))
            .collect();
        let arss: Vec<String> = cluster
            .agents
            .iter()
            .map(|c| format!("{:.1}", rss_mib(c.id())))
            .collect();
        println!(
            "resident memory after the runs (MiB): RMs {}, agents {}",
            rss.join(" / "),
            arss.join(" / ")
        );
        // Of an agent's resident memory: its heap and stacks (anonymous) and
        // the pages of its binary and libraries (file).
        let split: Vec<String> = cluster
            .agents
            .iter()
            .map(|c| {
                let kib = |k: &str| status_kib(c.id(), k);
                format!(
                    "{:.1} anon + {:.1} file",
                    kib("RssAnon:") / 1024.0,
                    kib("RssFile:") / 1024.0
                )
            })
            .collect();
        println!("  agents' resident memory (MiB): {}", split.join(" / "));
    });
}
