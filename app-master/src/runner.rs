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
    /// A rollout's replica that failed: gone at the next turn.
    Dropped,
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
    /// Since when it has passed its checks without a break.
    healthy_since: Option<Instant>,
    /// Restarts since it last ran for a while (its backoff doubles with each).
    restarts: u32,
    /// The spec revision it runs (a service's replica).
    revision: u32,
    /// A new revision's replica started beside the old one with its index
    /// (a rollout's); it takes the old one's place once healthy.
    surge: bool,
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
            healthy_since: None,
            restarts: 0,
            revision: 0,
            surge: false,
        }
    }
}

/// A service replica's ask id: `stage/index`, with `~rN` for a revision
/// after the first (so that a rollout's new replica and the old one with
/// its index are told apart, also by a later attempt).
fn replica_ask(stage: &str, index: u32, revision: u32) -> String {
    if revision == 0 {
        format!("{stage}/{index}")
    } else {
        format!("{stage}/{index}~r{revision}")
    }
}

/// (stage, index, revision) of a replica's ask id.
fn parse_replica_ask(ask: &str) -> Option<(&str, u32, u32)> {
    let (stage, rest) = ask.split_once('/')?;
    let (index, revision) = match rest.split_once("~r") {
        Some((i, r)) => (i.parse().ok()?, r.parse().ok()?),
        None => (rest.parse().ok()?, 0),
    };
    Some((stage, index, revision))
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
    /// Containers whose check is in flight, by the check's task.
    checking: BTreeSet<String>,
    check_of: BTreeMap<tokio::task::Id, String>,
    /// The spec revision being run (0: as submitted); `spec` is its spec.
    revision: u32,
    /// Earlier revisions' specs, for the replicas that still run them.
    old_specs: BTreeMap<u32, JobSpec>,
    /// A rollout that stopped: its revision and why.
    rollout_failed: Option<(u32, String)>,
    /// How the latest revision's rollout goes, in words (told to the RM).
    rollout: String,
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
        // Its task starts go through the same local agent as its RM calls.
        let nodes = NodeClients::with_local(rm.local_agent());
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
            nodes,
            restart_log: vec![VecDeque::new(); n],
            checks: tokio::task::JoinSet::new(),
            checking: BTreeSet::new(),
            check_of: BTreeMap::new(),
            revision: 0,
            old_specs: BTreeMap::new(),
            rollout_failed: None,
            rollout: String::new(),
        }
    }

    /// The stage as the task's revision has it.
    fn stage_for(&self, t: &Task) -> &weft_spec::StageSpec {
        &self.old_specs.get(&t.revision).unwrap_or(&self.spec).stages[t.stage]
    }

    fn is_service(&self, t: &Task) -> bool {
        self.spec.stages[t.stage].is_service()
    }

    fn has_services(&self) -> bool {
        self.spec.stages.iter().any(|s| s.is_service())
    }

    fn resources_of(&self, t: &Task) -> &ResourcesSpec {
        let s = self.stage_for(t);
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
        if reg.spec_revision > 0 {
            // Updated since submit: the latest revision's spec (the one
            // this master was started with, unless it changed since).
            match JobSpec::parse(&reg.spec, &reg.spec_format) {
                Ok(spec) => self.spec = spec,
                Err(e) => warn!(error = %e, "the RM's spec does not parse; running the one given"),
            }
            self.revision = reg.spec_revision;
            // Earlier revisions' specs, for replicas that still run them.
            for p in &reg.prior_specs {
                match JobSpec::parse(&p.spec, &p.spec_format) {
                    Ok(spec) => {
                        self.old_specs.insert(p.revision, spec);
                    }
                    Err(e) => {
                        warn!(revision = p.revision, error = %e, "an earlier spec does not parse")
                    }
                }
            }
            if reg.rollout_stopped == self.revision {
                self.rollout_failed = Some((
                    self.revision,
                    "its rollout stopped under an earlier master attempt".into(),
                ));
            }
            for t in &mut self.tasks {
                if self.spec.stages[t.stage].is_service() {
                    t.revision = self.revision;
                    t.ask_id = replica_ask(&self.spec.stages[t.stage].name, t.index, self.revision);
                }
            }
        }
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
                    spec_revision: self.revision,
                    rollout: self.rollout.clone(),
                    rollout_stopped: self.stopped_revision(),
                    ..Default::default()
                })
                .await?;
            if resp.spec_revision > self.revision {
                self.update(
                    resp.spec_revision,
                    &resp.spec,
                    &resp.spec_format,
                    &mut releases,
                );
            }
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
        // A service's replica is its stage and index, whatever revision
        // its container runs: an earlier revision's is adopted first (it
        // served; a rollout's new replica beside it is let go and made
        // again), and the rollout goes on from there.
        let stages = &self.spec.stages;
        let find = |tasks: &mut Vec<Task>, ask: &str| -> Option<usize> {
            if let Some((stage, index, revision)) = parse_replica_ask(ask) {
                if let Some(k) = tasks.iter().position(|t| {
                    t.state == State::Waiting
                        && stages[t.stage].is_service()
                        && stages[t.stage].name == stage
                        && t.index == index
                }) {
                    tasks[k].revision = revision;
                    tasks[k].ask_id = ask.to_string();
                    return Some(k);
                }
            }
            tasks
                .iter()
                .position(|t| t.ask_id == ask && t.state == State::Waiting)
        };
        let mut running = reg.running_containers;
        running.sort_by_key(|a| parse_replica_ask(&a.ask_id).map_or(0, |(_, _, r)| r));
        for a in running {
            match find(&mut self.tasks, &a.ask_id).map(|k| &mut self.tasks[k]) {
                Some(t) => {
                    t.state = State::Running;
                    t.alloc = Some(a);
                    // A service's replica is checked again from now (its
                    // grace too); without a check, running is healthy.
                    t.started = Some(Instant::now());
                    t.healthy = self.spec.stages[t.stage].health.is_none();
                    t.ever_healthy = t.healthy;
                    t.healthy_since = t.healthy.then(Instant::now);
                }
                None => releases.push(a.container_id),
            }
        }
        // Done work: a batch task's, or a service replica's that exited 0
        // under `restart: on-failure` (under `always` an exit of 0 was
        // followed by a restart: it says nothing of the replica now).
        for a in reg.succeeded_containers {
            if let Some(k) = find(&mut self.tasks, &a.ask_id) {
                let s = &self.spec.stages[self.tasks[k].stage];
                if !s.is_service() || s.restart().policy == weft_spec::RestartPolicy::OnFailure {
                    self.tasks[k].state = State::Succeeded;
                }
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
                let s = self.stage_for(t);
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
                    preemption_grace_ms: s.preemption_grace().as_millis() as u64,
                    min_available: s.min_available(),
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
                let s = self.stage_for(t);
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
                    // The same for every run of the task: a rerun resumes
                    // from what an earlier (preempted) run checkpointed.
                    checkpoint_key: checkpoint_key(&s.name, t.role.as_deref(), t.index),
                };
                starts.push((i, a, req));
            }
        }
        // Side by side, a bounded number at a time, over one connection per node.
        let nodes = &self.nodes;
        let results: Vec<_> = futures::stream::iter(starts)
            .map(|(i, a, req)| async move {
                let started = nodes.start(&a.node_id, &a.node_address, req).await;
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
                    t.healthy = self.old_specs.get(&t.revision).unwrap_or(&self.spec).stages
                        [t.stage]
                        .health
                        .is_none();
                    t.ever_healthy = t.healthy;
                    t.healthy_since = t.healthy.then_some(now);
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
                    // Its container holds the node's resources until given back.
                    self.unreachable.push(a.container_id.clone());
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
        let s = self.stage_for(t);
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
        self.tasks.retain(|t| t.state != State::Dropped);
        while let Some(done) = self.checks.try_join_next_with_id() {
            match done {
                Ok((id, (container, result))) => {
                    self.check_of.remove(&id);
                    self.checking.remove(&container);
                    self.checked(&container, result, releases);
                }
                // A check that panicked: its replica is checked again.
                Err(e) => {
                    if let Some(c) = self.check_of.remove(&e.id()) {
                        self.checking.remove(&c);
                    }
                }
            }
        }
        let now = Instant::now();
        for t in self.tasks.iter_mut() {
            if matches!(t.state, State::Backoff(at) if at <= now) {
                t.state = State::Asking;
            }
        }
        for t in &mut self.tasks {
            let s = &self.old_specs.get(&t.revision).unwrap_or(&self.spec).stages[t.stage];
            let (Some(h), State::Running, Some(a)) = (&s.health, &t.state, &t.alloc) else {
                continue;
            };
            if t.next_check.is_some_and(|n| n > now) || self.checking.contains(&a.container_id) {
                continue;
            }
            t.next_check = Some(now + h.interval);
            let target = crate::health::Target {
                host: host_of(&a.node_address).to_string(),
                ports: named_ports(s, a).collect(),
            };
            let (h, id) = (h.clone(), a.container_id.clone());
            self.checking.insert(id.clone());
            let c = id.clone();
            let handle = self.checks.spawn(async move {
                let r = crate::health::check(&h, &target).await;
                (id, r)
            });
            self.check_of.insert(handle.id(), c);
        }
        self.roll(releases);
    }

    /// A newer spec from the RM (an update): it becomes the spec new
    /// replicas run; the replicas of earlier revisions are replaced one at
    /// a time by [`Runner::roll`].
    fn update(&mut self, revision: u32, text: &str, format: &str, releases: &mut Vec<String>) {
        let spec = match JobSpec::parse(text, format) {
            Ok(s) => s,
            Err(e) => {
                warn!(revision, error = %e, "an updated spec that does not parse; not rolled out");
                self.revision = revision;
                self.rollout_failed = Some((revision, format!("the spec does not parse: {e}")));
                return;
            }
        };
        let same_shape = spec.stages.len() == self.spec.stages.len()
            && spec
                .stages
                .iter()
                .zip(&self.spec.stages)
                .all(|(a, b)| a.name == b.name && a.is_service() == b.is_service());
        if !same_shape {
            warn!(
                revision,
                "an updated spec with other stages; not rolled out"
            );
            self.revision = revision;
            self.rollout_failed =
                Some((revision, "its stages differ from the running ones".into()));
            return;
        }
        info!(app = %self.app, from = self.revision, to = revision, "rolling out a new revision");
        let old = std::mem::replace(&mut self.spec, spec);
        self.old_specs.insert(self.revision, old);
        self.revision = revision;
        self.rollout_failed = None;
        // Its replica counts (an update's own replace earlier scales).
        let counts: Vec<(String, u32)> = self
            .spec
            .stages
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.replicas?)))
            .collect();
        for (stage, n) in counts {
            self.scale(&stage, n, releases);
        }
    }

    /// The revision whose rollout stopped, if the latest's did (0: none).
    fn stopped_revision(&self) -> u32 {
        match &self.rollout_failed {
            Some((r, _)) if *r == self.revision => *r,
            _ => 0,
        }
    }

    /// The revision new replicas run: the latest, unless its rollout
    /// stopped (then the newest earlier one still known).
    fn serving_revision(&self) -> u32 {
        if self.stopped_revision() == 0 {
            return self.revision;
        }
        self.old_specs
            .keys()
            .copied()
            .filter(|r| *r < self.revision)
            .max()
            .unwrap_or(self.revision)
    }

    /// The rollout of the latest revision, one replica per stage at a
    /// time: a new replica beside the old one with its index (surge 1);
    /// once the new one is healthy the old one is stopped; a new one that
    /// ends or turns unhealthy stops the rollout, the old ones serving on.
    fn roll(&mut self, releases: &mut Vec<String>) {
        let target = self.revision;
        if target == 0 {
            return;
        }
        if let Some((rev, why)) = &self.rollout_failed {
            if *rev == target {
                let serving = self
                    .tasks
                    .iter()
                    .filter(|t| t.revision < target && t.state == State::Running && t.healthy)
                    .count();
                self.rollout = format!(
                    "revision {target} stopped: {why}; {serving} replicas of earlier revisions serve on"
                );
                return;
            }
        }
        let mut pending = 0;
        let mut total = 0;
        for si in 0..self.spec.stages.len() {
            if !self.spec.stages[si].is_service() {
                continue;
            }
            total += self
                .tasks
                .iter()
                .filter(|t| t.stage == si && !t.surge)
                .count();
            pending += self
                .tasks
                .iter()
                .filter(|t| t.stage == si && !t.surge && t.revision < target)
                .count();
            if let Some(k) = self.tasks.iter().position(|t| t.stage == si && t.surge) {
                let t = &self.tasks[k];
                // Healthy for a while (two checks, or a second without
                // any): one that passes once and falls over is not taken.
                let min_ready = self
                    .stage_for(t)
                    .health
                    .as_ref()
                    .map_or(Duration::from_secs(1), |h| h.interval * 2);
                let ready = t.state == State::Running
                    && t.healthy
                    && t.healthy_since.is_some_and(|at| at.elapsed() >= min_ready);
                if !ready {
                    continue; // one at a time
                }
                let index = t.index;
                if let Some(o) = self
                    .tasks
                    .iter()
                    .position(|t| t.stage == si && !t.surge && t.index == index)
                {
                    let old = self.tasks.remove(o);
                    if let (State::Allocated | State::Running, Some(a)) = (&old.state, &old.alloc) {
                        releases.push(a.container_id.clone());
                    }
                    pending = pending.saturating_sub(usize::from(old.revision < target));
                }
                if let Some(k) = self.tasks.iter().position(|t| t.stage == si && t.surge) {
                    self.tasks[k].surge = false;
                }
                info!(app = %self.app, stage = %self.spec.stages[si].name, index, revision = target, "replica updated");
                continue;
            }
            let Some(o) = self
                .tasks
                .iter()
                .position(|t| t.stage == si && t.revision < target)
            else {
                continue;
            };
            let name = self.spec.stages[si].name.clone();
            let known = self.old_specs.contains_key(&self.tasks[o].revision);
            let t = &mut self.tasks[o];
            if matches!(t.state, State::Running | State::Allocated) {
                let mut n = Task::new(si, None, t.index, replica_ask(&name, t.index, target));
                n.revision = target;
                n.surge = true;
                n.state = State::Asking;
                self.tasks.push(n);
            } else if !known {
                // Not running, and its spec is not known here any more
                // (an attempt ago): it starts as the new revision.
                t.revision = target;
                t.ask_id = replica_ask(&name, t.index, target);
            }
            // Else (waiting, asking, backing off) it starts again as its
            // own revision, and is replaced once it runs.
        }
        // Earlier revisions' specs no replica runs any more.
        let in_use: BTreeSet<u32> = self.tasks.iter().map(|t| t.revision).collect();
        self.old_specs.retain(|r, _| in_use.contains(r));
        self.rollout = if pending == 0 {
            format!("revision {target} rolled out")
        } else {
            format!(
                "revision {target}: {} of {total} replicas updated",
                total - pending
            )
        };
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
        // A check of a revision without one any more: running is healthy.
        let h = self.stage_for(&self.tasks[i]).health.clone();
        let t = &mut self.tasks[i];
        let Some(h) = h else {
            t.healthy = true;
            t.ever_healthy = true;
            t.healthy_since.get_or_insert_with(Instant::now);
            return;
        };
        match result {
            Ok(()) => {
                if !t.healthy {
                    info!(app = %self.app, replica = %t.ask_id, container, "replica healthy");
                    t.healthy_since = Some(Instant::now());
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
                t.healthy_since = None;
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
            && !t.surge
            && s.restart().policy == weft_spec::RestartPolicy::OnFailure
        {
            info!(app = %self.app, replica = %t.ask_id, "replica exited 0; not restarted (restart: on-failure)");
            self.tasks[i].state = State::Succeeded;
            self.tasks[i].healthy = false;
            return;
        }
        use weft_proto::exit_codes::{AGENT_SHUTDOWN, FENCED, LOST, NODE_LOST, PREEMPTED};
        let not_its_fault = matches!(
            exit.exit_status,
            NODE_LOST | LOST | AGENT_SHUTDOWN | FENCED | PREEMPTED
        );
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
        if self.tasks[i].surge && counts {
            // A new revision's replica that failed: the rollout stops.
            let rev = self.tasks[i].revision;
            warn!(%reason, revision = rev, "the new revision's replica failed; the rollout stops");
            self.rollout_failed = Some((rev, format!("its replica failed: {reason}")));
            // Every stage's new replica goes (the rollout stops as a whole).
            for t in self.tasks.iter_mut().filter(|t| t.surge) {
                if let (State::Allocated | State::Running, Some(a)) = (&t.state, &t.alloc) {
                    self.unreachable.push(a.container_id.clone());
                }
                t.state = State::Dropped;
                t.alloc = None;
                t.healthy = false;
            }
            return;
        }
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
        let have = self
            .tasks
            .iter()
            .filter(|t| t.stage == si && !t.surge && t.state != State::Dropped)
            .count() as u32;
        if have == n {
            return;
        }
        info!(app = %self.app, stage, from = have, to = n, "scaling");
        if n > have {
            // Asked for once the stage's turn has come (as the first were).
            let name = self.spec.stages[si].name.clone();
            let revision = self.serving_revision();
            for i in have..n {
                let mut t = Task::new(si, None, i, replica_ask(&name, i, revision));
                t.revision = revision;
                self.tasks.push(t);
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
            // A rollout's new replica is listed once it takes its index's
            // place: one endpoint per replica.
            .filter(|t| t.state == State::Running && t.healthy && !t.surge && self.is_service(t))
            .filter_map(|t| {
                let a = t.alloc.as_ref()?;
                let s = self.stage_for(t);
                Some(pb::Endpoint {
                    stage: s.name.clone(),
                    index: t.index,
                    container_id: a.container_id.clone(),
                    node_id: a.node_id.clone(),
                    host: host_of(&a.node_address).to_string(),
                    ports: named_ports(s, a).collect(),
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
        use weft_proto::exit_codes::{AGENT_SHUTDOWN, FENCED, LOST, NODE_LOST, PREEMPTED};
        let not_its_fault = matches!(
            exit.exit_status,
            NODE_LOST | LOST | AGENT_SHUTDOWN | FENCED | PREEMPTED
        );
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

/// A replica's named ports (a service's stage is no gang: its ports are
/// its named ones, in order).
fn named_ports<'a>(
    s: &'a weft_spec::StageSpec,
    a: &'a pb::Allocation,
) -> impl Iterator<Item = (String, u32)> + 'a {
    s.ports.iter().cloned().zip(a.ports.iter().copied())
}

/// A task's checkpoint key (`stage/index`, `stage/role/index`), in the
/// characters an agent takes (any other becomes `_`; each part at most 80).
fn checkpoint_key(stage: &str, role: Option<&str>, index: u32) -> String {
    let clean = |p: &str| {
        let c: String = p
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .take(80)
            .collect();
        if c.is_empty() || c == "." || c == ".." {
            "_".to_string()
        } else {
            c
        }
    };
    match role {
        Some(r) => format!("{}/{}/{index}", clean(stage), clean(r)),
        None => format!("{}/{index}", clean(stage)),
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

#[cfg(test)]
mod checkpoint_key_tests {
    use super::checkpoint_key;

    #[test]
    fn a_checkpoint_key_holds_only_what_an_agent_takes() {
        assert_eq!(checkpoint_key("train", None, 3), "train/3");
        assert_eq!(checkpoint_key("train", Some("worker"), 0), "train/worker/0");
        assert_eq!(checkpoint_key("a b", Some(".."), 1), "a_b/_/1");
        assert_eq!(
            checkpoint_key(&"x".repeat(300), Some("r/s"), 2).len(),
            80 + 4 + 2
        );
    }
}
