//! Runs a job spec as an application master: stages in `after` order, each
//! stage's tasks asked for, started on their granted nodes with the `WEFT_*`
//! variables (and `TF_CONFIG` or the torch variables for gang stages, which
//! start only once every member has a container), failures retried up to
//! `max_retries`, and the job finished SUCCEEDED or FAILED with the first
//! failing task's reason.
//!
//! A service's stages (`replicas`) are kept running: each replica's health
//! is checked as its stage says, one that ends or turns unhealthy is
//! replaced after its backoff (more restarts than `restart.limit` within
//! `restart.window` fail the job), the healthy ones are reported to the RM
//! as the service's endpoints with every call, and the replica counts the
//! RM hands back (`rmctl app scale`) are followed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use weft_proto::v1 as pb;

use crate::client::{NodeClients, RmAmClient};
use weft_spec::{Framework, JobSpec, PlacementSpec, ResourcesSpec};

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting,
    Asking,
    Allocated,
    Running,
    Succeeded,
    Failed(String),
    /// A service's replica that ended: asked for again from this time.
    Backoff(Instant),
}

#[derive(Debug, Clone)]
struct Task {
    stage: usize,
    role: Option<String>,
    index: u32,
    ask_id: String,
    state: State,
    alloc: Option<pb::Allocation>,
    /// A service's replica: passing its health check now.
    healthy: bool,
    /// ... at least once since it started.
    ever_healthy: bool,
    /// Failed checks in a row.
    fails: u32,
    /// When it started running (or was adopted).
    started: Option<Instant>,
    /// When its next check is due.
    next_check: Option<Instant>,
    /// Restarts since it last ran for a while (its backoff doubles with each).
    restarts: u32,
}

impl Task {
    fn new(stage: usize, role: Option<String>, index: u32, ask_id: String) -> Task {
        Task {
            stage,
            role,
            index,
            ask_id,
            state: State::Waiting,
            alloc: None,
            healthy: false,
            ever_healthy: false,
            fails: 0,
            started: None,
            next_check: None,
            restarts: 0,
        }
    }
}

/// Outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub status: pb::FinalStatus,
    pub diagnostics: String,
}

pub struct Runner {
    pub app: String,
    pub attempt: u32,
    pub spec: JobSpec,
    rm: RmAmClient,
    tasks: Vec<Task>,
    /// Failures so far per stage (a gang's restarts count once per restart).
    failures: Vec<u32>,
    /// Containers on unreachable nodes, to release with the next call.
    unreachable: Vec<String>,
    /// Connections to node agents.
    nodes: NodeClients,
    /// A service's restarts per stage within its restart window.
    restart_log: Vec<VecDeque<Instant>>,
    /// Health checks in flight: the container checked, and how it went.
    checks: tokio::task::JoinSet<(String, Result<(), String>)>,
    /// Containers whose check is in flight.
    checking: BTreeSet<String>,
}

/// Container starts in flight at once.
const START_CONCURRENCY: usize = 32;

/// How long an Allocate call may wait for news (ms).
const LONG_POLL_MS: u64 = 5000;

/// exit status of a memory-quota kill (weft_proto::exit_codes::OVER_MEMORY_QUOTA).
const OVER_MEMORY: i32 = weft_proto::exit_codes::OVER_MEMORY_QUOTA;

impl Runner {
    /// `token`: this attempt's application token.
    pub fn new(app: String, attempt: u32, spec: JobSpec, rm: RmAmClient) -> Runner {
        let mut tasks = Vec::new();
        for (si, s) in spec.stages.iter().enumerate() {
            match &s.roles {
                Some(roles) => {
                    for (role, r) in roles {
                        for i in 0..r.instances {
                            // One ask per task: a later attempt tells
                            // which task a container ran from its ask id.
                            tasks.push(Task::new(
                                si,
                                Some(role.clone()),
                                i,
                                format!("{}.{role}/{i}", s.name),
                            ));
                        }
                    }
                }
                None => {
                    for i in 0..s.replicas.or(s.instances).unwrap_or(1) {
                        tasks.push(Task::new(si, None, i, format!("{}/{i}", s.name)));
                    }
                }
            }
        }
        let n = spec.stages.len();
        Runner {
            app,
            attempt,
            spec,
            rm,
            tasks,
            failures: vec![0; n],
            unreachable: Vec::new(),
            nodes: NodeClients::default(),
            restart_log: vec![VecDeque::new(); n],
            checks: tokio::task::JoinSet::new(),
            checking: BTreeSet::new(),
        }
    }

    fn is_service(&self, t: &Task) -> bool {
        self.spec.stages[t.stage].is_service()
    }

    fn has_services(&self) -> bool {
        self.spec.stages.iter().any(|s| s.is_service())
    }

    fn resources_of(&self, t: &Task) -> &ResourcesSpec {
        let s = &self.spec.stages[t.stage];
        match (&t.role, &s.roles) {
            (Some(r), Some(roles)) => &roles[r].resources,
            _ => s
                .resources
                .as_ref()
                .expect("validated: instances come with resources"),
        }
    }

    /// A batch stage: every task succeeded. A service's stage: it has
    /// replicas and all of them are healthy (stages `after` it start then).
    fn stage_done(&self, si: usize) -> bool {
        let mut of = self.tasks.iter().filter(|t| t.stage == si).peekable();
        if self.spec.stages[si].is_service() {
            of.peek().is_some() && of.all(|t| t.state == State::Running && t.healthy)
        } else {
            of.all(|t| t.state == State::Succeeded)
        }
    }

    /// Runs the job to its end and tells the RM.
    pub async fn run(mut self) -> Result<Finished, tonic::Status> {
        let reg = self.rm.register(&self.app, self.attempt).await?;
        let mut releases = Vec::new();
        for (stage, n) in &reg.replicas {
            self.scale(stage, *n, &mut releases);
        }
        releases.extend(self.adopt(reg));
        info!(app = %self.app, attempt = self.attempt, tasks = self.tasks.len(), "application master registered");
        loop {
            // Stages whose dependencies all succeeded start asking.
            for si in 0..self.spec.stages.len() {
                let ready = self.spec.stages[si].after.iter().all(|a| {
                    self.spec
                        .stages
                        .iter()
                        .position(|s| &s.name == a)
                        .is_some_and(|j| self.stage_done(j))
                });
                if ready {
                    for t in self
                        .tasks
                        .iter_mut()
                        .filter(|t| t.stage == si && t.state == State::Waiting)
                    {
                        t.state = State::Asking;
                    }
                }
            }
            if let Some(reason) = self.tasks.iter().find_map(|t| match &t.state {
                State::Failed(r) => Some(r.clone()),
                _ => None,
            }) {
                return self.finish(pb::FinalStatus::Failed, &reason).await;
            }
            // A service scaled to no replicas stays, to be scaled up again.
            let emptied = self
                .spec
                .stages
                .iter()
                .enumerate()
                .any(|(si, s)| s.is_service() && !self.tasks.iter().any(|t| t.stage == si));
            if !emptied && self.tasks.iter().all(|t| t.state == State::Succeeded) {
                return self
                    .finish(pb::FinalStatus::Succeeded, "all stages succeeded")
                    .await;
            }
            let services = self.has_services();
            if services {
                self.tend(&mut releases);
            }
            let resp = self
                .rm
                .allocate(pb::AllocateRequest {
                    application_id: self.app.clone(),
                    attempt: self.attempt,
                    asks: self.asks(),
                    releases: std::mem::take(&mut releases),
                    progress: self.progress(),
                    stages: self.stage_progress(),
                    // A long poll: the answer comes as soon as an
                    // allocation or an end does; a master with nothing to
                    // hear calls every few seconds, not every second (the
                    // RM caps the wait within its masters' expiry).
                    wait_ms: if services {
                        self.service_poll().as_millis() as u64
                    } else {
                        LONG_POLL_MS
                    },
                    endpoints: if services {
                        self.endpoints()
                    } else {
                        Vec::new()
                    },
                    reports_endpoints: services,
                    ..Default::default()
                })
                .await?;
            for (stage, n) in &resp.replicas {
                self.scale(stage, *n, &mut releases);
            }
            for a in resp.allocations {
                // A new leader re-sends allocations it cannot know were
                // delivered: the ones this master already holds are kept.
                if self.tasks.iter().any(|t| {
                    t.alloc
                        .as_ref()
                        .is_some_and(|x| x.container_id == a.container_id)
                }) {
                    continue;
                }
                match self
                    .tasks
                    .iter_mut()
                    .find(|t| t.state == State::Asking && t.ask_id == a.ask_id)
                {
                    Some(t) => {
                        t.alloc = Some(a);
                        t.state = State::Allocated;
                    }
                    None => releases.push(a.container_id),
                }
            }
            self.start_ready().await;
            releases.append(&mut self.unreachable);
            for c in resp.completed {
                self.completed(&c, &mut releases);
            }
        }
    }

    async fn finish(
        mut self,
        status: pb::FinalStatus,
        diagnostics: &str,
    ) -> Result<Finished, tonic::Status> {
        // Nothing outlives the job.
        let live: Vec<String> = self
            .tasks
            .iter()
            .filter(|t| matches!(t.state, State::Allocated | State::Running))
            .filter_map(|t| t.alloc.as_ref().map(|a| a.container_id.clone()))
            .collect();
        if !live.is_empty() {
            self.rm
                .allocate(pb::AllocateRequest {
                    application_id: self.app.clone(),
                    attempt: self.attempt,
                    releases: live,
                    ..Default::default()
                })
                .await?;
        }
        let stages = self.stage_progress();
        self.rm
            .finish(&self.app, self.attempt, status, diagnostics, stages)
            .await?;
        info!(app = %self.app, ?status, diagnostics, "application finished");
        Ok(Finished {
            status,
            diagnostics: diagnostics.to_string(),
        })
    }

    /// Takes over what earlier attempts did: tasks whose container
    /// succeeded are done, running ones are adopted (a gang only when all its
    /// members run or are done; else its runners are released and the gang
    /// starts again). Returns the containers to release.
    fn adopt(&mut self, reg: pb::RegisterApplicationMasterResponse) -> Vec<String> {
        let mut releases = Vec::new();
        for a in reg.succeeded_containers {
            if let Some(t) = self
                .tasks
                .iter_mut()
                .find(|t| t.ask_id == a.ask_id && t.state == State::Waiting)
            {
                t.state = State::Succeeded;
            }
        }
        for a in reg.running_containers {
            match self
                .tasks
                .iter_mut()
                .find(|t| t.ask_id == a.ask_id && t.state == State::Waiting)
            {
                Some(t) => {
                    t.state = State::Running;
                    t.alloc = Some(a);
                    // A service's replica is checked again from now (its
                    // grace too); without a check, running is healthy.
                    t.started = Some(Instant::now());
                    t.healthy = self.spec.stages[t.stage].health.is_none();
                    t.ever_healthy = t.healthy;
                }
                None => releases.push(a.container_id),
            }
        }
        for si in 0..self.spec.stages.len() {
            let members = self.tasks.iter().filter(|t| t.stage == si);
            let whole = members
                .clone()
                .all(|t| matches!(t.state, State::Running | State::Succeeded));
            if self.spec.stages[si].gang && !whole {
                for t in self.tasks.iter_mut().filter(|t| t.stage == si) {
                    if let (State::Running, Some(a)) = (&t.state, &t.alloc) {
                        releases.push(a.container_id.clone());
                    }
                    t.state = State::Waiting;
                    t.alloc = None;
                }
            }
        }
        let kept = self
            .tasks
            .iter()
            .filter(|t| t.state != State::Waiting)
            .count();
        if kept > 0 {
            info!(
                app = %self.app,
                attempt = self.attempt,
                done = self.tasks.iter().filter(|t| t.state == State::Succeeded).count(),
                running = self.tasks.iter().filter(|t| t.state == State::Running).count(),
                released = releases.len(),
                "took over the previous attempt's tasks"
            );
        }
        releases
    }

    /// Tasks done, running and failed per stage.
    fn stage_progress(&self) -> Vec<pb::StageProgress> {
        self.spec
            .stages
            .iter()
            .enumerate()
            .map(|(si, s)| {
                let of = |f: &dyn Fn(&State) -> bool| {
                    self.tasks
                        .iter()
                        .filter(|t| t.stage == si && f(&t.state))
                        .count() as u32
                };
                pb::StageProgress {
                    name: s.name.clone(),
                    // A service's: its healthy replicas.
                    done: if s.is_service() {
                        self.tasks
                            .iter()
                            .filter(|t| t.stage == si && t.state == State::Running && t.healthy)
                            .count() as u32
                    } else {
                        of(&|st| *st == State::Succeeded)
                    },
                    total: of(&|_| true),
                    running: of(&|st| *st == State::Running),
                    failed: self.failures[si],
                }
            })
            .collect()
    }

    fn progress(&self) -> f32 {
        let done = self
            .tasks
            .iter()
            .filter(|t| {
                t.state == State::Succeeded
                    || (t.state == State::Running && t.healthy && self.is_service(t))
            })
            .count();
        done as f32 / self.tasks.len().max(1) as f32
    }

    /// Outstanding asks (absolute counts), grouped by ask id.
    fn asks(&self) -> Vec<pb::ResourceAsk> {
        let mut by: BTreeMap<&str, (u32, &Task)> = BTreeMap::new();
        for t in self.tasks.iter().filter(|t| t.state == State::Asking) {
            by.entry(&t.ask_id).or_insert((0, t)).0 += 1;
        }
        by.into_iter()
            .map(|(id, (count, t))| {
                let s = &self.spec.stages[t.stage];
                let r = self.resources_of(t);
                let (whole, share) = r.gpu_split();
                pb::ResourceAsk {
                    ask_id: id.to_string(),
                    count,
                    resources: Some(pb::Resources {
                        vcores_milli: r.vcores_milli(),
                        memory_bytes: r.memory.as_u64(),
                        gpus: whole,
                        gpu_share_milli: share,
                        gpu_memory_bytes: r.gpu_memory.map_or(0, |m| m.as_u64()),
                    }),
                    priority: self.spec.priority,
                    node_labels: r.node_label_expr(),
                    gpu_model: r.gpu_model.clone().unwrap_or_default(),
                    gpu_min_memory_bytes: r.gpu_min_memory.map_or(0, |m| m.as_u64()),
                    gang_id: if s.gang {
                        format!("{}#{}", s.name, self.failures[t.stage])
                    } else {
                        String::new()
                    },
                    placement: match s.placement() {
                        PlacementSpec::Pack => pb::PlacementPolicy::Pack as i32,
                        PlacementSpec::Spread => pb::PlacementPolicy::Spread as i32,
                    },
                    ports: ports_asked(s),
                }
            })
            .collect()
    }

    /// Starts allocated tasks: at once, or for a gang once all members have
    /// a container, with the cluster layout.
    async fn start_ready(&mut self) {
        use futures::StreamExt;
        let mut starts = Vec::new();
        for si in 0..self.spec.stages.len() {
            let gang = self.spec.stages[si].gang;
            let members: Vec<usize> = (0..self.tasks.len())
                .filter(|&i| self.tasks[i].stage == si)
                .collect();
            let allocated: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| self.tasks[i].state == State::Allocated)
                .collect();
            if allocated.is_empty() || (gang && allocated.len() != members.len()) {
                continue;
            }
            let layout = if gang {
                self.layout(&members)
            } else {
                BTreeMap::new()
            };
            for i in allocated {
                let env = self.env(i, &layout);
                let t = &self.tasks[i];
                let s = &self.spec.stages[t.stage];
                let a = t.alloc.clone().expect("allocated tasks have an allocation");
                let command = match (&t.role, &s.roles) {
                    (Some(r), Some(roles)) => roles[r]
                        .command
                        .clone()
                        .unwrap_or_else(|| s.command.clone()),
                    _ => s.command.clone(),
                };
                let req = pb::StartContainerRequest {
                    container_id: a.container_id.clone(),
                    command: "sh".into(),
                    args: vec!["-c".into(), command],
                    env: env.into_iter().collect(),
                    resources: Some(pb::ContainerResources {
                        vcores_milli: a.resources.map_or(0, |r| r.vcores_milli),
                        memory_bytes: a.resources.map_or(0, |r| r.memory_bytes),
                        pids_limit: 0,
                        gpu_indices: a.gpu_indices.clone(),
                        gpu_memory_bytes: a.gpu_memory_bytes,
                        ports: a.ports.clone(),
                        max_runtime_ms: s.max_runtime.map_or(0, |d| d.as_millis() as u64),
                        gpu_share_milli: a.gpu_share_milli,
                    }),
                    token: a.container_token.clone(),
                    files: Default::default(),
                };
                starts.push((i, a, req));
            }
        }
        // Side by side, a bounded number at a time, over one connection per node.
        let nodes = &self.nodes;
        let results: Vec<_> = futures::stream::iter(starts)
            .map(|(i, a, req)| async move {
                let started = match nodes.get(&a.node_address) {
                    Ok(mut c) => c.start_container(req).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                (i, a, started)
            })
            .buffer_unordered(START_CONCURRENCY)
            .collect()
            .await;
        // Gang stages one of whose members could not start (transiently):
        // the whole gang starts again, together, without using a retry.
        let mut regang = std::collections::BTreeSet::new();
        for (i, a, started) in results {
            let t = &mut self.tasks[i];
            match started {
                Ok(()) => {
                    t.state = State::Running;
                    let now = Instant::now();
                    t.started = Some(now);
                    t.next_check = Some(now);
                    // Without a health check, running is healthy.
                    t.healthy = self.spec.stages[t.stage].health.is_none();
                    t.ever_healthy = t.healthy;
                    t.fails = 0;
                }
                // The node is unreachable (it may be dying), or still busy
                // with containers the RM already counts as ended: give the
                // container back and ask again; not the task's fault.
                Err(e) if weft_common::codes::start_refused_transiently(&e) => {
                    warn!(container = %a.container_id, node = %a.node_id, error = %e.message(), "node unreachable; asking again");
                    self.unreachable.push(a.container_id.clone());
                    t.state = State::Asking;
                    t.alloc = None;
                    if self.spec.stages[t.stage].gang {
                        regang.insert(t.stage);
                    }
                }
                Err(e) if self.spec.stages[t.stage].is_service() => {
                    warn!(container = %a.container_id, error = %e.message(), "starting a replica failed");
                    let reason = format!(
                        "stage {} replica {}: could not start on {}: {}",
                        self.spec.stages[t.stage].name,
                        t.index,
                        a.node_id,
                        e.message()
                    );
                    self.replica_ended(i, reason, true);
                }
                Err(e) => {
                    warn!(container = %a.container_id, error = %e.message(), "starting a task failed");
                    t.state = State::Failed(format!(
                        "stage {} task {}: could not start on {}: {}",
                        self.spec.stages[t.stage].name,
                        t.index,
                        a.node_id,
                        e.message()
                    ));
                }
            }
        }
        for si in regang {
            warn!(stage = %self.spec.stages[si].name, "a gang member could not start; starting the gang again");
            for t in self.tasks.iter_mut().filter(|t| t.stage == si) {
                if let (State::Running | State::Allocated, Some(a)) = (&t.state, &t.alloc) {
                    self.unreachable.push(a.container_id.clone());
                }
                t.state = State::Asking;
                t.alloc = None;
            }
        }
    }

    /// Host and port each member of a gang listens on.
    fn layout(&self, members: &[usize]) -> BTreeMap<usize, String> {
        members
            .iter()
            .map(|&i| {
                let a = self.tasks[i]
                    .alloc
                    .as_ref()
                    .expect("gang members are all allocated");
                let host = a
                    .node_address
                    .rsplit_once(':')
                    .map_or(a.node_address.as_str(), |(h, _)| h);
                // The gang's port: the first the RM gave this container on
                // its node (free there, and no other container's).
                let port = a.ports.first().copied().unwrap_or_default();
                (i, format!("{host}:{port}"))
            })
            .collect()
    }

    fn env(&self, i: usize, layout: &BTreeMap<usize, String>) -> BTreeMap<String, String> {
        let t = &self.tasks[i];
        let s = &self.spec.stages[t.stage];
        let a = t.alloc.as_ref().expect("starting tasks have an allocation");
        let mut env = s.env.clone();
        env.insert("WEFT_APP_ID".into(), self.app.clone());
        env.insert("WEFT_ATTEMPT".into(), self.attempt.to_string());
        env.insert("WEFT_STAGE".into(), s.name.clone());
        env.insert("WEFT_ROLE".into(), t.role.clone().unwrap_or_default());
        env.insert("WEFT_TASK_INDEX".into(), t.index.to_string());
        env.insert("WEFT_CONTAINER_ID".into(), a.container_id.clone());
        // Ports: the gang's own first (its address in the layout), then
        // the stage's named ones in order.
        let named = a.ports.iter().skip(s.gang as usize);
        for (name, port) in s.ports.iter().zip(named) {
            env.insert(
                format!("WEFT_PORT_{}", name.to_uppercase()),
                port.to_string(),
            );
        }
        if let Some(p) = a.ports.first() {
            env.insert("WEFT_PORT".into(), p.to_string());
        }
        if layout.is_empty() {
            return env;
        }
        let members: Vec<usize> = layout.keys().copied().collect();
        match s.framework {
            Framework::Tensorflow => {
                let mut cluster: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut ordered = members.clone();
                ordered.sort_by_key(|&m| (self.tasks[m].role.clone(), self.tasks[m].index));
                for m in ordered {
                    let role = self.tasks[m]
                        .role
                        .clone()
                        .unwrap_or_else(|| "worker".into());
                    cluster.entry(role).or_default().push(layout[&m].clone());
                }
                let tf = serde_json::json!({
                    "cluster": cluster,
                    "task": {"type": t.role.clone().unwrap_or_else(|| "worker".into()), "index": t.index},
                });
                env.insert("TF_CONFIG".into(), tf.to_string());
            }
            Framework::Pytorch | Framework::None => {
                // Rank 0 is the master role's first task (or the first task).
                let mut ordered = members.clone();
                ordered.sort_by_key(|&m| {
                    (
                        self.tasks[m].role.as_deref() != Some("master"),
                        self.tasks[m].role.clone(),
                        self.tasks[m].index,
                    )
                });
                let rank = ordered
                    .iter()
                    .position(|&m| m == i)
                    .expect("a member of its own gang");
                let master = &layout[&ordered[0]];
                let (addr, port) = master
                    .rsplit_once(':')
                    .unwrap_or((master.as_str(), "29500"));
                env.insert("MASTER_ADDR".into(), addr.to_string());
                env.insert("MASTER_PORT".into(), port.to_string());
                env.insert("WORLD_SIZE".into(), ordered.len().to_string());
                env.insert("RANK".into(), rank.to_string());
                env.insert("LOCAL_RANK".into(), "0".into());
            }
        }
        env
    }

    /// How long a service's master's Allocate call may wait: short
    /// enough to act on checks and backoffs in time.
    fn service_poll(&self) -> Duration {
        self.spec
            .stages
            .iter()
            .filter_map(|s| s.health.as_ref().map(|h| h.interval))
            .chain([SERVICE_POLL])
            .min()
            .unwrap_or(SERVICE_POLL)
    }

    /// A service's care between calls: the checks that came back, the
    /// checks now due, the replicas whose backoff is over.
    fn tend(&mut self, releases: &mut Vec<String>) {
        while let Some(done) = self.checks.try_join_next() {
            let Ok((container, result)) = done else {
                continue; // a check that panicked: the next one is due anyway
            };
            self.checking.remove(&container);
            self.checked(&container, result, releases);
        }
        let now = Instant::now();
        for t in self.tasks.iter_mut() {
            if matches!(t.state, State::Backoff(at) if at <= now) {
                t.state = State::Asking;
            }
        }
        for t in &mut self.tasks {
            let s = &self.spec.stages[t.stage];
            let (Some(h), State::Running, Some(a)) = (&s.health, &t.state, &t.alloc) else {
                continue;
            };
            if t.next_check.is_some_and(|n| n > now) || self.checking.contains(&a.container_id) {
                continue;
            }
            t.next_check = Some(now + h.interval);
            let target = crate::health::Target {
                host: host_of(&a.node_address).to_string(),
                ports: s
                    .ports
                    .iter()
                    .cloned()
                    .zip(a.ports.iter().copied())
                    .collect(),
            };
            let (h, id) = (h.clone(), a.container_id.clone());
            self.checking.insert(id.clone());
            self.checks.spawn(async move {
                let r = crate::health::check(&h, &target).await;
                (id, r)
            });
        }
    }

    /// A check of `container` came back.
    fn checked(&mut self, container: &str, result: Result<(), String>, releases: &mut Vec<String>) {
        let Some(i) = self.tasks.iter().position(|t| {
            t.state == State::Running
                && t.alloc
                    .as_ref()
                    .is_some_and(|a| a.container_id == container)
        }) else {
            return; // it ended or was replaced meanwhile
        };
        let h = self.spec.stages[self.tasks[i].stage]
            .health
            .clone()
            .expect("checked replicas have a health check");
        let t = &mut self.tasks[i];
        match result {
            Ok(()) => {
                if !t.healthy {
                    info!(app = %self.app, replica = %t.ask_id, container, "replica healthy");
                }
                t.healthy = true;
                t.ever_healthy = true;
                t.fails = 0;
            }
            Err(why) => {
                // Failing while it starts (never healthy yet, within its
                // grace) does not count.
                if !t.ever_healthy && t.started.is_some_and(|s| s.elapsed() < h.grace) {
                    return;
                }
                t.fails += 1;
                if t.fails < h.failures {
                    warn!(app = %self.app, replica = %t.ask_id, container, fails = t.fails, %why, "health check failed");
                    return;
                }
                t.healthy = false;
                releases.push(container.to_string());
                let reason = format!(
                    "stage {} replica {}: unhealthy ({} failed checks in a row; the last: {why})",
                    self.spec.stages[t.stage].name, t.index, t.fails
                );
                self.replica_ended(i, reason, true);
            }
        }
    }

    /// A service's replica whose container ended.
    fn replica_completed(&mut self, i: usize, c: &pb::ContainerStatus) {
        let t = &self.tasks[i];
        let s = &self.spec.stages[t.stage];
        let exit = c.exit.clone().unwrap_or_default();
        if c.state() == pb::ContainerState::Succeeded
            && s.restart().policy == weft_spec::RestartPolicy::OnFailure
        {
            info!(app = %self.app, replica = %t.ask_id, "replica exited 0; not restarted (restart: on-failure)");
            self.tasks[i].state = State::Succeeded;
            self.tasks[i].healthy = false;
            return;
        }
        use weft_proto::exit_codes::{AGENT_SHUTDOWN, FENCED, LOST, NODE_LOST};
        let not_its_fault = matches!(exit.exit_status, NODE_LOST | LOST | AGENT_SHUTDOWN | FENCED);
        let reason = format!(
            "stage {} replica {}: {}",
            s.name,
            t.index,
            if exit.diagnostic.is_empty() {
                format!("{:?}", c.state())
            } else {
                exit.diagnostic.clone()
            }
        );
        self.replica_ended(i, reason, !not_its_fault);
    }

    /// Replica `i` ended (or was let go): asked for again after its
    /// backoff; `counts`: a restart (not for a lost node), which fails the
    /// job when its stage has had more than `restart.limit` in its window.
    fn replica_ended(&mut self, i: usize, reason: String, counts: bool) {
        let si = self.tasks[i].stage;
        let r = self.spec.stages[si].restart();
        let now = Instant::now();
        let t = &mut self.tasks[i];
        // One that ran for a while starts its backoff over.
        if t.started
            .is_some_and(|s| now.duration_since(s) >= r.max_backoff)
        {
            t.restarts = 0;
        }
        t.alloc = None;
        t.healthy = false;
        t.ever_healthy = false;
        t.fails = 0;
        t.started = None;
        t.next_check = None;
        if !counts {
            warn!(%reason, "replica lost; replacing it");
            t.state = State::Asking;
            return;
        }
        let delay = crate::health::backoff(r.backoff, r.max_backoff, t.restarts);
        t.restarts = t.restarts.saturating_add(1);
        self.failures[si] += 1;
        let log = &mut self.restart_log[si];
        log.push_back(now);
        while log
            .front()
            .is_some_and(|f| now.duration_since(*f) > r.window)
        {
            log.pop_front();
        }
        if log.len() as u64 > u64::from(r.limit) {
            t.state = State::Failed(format!(
                "{reason} ({} restarts within {}: more than restart.limit, {})",
                log.len(),
                humantime::format_duration(r.window),
                r.limit
            ));
            return;
        }
        warn!(%reason, restart_in = ?delay, "replica ended; restarting it");
        t.state = State::Backoff(now + delay);
    }

    /// Keeps `n` replicas of the service's stage `stage`: new ones asked
    /// for, the highest-numbered ones let go.
    fn scale(&mut self, stage: &str, n: u32, releases: &mut Vec<String>) {
        let Some(si) = self
            .spec
            .stages
            .iter()
            .position(|s| s.name == stage && s.is_service())
        else {
            return;
        };
        let have = self.tasks.iter().filter(|t| t.stage == si).count() as u32;
        if have == n {
            return;
        }
        info!(app = %self.app, stage, from = have, to = n, "scaling");
        if n > have {
            // Asked for once the stage's turn has come (as the first were).
            let name = self.spec.stages[si].name.clone();
            for i in have..n {
                self.tasks
                    .push(Task::new(si, None, i, format!("{name}/{i}")));
            }
        } else {
            self.tasks.retain(|t| {
                if t.stage != si || t.index < n {
                    return true;
                }
                if let (State::Allocated | State::Running, Some(a)) = (&t.state, &t.alloc) {
                    releases.push(a.container_id.clone());
                }
                false
            });
        }
    }

    /// The healthy replicas of the service's stages, where to reach them.
    fn endpoints(&self) -> Vec<pb::Endpoint> {
        let mut out: Vec<pb::Endpoint> = self
            .tasks
            .iter()
            .filter(|t| t.state == State::Running && t.healthy && self.is_service(t))
            .filter_map(|t| {
                let a = t.alloc.as_ref()?;
                let s = &self.spec.stages[t.stage];
                Some(pb::Endpoint {
                    stage: s.name.clone(),
                    index: t.index,
                    container_id: a.container_id.clone(),
                    node_id: a.node_id.clone(),
                    host: host_of(&a.node_address).to_string(),
                    ports: s
                        .ports
                        .iter()
                        .cloned()
                        .zip(a.ports.iter().copied())
                        .collect(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.stage, a.index).cmp(&(&b.stage, b.index)));
        out
    }

    fn completed(&mut self, c: &pb::ContainerStatus, releases: &mut Vec<String>) {
        let Some(i) = self.tasks.iter().position(|t| {
            t.alloc
                .as_ref()
                .is_some_and(|a| a.container_id == c.container_id)
        }) else {
            return;
        };
        if !matches!(self.tasks[i].state, State::Running | State::Allocated) {
            return;
        }
        if self.is_service(&self.tasks[i]) {
            self.replica_completed(i, c);
            return;
        }
        if c.state() == pb::ContainerState::Succeeded {
            self.tasks[i].state = State::Succeeded;
            return;
        }
        let si = self.tasks[i].stage;
        let stage = self.spec.stages[si].clone();
        let exit = c.exit.clone().unwrap_or_default();
        let reason = format!(
            "stage {} task {}{}: {}",
            stage.name,
            self.tasks[i]
                .role
                .as_ref()
                .map(|r| format!("{r}/"))
                .unwrap_or_default(),
            self.tasks[i].index,
            if exit.diagnostic.is_empty() {
                format!("{:?}", c.state())
            } else {
                exit.diagnostic.clone()
            }
        );
        // A lost node, an agent that lost track of it or shut down: not the
        // task's fault; it reruns without using a retry.
        use weft_proto::exit_codes::{AGENT_SHUTDOWN, FENCED, LOST, NODE_LOST};
        let not_its_fault = matches!(exit.exit_status, NODE_LOST | LOST | AGENT_SHUTDOWN | FENCED);
        if !not_its_fault {
            self.failures[si] += 1;
        }
        if exit.exit_status == OVER_MEMORY {
            self.tasks[i].state = State::Failed(format!(
                "{reason} (not retried unchanged: it would go over its memory quota again; ask for more memory)"
            ));
            return;
        }
        if !not_its_fault && self.failures[si] > stage.max_retries {
            self.tasks[i].state =
                State::Failed(format!("{reason} (after {} retries)", stage.max_retries));
            return;
        }
        warn!(%reason, retry = self.failures[si], "task failed; retrying");
        if stage.gang {
            // A gang restarts as a whole.
            for t in self.tasks.iter_mut().filter(|t| t.stage == si) {
                if let (State::Running | State::Allocated, Some(a)) = (&t.state, &t.alloc) {
                    releases.push(a.container_id.clone());
                }
                t.state = State::Asking;
                t.alloc = None;
            }
        } else {
            self.tasks[i].state = State::Asking;
            self.tasks[i].alloc = None;
        }
    }
}

/// The host of a node's `host:port` address.
fn host_of(addr: &str) -> &str {
    let h = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    h.trim_start_matches('[').trim_end_matches(']')
}

/// The longest a service's master waits for news between its checks.
const SERVICE_POLL: Duration = Duration::from_secs(1);

/// Ports each task of stage `s` needs: one for a gang's address, plus the
/// stage's named ones.
fn ports_asked(s: &weft_spec::StageSpec) -> u32 {
    s.gang as u32 + s.ports.len() as u32
}
