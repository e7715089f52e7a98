//! The leader's scheduling loop (one per leadership, started and stopped by
//! the supervisor in [`crate::leader`]).
//!
//! Application masters send their outstanding asks with every Allocate call
//! (absolute counts, so a new leader rebuilds the table from the next call;
//! the service is [`crate::service::am`]). The loop runs a scheduler round
//! when asks arrive, containers end or nodes change (and every half second),
//! over the view [`crate::view::View`] keeps, verifies each round's plan
//! against the latest applied state and commits the part that fits as one
//! `ContainersAllocated` command; the allocations then go to their masters,
//! whose Allocate long poll answers early. [`masters`] starts and watches
//! application masters; [`round`] makes one round's plan.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tonic::Status;
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
use crate::view::queue_view;

pub mod masters;
pub mod preempt;
pub mod round;
pub mod why;

/// Longest an Allocate call is held when nothing changes.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// A pass of the scheduling loop that worked less than this is followed at
/// once by the next (a small cluster's pass takes microseconds); one that
/// worked longer is followed by as long a rest, up to [`MAX_REST`].
pub const MIN_REST: Duration = Duration::from_micros(500);
pub const MAX_REST: Duration = Duration::from_millis(250);

/// How long a node whose agent a master's start could not reach is held
/// out of placements at the least: until a heartbeat that left it after
/// the failure (one every `heartbeat_interval`). Without it, the leader
/// placed a master again and again on a node cut off from it but not yet
/// declared lost, each failed start a lost attempt, until the job ran out of
/// attempts (seen in the fault harness: six in a row, the job FAILED).
pub const HOLD_OUT_MIN: Duration = Duration::from_secs(2);

/// Master attempts lost with their node that do not count against
/// `max_attempts` (beyond these they do, so a job cannot retry forever).
pub const FREE_ATTEMPTS: u32 = 5;

pub use crate::tokens::{application_token, container_token, CONTAINER_TOKEN_LIFETIME};

/// The leader's scheduling table. Lock order: the replicated state's read
/// lock first, then this table (a reader waiting on the state behind the
/// raft thread's write while holding the table would deadlock).
#[derive(Default)]
pub(crate) struct Table {
    /// app -> its outstanding asks (ask as sent, count still wanted).
    pub(crate) asks: HashMap<String, Vec<(pb::ResourceAsk, u32)>>,
    /// app -> allocations granted but not yet handed to its master.
    pub(crate) undelivered: HashMap<String, Vec<pb::Allocation>>,
    /// Completed containers already reported to their masters.
    pub(crate) reported: HashSet<String>,
    /// The asks for jobs' next masters' containers.
    pub(crate) masters: MasterAsks,
    /// Apps whose master heard, under this leader, of every container the
    /// state holds for it (a new leader re-sends what its predecessor may
    /// not have delivered; masters release what they do not need).
    pub(crate) synced: HashSet<String>,
    /// app -> when its master last called (launched masters only).
    pub(crate) last_seen: HashMap<String, std::time::Instant>,
    /// Apps whose master container is granted and being started (its
    /// attempt not recorded yet): no other master is asked for.
    pub(crate) launching: HashSet<String>,
    /// app -> since when (or when last asked again) this leader has seen
    /// its master's container granted but not running.
    pub(crate) unstarted: HashMap<String, std::time::Instant>,
    /// Jobs every master pass looks at (see `manage_masters`): a master
    /// granted, starting or running, or an end being proposed.
    pub(crate) watch: BTreeSet<String>,
    /// The last job (`app_seq`) a master pass has looked at.
    pub(crate) pass_seq: u64,
    /// When the last master pass over every job ran (none yet: the next
    /// pass is one).
    pub(crate) full_pass_at: Option<std::time::Instant>,
    /// Nodes the last round held for units that waited long (starvation
    /// control), for `why`.
    pub(crate) held: Vec<HeldNodes>,
}

/// Nodes held for one waiting unit.
#[derive(Debug, Clone)]
pub(crate) struct HeldNodes {
    pub(crate) app: String,
    /// Its ask, or `gang <id>`.
    pub(crate) what: String,
    pub(crate) nodes: Vec<String>,
}

pub use crate::fsm::MASTER_ASK;

/// Jobs the master bookkeeping looks at under one hold of the state's lock.
pub const MASTER_PASS_CHUNK: usize = 1024;

/// How often a master pass looks at every job, not only the new and the
/// watched ones (a net under the watch list; a leadership's first pass is
/// one too).
pub const FULL_MASTER_PASS_EVERY: Duration = Duration::from_secs(10);

/// Master asks handed to one round, per queue: the oldest waiting.
pub const MASTERS_PER_ROUND: usize = 256;

/// Jobs waiting for a master's container, each queue's in submission
/// order. A round hands the scheduler the oldest [`MASTERS_PER_ROUND`] of
/// each queue (more could not start in one round on most clusters, and the
/// rest start in the rounds after), not every waiting job's: a backlog of
/// thousands made every round, and the state's lock it holds, as long as
/// the backlog (seen: writes' p99 growing from 3 to 10 ms over 15,000
/// waiting jobs).
#[derive(Default)]
pub(crate) struct MasterAsks {
    /// app -> (its queue, its submission order, the ask).
    by_app: HashMap<String, (String, (u64, String), pb::ResourceAsk)>,
    /// queue -> its waiting jobs, oldest first.
    by_queue: HashMap<String, BTreeSet<(u64, String)>>,
}

impl MasterAsks {
    pub(crate) fn contains_key(&self, app: &str) -> bool {
        self.by_app.contains_key(app)
    }

    /// Asks for `app`'s next master (in `queue`; `seq`: its place in submission order).
    pub(crate) fn insert(&mut self, app: &str, queue: &str, seq: u64, ask: pb::ResourceAsk) {
        self.remove(app);
        let key = (seq, app.to_string());
        self.by_queue
            .entry(queue.to_string())
            .or_default()
            .insert(key.clone());
        self.by_app
            .insert(app.to_string(), (queue.to_string(), key, ask));
    }

    /// The ask for `app`'s next master, if it waits for one.
    pub(crate) fn ask_of(&self, app: &str) -> Option<&pb::ResourceAsk> {
        self.by_app.get(app).map(|(_, _, a)| a)
    }

    /// Jobs of `queue` waiting for a master that were submitted before
    /// `seq`.
    pub(crate) fn ahead_in(&self, queue: &str, seq: u64) -> u32 {
        self.by_queue.get(queue).map_or(0, |set| {
            set.range(..(seq, String::new()))
                .count()
                .min(u32::MAX as usize) as u32
        })
    }

    pub(crate) fn remove(&mut self, app: &str) {
        if let Some((queue, key, _)) = self.by_app.remove(app) {
            if let Some(set) = self.by_queue.get_mut(&queue) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_queue.remove(&queue);
                }
            }
        }
    }

    /// Per queue, its waiting jobs oldest first: (app, ask).
    pub(crate) fn queues(
        &self,
    ) -> impl Iterator<Item = impl Iterator<Item = (&String, &pb::ResourceAsk)>> {
        self.by_queue.values().map(|set| {
            set.iter()
                .map(|(_, app)| (app, &self.by_app[app.as_str()].2))
        })
    }
}

/// A round's allocations to propose, each with its (app, ask id).
pub(crate) type Planned = (Vec<Allocation>, Vec<(String, String)>);

/// Counters of the scheduling loop (this member's, since it started).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) rounds: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) placed: AtomicU64,
    pub(crate) refused_at_verify: AtomicU64,
    pub(crate) refused_at_apply: AtomicU64,
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
    pub(crate) raft: RaftHandle,
    /// Present when the leader starts application masters.
    pub(crate) masters: Option<Arc<crate::config::MastersConfig>>,
    pub(crate) table: Arc<Mutex<Table>>,
    /// Wakes the loop (new asks, ended containers, node changes).
    pub(crate) wake: Arc<Notify>,
    /// Wakes Allocate long polls (new allocations or completions).
    pub(crate) delivered: Arc<Notify>,
    /// The group's token keys as signers and verifiers, built from the
    /// replicated ones (rebuilt when they change).
    pub(crate) keys: Arc<Mutex<Arc<Keys>>>,
    /// Connections to node agents (masters are started through them).
    /// Connections to agents, and the TLS generation they were made under.
    pub(crate) channels: Arc<Mutex<(u64, HashMap<String, tonic::transport::Channel>)>>,
    /// In-process masters (standalone mode): app -> its runner task and,
    /// once it ended without finishing its job, why.
    pub(crate) local: Arc<Mutex<HashMap<String, LocalMaster>>>,
    /// What the loop has done (rounds, placements, refusals).
    pub(crate) stats: Arc<Counters>,
    /// node -> ports of its range bound there, as its agent last reported
    /// (by anything): never handed out.
    pub(crate) busy_ports: Arc<Mutex<HashMap<String, BTreeSet<u16>>>>,
    /// node -> when this leader last failed to reach its agent to start a
    /// master there: no placements on it until it is heard from again
    /// [`HOLD_OUT_MIN`] later (or declared lost).
    pub(crate) unreachable: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// When the leader preempts (`[preemption]`).
    pub(crate) preemption: Arc<crate::config::PreemptionConfig>,
    /// When the preemption planner last ran (it runs at most every
    /// [`preempt::PLAN_EVERY`]).
    pub(crate) planned_at: Arc<Mutex<Option<std::time::Instant>>>,
}

/// The group's token keys, ready to sign and verify with.
#[derive(Default)]
pub struct Keys {
    /// (id, seed) of each key, as the state held them when these were made.
    made_from: Vec<(u32, String)>,
    /// Each key with the time it signs from.
    signers: Vec<(u64, TokenSigner)>,
    /// Every key, to check tokens with.
    pub set: weft_proto::token::KeySet,
    /// The group's identity (its first key's public key).
    pub group: Vec<u8>,
}

impl Keys {
    fn of(st: &crate::fsm::ClusterState) -> Keys {
        let signers: Vec<(u64, TokenSigner)> = st
            .token_keys
            .iter()
            .filter_map(|k| {
                let s = TokenSigner::from_seed_hex(&k.seed_hex).ok()?;
                Some((k.signs_from_ms, s.with_id(k.id)))
            })
            .collect();
        Keys {
            made_from: st
                .token_keys
                .iter()
                .map(|k| (k.id, k.seed_hex.clone()))
                .collect(),
            set: weft_proto::token::KeySet::new(
                signers
                    .iter()
                    .map(|(_, s)| (s.id(), s.verifier()))
                    .collect(),
            ),
            group: hex::decode(&st.token_group).unwrap_or_default(),
            signers,
        }
    }

    /// The key that signs at `now_ms` (see `ClusterState::signing_key`).
    pub fn signer(&self, now_ms: u64) -> Option<TokenSigner> {
        self.signers
            .iter()
            .rev()
            .find(|(from, _)| *from <= now_ms)
            .or_else(|| self.signers.first())
            .map(|(_, s)| s.clone())
    }

    /// The newest key's public key: what an agent must hold to be offered
    /// work (empty: no key yet).
    pub fn newest_public_key(&self) -> Vec<u8> {
        self.signers
            .last()
            .map(|(_, s)| s.public_key().to_vec())
            .unwrap_or_default()
    }

    /// Whether an agent whose newest key is `reported` holds the key that
    /// signs at `now_ms` (it learns every key, so holding a key as new or
    /// newer means holding that one; a pinned older key does not).
    pub fn holds_signing(&self, reported: &[u8], now_ms: u64) -> bool {
        let Some(signing) = self.signer(now_ms) else {
            return true;
        };
        self.signers
            .iter()
            .find(|(_, s)| s.public_key().as_slice() == reported)
            .is_some_and(|(_, s)| s.id() >= signing.id())
    }

    /// Every key's public key, as agents are told them.
    pub fn public_keys(&self) -> Vec<pb::TokenKey> {
        self.signers
            .iter()
            .map(|(_, s)| pb::TokenKey {
                id: s.id(),
                public_key: s.public_key().to_vec(),
            })
            .collect()
    }
}

pub(crate) struct LocalMaster {
    pub(crate) task: tokio::task::JoinHandle<()>,
    pub(crate) failure: Arc<Mutex<Option<String>>>,
}

impl Scheduling {
    pub fn new(raft: RaftHandle, masters: Option<crate::config::MastersConfig>) -> Self {
        Scheduling {
            raft,
            masters: masters.map(Arc::new),
            table: Arc::default(),
            wake: Arc::new(Notify::new()),
            delivered: Arc::new(Notify::new()),
            keys: Arc::default(),
            channels: Arc::default(),
            local: Arc::default(),
            stats: Arc::default(),
            busy_ports: Arc::default(),
            unreachable: Arc::default(),
            preemption: Arc::default(),
            planned_at: Arc::default(),
        }
    }

    /// The node's agent registered or heartbeat: a hold-out since long
    /// enough ends (a heartbeat already on its way when the start failed
    /// does not end it).
    pub fn node_heard(&self, node: &str) {
        let mut held = self.unreachable.lock().expect("unreachable lock");
        if held
            .get(node)
            .is_some_and(|at| at.elapsed() >= HOLD_OUT_MIN)
        {
            held.remove(node);
            drop(held);
            self.wake.notify_one();
        }
    }

    /// This leader could not reach `node`'s agent (a master's start there
    /// failed for that): it gets no placements until heard from again.
    pub(crate) fn hold_out(&self, node: &str) {
        self.unreachable
            .lock()
            .expect("unreachable lock")
            .insert(node.to_string(), std::time::Instant::now());
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
        let mut guard = self.channels.lock().expect("channels lock");
        let (made_under, map) = &mut *guard;
        // Certificates reloaded since: new connections show the new ones.
        let generation = weft_common::tls::generation();
        if *made_under != generation {
            map.clear();
            *made_under = generation;
        }
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = weft_common::net::endpoint(
            addr,
            weft_common::tls::Role::Agent,
            Duration::from_secs(2),
            Some(Duration::from_secs(10)),
        )
        .map_err(|e| Status::invalid_argument(format!("node address {addr:?}: {e}")))?
        .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The group's token keys (none until the first leader made one).
    pub fn keys(&self) -> Arc<Keys> {
        let st = self.raft.state();
        let mut cache = self.keys.lock().expect("keys lock");
        let same = cache.made_from.len() == st.token_keys.len()
            && cache
                .made_from
                .iter()
                .zip(&st.token_keys)
                .all(|((id, seed), k)| *id == k.id && *seed == k.seed_hex);
        if !same {
            *cache = Arc::new(Keys::of(&st));
        }
        cache.clone()
    }

    /// The signer for new tokens (the key that signs now), if the group has
    /// a key yet.
    pub fn signer(&self) -> Option<TokenSigner> {
        self.keys().signer(crate::tokens::token_clock_ms())
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

    /// How long an Allocate call may wait for news: [`MAX_WAIT`], and a
    /// third of the masters' `expiry`, so that a master waiting as long as
    /// it may still calls well within it.
    pub fn max_wait(&self) -> Duration {
        match &self.masters {
            Some(m) if !m.in_process => MAX_WAIT.min(m.expiry / 3),
            _ => MAX_WAIT,
        }
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
        // Masters waiting in a long poll here go on to the new leader now.
        self.delivered.notify_waiters();
        self.unreachable.lock().expect("unreachable lock").clear();
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
        // How long the last pass's own work took (its scans of the state
        // and the scheduler; not the proposals' round trips).
        let mut worked = Duration::ZERO;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = cancel.cancelled() => return,
                }
                // Rest as long as the last pass worked: events that come
                // meanwhile (a submission each, at hundreds a second) fold
                // into the next pass, so that the passes over a long
                // backlog take at most half of a core, and the state's lock
                // (which the raft thread needs to apply) half the time.
                if worked >= MIN_REST {
                    tokio::select! {
                        _ = tokio::time::sleep(worked.min(MAX_REST)) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
            let status = self.raft.status();
            if self.signer().is_none() {
                if let Err(e) = self.ensure_signer().await {
                    debug!(error = %e, "token key not made yet");
                }
            }
            worked = Duration::ZERO;
            if self.masters.is_some() {
                worked += self.manage_masters().await;
            }
            let started = std::time::Instant::now();
            let planned = self
                .round(&mut reservations, &mut view, status.term, &mut counter)
                .await;
            worked += started.elapsed();
            let Some((plan, keys)) = planned else {
                continue;
            };
            self.raft
                .metrics()
                .round_seconds
                .observe(started.elapsed().as_secs_f64());
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
            let addresses: Vec<(String, crate::tokens::Owner)> = {
                let st = self.raft.state();
                granted_now
                    .iter()
                    .map(|(a, _)| {
                        (
                            node_address(&st, &a.node_id),
                            crate::tokens::Owner::of(&st, &a.app_id),
                        )
                    })
                    .collect()
            };
            let (granted_now, delivered) = tokio::task::spawn_blocking(move || {
                let delivered: Vec<Option<pb::Allocation>> = granted_now
                    .iter()
                    .zip(&addresses)
                    .map(|((a, (_, ask_id)), (addr, owner))| {
                        (ask_id != MASTER_ASK)
                            .then(|| pb_allocation_at(addr, owner, a, signer.as_ref()))
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
                        t.masters.remove(app.as_str());
                        t.launching.insert(app.clone());
                        t.watch.insert(app.clone());
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
}

/// An allocation as its master receives it, with its container token.
pub(crate) fn pb_allocation(
    state: &ClusterState,
    a: &Allocation,
    signer: Option<&TokenSigner>,
) -> pb::Allocation {
    pb_allocation_at(
        &node_address(state, &a.node_id),
        &crate::tokens::Owner::of(state, &a.app_id),
        a,
        signer,
    )
}

/// The address of `node`'s agent (empty when unknown).
pub(crate) fn node_address(state: &ClusterState, node: &str) -> String {
    state
        .nodes
        .get(node)
        .map(|n| n.address.clone())
        .unwrap_or_default()
}

/// [`pb_allocation`] for an agent at `address` (no state needed: callers
/// sign outside the state's lock).
pub(crate) fn pb_allocation_at(
    address: &str,
    owner: &crate::tokens::Owner,
    a: &Allocation,
    signer: Option<&TokenSigner>,
) -> pb::Allocation {
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
        container_token: signer
            .map(|s| container_token(s, a, owner))
            .unwrap_or_default(),
        gpu_share_milli: a.gpu_share.map_or(0, |sh| sh.milli),
        gpu_memory_bytes: a.gpu_share.map_or(0, |sh| sh.memory_bytes),
        ports: a.ports.iter().map(|&p| p as u32).collect(),
    }
}

/// An ask's identity across rounds: its application, its ask id and which
/// of its count (never 0, which means "none" to the scheduler).
/// (FxHash: made for every waiting ask every round, a fraction of SipHash's
/// cost; a collision would only merge two asks' wait counts.)
pub(crate) fn ask_key(app: &str, ask: &str, k: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    (app, ask, k).hash(&mut h);
    h.finish().max(1)
}

/// The spread group of an ask (a service's stage, or a role of one):
/// its application and the ask id's part before `/` (never 0).
pub(crate) fn spread_key(app: &str, ask: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let stage = ask.split_once('/').map_or(ask, |(s, _)| s);
    let mut h = rustc_hash::FxHasher::default();
    (app, stage).hash(&mut h);
    h.finish().max(1)
}

pub(crate) fn gang_key(app: &str, gang: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (app, gang).hash(&mut h);
    h.finish()
}

pub(crate) fn labels(expr: &str) -> Vec<(String, String)> {
    expr.split(',')
        .filter_map(|kv| kv.trim().split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub(crate) fn to_ask(ra: &pb::ResourceAsk, id: u64, queue: usize, user: &str) -> Ask {
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

#[cfg(test)]
mod master_asks_tests {
    use super::*;

    fn ask(vcores_milli: u64) -> pb::ResourceAsk {
        pb::ResourceAsk {
            ask_id: MASTER_ASK.into(),
            count: 1,
            resources: Some(pb::Resources {
                vcores_milli,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn waiting(m: &MasterAsks) -> Vec<Vec<(String, u64)>> {
        let mut out: Vec<Vec<(String, u64)>> = m
            .queues()
            .map(|q| {
                q.map(|(app, a)| (app.clone(), a.resources.unwrap().vcores_milli))
                    .collect()
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn each_queues_waiting_masters_come_oldest_first_and_leave_cleanly() {
        let mut m = MasterAsks::default();
        m.insert("app-3", "root.a", 30, ask(3));
        m.insert("app-1", "root.a", 10, ask(1));
        m.insert("app-2", "root.b", 20, ask(2));
        m.insert("app-4", "root.a", 5, ask(4));
        assert_eq!(
            waiting(&m),
            vec![
                vec![("app-2".into(), 2)],
                vec![
                    ("app-4".into(), 4),
                    ("app-1".into(), 1),
                    ("app-3".into(), 3)
                ],
            ]
        );
        // Asked again (a new attempt): replaced, not doubled.
        m.insert("app-1", "root.a", 10, ask(9));
        assert_eq!(waiting(&m)[1][1], ("app-1".into(), 9));
        assert_eq!(waiting(&m)[1].len(), 3);
        m.remove("app-2");
        m.remove("app-2");
        assert!(!m.contains_key("app-2"));
        assert_eq!(waiting(&m).len(), 1, "an emptied queue goes");
        for app in ["app-1", "app-3", "app-4"] {
            m.remove(app);
        }
        assert!(m.by_app.is_empty() && m.by_queue.is_empty());
    }
}
