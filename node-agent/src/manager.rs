//! The container manager: admits StartContainer requests against the node's
//! free resources, launches each container in its group, supervises it until it
//! ends (quotas, wall time, stop requests), and keeps its record for status,
//! logs and heartbeats.
//!
//! Data flow: `start` validates and reserves under the state lock, creates the
//! group and directories on a blocking thread, spawns the process (which joins
//! its group and a new session before exec), then hands it to `supervise`, one
//! tokio task per container, which alone decides how the container ends.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use weft_proto::v1 as pb;

use crate::capacity::Capacity;
use crate::config::{ContainersConfig, LogsConfig};
use crate::driver::{self, Driver, Group, Limits};
use crate::error::{Error, Result};
use crate::gpu::{GpuInfo, GpuProbe};
use crate::model::{human_bytes, ContainerSpec, Exit, ExitReason, Phase, Record};
use crate::procfs::{self, ProcessSample};
use crate::recovery::{self, StateDir};
use crate::{shim, validate};

/// Character-device major number of NVIDIA GPUs (`/dev/nvidiaN` is 195:N).
pub const NVIDIA_MAJOR: u32 = 195;

/// Where containers' notice files live (`WEFT_NOTICE_FILE`), under the
/// agent's work dir: a directory of the agent's alone, so that a task can
/// read its notice but cannot put a link in its place for the agent (root)
/// to write through.
pub const NOTICES_DIR: &str = "notices";

/// Cloneable handle on the node's containers.
#[derive(Clone)]
pub struct Manager {
    sh: Arc<Shared>,
}

struct Shared {
    cfg: ContainersConfig,
    logs_cfg: LogsConfig,
    driver: Arc<dyn Driver>,
    gpu: Arc<dyn GpuProbe>,
    gpus: Vec<GpuInfo>,
    capacity: Capacity,
    containers_root: PathBuf,
    /// Tasks' checkpoints: `<root>/<application>/<checkpoint key>`.
    checkpoints_root: PathBuf,
    /// Containers' notice files, by container id.
    notices_root: PathBuf,
    /// The agent's Unix socket, once it serves one (`WEFT_AGENT_SOCKET`).
    agent_socket: std::sync::OnceLock<PathBuf>,
    /// Whether the socket serves the relays (`crate::relay`).
    relay: std::sync::atomic::AtomicBool,
    logs_root: PathBuf,
    /// Every container the agent knows, running or ended and retained.
    state: Mutex<HashMap<String, Arc<Container>>>,
    /// What the agent counts and times.
    metrics: Arc<crate::metrics::AgentMetrics>,
    /// Set once shutdown begins: no new containers.
    closing: AtomicBool,
    /// Supervisor tasks, awaited at shutdown.
    tasks: TaskTracker,
    tokens: Arc<crate::tokens::Tokens>,
    /// Signalled when a container ends (the tracker reports it early).
    ended: tokio::sync::Notify,
    /// Where each container's record and end are kept for the next agent.
    state_dir: StateDir,
    /// Program run as the shim between the agent and each container.
    shim: PathBuf,
    /// This boot's id, kept in each record.
    boot_id: String,
    /// Shims starting at once. A burst of starts (a 100-task stage) would
    /// otherwise start every shim together and each container would wait
    /// for CPU behind all of them: a few at a time start the first ones
    /// first.
    launching: tokio::sync::Semaphore,
    /// Log reads served at once (`logs.max_streams`).
    log_streams: Arc<tokio::sync::Semaphore>,
    /// The node's lease: containers die when it runs out (see
    /// [`crate::fence`]).
    lease: crate::fence::Lease,
    /// When (`fence::now_ms`) a container that was given ports last ended
    /// (this agent's start, for containers an earlier agent started): its
    /// connections can hold those ports in TIME_WAIT for a while.
    ports_freed_at_ms: std::sync::atomic::AtomicU64,
}

/// How long after a container given ports ends its ports may still be held
/// by its closing connections (TIME_WAIT is 60 s on Linux, FIN_WAIT2
/// `tcp_fin_timeout`, 60 s by default).
const PORTS_LINGER_MS: u64 = 120_000;

/// One container: its record plus the channels to its supervisor.
pub struct Container {
    record: Mutex<Record>,
    stop_tx: mpsc::UnboundedSender<StopRequest>,
    /// Flips to true once the container has ended.
    done: watch::Sender<bool>,
}

struct StopRequest {
    reason: ExitReason,
    grace: Duration,
}

impl Container {
    pub fn record(&self) -> Record {
        self.record.lock().expect("record lock poisoned").clone()
    }

    fn update(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().expect("record lock poisoned"))
    }

    /// Resolves once the container has ended.
    pub async fn wait_done(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Parts the manager is built from.
pub struct ManagerParts {
    pub containers: ContainersConfig,
    pub logs: LogsConfig,
    pub driver: Arc<dyn Driver>,
    pub gpu: Arc<dyn GpuProbe>,
    pub capacity: Capacity,
    pub work_dir: PathBuf,
    /// Checks container tokens.
    pub tokens: Arc<crate::tokens::Tokens>,
}

impl Manager {
    pub fn new(p: ManagerParts) -> Result<Self> {
        let containers_root = p.work_dir.join("containers");
        let logs_root = p.work_dir.join("logs");
        let checkpoints_root = p
            .containers
            .checkpoint_dir
            .clone()
            .unwrap_or_else(|| p.work_dir.join("checkpoints"));
        let notices_root = p.work_dir.join(NOTICES_DIR);
        let state_dir = StateDir::new(&p.work_dir);
        // Others may pass through the notices' directory, not list it.
        std::fs::create_dir_all(&notices_root)
            .map_err(|e| Error::io("creating", &notices_root, e))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&notices_root, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| Error::io("setting the mode of", &notices_root, e))?;
        }
        for d in [
            &checkpoints_root,
            &containers_root,
            &logs_root,
            &state_dir.path().to_path_buf(),
        ] {
            std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, e))?;
        }
        let shim = match &p.containers.shim {
            Some(s) => s.clone(),
            None => default_shim().map_err(|e| {
                Error::Config(format!(
                    "containers.shim: finding the agent's own program: {e}"
                ))
            })?,
        };
        if !shim.is_file() {
            return Err(Error::Config(format!(
                "containers.shim: {} is not a file",
                shim.display()
            )));
        }
        let gpus = p.gpu.devices();
        let lease = crate::fence::Lease::open(state_dir.path().join("lease"));
        let log_streams = p.logs.max_streams;
        Ok(Manager {
            sh: Arc::new(Shared {
                cfg: p.containers,
                logs_cfg: p.logs,
                driver: p.driver,
                gpu: p.gpu,
                gpus,
                capacity: p.capacity,
                containers_root,
                checkpoints_root,
                notices_root,
                agent_socket: std::sync::OnceLock::new(),
                relay: Default::default(),
                logs_root,
                state: Mutex::new(HashMap::new()),
                closing: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                tokens: p.tokens,
                ended: tokio::sync::Notify::new(),
                state_dir,
                shim,
                boot_id: recovery::boot_id(),
                launching: tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(2, |n| n.get()),
                ),
                log_streams: Arc::new(tokio::sync::Semaphore::new(log_streams)),
                lease,
                ports_freed_at_ms: std::sync::atomic::AtomicU64::new(crate::fence::now_ms()),
                metrics: Arc::default(),
            }),
        })
    }

    /// Resolves when a container has ended since the last call.
    pub async fn container_ended(&self) {
        self.sh.ended.notified().await
    }

    /// The container-token checker (the tracker hands it the RM's key).
    pub fn tokens(&self) -> &crate::tokens::Tokens {
        &self.sh.tokens
    }

    /// The node's lease, renewed by the tracker.
    pub fn lease(&self) -> &crate::fence::Lease {
        &self.sh.lease
    }

    pub fn capacity(&self) -> Capacity {
        self.sh.capacity
    }

    /// What the agent counts and times (served at `/metrics`).
    pub fn metrics(&self) -> Arc<crate::metrics::AgentMetrics> {
        self.sh.metrics.clone()
    }

    pub fn gpus(&self) -> &[GpuInfo] {
        &self.sh.gpus
    }

    pub fn driver_kind(&self) -> driver::DriverKind {
        self.sh.driver.kind()
    }

    pub fn logs_root(&self) -> &Path {
        &self.sh.logs_root
    }

    /// A place among the log reads served at once, or a refusal naming
    /// the bound.
    pub fn log_stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.sh.log_streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted {
                field: "logs",
                reason: format!(
                    "{} log reads are being served on this node, its most (logs.max_streams); try again once one ends",
                    self.sh.logs_cfg.max_streams
                ),
            }
        })
    }

    pub fn logs_config(&self) -> &LogsConfig {
        &self.sh.logs_cfg
    }

    /// Serves its API on the Unix socket `path` too: containers started
    /// from now on are told it (`WEFT_AGENT_SOCKET`, with `WEFT_NODE_ID`).
    pub fn set_agent_socket(&self, path: PathBuf) {
        let _ = self.sh.agent_socket.set(path);
    }

    /// The agent's Unix socket, where it serves one.
    pub fn agent_socket(&self) -> Option<&std::path::Path> {
        self.sh.agent_socket.get().map(PathBuf::as_path)
    }

    /// Passes masters' calls to the RM and their starts on other nodes on,
    /// over its socket (`crate::relay`): containers started from now on
    /// are told (`WEFT_AGENT_RELAY=1`).
    pub fn set_relay(&self) {
        self.sh
            .relay
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `uid` may use the agent's Unix socket: the agent's own user
    /// (its tasks run as it unless they run as their users), or the user
    /// of a container running here (the owner of its work dir). Blocks on
    /// the file system.
    pub fn runs_uid(&self, uid: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        if uid == nix::unistd::geteuid().as_raw() {
            return true;
        }
        self.list(false)
            .iter()
            .filter(|r| !r.is_done())
            .any(|r| std::fs::metadata(&r.work_dir).is_ok_and(|m| m.uid() == uid))
    }

    /// Where tasks' checkpoints live, and how long an application's are
    /// kept once nothing touches them.
    pub fn checkpoints(&self) -> (&Path, Duration) {
        (&self.sh.checkpoints_root, self.sh.cfg.checkpoint_retention)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.sh
            .state
            .lock()
            .expect("state lock poisoned")
            .get(id)
            .cloned()
    }

    pub fn status(&self, id: &str) -> Result<pb::ContainerStatus> {
        self.get(id)
            .map(|c| c.record().to_proto())
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Whether `token` (an application token) is that of the application
    /// container `id` was granted to.
    pub fn owned_by(&self, id: &str, token: &[u8]) -> std::result::Result<(), String> {
        let app = self
            .get(id)
            .map(|c| c.record().application_id)
            .ok_or_else(|| format!("no container {id} on this node"))?;
        self.sh.tokens.owns(token, &app)
    }

    /// Records of every container, running first, then by id.
    pub fn list(&self, include_finished: bool) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .sh
            .state
            .lock()
            .expect("state lock poisoned")
            .values()
            .filter_map(|c| {
                let r = c.record.lock().expect("record lock poisoned");
                (include_finished || !r.is_done()).then(|| r.clone())
            })
            .collect();
        v.sort_by(|a, b| {
            a.is_done()
                .cmp(&b.is_done())
                .then(a.spec.id.cmp(&b.spec.id))
        });
        v
    }

    /// Whether a container given ports ended recently enough (or before
    /// this agent started) that its closing connections may still hold
    /// them: the port scan then looks at every TCP socket, not only the
    /// listening ones.
    pub fn ports_may_linger(&self) -> bool {
        crate::fence::now_ms().saturating_sub(self.sh.ports_freed_at_ms.load(Ordering::SeqCst))
            < PORTS_LINGER_MS
    }

    /// What a heartbeat reports, in one pass under the lock with no record
    /// copied: the status of every container whose id is not in
    /// `acknowledged` (ended ones the RM has stored), running first, then
    /// by id, and what the running ones use. `acknowledged` drops the ids
    /// the agent no longer knows.
    pub fn heartbeat_report(
        &self,
        acknowledged: &mut HashSet<String>,
    ) -> (Vec<pb::ContainerStatus>, pb::NodeUtilization) {
        let st = self.sh.state.lock().expect("state lock poisoned");
        acknowledged.retain(|id| st.contains_key(id));
        let mut used = pb::NodeUtilization::default();
        let mut out: Vec<(bool, pb::ContainerStatus)> = Vec::new();
        for (id, c) in st.iter() {
            let r = c.record.lock().expect("record lock poisoned");
            if !r.is_done() {
                used.vcores_used_milli += r.spec.resources.vcores_milli;
                used.memory_used_bytes += r.memory_bytes;
                used.running_containers += 1;
            }
            if !acknowledged.contains(id) {
                out.push((r.is_done(), r.to_proto()));
            }
        }
        drop(st);
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.container_id.cmp(&b.1.container_id)));
        (out.into_iter().map(|(_, s)| s).collect(), used)
    }

    /// Forgets an ended container (its logs were removed), and its files
    /// in the state directory.
    pub fn forget(&self, id: &str) {
        let mut st = self.sh.state.lock().expect("state lock poisoned");
        if st.get(id).is_some_and(|c| c.record().is_done()) {
            st.remove(id);
            drop(st);
            self.sh.state_dir.remove(id);
        }
    }

    /// Takes over what an earlier agent left (see [`crate::recovery`]):
    /// containers whose shim still runs are supervised again (same pid,
    /// same group and quotas, the rest of their `max_runtime`); those that
    /// ended meanwhile are recorded as they ended; the rest, and groups
    /// without a record, are killed and recorded lost.
    pub async fn recover(&self) -> Recovered {
        let sh = self.sh.clone();
        let found = blocking(move || take_over(&sh)).await;
        let mut out = Recovered::default();
        for f in found {
            let id = f.spec.id.clone();
            let (stop_tx, stop_rx) = mpsc::unbounded_channel();
            let mut record = Record {
                spec: f.spec,
                phase: Phase::Running,
                pid: f.pid,
                started_at: f.started_at,
                finished_at: None,
                memory_bytes: 0,
                memory_peak_bytes: 0,
                cpu_usec: 0,
                gpu_memory_used_bytes: 0,
                gpu_uuids: f.gpu_uuids,
                work_dir: f.work_dir,
                log_dir: f.log_dir,
                group_key: f.group_key,
                application_id: f.application_id,
            };
            let adopt = match f.state {
                Found::Running { pidfd, group } => {
                    // SAFETY: the AsyncFd owns the pidfd from here on.
                    match unsafe { AsyncFd::register(pidfd) } {
                        Ok(pidfd) => Some((pidfd, group)),
                        Err(e) => {
                            // Cannot watch it: it must not run unseen.
                            warn!(container_id = %id, error = %e, "cannot watch a recovered container; killing it");
                            let g = group.clone();
                            blocking(move || {
                                g.kill_all();
                                let _ = g.destroy();
                            })
                            .await;
                            record.phase = Phase::Done(Exit::new(ExitReason::Lost, vec![]));
                            record.finished_at = Some(SystemTime::now());
                            self.sh.metrics.ended(&ExitReason::Lost);
                            None
                        }
                    }
                }
                Found::Ended { exit, at } => {
                    record.phase = Phase::Done(exit);
                    record.finished_at = Some(at);
                    None
                }
            };
            let done = record.is_done();
            let c = Arc::new(Container {
                record: Mutex::new(record),
                stop_tx,
                done: watch::Sender::new(done),
            });
            self.sh
                .state
                .lock()
                .expect("state lock poisoned")
                .insert(id.clone(), c.clone());
            match adopt {
                Some((pidfd, group)) => {
                    let r = c.record();
                    let left = r.spec.resources.max_runtime.map(|max| {
                        let ran = r
                            .started_at
                            .and_then(|t| t.elapsed().ok())
                            .unwrap_or_default();
                        tokio::time::Instant::now() + max.saturating_sub(ran)
                    });
                    info!(container_id = %id, pid = r.pid, "container taken over from an earlier agent");
                    self.sh.tasks.spawn(supervise(
                        self.sh.clone(),
                        c,
                        Waiter::Adopted {
                            pidfd,
                            exit_file: self.sh.state_dir.exit_file(&id),
                        },
                        group,
                        stop_rx,
                        left,
                    ));
                    out.running.push(id);
                }
                None => {
                    let r = c.record();
                    if matches!(&r.phase, Phase::Done(e) if e.reason == ExitReason::Lost) {
                        out.lost.push(id);
                    } else {
                        out.ended.push(id);
                    }
                }
            }
        }
        if !out.ended.is_empty() {
            self.sh.ended.notify_one();
        }
        out.lost.extend(self.recover_leftovers().await);
        out
    }

    /// Kills the processes of containers an earlier agent left behind
    /// without a record (and not already taken over), removes their groups,
    /// and records them as lost. Returns their ids.
    async fn recover_leftovers(&self) -> Vec<String> {
        let sh = self.sh.clone();
        let known: HashSet<String> = self
            .sh
            .state
            .lock()
            .expect("state lock poisoned")
            .keys()
            .cloned()
            .collect();
        let found = blocking(move || {
            let mut found = Vec::new();
            for id in sh.driver.leftovers() {
                if known.contains(&id) {
                    continue;
                }
                let g = sh.driver.open(&id);
                let left = g.kill_all();
                if !left.is_empty() {
                    warn!(container_id = %id, pids = ?left, "leftover processes survived SIGKILL");
                }
                if let Err(e) = g.destroy() {
                    warn!(container_id = %id, error = %e, "could not remove leftover group");
                }
                let _ = std::fs::remove_dir_all(sh.containers_root.join(&id));
                found.push(id);
            }
            found
        })
        .await;
        let now = SystemTime::now();
        for id in &found {
            self.sh.metrics.ended(&ExitReason::Lost);
            warn!(container_id = %id, "container left by an earlier agent: processes killed, reported lost");
            if !validate::container_id_ok(id) {
                continue;
            }
            let record = Record {
                spec: ContainerSpec {
                    id: id.clone(),
                    command: String::new(),
                    args: vec![],
                    env: Default::default(),
                    files: Default::default(),
                    checkpoint_key: String::new(),
                    resources: Default::default(),
                },
                phase: Phase::Done(Exit::new(ExitReason::Lost, vec![])),
                pid: 0,
                started_at: None,
                finished_at: Some(now),
                memory_bytes: 0,
                memory_peak_bytes: 0,
                cpu_usec: 0,
                gpu_memory_used_bytes: 0,
                gpu_uuids: vec![],
                work_dir: self.sh.containers_root.join(id),
                log_dir: self.sh.logs_root.join(id),
                group_key: String::new(),
                application_id: String::new(),
            };
            let (stop_tx, _) = mpsc::unbounded_channel();
            let c = Arc::new(Container {
                record: Mutex::new(record),
                stop_tx,
                done: watch::Sender::new(true),
            });
            self.sh
                .state
                .lock()
                .expect("state lock poisoned")
                .insert(id.clone(), c);
        }
        found
    }

    /// Admits, launches and starts supervising a container.
    pub async fn start(&self, req: pb::StartContainerRequest) -> Result<pb::ContainerStatus> {
        // A caller that goes away mid-call (its connection reset: an RM
        // killed while it launched a master) must not cancel a start
        // halfway, leaving a record forever STARTING and a group nobody
        // removes (found by the fault harness): the start runs to its end
        // on a task of its own, whoever still waits for it.
        use tracing::Instrument;
        // Tracked with the containers' tasks: a shutdown waits for a start
        // in flight (one that creates its group as the agent stops would
        // leave it behind).
        let me = self.clone();
        let started = std::time::Instant::now();
        let r = self
            .sh
            .tasks
            .spawn(async move { me.start_now(req).await }.instrument(tracing::Span::current()))
            .await;
        self.sh
            .metrics
            .start_seconds
            .observe(started.elapsed().as_secs_f64());
        r.map_err(|e| Error::NotReady(format!("the start was interrupted: {e}")))?
    }

    async fn start_now(&self, mut req: pb::StartContainerRequest) -> Result<pb::ContainerStatus> {
        if self.sh.closing.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let token = std::mem::take(&mut req.token);
        let ports = req
            .resources
            .as_ref()
            .map(|r| r.ports.clone())
            .unwrap_or_default();
        let mut spec = validate::start_request(req, self.sh.gpus.len())?;
        // Written once at launch, not kept with the record.
        let files = std::mem::take(&mut spec.files);
        if let Some(why) = self.sh.lease.fenced() {
            return Err(Error::NotReady(format!(
                "the node is fenced: {}",
                crate::model::diagnostic(&why, &[])
            )));
        }
        let grant = self.sh.tokens.check(&token, &spec, &ports)?;
        // Who it runs as (its application's user, where tasks run as theirs).
        let run_as = crate::users::resolve(
            &self.sh.cfg,
            &grant.user,
            &grant.queue,
            self.sh.tokens.node_id(),
        )?;
        let (expires, group_key) = (grant.expires_at_ms, grant.group_key.clone());
        // A port given to it and bound on the node by something else: a
        // transient refusal (the RM hears of the port and gives another).
        crate::ports::check_free(&ports)?;
        let (c, stop_rx) = self.admit(&spec, &grant)?;
        if let Err(e) = self.sh.tokens.spend(&group_key, &spec.id, expires) {
            self.sh
                .state
                .lock()
                .expect("state lock poisoned")
                .remove(&spec.id);
            return Err(e);
        }
        match self.launch(&spec, files, &c, stop_rx, run_as).await {
            Ok(()) => {
                if !ports.is_empty() {
                    let (sh, c) = (self.sh.clone(), c.clone());
                    tokio::spawn(async move {
                        c.wait_done().await;
                        sh.ports_freed_at_ms
                            .store(crate::fence::now_ms(), Ordering::SeqCst);
                    });
                }
                Ok(c.record().to_proto())
            }
            Err(e) => {
                self.sh
                    .state
                    .lock()
                    .expect("state lock poisoned")
                    .remove(&spec.id);
                // Nothing ran: the token may be used again.
                self.sh.tokens.unspend(&group_key, &spec.id);
                Err(e)
            }
        }
    }

    /// Checks the request against what is free and reserves it with a record.
    fn admit(
        &self,
        spec: &ContainerSpec,
        grant: &crate::tokens::Grant,
    ) -> Result<(Arc<Container>, mpsc::UnboundedReceiver<StopRequest>)> {
        let group_key = grant.group_key.as_str();
        let r = &spec.resources;
        let mut st = self.sh.state.lock().expect("state lock poisoned");
        // Under the lock a shutdown takes its list of containers to stop
        // under: a start either is on that list or is refused here.
        if self.sh.closing.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        if let Some(old) = st.get(&spec.id) {
            let rec = old.record();
            // An ended container another RM group granted (see
            // `Record::group_key`): its record, logs and files give way.
            if !(rec.is_done() && !rec.group_key.is_empty() && rec.group_key != group_key) {
                return Err(Error::AlreadyExists(spec.id.clone()));
            }
            warn!(
                container_id = %spec.id,
                "an ended container of another resource-manager group had this id: its record and logs are removed for the new one"
            );
            st.remove(&spec.id);
            self.sh.state_dir.remove(&spec.id);
            // Moved aside at once (the new container's dirs have the same
            // paths), removed off the runtime (logs can be large).
            for dir in [&rec.work_dir, &rec.log_dir] {
                let aside =
                    dir.with_extension(format!("gone-{}", crate::model::millis(SystemTime::now())));
                if std::fs::rename(dir, &aside).is_ok() {
                    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(aside));
                }
            }
        }
        let (mut vcores, mut memory) = (0u64, 0u64);
        // Device -> the container holding it whole, or the shares on it.
        let mut gpu_owner: HashMap<u32, String> = HashMap::new();
        let mut gpu_shared: HashMap<u32, u32> = HashMap::new();
        for c in st.values() {
            let rec = c.record.lock().expect("record lock poisoned");
            if rec.is_done() {
                continue;
            }
            vcores += rec.spec.resources.vcores_milli;
            memory += rec.spec.resources.memory_bytes;
            for &g in &rec.spec.resources.gpu_indices {
                if rec.spec.resources.gpu_share_milli > 0 {
                    *gpu_shared.entry(g).or_default() += rec.spec.resources.gpu_share_milli;
                } else {
                    gpu_owner.insert(g, rec.spec.id.clone());
                }
            }
        }
        let cap = self.sh.capacity;
        let free_v = cap.vcores_milli.saturating_sub(vcores);
        if r.vcores_milli > free_v {
            return Err(Error::ResourceExhausted {
                field: "resources.vcores_milli",
                reason: format!(
                    "asks {} but the node has {free_v} free of {}",
                    r.vcores_milli, cap.vcores_milli
                ),
            });
        }
        let free_m = cap.memory_bytes.saturating_sub(memory);
        if r.memory_bytes > free_m {
            return Err(Error::ResourceExhausted {
                field: "resources.memory_bytes",
                reason: format!(
                    "asks {} but the node has {} free of {}",
                    human_bytes(r.memory_bytes),
                    human_bytes(free_m),
                    human_bytes(cap.memory_bytes)
                ),
            });
        }
        for g in &r.gpu_indices {
            if let Some(owner) = gpu_owner.get(g) {
                return Err(Error::ResourceExhausted {
                    field: "resources.gpu_indices",
                    reason: format!("GPU {g} is already given to container {owner}"),
                });
            }
            let shared = gpu_shared.get(g).copied().unwrap_or(0);
            if r.gpu_share_milli == 0 && shared > 0 {
                return Err(Error::ResourceExhausted {
                    field: "resources.gpu_indices",
                    reason: format!(
                        "GPU {g} is shared ({shared}/1000 in use); it cannot be given whole"
                    ),
                });
            }
            if r.gpu_share_milli > 0 && shared + r.gpu_share_milli > 1000 {
                return Err(Error::ResourceExhausted {
                    field: "resources.gpu_share_milli",
                    reason: format!(
                        "GPU {g} has {}/1000 free, {} asked",
                        1000 - shared,
                        r.gpu_share_milli
                    ),
                });
            }
        }
        let gpu_uuids = r
            .gpu_indices
            .iter()
            .map(|&i| self.sh.gpus[i as usize].uuid.clone())
            .collect();
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let c = Arc::new(Container {
            record: Mutex::new(Record {
                spec: spec.clone(),
                phase: Phase::Starting,
                pid: 0,
                started_at: None,
                finished_at: None,
                memory_bytes: 0,
                memory_peak_bytes: 0,
                cpu_usec: 0,
                gpu_memory_used_bytes: 0,
                gpu_uuids,
                work_dir: self.sh.containers_root.join(&spec.id),
                log_dir: self.sh.logs_root.join(&spec.id),
                group_key: group_key.to_string(),
                application_id: grant.application_id.clone(),
            }),
            stop_tx,
            done: watch::Sender::new(false),
        });
        st.insert(spec.id.clone(), c.clone());
        Ok((c, stop_rx))
    }

    async fn launch(
        &self,
        spec: &ContainerSpec,
        files: std::collections::BTreeMap<String, Vec<u8>>,
        c: &Arc<Container>,
        stop_rx: mpsc::UnboundedReceiver<StopRequest>,
        run_as: Option<crate::users::RunAs>,
    ) -> Result<()> {
        let rec = c.record();
        let limits = Limits {
            memory_bytes: spec.resources.memory_bytes,
            vcores_milli: spec.resources.vcores_milli,
            pids: if spec.resources.pids_limit > 0 {
                spec.resources.pids_limit
            } else {
                self.sh.cfg.default_pids_limit
            },
            denied_devices: self
                .sh
                .gpus
                .iter()
                .filter(|g| !spec.resources.gpu_indices.contains(&g.index))
                .map(|g| (NVIDIA_MAJOR, g.minor))
                .collect(),
        };
        let (sh, id, work_dir, log_dir, owner) = (
            self.sh.clone(),
            spec.id.clone(),
            rec.work_dir.clone(),
            rec.log_dir.clone(),
            run_as.clone(),
        );
        // The task's checkpoints, kept across its reruns: under its
        // application (from its token, so never another's) and its key.
        // One directory per task right under the application's (its key's
        // parts joined by '+', a character keys cannot hold): every
        // directory above a task's is the agent's, so a task cannot swap
        // one for a link to elsewhere.
        let checkpoint = (!spec.checkpoint_key.is_empty()
            && validate::container_id_ok(&rec.application_id))
        .then(|| {
            self.sh
                .checkpoints_root
                .join(&rec.application_id)
                .join(spec.checkpoint_key.replace('/', "+"))
        });
        let notice = self.sh.notices_root.join(&spec.id);
        let checkpoint_dir = checkpoint.clone();
        let notice_file = notice.clone();
        let prepared = blocking(move || -> Result<Arc<dyn Group>> {
            for d in [&work_dir, &log_dir] {
                std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, e))?;
            }
            // Empty until the agent has something to say; the task's to
            // read, the agent's to write.
            std::fs::write(&notice_file, b"")
                .map_err(|e| Error::io("creating", &notice_file, e))?;
            if let Some(who) = &owner {
                crate::users::give(&notice_file, who, 0o600)?;
            }
            if let Some(dir) = &checkpoint_dir {
                std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
                let meta =
                    std::fs::symlink_metadata(dir).map_err(|e| Error::io("reading", dir, e))?;
                if !meta.is_dir() {
                    return Err(Error::invalid(
                        "checkpoint_key",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                if let Some(who) = &owner {
                    crate::users::give(dir, who, 0o700)?;
                }
                let link = work_dir.join("checkpoint");
                std::os::unix::fs::symlink(dir, &link)
                    .map_err(|e| Error::io("linking", &link, e))?;
            }
            // Empty log files now: readable from the start, and the shim
            // appends to them.
            for name in ["stdout", "stderr"] {
                let p = log_dir.join(name);
                std::fs::File::create(&p).map_err(|e| Error::io("creating log", p, e))?;
            }
            // The request's files (plain names, checked): readable by the
            // container's user only.
            for (name, content) in &files {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let p = work_dir.join(name);
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .and_then(|mut f| f.write_all(content))
                    .map_err(|e| Error::io("writing file", &p, e))?;
                if let Some(who) = &owner {
                    crate::users::give(&p, who, 0o600)?;
                }
            }
            // Its user's alone: no other user's task can list, read or
            // write them.
            if let Some(who) = &owner {
                for d in [&work_dir, &log_dir] {
                    crate::users::give(d, who, 0o700)?;
                }
                for name in ["stdout", "stderr"] {
                    crate::users::give(&log_dir.join(name), who, 0o600)?;
                }
            }
            sh.driver.create(&id, &limits)
        })
        .await;
        let group = match prepared {
            Ok(g) => g,
            Err(e) => {
                self.remove_dirs(&rec).await;
                return Err(e);
            }
        };

        let mut env: Vec<(String, String)> = Vec::new();
        if let Ok(path) = std::env::var("PATH") {
            env.push(("PATH".into(), path));
        }
        if let Ok(lang) = std::env::var("LANG") {
            env.push(("LANG".into(), lang));
        }
        env.push(("HOME".into(), rec.work_dir.display().to_string()));
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(who) = &run_as {
            env.push(("USER".into(), who.name.clone()));
            env.push(("LOGNAME".into(), who.name.clone()));
        }
        env.push(("WEFT_CONTAINER_ID".into(), spec.id.clone()));
        env.push(("WEFT_WORK_DIR".into(), rec.work_dir.display().to_string()));
        // Where the agent says why it stops the task early (a preemption),
        // before its SIGTERM.
        env.push(("WEFT_NOTICE_FILE".into(), notice.display().to_string()));
        if let Some(dir) = &checkpoint {
            env.push(("WEFT_CHECKPOINT_DIR".into(), dir.display().to_string()));
        }
        // This node's agent, reachable without a TLS handshake (a master
        // starting tasks on its own node).
        if let Some(sock) = self.sh.agent_socket.get() {
            env.push(("WEFT_AGENT_SOCKET".into(), sock.display().to_string()));
            env.push(("WEFT_NODE_ID".into(), self.sh.tokens.node_id().to_string()));
            if self.sh.relay.load(std::sync::atomic::Ordering::Relaxed) {
                env.push(("WEFT_AGENT_RELAY".into(), "1".into()));
            }
        }
        // With TLS on, a container's clients (its master, rmctl in a task)
        // verify the cluster's servers with the CA this agent trusts.
        if let Some(tls) = weft_common::tls::installed() {
            env.push(("WEFT_TLS_CA".into(), tls.ca_file.display().to_string()));
        }
        // GPU visibility and the scope marker come last: a request cannot widen them.
        env.extend(crate::gpu::visibility_env(&rec.gpu_uuids));
        let marker = driver::scope_marker(&self.sh.cfg.cgroup_parent, &spec.id);
        let (mk, mv) = marker.split_once('=').expect("marker has '='");
        env.push((mk.into(), mv.into()));

        let plan = shim::Plan {
            command: spec.command.clone(),
            args: spec.args.clone(),
            env,
            cwd: rec.work_dir.clone(),
            stdout: rec.log_dir.join("stdout"),
            stderr: rec.log_dir.join("stderr"),
            join: group.join_paths(),
            exit_file: self.sh.state_dir.exit_file(&spec.id),
            lease: Some(self.sh.lease.path().to_path_buf()),
            run_as: run_as.clone(),
        };
        let permit = self.sh.launching.acquire().await.expect("never closed");
        let started = self.start_shim(&plan).await;
        drop(permit);
        let (shim_child, pid) = match started {
            Ok(started) => started,
            Err(e) => {
                let g = group.clone();
                let _ = blocking(move || {
                    g.kill_all();
                    g.destroy()
                })
                .await;
                self.remove_dirs(&rec).await;
                let _ = tokio::fs::remove_file(&plan.exit_file).await;
                return Err(e);
            }
        };
        group.set_leader(pid as i32);
        let started_at = SystemTime::now();
        c.update(|r| {
            r.pid = pid;
            r.started_at = Some(started_at);
            r.phase = Phase::Running;
        });
        // The record the next agent takes the container over from.
        let persisted = recovery::Persisted {
            version: recovery::VERSION,
            id: spec.id.clone(),
            command: spec.command.clone(),
            resources: spec.resources.clone(),
            gpu_uuids: rec.gpu_uuids.clone(),
            pid,
            pid_start: 0,
            shim_pid: shim_child.id().unwrap_or(0),
            shim_start: 0,
            boot_id: self.sh.boot_id.clone(),
            started_at_ms: crate::model::millis(started_at),
            work_dir: rec.work_dir.clone(),
            log_dir: rec.log_dir.clone(),
            group_key: rec.group_key.clone(),
            application_id: rec.application_id.clone(),
        };
        let state_dir = self.sh.state_dir.clone();
        blocking(move || {
            let mut p = persisted;
            p.pid_start = recovery::start_time(p.pid);
            p.shim_start = recovery::start_time(p.shim_pid);
            if let Err(e) = state_dir.write_record(&p) {
                warn!(container_id = %p.id, error = %e, "writing the container's record failed: it will not outlive this agent");
            }
        })
        .await;
        info!(container_id = %spec.id, pid, "container started");
        let deadline = spec
            .resources
            .max_runtime
            .map(|d| tokio::time::Instant::now() + d);
        let (sh, c2) = (self.sh.clone(), c.clone());
        self.sh.tasks.spawn(supervise(
            sh,
            c2,
            Waiter::Child {
                shim: shim_child,
                exit_file: plan.exit_file,
            },
            group,
            stop_rx,
            deadline,
        ));
        Ok(())
    }

    /// Starts the shim with `plan` and waits for the container's pid.
    async fn start_shim(&self, plan: &shim::Plan) -> Result<(tokio::process::Child, u32)> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut child = tokio::process::Command::new(&self.sh.shim)
            .arg(shim::SHIM_ARG)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "starting the container shim {}: {e}",
                    self.sh.shim.display()
                ))
            })?;
        let bytes = serde_json::to_vec(plan).expect("plans encode");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let talk = async move {
            stdin.write_all(&bytes).await?;
            drop(stdin);
            let mut line = String::new();
            tokio::io::BufReader::new(stdout)
                .read_line(&mut line)
                .await?;
            Ok::<_, std::io::Error>(line)
        };
        let answer = match tokio::time::timeout(SHIM_ANSWER, talk).await {
            Ok(Ok(line)) if !line.is_empty() => serde_json::from_str::<shim::Started>(&line)
                .map_err(|e| format!("the container shim answered {line:?}: {e}")),
            Ok(Ok(_)) => Err("the container shim ended without starting the container".into()),
            Ok(Err(e)) => Err(format!("talking to the container shim: {e}")),
            Err(_) => Err(format!(
                "the container shim did not answer within {SHIM_ANSWER:?}"
            )),
        };
        match answer {
            Ok(shim::Started::Pid(pid)) => Ok((child, pid)),
            Ok(shim::Started::Failed {
                unrunnable,
                message,
            }) => {
                let _ = child.wait().await;
                Err(if unrunnable {
                    Error::invalid("command", message)
                } else {
                    Error::FailedPrecondition(message)
                })
            }
            Err(why) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(Error::FailedPrecondition(why))
            }
        }
    }

    async fn remove_dirs(&self, rec: &Record) {
        let _ = tokio::fs::remove_file(self.sh.notices_root.join(&rec.spec.id)).await;
        let _ = tokio::fs::remove_dir_all(&rec.work_dir).await;
        let _ = tokio::fs::remove_dir_all(&rec.log_dir).await;
    }

    /// Asks a container to stop: SIGTERM, `grace` (default from config), SIGKILL.
    pub async fn stop(
        &self,
        id: &str,
        grace: Option<Duration>,
        wait: bool,
    ) -> Result<pb::ContainerStatus> {
        let c = self
            .get(id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        self.request_stop(&c, ExitReason::UserRequested, grace);
        if wait {
            c.wait_done().await;
        }
        Ok(c.record().to_proto())
    }

    /// Preempts a container: its notice file says so (`WEFT_PREEMPTED=1`,
    /// the grace, why), then SIGTERM and, after `grace`, SIGKILL; it ends
    /// as PREEMPTED. A container already stopping goes on as it was.
    pub async fn preempt(&self, id: &str, grace: Duration, why: &str) -> Result<()> {
        let c = self
            .get(id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let rec = c.record();
        if rec.is_done() || rec.phase == Phase::Stopping {
            return Ok(());
        }
        let notice = format!(
            "WEFT_PREEMPTED=1\nWEFT_PREEMPTION_GRACE_MS={}\nWEFT_PREEMPTION_REASON={}\n",
            grace.as_millis(),
            why.replace(['\n', '\r'], " ")
        );
        let path = self.sh.notices_root.join(id);
        if let Err(e) = tokio::fs::write(&path, notice).await {
            warn!(container_id = %id, error = %e, "writing the preemption notice");
        }
        info!(container_id = %id, grace = ?grace, why, "preempting container");
        self.request_stop(&c, ExitReason::Preempted { grace }, Some(grace));
        Ok(())
    }

    fn request_stop(&self, c: &Container, reason: ExitReason, grace: Option<Duration>) {
        if c.record().is_done() {
            return;
        }
        let _ = c.stop_tx.send(StopRequest {
            reason,
            grace: grace.unwrap_or(self.sh.cfg.stop_grace_period),
        });
    }

    /// Stops every container (reason AgentShutdown), waits for them all to end
    /// and removes the agent's parent groups.
    pub async fn shutdown(&self) {
        self.sh.closing.store(true, Ordering::SeqCst);
        let all: Vec<Arc<Container>> = self
            .sh
            .state
            .lock()
            .expect("state lock poisoned")
            .values()
            .cloned()
            .collect();
        for c in &all {
            self.request_stop(c, ExitReason::AgentShutdown, None);
        }
        self.sh.tasks.close();
        self.sh.tasks.wait().await;
        let sh = self.sh.clone();
        blocking(move || {
            // Groups left empty (one whose removal at its container's end
            // found it still busy, a recovered one): removed, or the
            // parent could not be.
            for id in sh.driver.leftovers() {
                let g = sh.driver.open(&id);
                if g.pids().is_empty() {
                    if let Err(e) = g.destroy() {
                        warn!(container_id = %id, error = %e, "removing a container's empty group at shutdown");
                    }
                }
            }
            sh.driver.cleanup()
        })
        .await;
    }
}

/// Copies an ended container's logs to `[logs] aggregate_dir`, if set
/// (a failure is logged: the logs stay here, under retention).
fn aggregate_logs(cfg: &crate::config::LogsConfig, log_dir: &Path, id: &str) {
    let Some(dir) = &cfg.aggregate_dir else {
        return;
    };
    match crate::logs::aggregate(dir, cfg.aggregate_max.as_u64(), log_dir, id) {
        Ok(()) => tracing::debug!(container_id = %id, dir = %dir.display(), "logs aggregated"),
        Err(e) => {
            warn!(container_id = %id, dir = %dir.display(), error = %e, "aggregating the container's logs failed")
        }
    }
}

/// Runs `f` on the blocking pool. A panic there is a bug in the agent and
/// goes on as the caller's; a task the runtime cancelled (it is shutting
/// down, and drops the caller too) never answers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => std::future::pending().await,
    }
}

/// `weft-shim` beside the agent's program, else the agent's program itself
/// (run as `<program> __weft-shim`; see [`shim::run_if_shim`]).
fn default_shim() -> std::io::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("weft-shim");
    Ok(if beside.is_file() { beside } else { me })
}

/// How long a starting shim may take to say the container runs.
const SHIM_ANSWER: Duration = Duration::from_secs(10);

/// What tells the supervisor that the container's process ended, and how.
enum Waiter {
    /// The shim this agent started: it exits as the container did.
    Child {
        shim: tokio::process::Child,
        exit_file: PathBuf,
    },
    /// The shim of a container taken over from an earlier agent (not this
    /// agent's child): its pidfd turns readable when it exits, after it
    /// wrote the exit file.
    Adopted {
        pidfd: AsyncFd<OwnedFd>,
        exit_file: PathBuf,
    },
}

impl Waiter {
    /// Resolves when the container's leading process has ended: how, and
    /// why when the shim ended it (the node's lease ran out). Cancel-safe.
    async fn wait(&mut self) -> std::io::Result<(std::process::ExitStatus, Option<ExitReason>)> {
        match self {
            Waiter::Child { shim, exit_file } => {
                let own = shim.wait().await?;
                // The exit file tells a container's end from the shim's own
                // failure; the shim's status mirrors it otherwise.
                Ok(shim::read_exit(exit_file).map_or((own, None), |e| (e.status(), e.reason())))
            }
            Waiter::Adopted { pidfd, exit_file } => {
                let _ = pidfd.readable().await?;
                shim::read_exit(exit_file)
                    .map(|e| (e.status(), e.reason()))
                    .ok_or_else(|| {
                        std::io::Error::other(
                            "the shim ended without saying how the container ended",
                        )
                    })
            }
        }
    }
}

/// What ends a container's watch.
enum Ending {
    /// The leading process exited on its own.
    Exited(std::process::ExitStatus),
    /// The agent decided to end it: why, after what grace, and the tree's
    /// biggest processes when the decision was made.
    Kill {
        reason: ExitReason,
        grace: Duration,
        top: Vec<ProcessSample>,
    },
}

/// One monitor tick's measurements.
struct Sample {
    memory_bytes: u64,
    memory_peak_bytes: u64,
    cpu_usec: u64,
    oom: bool,
    gpu_used: u64,
    top: Vec<ProcessSample>,
}

/// Measures the group; `top` only when `want_top`.
fn sample(sh: &Shared, group: &dyn Group, spec: &ContainerSpec, want_top: bool) -> Sample {
    let st = group.stats();
    let over_rss = !group.kernel_enforces_memory() && st.memory_bytes > spec.resources.memory_bytes;
    let oom = st.under_oom || st.oom_kills > 0 || over_rss;
    let mut gpu_used = 0;
    // GPU memory is read for every container given a GPU (its figure in
    // the metrics), not only those with a GPU-memory quota.
    let gpus = spec.resources.gpu_memory_bytes > 0 || !spec.resources.gpu_indices.is_empty();
    let need_pids = want_top || oom || gpus;
    let pids = if need_pids { group.pids() } else { Vec::new() };
    if gpus {
        match sh.gpu.process_usage() {
            Ok(usage) => {
                let members: HashSet<u32> = pids.iter().map(|&p| p as u32).collect();
                gpu_used = usage
                    .iter()
                    .filter(|u| members.contains(&u.pid))
                    .map(|u| u.used_bytes)
                    .sum();
            }
            Err(e) => warn!(container_id = %spec.id, error = %e, "reading GPU memory failed"),
        }
    }
    let over_gpu =
        spec.resources.gpu_memory_bytes > 0 && gpu_used > spec.resources.gpu_memory_bytes;
    let top = if want_top || oom || over_gpu {
        procfs::top_processes(&pids, sh.cfg.diagnostic_processes)
    } else {
        Vec::new()
    };
    Sample {
        memory_bytes: st.memory_bytes,
        memory_peak_bytes: st.memory_peak_bytes.max(st.memory_bytes),
        cpu_usec: st.cpu_usec,
        oom,
        gpu_used,
        top,
    }
}

/// Resolves when the group's memory event descriptor (eventfd or inotify)
/// has something to read, after draining it; never without one.
async fn memory_event(fd: &Option<AsyncFd<OwnedFd>>) {
    match fd {
        None => std::future::pending().await,
        Some(fd) => loop {
            let Ok(mut guard) = fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 1024];
            // SAFETY: reads at most buf.len() bytes into buf from a descriptor we own.
            let n =
                unsafe { libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return;
            }
            guard.clear_ready();
        },
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How often a container's memory use is read where only reports need it
/// (the kernel enforces its limit and signals a breach): each heartbeat
/// (1 s by default) then carries a figure at most this old. Reading it
/// every `monitor_interval` (250 ms) cost 4 cgroup reads a second per
/// container: 400 idle containers on one host's 4 agents took a ninth of a
/// core (e2e bench, idle phase).
const USAGE_REFRESH: Duration = Duration::from_secs(1);

/// Watches one container until it ends, then records why and cleans up.
async fn supervise(
    sh: Arc<Shared>,
    c: Arc<Container>,
    mut child: Waiter,
    group: Arc<dyn Group>,
    mut stop_rx: mpsc::UnboundedReceiver<StopRequest>,
    deadline: Option<tokio::time::Instant>,
) {
    let rec = c.record();
    let spec = rec.spec.clone();
    let pid = rec.pid as i32;
    let limit = spec.resources.memory_bytes;
    // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it from here on:
    // it stays open and the same for the AsyncFd's whole life.
    let events = group
        .memory_events()
        .and_then(|fd| unsafe { AsyncFd::register(fd) }.ok());
    // Without memory events, where the kernel kills at the limit, the
    // diagnostic can only show the tree as last sampled.
    let sample_top_each_tick = group.kernel_enforces_memory() && events.is_none();
    // Where the kernel holds the memory limit and says when it is reached,
    // a tick only refreshes the use the heartbeats report: once a
    // [`USAGE_REFRESH`]. Where the agent itself finds a breach by looking
    // (the procfs driver, no memory events, a GPU memory quota), every
    // `monitor_interval`.
    let agent_looks =
        !group.kernel_enforces_memory() || events.is_none() || spec.resources.gpu_memory_bytes > 0;
    let every = if agent_looks {
        sh.cfg.monitor_interval
    } else {
        sh.cfg.monitor_interval.max(USAGE_REFRESH)
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_top: Vec<ProcessSample> = Vec::new();
    let mut peak = 0u64;

    let ending = loop {
        tokio::select! {
            // Memory events first: when the kernel kills a tree at its limit,
            // its snapshot must be taken before the leader's exit is seen.
            biased;
            _ = memory_event(&events) => {
                // The group hit its limit (v1: paused at OOM; v2: reclaiming
                // at memory.max, or already OOM-killed). Snapshot the tree
                // while it is still there.
                let (sh2, g, sp) = (sh.clone(), group.clone(), spec.clone());
                let s = blocking(move || sample(&sh2, g.as_ref(), &sp, true)).await;
                peak = peak.max(s.memory_peak_bytes);
                if !s.top.is_empty() {
                    last_top = s.top;
                }
                if s.oom {
                    break Ending::Kill {
                        reason: ExitReason::OverMemoryQuota { limit, peak: peak.max(limit) },
                        grace: Duration::ZERO,
                        top: last_top.clone(),
                    };
                }
            }
            status = child.wait() => match status {
                Ok((_, Some(reason))) => {
                    break Ending::Kill { reason, grace: Duration::ZERO, top: vec![] };
                }
                Ok((s, None)) => break Ending::Exited(s),
                Err(e) => {
                    warn!(container_id = %spec.id, error = %e, "waiting for the container failed");
                    break Ending::Kill { reason: ExitReason::Lost, grace: Duration::ZERO, top: vec![] };
                }
            },
            _ = sleep_until(deadline) => {
                break Ending::Kill {
                    reason: ExitReason::WallTimeExceeded { limit: spec.resources.max_runtime.unwrap_or_default() },
                    grace: sh.cfg.stop_grace_period,
                    top: vec![],
                };
            }
            Some(req) = stop_rx.recv() => {
                break Ending::Kill { reason: req.reason, grace: req.grace, top: vec![] };
            }
            _ = tick.tick() => {
                let (sh2, g, sp) = (sh.clone(), group.clone(), spec.clone());
                let s = blocking(move || sample(&sh2, g.as_ref(), &sp, sample_top_each_tick)).await;
                peak = peak.max(s.memory_peak_bytes);
                c.update(|r| {
                    r.memory_bytes = s.memory_bytes;
                    r.memory_peak_bytes = peak;
                    r.cpu_usec = r.cpu_usec.max(s.cpu_usec);
                    r.gpu_memory_used_bytes = s.gpu_used;
                });
                if !s.top.is_empty() {
                    last_top = s.top.clone();
                }
                if s.oom {
                    break Ending::Kill {
                        reason: ExitReason::OverMemoryQuota { limit, peak: peak.max(limit) },
                        grace: Duration::ZERO,
                        top: last_top.clone(),
                    };
                }
                let gpu_limit = spec.resources.gpu_memory_bytes;
                if gpu_limit > 0 && s.gpu_used > gpu_limit {
                    break Ending::Kill {
                        reason: ExitReason::OverGpuMemoryQuota { limit: gpu_limit, used: s.gpu_used },
                        grace: sh.cfg.stop_grace_period.min(Duration::from_secs(1)),
                        top: s.top,
                    };
                }
            }
        }
    };

    let ended_at = std::time::Instant::now();
    let (status, mut decided) = match ending {
        Ending::Exited(s) => (Some(s), None),
        Ending::Kill { reason, grace, top } => {
            info!(container_id = %spec.id, reason = ?reason, "stopping container");
            c.update(|r| r.phase = Phase::Stopping);
            let mut status = None;
            if !grace.is_zero() {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
                // Then the group's processes that left the leader's session
                // (once each: a second SIGTERM can cut short the handler
                // the first one started, a checkpoint half written).
                let g = group.clone();
                blocking(move || {
                    let leader = nix::unistd::Pid::from_raw(pid);
                    for p in g.pids() {
                        let p = nix::unistd::Pid::from_raw(p);
                        if nix::unistd::getpgid(Some(p)).ok() != Some(leader) {
                            let _ = nix::sys::signal::kill(p, Signal::SIGTERM);
                        }
                    }
                })
                .await;
                if let Ok(Ok((s, _))) = tokio::time::timeout(grace, child.wait()).await {
                    status = Some(s);
                }
            }
            (status, Some((reason, top)))
        }
    };

    // Whatever is left of the tree goes now: the leader's session, then every
    // pid the group still holds (escaped grandchildren included).
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let g = group.clone();
    let (stats, left) = blocking(move || {
        let stats = g.stats();
        let left = g.kill_all();
        (stats, left)
    })
    .await;
    let status = match status {
        Some(s) => Some(s),
        None => child.wait().await.ok().map(|(s, _)| s),
    };
    if !left.is_empty() {
        warn!(container_id = %spec.id, pids = ?left, "processes survived SIGKILL");
    }
    peak = peak.max(stats.memory_peak_bytes);
    if decided.is_none() && (stats.oom_kills > 0 || stats.under_oom) {
        // The kernel killed (part of) the tree at its limit.
        decided = Some((
            ExitReason::OverMemoryQuota {
                limit,
                peak: peak.max(limit),
            },
            last_top,
        ));
    }
    let exit = match decided {
        Some((reason, top)) => Exit::new(reason, top),
        None => {
            let s = status.expect("the leader exited on its own, so its status was read");
            Exit::new(recovery::reason_of(s), vec![])
        }
    };

    // Every process is gone: report the end now, tidy up after.
    info!(
        container_id = %spec.id,
        exit_status = exit.reason.exit_status(),
        diagnostic = %exit.diagnostic,
        teardown_us = ended_at.elapsed().as_micros() as u64,
        "container ended"
    );
    c.update(|r| {
        r.memory_peak_bytes = peak;
        r.finished_at = Some(SystemTime::now());
        r.phase = Phase::Done(exit.clone());
        sh.metrics.ended(&exit.reason);
        // What started it (its command and environment, tokens among them)
        // is not needed once it ended: the record keeps what reports use,
        // so an agent's memory does not grow with every container it ran.
        r.spec.command = String::new();
        r.spec.args = Vec::new();
        r.spec.env = Default::default();
    });
    c.done.send_replace(true);
    sh.ended.notify_one();
    let (work_dir, keep) = (rec.work_dir.clone(), sh.cfg.keep_work_dirs);
    let notice = sh.notices_root.join(&spec.id);
    let (state_dir, id) = (sh.state_dir.clone(), spec.id.clone());
    let (log_dir, logs) = (rec.log_dir.clone(), sh.logs_cfg.clone());
    blocking(move || {
        // Before the end is written: an agent that dies in between decides
        // the end again after its restart, and copies them then.
        aggregate_logs(&logs, &log_dir, &id);
        // Kept for a next agent until the container is forgotten: an agent
        // that dies before the RM stored the end still reports it.
        if let Err(e) = state_dir.write_end(&id, &exit) {
            warn!(container_id = %id, error = %e, "writing the container's end failed");
        }
        if let Err(e) = group.destroy() {
            warn!(error = %e, "removing the container's group failed");
        }
        let _ = std::fs::remove_file(&notice);
        if !keep {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
    })
    .await;
}

/// What an agent start found of its predecessor's containers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Still running: supervised again.
    pub running: Vec<String>,
    /// Ended while no agent watched (or before the last agent reported
    /// them): recorded as they ended.
    pub ended: Vec<String>,
    /// Killed and recorded lost: no record, or no shim left to tell how
    /// they end.
    pub lost: Vec<String>,
}

/// One container of the state directory, as found.
struct FoundContainer {
    spec: ContainerSpec,
    pid: u32,
    started_at: Option<SystemTime>,
    gpu_uuids: Vec<String>,
    work_dir: PathBuf,
    log_dir: PathBuf,
    group_key: String,
    application_id: String,
    state: Found,
}

enum Found {
    /// Its shim runs: watch it again.
    Running {
        pidfd: OwnedFd,
        group: Arc<dyn Group>,
    },
    Ended {
        exit: Exit,
        at: SystemTime,
    },
}

/// Reads the state directory and decides, per container, whether it is
/// taken over, ended or lost (see [`Manager::recover`]). Blocks.
fn take_over(sh: &Shared) -> Vec<FoundContainer> {
    let dir = &sh.state_dir;
    let mut out = Vec::new();
    for read in dir.records() {
        let p = match read {
            Ok(p) => p,
            Err((path, why)) => {
                // Its group, if any, is killed as a leftover.
                warn!(file = %path.display(), reason = %why, "unreadable container record removed");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        if !validate::container_id_ok(&p.id) {
            warn!(container_id = %p.id, "container record with an invalid id removed");
            dir.remove(&p.id);
            continue;
        }
        let mtime = |f: &Path| {
            std::fs::metadata(f)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now())
        };
        let found = |state| FoundContainer {
            spec: p.spec(),
            pid: p.pid,
            started_at: Some(p.started_at()),
            gpu_uuids: p.gpu_uuids.clone(),
            work_dir: p.work_dir.clone(),
            log_dir: p.log_dir.clone(),
            group_key: p.group_key.clone(),
            application_id: p.application_id.clone(),
            state,
        };
        // Ended and decided by an earlier agent (its groups are gone).
        if let Some(exit) = dir.read_end(&p.id) {
            out.push(found(Found::Ended {
                at: mtime(&dir.end_file(&p.id)),
                exit,
            }));
            continue;
        }
        let group = sh.driver.open(&p.id);
        group.set_leader(p.pid as i32);
        // Frozen only inside a kill: the agent before died killing it.
        // Finish the kill (thawed, it could go on running what the first
        // SIGKILL missed) and say so.
        let frozen = group.thaw();
        if frozen {
            warn!(container_id = %p.id, "found frozen: an earlier agent died while killing it; finishing the kill");
        }
        if !frozen && p.boot_id == sh.boot_id && recovery::alive(p.shim_pid, p.shim_start) {
            // The pidfd first, then the check again: the pid cannot be
            // reused in between without the pidfd seeing the end.
            if let Ok(pidfd) = recovery::pidfd(p.shim_pid) {
                if recovery::alive(p.shim_pid, p.shim_start) {
                    out.push(found(Found::Running { pidfd, group }));
                    continue;
                }
            }
        }
        // Not running: how it ended, if the shim could say.
        let stats = group.stats();
        let left = group.kill_all();
        if !left.is_empty() {
            warn!(container_id = %p.id, pids = ?left, "processes of a recovered container survived SIGKILL");
        }
        if let Err(e) = group.destroy() {
            warn!(container_id = %p.id, error = %e, "could not remove a recovered container's group");
        }
        let _ = std::fs::remove_file(sh.notices_root.join(&p.id));
        if !sh.cfg.keep_work_dirs {
            let _ = std::fs::remove_dir_all(&p.work_dir);
        }
        let exit_file = dir.exit_file(&p.id);
        let (exit, at) = match shim::read_exit(&exit_file) {
            _ if frozen => {
                let mut exit = Exit::new(ExitReason::Lost, vec![]);
                exit.diagnostic = "lost: found frozen when the node agent started (the previous agent died while killing it); the kill was finished".into();
                (exit, SystemTime::now())
            }
            Some(e) => {
                let reason = if let Some(fenced) = e.reason() {
                    fenced
                } else if stats.oom_kills > 0 || stats.under_oom {
                    ExitReason::OverMemoryQuota {
                        limit: p.resources.memory_bytes,
                        peak: stats.memory_peak_bytes.max(p.resources.memory_bytes),
                    }
                } else {
                    recovery::reason_of(e.status())
                };
                (Exit::new(reason, vec![]), mtime(&exit_file))
            }
            None => {
                warn!(container_id = %p.id, "a recovered container's shim is gone without saying how it ended: reported lost");
                (Exit::new(ExitReason::Lost, vec![]), SystemTime::now())
            }
        };
        aggregate_logs(&sh.logs_cfg, &p.log_dir, &p.id);
        if let Err(e) = dir.write_end(&p.id, &exit) {
            warn!(container_id = %p.id, error = %e, "writing the container's end failed");
        }
        // Decided by this agent (one an earlier agent decided was counted
        // by it).
        sh.metrics.ended(&exit.reason);
        out.push(found(Found::Ended { exit, at }));
    }
    out
}
