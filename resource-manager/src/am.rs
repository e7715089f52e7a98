//! The leader's scheduling loop and the ApplicationMasterService.
//!
//! Application masters send their outstanding asks with every Allocate call
//! (absolute counts, so a new leader rebuilds the table from the next call).
//! The loop runs a scheduler round when asks arrive, containers end or nodes
//! change (and every half second), over a view built from the replicated
//! state, and commits each round's placements as one `ContainersAllocated`
//! command; the allocations then go to their masters, whose Allocate long
//! poll answers early.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use weft_proto::token::TokenSigner;
use weft_proto::v1 as pb;

use crate::error::Error;
use crate::fsm::{
    Allocation, AppState, ClusterState, Command, Completion, ContainerEnd, ContainerPhase, Outcome,
};
use crate::raft_node::RaftHandle;
use crate::scheduler::{self, Ask, GpuAsk, Placement, Queues, Reservations};
use crate::service::now_ms;

/// Longest an Allocate call is held when nothing changes.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// Master attempts lost with their node that do not count against
/// `max_attempts` (beyond these they do, so a job cannot retry forever).
pub const FREE_ATTEMPTS: u32 = 5;

/// How long a container token lets an agent start its container.
pub const CONTAINER_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// The leader's scheduling table. Lock order: the replicated state's read
/// lock first, then this table (a reader waiting on the state behind the
/// raft thread's write while holding the table would deadlock).
#[derive(Default)]
struct Table {
    /// app -> its outstanding asks (ask as sent, count still wanted).
    asks: HashMap<String, Vec<(pb::ResourceAsk, u32)>>,
    /// app -> allocations granted but not yet handed to its master.
    undelivered: HashMap<String, Vec<pb::Allocation>>,
    /// Completed containers already reported to their masters.
    reported: HashSet<String>,
    /// app -> the ask for its next master's container.
    masters: HashMap<String, pb::ResourceAsk>,
    /// Apps whose master heard, under this leader, of every container the
    /// state holds for it (a new leader re-sends what its predecessor may
    /// not have delivered; masters release what they do not need).
    synced: HashSet<String>,
    /// app -> when its master last called (launched masters only).
    last_seen: HashMap<String, std::time::Instant>,
    /// Apps whose master container is granted and being started (its
    /// attempt not recorded yet): no other master is asked for.
    launching: HashSet<String>,
}

pub use crate::fsm::MASTER_ASK;

/// A round's allocations to propose, each with its (app, ask id).
type Planned = (Vec<Allocation>, Vec<(String, String)>);

/// Counters of the scheduling loop (this member's, since it started).
#[derive(Default)]
struct Counters {
    rounds: AtomicU64,
    committed: AtomicU64,
    placed: AtomicU64,
    refused_at_verify: AtomicU64,
    refused_at_apply: AtomicU64,
}

/// What the scheduling loop did, as `ClusterStatus` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Rounds that placed something.
    pub rounds: u64,
    /// Rounds whose (verified part of the) plan was committed.
    pub committed: u64,
    /// Containers granted.
    pub placed: u64,
    /// Allocations dropped by the leader's check against the latest state.
    pub refused_at_verify: u64,
    /// Allocations refused when the committed round was applied.
    pub refused_at_apply: u64,
}

/// Shared by the ApplicationMasterService and the scheduling loop.
#[derive(Clone)]
pub struct Scheduling {
    raft: RaftHandle,
    /// Present when the leader starts application masters.
    masters: Option<Arc<crate::config::MastersConfig>>,
    table: Arc<Mutex<Table>>,
    /// Wakes the loop (new asks, ended containers, node changes).
    wake: Arc<Notify>,
    /// Wakes Allocate long polls (new allocations or completions).
    delivered: Arc<Notify>,
    /// The token signer built from the replicated key (seed hex, signer).
    signer: Arc<Mutex<Option<(String, TokenSigner)>>>,
    /// Connections to node agents (masters are started through them).
    channels: Arc<Mutex<HashMap<String, tonic::transport::Channel>>>,
    /// In-process masters (standalone mode): app -> its runner task and,
    /// once it ended without finishing its job, why.
    local: Arc<Mutex<HashMap<String, LocalMaster>>>,
    /// What the loop has done (rounds, placements, refusals).
    stats: Arc<Counters>,
    /// node -> ports of its range bound there, as its agent last reported
    /// (by anything): never handed out.
    busy_ports: Arc<Mutex<HashMap<String, BTreeSet<u16>>>>,
}

struct LocalMaster {
    task: tokio::task::JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Scheduling {
    pub fn new(raft: RaftHandle, masters: Option<crate::config::MastersConfig>) -> Self {
        Scheduling {
            raft,
            masters: masters.map(Arc::new),
            table: Arc::default(),
            wake: Arc::new(Notify::new()),
            delivered: Arc::new(Notify::new()),
            signer: Arc::default(),
            channels: Arc::default(),
            local: Arc::default(),
            stats: Arc::default(),
            busy_ports: Arc::default(),
        }
    }

    /// Records the ports of `node`'s range bound there now (from its
    /// registration or heartbeat); wakes the loop when they changed.
    pub fn note_ports_in_use(&self, node: &str, ports: &[u32]) {
        let now: BTreeSet<u16> = ports
            .iter()
            .filter_map(|&p| u16::try_from(p).ok())
            .collect();
        let mut busy = self.busy_ports.lock().expect("busy ports lock");
        if busy.get(node) != Some(&now) {
            busy.insert(node.to_string(), now);
            drop(busy);
            self.wake.notify_one();
        }
    }

    /// A (shared, reconnecting) connection to the agent at `addr`.
    fn node_channel(&self, addr: &str) -> Result<tonic::transport::Channel, Status> {
        let mut map = self.channels.lock().expect("channels lock");
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("node address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The signer for the replicated token key, if the group has one yet.
    pub fn signer(&self) -> Option<TokenSigner> {
        let seed = self.raft.state().token_key.clone()?;
        let mut cache = self.signer.lock().expect("signer lock");
        if let Some((s, signer)) = cache.as_ref() {
            if *s == seed {
                return Some(signer.clone());
            }
        }
        let signer = TokenSigner::from_seed_hex(&seed).ok()?;
        *cache = Some((seed, signer.clone()));
        Some(signer)
    }

    /// The signer, making the group's key first if it has none (leader only).
    pub async fn ensure_signer(&self) -> Result<TokenSigner, Error> {
        if let Some(s) = self.signer() {
            return Ok(s);
        }
        self.raft
            .propose(Command::SetTokenKey {
                seed_hex: TokenSigner::generate().seed_hex(),
            })
            .await?;
        self.signer()
            .ok_or_else(|| Error::Unavailable("the token key is not applied yet".into()))
    }

    /// An application token for `attempt` of `app`.
    pub fn application_token(signer: &TokenSigner, app: &str, attempt: u32) -> Vec<u8> {
        signer.sign_application(&pb::ApplicationTokenBody {
            application_id: app.to_string(),
            attempt,
            issued_at_ms: now_ms(),
        })
    }

    /// Whether this RM starts application masters for submitted jobs.
    pub fn launches_masters(&self) -> bool {
        self.masters.is_some()
    }

    /// Asks for a round soon (containers ended, a node changed...).
    pub fn poke(&self) {
        self.wake.notify_one();
        self.delivered.notify_waiters();
    }

    /// What this member kept as leader goes when it steps down: a new
    /// leader rebuilds the table from the masters' next calls (and runs its
    /// own in-process masters).
    pub fn step_down(&self) {
        *self.table.lock().expect("table lock") = Table::default();
        for (_, m) in self.local.lock().expect("local masters lock").drain() {
            m.task.abort();
        }
    }

    /// The scheduling loop of one leadership (the leader supervisor starts
    /// and stops it), until `cancel` fires. Rounds run on events (asks,
    /// ends, node changes) and every half second.
    pub async fn run(self, cancel: tokio_util::sync::CancellationToken) {
        let mut reservations = Reservations::default();
        // The scheduler's view of this leadership, patched round to round.
        let mut view = crate::view::View::new();
        let mut counter = 0u64;
        // A leadership starts from an empty table.
        *self.table.lock().expect("table lock") = Table::default();
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            let status = self.raft.status();
            if self.signer().is_none() {
                if let Err(e) = self.ensure_signer().await {
                    debug!(error = %e, "token key not made yet");
                }
            }
            if self.masters.is_some() {
                self.manage_masters().await;
            }
            let Some((plan, keys)) = self
                .round(&mut reservations, &mut view, status.term, &mut counter)
                .await
            else {
                continue;
            };
            self.stats.rounds.fetch_add(1, Relaxed);
            // Verify against the latest applied state (the round was made
            // from a view that may be older) and propose the part that
            // still fits; the rest stays asked for and is planned again.
            let verdict = self.raft.state().verify_plan(&plan);
            if !verdict.refused.is_empty() {
                self.stats
                    .refused_at_verify
                    .fetch_add(verdict.refused.len() as u64, Relaxed);
                debug!(refused = ?verdict.refused, "allocations refused before proposing");
            }
            let (allocations, keys): (Vec<Allocation>, Vec<(String, String)>) = plan
                .into_iter()
                .zip(keys)
                .filter(|(a, _)| !verdict.is_refused(&a.container_id))
                .unzip();
            if allocations.is_empty() {
                continue;
            }
            let refused: Vec<crate::fsm::Refusal> = match self
                .raft
                .propose(Command::ContainersAllocated {
                    allocations: allocations.clone(),
                    at_ms: now_ms(),
                })
                .await
            {
                Ok(Outcome::Done) => Vec::new(),
                Ok(Outcome::PartlyApplied { refused }) => {
                    self.stats
                        .refused_at_apply
                        .fetch_add(refused.len() as u64, Relaxed);
                    warn!(refused = ?refused, "allocations refused at apply; they are planned again");
                    refused
                }
                Ok(other) => {
                    warn!(outcome = ?other, "scheduling round refused at apply; next round replans");
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "scheduling round not committed");
                    continue;
                }
            };
            let granted = allocations.len() - refused.len();
            self.stats.placed.fetch_add(granted as u64, Relaxed);
            self.stats.committed.fetch_add(1, Relaxed);
            let signer = self.signer();
            let granted_now: Vec<(Allocation, (String, String))> = allocations
                .into_iter()
                .zip(keys)
                .filter(|(a, _)| !refused.iter().any(|r| r.container_id == a.container_id))
                .collect();
            // Node addresses under the state's lock; tokens signed with no
            // lock held, off the runtime.
            let addresses: Vec<String> = {
                let st = self.raft.state();
                granted_now
                    .iter()
                    .map(|(a, _)| node_address(&st, &a.node_id))
                    .collect()
            };
            let (granted_now, delivered) = tokio::task::spawn_blocking(move || {
                let delivered: Vec<Option<pb::Allocation>> = granted_now
                    .iter()
                    .zip(&addresses)
                    .map(|((a, (_, ask_id)), addr)| {
                        (ask_id != MASTER_ASK).then(|| pb_allocation_at(addr, a, signer.as_ref()))
                    })
                    .collect();
                (granted_now, delivered)
            })
            .await
            .expect("signing tokens does not panic");
            let launch = {
                let mut launch = Vec::new();
                let mut t = self.table.lock().expect("table lock");
                for ((a, (app, ask_id)), pa) in granted_now.into_iter().zip(delivered) {
                    let Some(pa) = pa else {
                        t.masters.remove(&app);
                        t.launching.insert(app.clone());
                        launch.push((app, a));
                        continue;
                    };
                    if let Some(list) = t.asks.get_mut(&app) {
                        if let Some(e) = list.iter_mut().find(|(x, _)| x.ask_id == ask_id) {
                            e.1 = e.1.saturating_sub(1);
                        }
                    }
                    t.undelivered.entry(app).or_default().push(pa);
                }
                launch
            };
            info!(containers = granted, "scheduling round committed");
            self.delivered.notify_waiters();
            // Masters start side by side (their attempts commit together);
            // the loop goes on meanwhile.
            for (app, a) in launch {
                let s = self.clone();
                tokio::spawn(async move {
                    s.launch_master(&app, a).await;
                    s.table.lock().expect("table lock").launching.remove(&app);
                });
            }
        }
    }

    /// What the scheduling loop has done under this member's leaderships.
    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            rounds: self.stats.rounds.load(Relaxed),
            committed: self.stats.committed.load(Relaxed),
            placed: self.stats.placed.load(Relaxed),
            refused_at_verify: self.stats.refused_at_verify.load(Relaxed),
            refused_at_apply: self.stats.refused_at_apply.load(Relaxed),
        }
    }

    /// Accepts submitted jobs, asks for a master container for every job
    /// whose master is not running, and fails jobs whose masters failed
    /// `max_attempts` times.
    async fn manage_masters(&self) {
        let cfg = self
            .masters
            .clone()
            .expect("called only when masters are launched");
        if cfg.in_process {
            return self.manage_local_masters().await;
        }
        let mut commands = Vec::new();
        {
            let state = self.raft.state();
            let mut t = self.table.lock().expect("table lock");
            let now = std::time::Instant::now();
            for app in state
                .apps
                .values()
                .filter(|a| !a.state.is_terminal() && !a.unmanaged)
            {
                if app.state == AppState::Submitted {
                    // Accepted, and its master asked for, in one pass.
                    commands.push(Command::ApplicationAccepted {
                        app_id: app.id.clone(),
                        at_ms: now_ms(),
                    });
                }
                let last = app
                    .am_container
                    .as_ref()
                    .and_then(|c| state.containers.get(c));
                if let Some(c) = last.filter(|c| c.phase != ContainerPhase::Completed) {
                    // A master that stopped calling is ended (its agent stops
                    // it) and replaced; a new leader gives every master a
                    // full expiry from its election.
                    let seen = *t.last_seen.entry(app.id.clone()).or_insert(now);
                    if now.duration_since(seen) > cfg.expiry {
                        warn!(app = %app.id, attempt = app.attempt, expiry = ?cfg.expiry, "application master stopped calling; ending it");
                        t.last_seen.remove(&app.id);
                        commands.push(Command::ContainersCompleted {
                            completions: vec![Completion {
                                container_id: c.alloc.container_id.clone(),
                                state: ContainerEnd::Killed,
                                exit_status: weft_proto::exit_codes::USER_REQUESTED,
                                diagnostic: format!(
                                    "the application master made no call for {}",
                                    humantime::format_duration(cfg.expiry)
                                ),
                            }],
                            still_running: true,
                            at_ms: now_ms(),
                        });
                    }
                    continue;
                }
                if t.masters.contains_key(&app.id) || t.launching.contains(&app.id) {
                    continue; // already asked for, or starting
                }
                if app.am_container.is_some() && last.is_none() {
                    continue; // its allocation is not applied here yet
                }
                let Ok(spec) = weft_spec::JobSpec::parse(&app.spec, &app.spec_format) else {
                    continue;
                };
                let why = last
                    .and_then(|c| c.end.as_ref())
                    .map(|e| e.diagnostic.clone())
                    .unwrap_or_default();
                if let Some(end) = attempts_exhausted(app, &spec, 0, &why) {
                    commands.push(end);
                    continue;
                }
                let (vcores, memory) = match &spec.am {
                    Some(r) => (r.vcores_milli(), r.memory.as_u64()),
                    None => ((cfg.vcores * 1000.0) as u64, cfg.memory.as_u64()),
                };
                t.masters.insert(
                    app.id.clone(),
                    pb::ResourceAsk {
                        ask_id: MASTER_ASK.into(),
                        count: 1,
                        resources: Some(pb::Resources {
                            vcores_milli: vcores,
                            memory_bytes: memory,
                            ..Default::default()
                        }),
                        placement: pb::PlacementPolicy::Spread as i32,
                        ..Default::default()
                    },
                );
            }
        }
        for c in commands {
            if let Err(e) = self.raft.propose(c).await {
                debug!(error = %e, "master bookkeeping not committed");
            }
        }
    }

    /// Standalone mode: every live job has a master task inside this
    /// leader. A job found running without one (this process restarted)
    /// gets a new attempt that does not count against `max_attempts` and
    /// adopts what still runs; a master task that ended without finishing
    /// its job counts.
    async fn manage_local_masters(&self) {
        let mut commands = Vec::new();
        let mut start = Vec::new();
        {
            let state = self.raft.state();
            let mut local = self.local.lock().expect("local masters lock");
            local.retain(|id, m| {
                !m.task.is_finished() || state.apps.get(id).is_some_and(|a| !a.state.is_terminal())
            });
            for app in state
                .apps
                .values()
                .filter(|a| !a.state.is_terminal() && !a.unmanaged)
            {
                if app.state == AppState::Submitted {
                    commands.push(Command::ApplicationAccepted {
                        app_id: app.id.clone(),
                        at_ms: now_ms(),
                    });
                }
                let failure = match local.get(&app.id) {
                    Some(m) if !m.task.is_finished() => continue,
                    Some(m) => Some(
                        m.failure
                            .lock()
                            .expect("failure lock")
                            .clone()
                            .unwrap_or_else(|| "the master ended early".into()),
                    ),
                    None => None,
                };
                let Ok(spec) = weft_spec::JobSpec::parse(&app.spec, &app.spec_format) else {
                    continue;
                };
                let previous_lost = failure.is_none() && app.attempt > 0;
                let why = failure.unwrap_or_default();
                if let Some(end) = attempts_exhausted(app, &spec, previous_lost as u32, &why) {
                    commands.push(end);
                    continue;
                }
                start.push((app.id.clone(), app.attempt + 1, spec, previous_lost));
            }
        }
        for c in commands {
            if let Err(e) = self.raft.propose(c).await {
                debug!(error = %e, "master bookkeeping not committed");
            }
        }
        if start.is_empty() {
            return;
        }
        let (Ok(signer), Some(me)) = (
            self.ensure_signer().await,
            self.raft.address_of(self.raft.status().id),
        ) else {
            return;
        };
        for (app_id, attempt, spec, previous_lost) in start {
            let started = self
                .raft
                .propose(Command::AttemptStarted {
                    app_id: app_id.clone(),
                    attempt,
                    am_container: None,
                    keep_containers: spec.keep_containers,
                    previous_lost,
                    at_ms: now_ms(),
                })
                .await;
            if !matches!(started, Ok(Outcome::Done)) {
                continue;
            }
            let token = Self::application_token(&signer, &app_id, attempt);
            let failure: Arc<Mutex<Option<String>>> = Arc::default();
            let (id, why, rm) = (app_id.clone(), failure.clone(), vec![me.clone()]);
            let task = tokio::spawn(async move {
                let result = match weft_app_master::client::RmAmClient::new(rm, token) {
                    Ok(rm) => {
                        weft_app_master::runner::Runner::new(id.clone(), attempt, spec, rm)
                            .run()
                            .await
                    }
                    Err(e) => Err(e.into_status()),
                };
                match result {
                    Ok(f) => {
                        info!(app = %id, attempt, status = ?f.status, "in-process master finished")
                    }
                    Err(e) => {
                        warn!(app = %id, attempt, error = %e.message(), "in-process master failed");
                        *why.lock().expect("failure lock") = Some(e.message().to_string());
                    }
                }
            });
            info!(app = %app_id, attempt, "in-process application master started");
            self.local
                .lock()
                .expect("local masters lock")
                .insert(app_id, LocalMaster { task, failure });
        }
    }

    /// Starts a job's master in its container and records the attempt; a
    /// master that cannot start counts as a failed attempt.
    async fn launch_master(&self, app_id: &str, a: Allocation) {
        let cfg = self
            .masters
            .clone()
            .expect("called only when masters are launched");
        // This leader first: the master's first call goes straight here.
        let me = self.raft.address_of(self.raft.status().id);
        let (app, node_addr, rm) = {
            let st = self.raft.state();
            let Some(app) = st.apps.get(app_id).cloned() else {
                return;
            };
            let node_addr = st
                .nodes
                .get(&a.node_id)
                .map(|n| n.address.clone())
                .unwrap_or_default();
            let mut rm: Vec<String> = st.members.values().cloned().collect();
            if let Some(me) = me {
                rm.retain(|a| *a != me);
                rm.insert(0, me);
            }
            (app, node_addr, rm)
        };
        let attempt = app.attempt + 1;
        let keep_containers = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
            .map_or(true, |s| s.keep_containers);
        let Ok(signer) = self.ensure_signer().await else {
            return; // the next round asks again
        };
        let started = self
            .raft
            .propose(Command::AttemptStarted {
                app_id: app_id.to_string(),
                attempt,
                am_container: Some(a.container_id.clone()),
                keep_containers,
                previous_lost: false,
                at_ms: now_ms(),
            })
            .await;
        if !matches!(started, Ok(Outcome::Done)) {
            return;
        }
        self.table
            .lock()
            .expect("table lock")
            .last_seen
            .insert(app_id.to_string(), std::time::Instant::now());
        let req = pb::StartContainerRequest {
            container_id: a.container_id.clone(),
            command: cfg.command.clone(),
            args: vec![
                "--app-id".into(),
                app_id.to_string(),
                "--attempt".into(),
                attempt.to_string(),
                "--rm".into(),
                rm.join(","),
                "--spec-env".into(),
            ],
            env: [
                ("WEFT_JOB_SPEC".to_string(), app.spec.clone()),
                ("WEFT_JOB_SPEC_FORMAT".to_string(), app.spec_format.clone()),
                ("WEFT_APP_ID".to_string(), app_id.to_string()),
                ("WEFT_ATTEMPT".to_string(), attempt.to_string()),
                (
                    "WEFT_APP_TOKEN".to_string(),
                    hex::encode(Self::application_token(&signer, app_id, attempt)),
                ),
            ]
            .into_iter()
            .collect(),
            resources: Some(pb::ContainerResources {
                vcores_milli: a.vcores_milli,
                memory_bytes: a.memory_bytes,
                ..Default::default()
            }),
            token: container_token(&signer, &a),
        };
        let result = match self.node_channel(&node_addr) {
            Ok(ch) => {
                let mut c =
                    weft_proto::v1::container_manager_client::ContainerManagerClient::new(ch);
                c.start_container(req).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(app = %app_id, attempt, node = %a.node_id, "application master started")
            }
            Err(e) => {
                warn!(app = %app_id, attempt, error = %e.message(), "application master could not start");
                // An unreachable node is not the job's fault (a free attempt).
                let unreachable = weft_common::codes::start_refused_transiently(&e);
                let _ = self
                    .raft
                    .propose(Command::ContainersCompleted {
                        completions: vec![Completion {
                            container_id: a.container_id,
                            state: if unreachable {
                                ContainerEnd::Lost
                            } else {
                                ContainerEnd::Failed
                            },
                            exit_status: weft_proto::exit_codes::LAUNCH_FAILED,
                            diagnostic: format!(
                                "could not start the application master: {}",
                                e.message()
                            ),
                        }],
                        still_running: false,
                        at_ms: now_ms(),
                    })
                    .await;
            }
        }
    }

    /// One round over the table: the allocations to propose and, for each,
    /// its (app, ask id). None when nothing is placed. The view kept
    /// from the last round is patched under the state's lock (the nodes
    /// that changed since); the scheduler runs on a blocking thread with
    /// no lock held (the raft thread applies meanwhile); ports are then
    /// numbered against the latest state.
    async fn round(
        &self,
        reservations: &mut Reservations,
        view: &mut crate::view::View,
        term: u64,
        counter: &mut u64,
    ) -> Option<Planned> {
        let mut input = self.round_input(view)?;
        let mut held = std::mem::take(reservations);
        let mut kept = std::mem::take(view);
        let (out, input, held, kept) = tokio::task::spawn_blocking(move || {
            let (out, _) =
                scheduler::schedule_with(kept.cluster(), &mut input.queues, &input.asks, &mut held);
            (out, input, held, kept)
        })
        .await
        .expect("the scheduler does not panic");
        *view = kept;
        let node_ids = view.ids();
        *reservations = held;
        if out.is_empty() {
            return None;
        }
        let RoundInput {
            asks,
            keys,
            gangs,
            busy,
            ..
        } = input;
        let state = self.raft.state();
        let mut allocations = Vec::with_capacity(out.len());
        let mut out_keys = Vec::with_capacity(out.len());
        // Ports taken on each node so far: given to its containers, bound
        // there by anything, or given earlier in this round.
        let mut taken: HashMap<usize, BTreeSet<u16>> = HashMap::new();
        // Gangs a member of which found too few ports (the state moved on
        // while the round ran): dropped whole, asked again next round.
        let mut short: HashSet<String> = HashSet::new();
        for p in out {
            let i = p.ask as usize;
            let ports = if asks[i].ports == 0 {
                Vec::new()
            } else {
                let Some(node) = state.nodes.get(&node_ids[p.node]) else {
                    continue;
                };
                let used = taken.entry(p.node).or_insert_with(|| {
                    let mut u = state.node_use(&node.id).ports;
                    u.extend(busy.get(&node.id).into_iter().flatten());
                    u
                });
                let free: Vec<u16> = (node.ports.first..=node.ports.last)
                    .filter(|q| !used.contains(q))
                    .take(asks[i].ports as usize)
                    .collect();
                if free.len() < asks[i].ports as usize {
                    short.extend(gangs[i].clone());
                    continue;
                }
                used.extend(&free);
                free
            };
            *counter += 1;
            let (app, ask_id) = keys[i].clone();
            let share = matches!(asks[i].gpu, GpuAsk::Share { .. });
            allocations.push(Allocation {
                container_id: format!("c{term:x}-{counter}"),
                app_id: app.clone(),
                node_id: node_ids[p.node].clone(),
                vcores_milli: asks[i].vcores,
                memory_bytes: asks[i].memory,
                gpus: if share {
                    vec![]
                } else {
                    p.gpus.iter().map(|g| g.device as u32).collect()
                },
                gpu_share: if share {
                    p.gpus.first().map(|g| crate::fsm::GpuShare {
                        device: g.device as u32,
                        milli: g.milli,
                        memory_bytes: g.memory,
                    })
                } else {
                    None
                },
                ask_id: ask_id.clone(),
                gang: gangs[i].clone(),
                ports,
            });
            out_keys.push((app, ask_id));
        }
        drop(state);
        if !short.is_empty() {
            let (a, k): (Vec<Allocation>, Vec<(String, String)>) = allocations
                .into_iter()
                .zip(out_keys)
                .filter(|(a, _)| a.gang.as_ref().is_none_or(|g| !short.contains(g)))
                .unzip();
            (allocations, out_keys) = (a, k);
        }
        (!allocations.is_empty()).then_some((allocations, out_keys))
    }

    /// The scheduler's input, taken from the state and the table (locks
    /// held only here). None when nothing is asked for.
    fn round_input(&self, view: &mut crate::view::View) -> Option<RoundInput> {
        let state = self.raft.state();
        let queues = queue_view(&state);
        let mut t = self.table.lock().expect("table lock");
        // Asks of applications that ended leave the table with the round
        // that first sees them ended: nothing is planned for them again.
        let live = |id: &String| state.apps.get(id).is_some_and(|a| !a.state.is_terminal());
        t.asks.retain(|id, _| live(id));
        t.masters.retain(|id, _| live(id));
        t.undelivered.retain(|id, _| live(id));
        let mut asks = Vec::new();
        let mut keys = Vec::new();
        let mut gangs: Vec<Option<String>> = Vec::new();
        for (app_id, list) in &t.asks {
            let Some(app) = state.apps.get(app_id) else {
                continue;
            };
            let Some(q) = queues.index(&app.queue) else {
                continue;
            };
            for (ra, count) in list {
                for _ in 0..*count {
                    let mut a = to_ask(ra, asks.len() as u64, q, &app.user);
                    if !ra.gang_id.is_empty() {
                        a.gang = Some(gang_key(app_id, &ra.gang_id));
                    }
                    a.seq = app.submitted_at_ms;
                    asks.push(a);
                    keys.push((app_id.clone(), ra.ask_id.clone()));
                    gangs
                        .push((!ra.gang_id.is_empty()).then(|| format!("{app_id}/{}", ra.gang_id)));
                }
            }
        }
        for (app_id, ra) in &t.masters {
            let Some(app) = state.apps.get(app_id) else {
                continue;
            };
            let Some(q) = queues.index(&app.queue) else {
                continue;
            };
            let mut a = to_ask(ra, asks.len() as u64, q, &app.user);
            a.seq = app.submitted_at_ms;
            asks.push(a);
            keys.push((app_id.clone(), MASTER_ASK.to_string()));
            gangs.push(None);
        }
        drop(t);
        if asks.is_empty() {
            return None;
        }
        let busy = self.busy_ports.lock().expect("busy ports lock").clone();
        view.refresh(&state, &busy);
        Some(RoundInput {
            queues,
            asks,
            keys,
            gangs,
            busy,
        })
    }
}

/// What one scheduling round works on.
struct RoundInput {
    queues: Queues,
    asks: Vec<Ask>,
    /// Per ask: (app, ask id).
    keys: Vec<(String, String)>,
    /// Per ask: its gang key (app/gang id), if in a gang.
    gangs: Vec<Option<String>>,
    busy: HashMap<String, BTreeSet<u16>>,
}

/// The end of a job whose master attempts ran out (`extra_free`: attempts
/// not yet recorded as free), or None while it may try again.
fn attempts_exhausted(
    app: &crate::fsm::App,
    spec: &weft_spec::JobSpec,
    extra_free: u32,
    why: &str,
) -> Option<Command> {
    let free = (app.free_attempts + extra_free).min(FREE_ATTEMPTS);
    let failed = app.attempt.saturating_sub(free);
    (failed >= spec.max_attempts).then(|| Command::ApplicationFinished {
        app_id: app.id.clone(),
        state: AppState::Failed,
        diagnostics: format!("the application master failed {failed} time(s); last: {why}"),
        stages: vec![],
        at_ms: now_ms(),
    })
}

/// The container token an agent needs to start `a`.
fn container_token(signer: &TokenSigner, a: &Allocation) -> Vec<u8> {
    let now = now_ms();
    signer.sign_container(&pb::ContainerTokenBody {
        container_id: a.container_id.clone(),
        application_id: a.app_id.clone(),
        node_id: a.node_id.clone(),
        vcores_milli: a.vcores_milli,
        memory_bytes: a.memory_bytes,
        gpu_indices: match a.gpu_share {
            Some(sh) => vec![sh.device],
            None => a.gpus.clone(),
        },
        gpu_share_milli: a.gpu_share.map_or(0, |sh| sh.milli),
        gpu_memory_bytes: a.gpu_share.map_or(0, |sh| sh.memory_bytes),
        issued_at_ms: now,
        expires_at_ms: now + CONTAINER_TOKEN_LIFETIME.as_millis() as u64,
    })
}

/// An allocation as its master receives it, with its container token.
fn pb_allocation(
    state: &ClusterState,
    a: &Allocation,
    signer: Option<&TokenSigner>,
) -> pb::Allocation {
    pb_allocation_at(&node_address(state, &a.node_id), a, signer)
}

/// The address of `node`'s agent (empty when unknown).
fn node_address(state: &ClusterState, node: &str) -> String {
    state
        .nodes
        .get(node)
        .map(|n| n.address.clone())
        .unwrap_or_default()
}

/// [`pb_allocation`] for an agent at `address` (no state needed: callers
/// sign outside the state's lock).
fn pb_allocation_at(address: &str, a: &Allocation, signer: Option<&TokenSigner>) -> pb::Allocation {
    pb::Allocation {
        container_id: a.container_id.clone(),
        ask_id: a.ask_id.clone(),
        node_id: a.node_id.clone(),
        node_address: address.to_string(),
        resources: Some(pb::Resources {
            vcores_milli: a.vcores_milli,
            memory_bytes: a.memory_bytes,
            gpus: a.gpus.len() as u32,
            gpu_share_milli: a.gpu_share.map_or(0, |sh| sh.milli),
            gpu_memory_bytes: a.gpu_share.map_or(0, |sh| sh.memory_bytes),
        }),
        gpu_indices: match a.gpu_share {
            Some(sh) => vec![sh.device],
            None => a.gpus.clone(),
        },
        container_token: signer.map(|s| container_token(s, a)).unwrap_or_default(),
        gpu_share_milli: a.gpu_share.map_or(0, |sh| sh.milli),
        gpu_memory_bytes: a.gpu_share.map_or(0, |sh| sh.memory_bytes),
        ports: a.ports.iter().map(|&p| p as u32).collect(),
    }
}

fn gang_key(app: &str, gang: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (app, gang).hash(&mut h);
    h.finish()
}

fn labels(expr: &str) -> Vec<(String, String)> {
    expr.split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn to_ask(ra: &pb::ResourceAsk, id: u64, queue: usize, user: &str) -> Ask {
    let r = ra.resources.unwrap_or_default();
    let mut a = Ask::new(id, queue, r.vcores_milli, r.memory_bytes);
    a.user = user.to_string();
    a.priority = ra.priority as i32;
    a.gpu = if r.gpu_share_milli > 0 {
        GpuAsk::Share {
            milli: r.gpu_share_milli,
            memory: r.gpu_memory_bytes,
        }
    } else if r.gpus > 0 {
        GpuAsk::Whole(r.gpus)
    } else {
        GpuAsk::None
    };
    a.gpu_model = (!ra.gpu_model.is_empty()).then(|| ra.gpu_model.clone());
    a.gpu_min_memory = ra.gpu_min_memory_bytes;
    a.labels = labels(&ra.node_labels);
    a.ports = ra.ports;
    a.placement = if ra.placement == pb::PlacementPolicy::Spread as i32 {
        Placement::Spread
    } else {
        Placement::Pack
    };
    a
}

pub use crate::view::{cluster_view, cluster_view_with, queue_view};

/// The ApplicationMasterService.
pub struct AmService {
    s: Scheduling,
}

impl AmService {
    pub fn new(s: Scheduling) -> Self {
        AmService { s }
    }

    /// Checks an application token: signed by this group, for this
    /// application and (when the call names one) this attempt. Returns the
    /// attempt the token is for.
    fn authorize(&self, token: &[u8], app: &str, attempt: u32) -> Result<u32, Status> {
        let signer = self
            .s
            .signer()
            .ok_or_else(|| Status::unavailable("the resource manager has no token key yet"))?;
        let body = signer
            .verify_application(token)
            .map_err(|e| Status::permission_denied(format!("application_token: {e}")))?;
        if body.application_id != app {
            return Err(Status::permission_denied(format!(
                "application_token: issued for {}, not {app}",
                body.application_id
            )));
        }
        if attempt != 0 && attempt != body.attempt {
            return Err(Status::permission_denied(format!(
                "application_token: issued for attempt {}, not {attempt}",
                body.attempt
            )));
        }
        self.s
            .table
            .lock()
            .expect("table lock")
            .last_seen
            .insert(app.to_string(), std::time::Instant::now());
        Ok(body.attempt)
    }

    /// The application, if it is live and `attempt` (when given) is current.
    fn live_app(&self, id: &str, attempt: u32) -> Result<crate::fsm::App, Status> {
        let st = self.s.raft.state();
        match st.apps.get(id) {
            None => Err(Error::NotFound(format!("application_id: no application {id}")).into()),
            Some(a) if a.state.is_terminal() => Err(Status::failed_precondition(format!(
                "application_id: {id} already ended ({:?})",
                a.state
            ))),
            Some(a) if attempt > 0 && attempt < a.attempt => {
                Err(Status::failed_precondition(format!(
                    "attempt: {attempt} of {id} was replaced by attempt {}",
                    a.attempt
                )))
            }
            Some(a) => Ok(a.clone()),
        }
    }
}

#[tonic::async_trait]
impl pb::application_master_service_server::ApplicationMasterService for AmService {
    async fn register_application_master(
        &self,
        req: Request<pb::RegisterApplicationMasterRequest>,
    ) -> Result<Response<pb::RegisterApplicationMasterResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        r.attempt = self.authorize(&r.application_token, &r.application_id, r.attempt)?;
        let app = self.live_app(&r.application_id, r.attempt)?;
        if r.attempt > app.attempt {
            let keep_containers = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
                .map_or(true, |s| s.keep_containers);
            let started = self
                .s
                .raft
                .propose(Command::AttemptStarted {
                    app_id: r.application_id.clone(),
                    attempt: r.attempt,
                    am_container: None,
                    keep_containers,
                    previous_lost: false,
                    at_ms: now_ms(),
                })
                .await?;
            if let Outcome::Rejected(why) = started {
                return Err(Status::failed_precondition(why));
            }
        }
        // Work-preserving restart: what earlier attempts left running, and
        // what they finished.
        let signer = self.s.signer();
        let st = self.s.raft.state();
        let mut resp = pb::RegisterApplicationMasterResponse {
            max_container: st
                .nodes
                .values()
                .map(|n| (n.vcores_milli, n.memory_bytes))
                .max()
                .map(|(v, m)| pb::Resources {
                    vcores_milli: v,
                    memory_bytes: m,
                    ..Default::default()
                }),
            ..Default::default()
        };
        // Ends already known to the new attempt are not reported again.
        let mut delivered = Vec::new();
        for c in st.containers_of(&r.application_id) {
            if c.alloc.ask_id == MASTER_ASK {
                continue;
            }
            match c.phase {
                ContainerPhase::Running => {
                    resp.running_containers
                        .push(pb_allocation(&st, &c.alloc, signer.as_ref()));
                }
                ContainerPhase::Completed
                    if c.end
                        .as_ref()
                        .is_some_and(|e| e.state == ContainerEnd::Succeeded) =>
                {
                    delivered.push(c.alloc.container_id.clone());
                    resp.succeeded_containers
                        .push(pb_allocation(&st, &c.alloc, None));
                }
                _ => {}
            }
        }
        drop(st);
        let mut t = self.s.table.lock().expect("table lock");
        t.reported.extend(delivered);
        drop(t);
        Ok(Response::new(resp))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        r.attempt = self.authorize(&r.application_token, &r.application_id, r.attempt)?;
        let app = self.live_app(&r.application_id, r.attempt)?;
        // Progress, replicated when it changed.
        if !r.stages.is_empty() && r.attempt == app.attempt {
            let stages: Vec<crate::fsm::StageProgress> = r.stages.iter().map(Into::into).collect();
            if stages != app.stages {
                // Off the call's path: progress is advisory.
                let (raft, cmd) = (
                    self.s.raft.clone(),
                    Command::ReportProgress {
                        app_id: r.application_id.clone(),
                        attempt: r.attempt,
                        stages,
                    },
                );
                tokio::spawn(async move {
                    if let Err(e) = raft.propose(cmd).await {
                        debug!(error = %e, "progress not recorded");
                    }
                });
            }
        }
        // Check every ask before taking any.
        {
            let state = self.s.raft.state();
            let (cluster, _) = cluster_view(&state);
            let queues = queue_view(&state);
            let q = queues.index(&app.queue).ok_or_else(|| {
                Status::failed_precondition(format!("queue: {} no longer exists", app.queue))
            })?;
            for (i, ra) in r.asks.iter().enumerate() {
                let res = ra.resources.unwrap_or_default();
                if res.gpu_share_milli > 1000 || (res.gpu_share_milli > 0 && res.gpus > 0) {
                    return Err(Error::InvalidArgument {
                        field: "asks.resources.gpu_share_milli",
                        reason: format!(
                            "ask {:?}: a share is of one GPU (1 to 1000 thousandths), not combined with whole gpus",
                            ra.ask_id
                        ),
                    }
                    .into());
                }
                if res.memory_bytes == 0 {
                    return Err(Error::InvalidArgument {
                        field: "asks.resources.memory_bytes",
                        reason: format!("ask {:?} must ask for some memory", ra.ask_id),
                    }
                    .into());
                }
                // With no node registered yet (a cluster starting), asks wait
                // for nodes rather than being judged against none.
                if cluster.nodes.is_empty() {
                    continue;
                }
                scheduler::validate_ask(&cluster.nodes, &queues, &to_ask(ra, 0, q, &app.user))
                    .map_err(|e| {
                        Status::invalid_argument(format!("asks[{i}] ({}): {e}", ra.ask_id))
                    })?;
            }
        }
        // Releases end their containers (the agents stop them at their next heartbeat).
        if !r.releases.is_empty() {
            let known: Vec<String> = {
                let st = self.s.raft.state();
                r.releases
                    .iter()
                    .filter(|id| {
                        st.containers
                            .get(*id)
                            .is_some_and(|c| c.alloc.app_id == r.application_id)
                    })
                    .cloned()
                    .collect()
            };
            let completions = known
                .into_iter()
                .map(|id| Completion {
                    container_id: id,
                    state: ContainerEnd::Killed,
                    exit_status: weft_proto::exit_codes::USER_REQUESTED,
                    diagnostic: "released by the application master".into(),
                })
                .collect();
            self.s
                .raft
                .propose(Command::ContainersCompleted {
                    completions,
                    still_running: true,
                    at_ms: now_ms(),
                })
                .await?;
        }
        {
            let signer = self.s.signer();
            // Lock order everywhere: the state, then the table.
            let st = self.s.raft.state();
            let mut t = self.s.table.lock().expect("table lock");
            if t.synced.insert(r.application_id.clone()) {
                let waiting: Vec<pb::Allocation> = st
                    .containers_of(&r.application_id)
                    .filter(|c| {
                        c.phase == ContainerPhase::Allocated && c.alloc.ask_id != MASTER_ASK
                    })
                    .map(|c| pb_allocation(&st, &c.alloc, signer.as_ref()))
                    .collect();
                let list = t.undelivered.entry(r.application_id.clone()).or_default();
                for a in waiting {
                    if !list.iter().any(|x| x.container_id == a.container_id) {
                        list.push(a);
                    }
                }
            }
            let undelivered: Vec<String> = t
                .undelivered
                .get(&r.application_id)
                .map(|v| v.iter().map(|a| a.ask_id.clone()).collect())
                .unwrap_or_default();
            let list = r
                .asks
                .iter()
                .map(|a| {
                    let already = undelivered.iter().filter(|x| **x == a.ask_id).count() as u32;
                    (a.clone(), a.count.saturating_sub(already))
                })
                .collect();
            t.asks.insert(r.application_id.clone(), list);
        }
        self.s.wake.notify_one();
        // Long poll: answer at once when something is waiting, else wait.
        let wait = Duration::from_millis(r.wait_ms).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.s.delivered.notified();
            if let Some(resp) = self.take_news(&r.application_id) {
                return Ok(Response::new(resp));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(
                    self.take_news(&r.application_id).unwrap_or_default(),
                ));
            }
        }
    }

    async fn finish_application_master(
        &self,
        req: Request<pb::FinishApplicationMasterRequest>,
    ) -> Result<Response<pb::FinishApplicationMasterResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        r.attempt = self.authorize(&r.application_token, &r.application_id, r.attempt)?;
        {
            let st = self.s.raft.state();
            if let Some(a) = st.apps.get(&r.application_id) {
                if r.attempt > 0 && r.attempt < a.attempt {
                    return Err(Status::failed_precondition(format!(
                        "attempt: {} of {} was replaced by attempt {}",
                        r.attempt, r.application_id, a.attempt
                    )));
                }
            }
        }
        let state = match pb::FinalStatus::try_from(r.final_status) {
            Ok(pb::FinalStatus::Succeeded) => AppState::Succeeded,
            Ok(pb::FinalStatus::Failed) => AppState::Failed,
            Ok(pb::FinalStatus::Killed) => AppState::Killed,
            _ => {
                return Err(Error::InvalidArgument {
                    field: "final_status",
                    reason: "must be SUCCEEDED, FAILED or KILLED".into(),
                }
                .into())
            }
        };
        match self
            .s
            .raft
            .propose(Command::ApplicationFinished {
                app_id: r.application_id.clone(),
                state,
                diagnostics: r.diagnostics,
                stages: r.stages.iter().map(Into::into).collect(),
                at_ms: now_ms(),
            })
            .await?
        {
            Outcome::Rejected(why) => Err(Error::NotFound(why).into()),
            _ => {
                self.s
                    .table
                    .lock()
                    .expect("table lock")
                    .asks
                    .remove(&r.application_id);
                Ok(Response::new(pb::FinishApplicationMasterResponse {}))
            }
        }
    }
}

impl AmService {
    /// New allocations and newly completed containers of `app`, if any.
    fn take_news(&self, app: &str) -> Option<pb::AllocateResponse> {
        let state = self.s.raft.state();
        let mut t = self.s.table.lock().expect("table lock");
        let allocations = t.undelivered.remove(app).unwrap_or_default();
        let mut completed = Vec::new();
        for c in state.containers_of(app) {
            if c.phase == ContainerPhase::Completed && !t.reported.contains(&c.alloc.container_id) {
                t.reported.insert(c.alloc.container_id.clone());
                let end = c.end.clone();
                completed.push(pb::ContainerStatus {
                    container_id: c.alloc.container_id.clone(),
                    state: match end.as_ref().map(|e| e.state) {
                        Some(ContainerEnd::Succeeded) => pb::ContainerState::Succeeded,
                        Some(ContainerEnd::Failed) => pb::ContainerState::Failed,
                        Some(ContainerEnd::Lost) => pb::ContainerState::Lost,
                        _ => pb::ContainerState::Killed,
                    } as i32,
                    exit: end.map(|e| pb::ContainerExit {
                        exit_status: e.exit_status,
                        diagnostic: e.diagnostic,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        if allocations.is_empty() && completed.is_empty() {
            return None;
        }
        Some(pb::AllocateResponse {
            allocations,
            completed,
            lost_nodes: vec![],
        })
    }
}
