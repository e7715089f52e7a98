//! Starting an in-process agent on loopback and checking it leaves nothing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::transport::Channel;
use weft_node_agent::config::{AgentConfig, DriverChoice, GpuProbeChoice};
use weft_node_agent::driver::cgroupfs::Mounts;
use weft_proto::v1 as pb;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

pub type Client = ContainerManagerClient<Channel>;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A cgroup parent name no other test (or test run) uses.
pub fn unique_parent(tag: &str) -> String {
    format!(
        "weft-it-{}-{}-{tag}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A config for tests: loopback, a temp work dir, fast monitoring, no GPUs,
/// a fixed capacity (so admission tests do not depend on the machine).
pub fn test_config(work: &std::path::Path, tag: &str) -> AgentConfig {
    let mut c = AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        work_dir: work.to_path_buf(),
        node_id: Some(TEST_NODE.into()),
        ..Default::default()
    };
    c.security.token_public_key = Some(hex::encode(test_signer().public_key()));
    c.containers.cgroup_parent = unique_parent(tag);
    c.containers.monitor_interval = Duration::from_millis(100);
    c.containers.stop_grace_period = Duration::from_millis(500);
    c.gpu.probe = GpuProbeChoice::None;
    // This test program cannot be a shim: the real agent binary is.
    c.containers.shim = Some(env!("CARGO_BIN_EXE_node-agent").into());
    c.resources.vcores = Some(4.0);
    c.resources.memory = Some(bytesize::ByteSize::gib(4));
    c
}

pub struct TestAgent {
    pub client: Client,
    pub addr: std::net::SocketAddr,
    pub config: AgentConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<weft_node_agent::Result<()>>>,
    _work: Option<tempfile::TempDir>,
}

impl TestAgent {
    /// Starts an agent with `test_config` changed by `f`.
    pub async fn start(tag: &str, f: impl FnOnce(&mut AgentConfig)) -> TestAgent {
        weft_common::telemetry::init_with_default(weft_common::telemetry::LogFormat::Human, "warn");
        let work = tempfile::tempdir().unwrap();
        let mut config = test_config(work.path(), tag);
        f(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(weft_node_agent::run(config.clone(), listener, async {
            let _ = rx.await;
        }));
        let client = connect(addr).await;
        TestAgent {
            client,
            addr,
            config,
            stop: Some(tx),
            task: Some(task),
            _work: Some(work),
        }
    }

    pub fn parent(&self) -> &str {
        &self.config.containers.cgroup_parent
    }

    pub fn work_dir(&self) -> PathBuf {
        self.config.work_dir.clone()
    }

    /// Stops the agent and checks that no process or cgroup of it is left.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let res = tokio::time::timeout(Duration::from_secs(30), self.task.take().unwrap())
            .await
            .expect("agent shut down within 30s")
            .unwrap();
        res.expect("agent ran without error");
        assert_nothing_left(self.parent());
    }
}

pub async fn connect(addr: std::net::SocketAddr) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ContainerManagerClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot reach the agent at {addr}: {e}"),
        }
    }
}

/// Pids of live (non-zombie) processes carrying the scope marker of `parent`.
pub fn marked_pids(parent: &str) -> Vec<i32> {
    let prefix = format!("WEFT_CONTAINER_SCOPE={parent}/");
    weft_node_agent::procfs::all_pids()
        .into_iter()
        .filter(|&p| {
            let zombie = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    s.rfind(')')
                        .is_some_and(|i| s[i + 1..].trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            !zombie
                && std::fs::read(format!("/proc/{p}/environ"))
                    .map(|env| {
                        env.split(|b| *b == 0)
                            .any(|kv| kv.starts_with(prefix.as_bytes()))
                    })
                    .unwrap_or(false)
        })
        .collect()
}

/// Every cgroup directory named `parent` in any hierarchy.
pub fn cgroups_of(parent: &str) -> Vec<PathBuf> {
    let m = Mounts::read();
    let mut roots: Vec<PathBuf> = m.v1.iter().map(|(p, _)| p.clone()).collect();
    roots.extend(m.v2.clone());
    roots
        .into_iter()
        .map(|r| r.join(parent))
        .filter(|p| p.exists())
        .collect()
}

impl Drop for TestAgent {
    /// A test that panicked before `shutdown` still leaves nothing behind.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            force_clean(self.parent());
        }
    }
}

/// Calls [`force_clean`] when dropped: for tests that run agents or groups
/// outside [`TestAgent`].
pub struct CleanGuard(pub String);

impl Drop for CleanGuard {
    fn drop(&mut self) {
        force_clean(&self.0);
    }
}

/// Kills every process of `parent`'s containers and removes its cgroups.
pub fn force_clean(parent: &str) {
    for _ in 0..50 {
        let pids = marked_pids(parent);
        if pids.is_empty() {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in cgroups_of(parent) {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

pub fn assert_nothing_left(parent: &str) {
    // Killed processes may take a moment to be reaped by init.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = marked_pids(parent);
        let groups = cgroups_of(parent);
        if pids.is_empty() && groups.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("left behind: processes {pids:?}, cgroups {groups:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Node id of test agents (container tokens name it).
pub const TEST_NODE: &str = "test-node";

/// The key test agents trust (as an RM group's would be).
pub fn test_signer() -> weft_proto::token::TokenSigner {
    weft_proto::token::TokenSigner::from_seed([7; 32])
}

/// `req` with the token an RM would sign for an application of `user` in
/// `queue`.
pub fn signed_as(
    mut req: pb::StartContainerRequest,
    user: &str,
    queue: &str,
) -> pb::StartContainerRequest {
    let mut body = token_body(&req, TEST_NODE);
    body.user = user.into();
    body.queue = queue.into();
    req.token = test_signer().sign_container(&body);
    req
}

/// The token an RM would sign for `req` on `node`, valid for a minute.
pub fn token_for(req: &pb::StartContainerRequest, node: &str) -> Vec<u8> {
    test_signer().sign_container(&token_body(req, node))
}

fn token_body(req: &pb::StartContainerRequest, node: &str) -> pb::ContainerTokenBody {
    let r = req.resources.clone().unwrap_or_default();
    let now = weft_proto::token::now_ms();
    pb::ContainerTokenBody {
        container_id: req.container_id.clone(),
        application_id: "app-test".into(),
        node_id: node.into(),
        vcores_milli: r.vcores_milli,
        memory_bytes: r.memory_bytes,
        gpu_indices: r.gpu_indices.clone(),
        gpu_share_milli: r.gpu_share_milli,
        gpu_memory_bytes: r.gpu_memory_bytes,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ports: r.ports.clone(),
        ..Default::default()
    }
}

/// `req` with a valid token for a test agent (unless it has one).
pub fn signed(mut req: pb::StartContainerRequest) -> pb::StartContainerRequest {
    if req.token.is_empty() {
        req.token = token_for(&req, TEST_NODE);
    }
    req
}

pub fn spec(id: &str, script: &str, memory: u64) -> pb::StartContainerRequest {
    pb::StartContainerRequest {
        container_id: id.into(),
        command: "sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Default::default(),
        resources: Some(pb::ContainerResources {
            memory_bytes: memory,
            ..Default::default()
        }),
        token: vec![],
        files: Default::default(),
        checkpoint_key: String::new(),
    }
}

pub const MIB: u64 = 1 << 20;

pub async fn start(client: &mut Client, req: pb::StartContainerRequest) -> pb::ContainerStatus {
    client
        .start_container(signed(req))
        .await
        .expect("start_container")
        .into_inner()
        .status
        .unwrap()
}

pub fn is_terminal(s: &pb::ContainerStatus) -> bool {
    use pb::ContainerState as S;
    matches!(s.state(), S::Succeeded | S::Failed | S::Killed | S::Lost)
}

/// Polls until the container is terminal.
pub async fn wait_end(client: &mut Client, id: &str, within: Duration) -> pb::ContainerStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = client
            .get_container_status(pb::GetContainerStatusRequest {
                container_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if is_terminal(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} still {:?} after {within:?}",
            s.state()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn read_log(
    client: &mut Client,
    id: &str,
    stream: pb::LogStream,
    offset: u64,
    follow: bool,
) -> String {
    let mut s = client
        .read_logs(pb::ReadLogsRequest {
            container_id: id.into(),
            stream: stream as i32,
            offset,
            follow,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        assert_eq!(
            chunk.offset,
            offset + out.len() as u64,
            "chunks are contiguous"
        );
        out.extend(chunk.data);
    }
    String::from_utf8(out).unwrap()
}

/// Waits until `f` holds, polling; panics with `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn driver_or_skip(d: DriverChoice) -> bool {
    if !is_root() && d != DriverChoice::Procfs {
        eprintln!("skipped: needs root for cgroups");
        return false;
    }
    true
}

/// Stops a container with `grace_ms` between SIGTERM and SIGKILL and waits for its end.
pub async fn stop(client: &mut Client, id: &str, grace_ms: u64) -> pb::ContainerStatus {
    client
        .stop_container(pb::StopContainerRequest {
            container_id: id.into(),
            grace_period_ms: grace_ms,
            wait: true,
        })
        .await
        .expect("stop_container")
        .into_inner()
        .status
        .unwrap()
}

/// Gives the agent `n` fake GPUs named `<prefix><i>`.
pub fn fake_gpus(c: &mut AgentConfig, prefix: &str, n: usize) {
    c.gpu.probe = GpuProbeChoice::Fake;
    for i in 0..n {
        c.gpu
            .fake
            .devices
            .push(weft_node_agent::config::FakeGpuDevice {
                uuid: format!("{prefix}{i}"),
                model: "Fake A100".into(),
                memory: bytesize::ByteSize::gib(40),
                minor: None,
            });
    }
}
