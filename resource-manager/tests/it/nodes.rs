//! Node agents registering, heartbeating, going LOST and coming back against
//! the real RM group (node expiry 1 s in these tests).

use std::time::{Duration, Instant};

use weft_client::proto as pb;
use weft_client::RmClient;

use crate::cluster::Cluster;

async fn node(client: &RmClient, id: &str) -> Option<pb::NodeReport> {
    client
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_id == id)
}

async fn wait_state(
    client: &RmClient,
    id: &str,
    state: pb::NodeState,
    within: Duration,
) -> pb::NodeReport {
    let deadline = Instant::now() + within;
    loop {
        if let Some(n) = node(client, id).await {
            if n.state() == state {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} not {state:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real `node-agent` binary, beside `resource-manager` once the
/// workspace's binaries are built (README's test command does that first).
pub fn agent_binary() -> std::path::PathBuf {
    let p =
        std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("node-agent");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A node-agent process; killed (SIGKILL) when dropped.
/// The cgroup parent of a test agent: unique to this test binary, this
/// cluster (its first member's port) and the node, so agents of tests running
/// side by side never share one, while a restarted node finds its leftovers.
fn parent_name(node_id: &str, rm: &[String]) -> String {
    let port = rm.first().and_then(|a| a.rsplit(':').next()).unwrap_or("0");
    format!("weft-rm-it-{}-{port}-{node_id}", std::process::id())
}

pub struct AgentProcess {
    child: std::process::Child,
    /// The agent's cgroup parent and environment scope.
    parent: String,
    /// Its config file and RM addresses, to start it again.
    config: std::path::PathBuf,
    rm: Vec<String>,
    /// The agent's work dir (its containers' work dirs are under it).
    pub work_dir: std::path::PathBuf,
    _work: tempfile::TempDir,
}

impl AgentProcess {
    pub fn start(node_id: &str, rm: &[String]) -> AgentProcess {
        Self::start_at(node_id, rm, "127.0.0.1", "gpu = \"h100\"")
    }

    /// An agent listening on `ip` (its connections leave from there too),
    /// with `labels` (TOML inline-table body).
    pub fn start_at(node_id: &str, rm: &[String], ip: &str, labels: &str) -> AgentProcess {
        Self::start_with(node_id, rm, ip, labels, "")
    }

    /// Like [`AgentProcess::start_at`], with `extra` TOML (tables) at the
    /// end of its config.
    pub fn start_with(
        node_id: &str,
        rm: &[String],
        ip: &str,
        labels: &str,
        extra: &str,
    ) -> AgentProcess {
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("agent.toml");
        let ports = port_range();
        // A `[containers]` table in `extra` adds to the one written here.
        let (containers, extra) = match extra.split_once("[containers]\n") {
            Some((before, after)) => {
                let end = after.find("\n[").map_or(after.len(), |i| i + 1);
                (
                    after[..end].to_string(),
                    format!("{before}{}", &after[end..]),
                )
            }
            None => (String::new(), extra.to_string()),
        };
        std::fs::write(
            &config,
            format!(
                "node_id = {node_id:?}\nlisten = \"{ip}:0\"\nwork_dir = {:?}\nlabels = {{ {labels} }}\n\
                 [resources]\nvcores = 8.0\n[containers]\ncgroup_parent = {:?}\n{containers}\
                 [heartbeat]\nmax_backoff = \"300ms\"\n[ports]\nfirst = {ports_first}\nlast = {ports_last}\n\
                 [gpu]\nprobe = \"fake\"\n\
                 [[gpu.fake.devices]]\nuuid = \"GPU-0\"\nmodel = \"Fake H100\"\nmemory = \"80GiB\"\n{extra}{}",
                work.path().join("agent").display().to_string(),
                parent_name(node_id, rm),
                crate::secure::agent_toml(node_id, &extra),
                ports_first = ports.0,
                ports_last = ports.1,
            ),
        )
        .unwrap();
        AgentProcess {
            child: Self::spawn(&config, rm),
            work_dir: work.path().join("agent"),
            parent: parent_name(node_id, rm),
            config,
            rm: rm.to_vec(),
            _work: work,
        }
    }

    fn spawn(config: &std::path::Path, rm: &[String]) -> std::process::Child {
        std::process::Command::new(agent_binary())
            .args(["--config", config.to_str().unwrap(), "--rm", &rm.join(",")])
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Starts the agent again with the same config and work dir (after
    /// [`AgentProcess::kill9`]).
    pub fn restart(&mut self) {
        assert!(
            !matches!(self.child.try_wait(), Ok(None)),
            "the agent still runs"
        );
        self.child = Self::spawn(&self.config, &self.rm);
    }

    /// Live processes of this agent's containers (by their scope marker).
    pub fn container_processes(&self) -> Vec<i32> {
        let marker = format!("WEFT_CONTAINER_SCOPE={}/", self.parent);
        weft_node_agent::procfs::all_pids()
            .into_iter()
            .filter(|pid| {
                let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(true);
                !zombie
                    && env
                        .split(|b| *b == 0)
                        .any(|kv| kv.starts_with(marker.as_bytes()))
            })
            .collect()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    /// A clean stop, so the agent removes its cgroups (a killed agent's are
    /// reused and removed by the next agent with the same cgroup parent).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill9();
        force_clean(&self.parent);
    }
}

/// Kills what an agent killed with SIGKILL left running (processes carrying
/// its scope marker) and removes its cgroups; a clean stop leaves nothing.
/// A port range of its own for each agent this process starts: agents of
/// one machine (every node of a test cluster, and the clusters of tests
/// running side by side) must not hand out the same ports, as nodes of
/// their own would not. 60 ranges of 200 ports below the kernel's
/// ephemeral ones, taken in turn.
fn port_range() -> (u16, u16) {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 60;
    let first = 20_000 + k * 200;
    (first, first + 199)
}

pub fn force_clean(parent: &str) {
    let marker = format!("WEFT_CONTAINER_SCOPE={parent}/");
    for pid in weft_node_agent::procfs::all_pids() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env
            .split(|b| *b == 0)
            .any(|kv| kv.starts_with(marker.as_bytes()))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let mounts = weft_node_agent::driver::cgroupfs::Mounts::read();
    let mut roots: Vec<std::path::PathBuf> = mounts.v1.iter().map(|(p, _)| p.clone()).collect();
    roots.extend(mounts.v2.clone());
    // A group an agent froze to kill its tree and never thawed (the agent
    // killed in between) holds its processes where SIGKILL cannot land:
    // thaw every group of this parent, so the kills above take effect.
    for root in &roots {
        if let Ok(rd) = std::fs::read_dir(root.join(parent)) {
            for e in rd.flatten() {
                let _ = std::fs::write(e.path().join("freezer.state"), "THAWED");
                let _ = std::fs::write(e.path().join("cgroup.freeze"), "0");
            }
        }
    }
    // Killed processes leave their groups once reaped: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = false;
        for root in &roots {
            let dir = root.join(parent);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
            left |= dir.exists();
        }
        if !left || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_goes_lost_when_killed_and_returns() {
    let cluster = Cluster::start(3, 1000);
    cluster.leader().await;
    let client = cluster.client();
    let mut agent = AgentProcess::start("gpu-node-1", &cluster.addrs());
    let n = wait_state(
        &client,
        "gpu-node-1",
        pb::NodeState::Running,
        Duration::from_secs(20),
    )
    .await;
    let cap = n.capacity.clone().unwrap();
    assert_eq!(cap.vcores_milli, 8000);
    assert_eq!(cap.gpus.len(), 1);
    assert_eq!(cap.gpus[0].model, "Fake H100");
    assert_eq!(n.labels.get("gpu").map(String::as_str), Some("h100"));
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.nodes, 1);
    assert_eq!(status.capacity.unwrap().gpus, 1);
    // Heartbeats keep it alive well past the expiry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        node(&client, "gpu-node-1").await.unwrap().state(),
        pb::NodeState::Running
    );

    // Killed: LOST after the expiry.
    let t0 = Instant::now();
    agent.kill9();
    wait_state(
        &client,
        "gpu-node-1",
        pb::NodeState::Lost,
        Duration::from_secs(10),
    )
    .await;
    let took = t0.elapsed();
    // Its last heartbeat went out at most one interval (200 ms) before the kill.
    assert!(
        took >= Duration::from_millis(700),
        "declared lost after only {took:?}"
    );
    assert_eq!(
        client
            .cluster_status()
            .await
            .unwrap()
            .capacity
            .unwrap()
            .gpus,
        0
    );

    // Restarted: it registers again and is RUNNING.
    let _agent = AgentProcess::start("gpu-node-1", &cluster.addrs());
    wait_state(
        &client,
        "gpu-node-1",
        pb::NodeState::Running,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_declares_no_node_lost() {
    let mut cluster = Cluster::start(3, 1000);
    let leader = cluster.leader().await;
    let client = cluster.client();
    let _agents = [
        AgentProcess::start("n1", &cluster.addrs()),
        AgentProcess::start("n2", &cluster.addrs()),
    ];
    for id in ["n1", "n2"] {
        wait_state(&client, id, pb::NodeState::Running, Duration::from_secs(20)).await;
    }
    cluster.kill(leader);
    cluster.leader().await;
    // Three expiries after the election, both nodes are still RUNNING...
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in ["n1", "n2"] {
        assert_eq!(
            node(&client, id).await.unwrap().state(),
            pb::NodeState::Running,
            "{id}"
        );
    }
    // ...and no member ever declared one lost.
    for i in 0..3 {
        assert!(
            !cluster.log_text(i).contains("node lost"),
            "member {} declared a node lost",
            i + 1
        );
    }
}
