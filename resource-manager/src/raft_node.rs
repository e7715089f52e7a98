//! The one owner of the `RawNode`: a dedicated OS thread running raft-rs's
//! ready loop (see `../shared/RAFT.md`). Everyone else holds a cloneable
//! [`RaftHandle`] to propose commands, feed peer messages and read status.
//!
//! Per round: take every queued input (proposals are batched: many writes, one
//! fsync), tick when due, then handle the Ready in raft-rs's order: leader
//! messages out; snapshot installed; role change handled (pending proposals
//! fail fast on step-down); committed entries applied; new entries, hard state
//! written and fsynced; only then follower messages out; advance; light ready.
//! A storage failure panics: the member restarts from disk.

// raft-rs's protobuf types are built field by field, as raft-rs itself does.
#![allow(clippy::field_reassign_with_default)]

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::*;
use raft::{ProgressState, StateRole};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fsm::{ClusterState, Command, Envelope, Outcome, COMMAND_VERSION};
use crate::storage::SledStorage;
use crate::transport::Network;

/// Raft settings of one member.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    /// Every initial member: raft id -> address (gRPC, all services).
    pub peers: BTreeMap<u64, String>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log every this many applied entries
    /// (a large state waits longer: see [`SNAPSHOT_BYTES_FREE`]).
    pub snapshot_every: u64,
    /// Joining an existing group: start empty and wait for the leader's
    /// snapshot instead of bootstrapping a new group.
    pub join: bool,
}

/// What readers see of the member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub is_leader: bool,
    pub leader_id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    /// Voters and learners.
    pub members: Vec<u64>,
    /// The members that do not vote yet (added, catching up).
    pub learners: Vec<u64>,
    /// This member leads and has applied an entry of its own term (the
    /// empty one a new leader appends): every entry committed before its
    /// term is in its state. Until then a new leader's state may lack
    /// grants an earlier leader had committed.
    pub caught_up: bool,
}

/// State shared between the raft thread (writer) and the services (readers).
pub struct Shared {
    pub state: RwLock<ClusterState>,
    pub status: RwLock<RaftStatus>,
    /// This member's role, published by the raft thread on every change:
    /// leader-only work starts and stops on it (nothing polls).
    pub role: tokio::sync::watch::Sender<Leadership>,
    /// What the member counts and times (served at `/metrics`).
    pub metrics: Arc<crate::metrics::RmMetrics>,
}

/// Whether this member leads, and in which term.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Leadership {
    /// Leads and has applied an entry of its own term (so everything
    /// committed before its election): its state is the group's latest.
    pub is_leader: bool,
    pub term: u64,
}

/// A change of the group's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    Add { id: u64, address: String },
    Remove { id: u64 },
}

enum Input {
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    ChangeMembers {
        change: MemberChange,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<()>>,
    },
    Message(Box<Message>),
    /// The stream of messages from this peer ended.
    StreamEnded {
        peer: u64,
    },
    /// The leader of `term` refused a connection: its process is gone.
    LeaderGone {
        term: u64,
        leader: u64,
    },
}

/// Who proposed a conf change, carried in its entry's context.
#[derive(serde::Serialize, serde::Deserialize)]
struct ConfOrigin {
    origin: u64,
    request: u64,
}

thread_local! {
    /// Read guards of the replicated state this thread holds.
    static STATE_READS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A read guard of the replicated state ([`RaftHandle::state`]).
pub struct StateGuard<'a> {
    guard: std::sync::RwLockReadGuard<'a, ClusterState>,
}

impl<'a> StateGuard<'a> {
    fn enter(guard: std::sync::RwLockReadGuard<'a, ClusterState>) -> Self {
        let held = STATE_READS.with(|n| n.replace(n.get() + 1));
        if cfg!(debug_assertions) && held > 0 {
            // Loud in every test: a panic in a request handler would only
            // fail that request.
            eprintln!(
                "resource-manager: bug: the replicated state was read-locked twice on one thread (that deadlocks once the raft thread waits to write):\n{}",
                std::backtrace::Backtrace::force_capture()
            );
            std::process::abort();
        }
        StateGuard { guard }
    }
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = ClusterState;
    fn deref(&self) -> &ClusterState {
        &self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        STATE_READS.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Cloneable access to the raft member.
#[derive(Clone)]
pub struct RaftHandle {
    tx: Sender<Input>,
    shared: Arc<Shared>,
    peers: Arc<BTreeMap<u64, String>>,
}

/// Longest a proposal may wait for its commit before the caller is told to retry.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How far behind the commit index a learner may be and still be promoted
/// (entries in flight under load; a learner this close catches up within
/// a round trip or two).
pub const LEARNER_LAG: u64 = 64;

impl RaftHandle {
    /// Proposes `command`; resolves once it is committed and applied here,
    /// with its outcome. NotLeader when this member is not the leader.
    pub async fn propose(&self, command: Command) -> Result<Outcome> {
        let started = Instant::now();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose { command, reply })
            .map_err(|_| Error::Unavailable("raft member is stopping".into()))?;
        let r = Self::await_reply(rx).await;
        let m = &self.shared.metrics;
        match &r {
            Ok(_) => m.proposal_seconds.observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                m.proposal_failures.inc();
            }
        }
        r
    }

    /// What this member counts and times.
    pub fn metrics(&self) -> Arc<crate::metrics::RmMetrics> {
        self.shared.metrics.clone()
    }

    /// Adds or removes a member; resolves once the change is committed and
    /// applied here.
    pub async fn change_members(&self, change: MemberChange) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ChangeMembers { change, reply })
            .map_err(|_| Error::Unavailable("raft member is stopping".into()))?;
        Self::await_reply(rx).await
    }

    /// Resolves once this member is confirmed leader (a heartbeat round with
    /// a quorum) and has applied everything committed before the call: reads
    /// of the state after it are linearizable.
    pub async fn read_barrier(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ReadIndex { reply })
            .map_err(|_| Error::Unavailable("raft member is stopping".into()))?;
        Self::await_reply(rx).await
    }

    async fn await_reply<T>(rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Unavailable("raft member is stopping".into())),
            Err(_) => Err(Error::Unavailable(
                "the write was not committed in time (election or lost quorum?); retry".into(),
            )),
        }
    }

    /// Hands a message from a peer to raft.
    pub fn step(&self, m: Message) {
        let _ = self.tx.send(Input::Message(Box::new(m)));
    }

    /// Says that the stream of messages from `peer` ended (its connection
    /// closed or failed): a leader whose process died is probed at once.
    pub fn peer_stream_ended(&self, peer: u64) {
        let _ = self.tx.send(Input::StreamEnded { peer });
    }

    pub fn status(&self) -> RaftStatus {
        self.shared.status.read().expect("status lock").clone()
    }

    /// This member's role as it changes (the current one first).
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<Leadership> {
        self.shared.role.subscribe()
    }

    /// The replicated state, read-locked until the guard drops. Never take
    /// it twice on one thread (directly, or through a helper that reads the
    /// state): once the raft thread waits to write, the second read waits
    /// behind it and the first is never released. Debug builds panic on it.
    pub fn state(&self) -> StateGuard<'_> {
        StateGuard::enter(self.shared.state.read().expect("state lock"))
    }

    /// A member's address: from the replicated membership, else the config.
    pub fn address_of(&self, id: u64) -> Option<String> {
        self.address_in(&self.state(), id)
    }

    /// [`RaftHandle::address_of`] for a caller already holding the state.
    pub fn address_in(&self, state: &ClusterState, id: u64) -> Option<String> {
        state
            .members
            .get(&id)
            .cloned()
            .or_else(|| self.peers.get(&id).cloned())
    }

    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    /// Ok when this member leads; NotLeader with the leader's address otherwise.
    pub fn ensure_leader(&self) -> Result<()> {
        let st = self.status();
        if st.is_leader && st.caught_up {
            Ok(())
        } else if st.is_leader {
            // Elected, but entries committed before its term may not be in
            // its state yet (a whole group restarted replays them after the
            // election): an answer now could say an application does not
            // exist, and its master would give up. A moment later it has.
            Err(Error::Unavailable(
                "this member was just elected and is applying the log: try again".into(),
            ))
        } else {
            Err(Error::NotLeader {
                leader: (st.leader_id != 0)
                    .then(|| self.address_of(st.leader_id))
                    .flatten(),
            })
        }
    }
}

/// Opens the member's storage, restores the state machine from its latest
/// snapshot, and starts the raft thread. `transport` delivers outgoing messages.
pub fn start(
    settings: RaftSettings,
    storage: SledStorage,
    transport: Box<dyn Network>,
) -> Result<(RaftHandle, std::thread::JoinHandle<()>)> {
    if storage.is_empty()? {
        if settings.join {
            info!(
                id = settings.id,
                "empty storage: waiting for the leader to send this new member a snapshot"
            );
        } else {
            // Every initial member starts from the same snapshot at index 1.
            let initial = ClusterState {
                members: settings.peers.clone(),
                ..Default::default()
            };
            let voters: Vec<u64> = settings.peers.keys().copied().collect();
            storage.bootstrap(voters.clone(), initial.to_snapshot())?;
            info!(id = settings.id, ?voters, "bootstrapped a new group");
        }
    }
    let (state, applied, snapshot_bytes) = match storage.latest_snapshot()? {
        Some((meta, data)) => (
            ClusterState::from_snapshot(&data)
                .map_err(|e| Error::Storage(format!("snapshot data: {e}")))?,
            meta.index,
            data.len() as u64,
        ),
        None => (ClusterState::default(), 0, 0),
    };
    let cfg = Config {
        id: settings.id,
        election_tick: settings.election_ticks,
        heartbeat_tick: settings.heartbeat_ticks,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| Error::Config(format!("raft: {e}")))?;
    let logger = slog::Logger::root(
        crate::slog_bridge::TracingDrain,
        slog::o!("raft_id" => settings.id),
    );
    let raw = RawNode::new(&cfg, storage.clone(), &logger)
        .map_err(|e| Error::Storage(format!("raft: {e}")))?;
    let shared = Arc::new(Shared {
        state: RwLock::new(state),
        status: RwLock::new(RaftStatus {
            id: settings.id,
            applied,
            snapshot_index: storage.snapshot_index(),
            ..Default::default()
        }),
        role: tokio::sync::watch::Sender::new(Leadership::default()),
        metrics: Arc::default(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = RaftHandle {
        tx,
        shared: shared.clone(),
        peers: Arc::new(settings.peers.clone()),
    };
    let mut member = Member {
        raw,
        storage,
        shared,
        transport,
        settings,
        pending: HashMap::new(),
        reads: HashMap::new(),
        ready_reads: Vec::new(),
        next_request: 1,
        applied,
        last_snapshot: applied,
        snapshot_bytes,
        log_bytes: 0,
        snapshotting: None,
        probes: std::sync::mpsc::channel(),
        probed: None,
        last_leader: 0,
        gone: 0,
        split_retried: 0,
    };
    member.sync_transport();
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            stop_on_panic(|| member.run(rx), |why| stop_member(&why));
        })
        .map_err(|e| Error::Storage(format!("starting the raft thread: {e}")))?;
    Ok((handle, thread))
}

struct Member {
    raw: RawNode<SledStorage>,
    storage: SledStorage,
    shared: Arc<Shared>,
    transport: Box<dyn Network>,
    settings: RaftSettings,
    /// Proposals of this member waiting for their entry to apply.
    pending: HashMap<u64, oneshot::Sender<Result<Outcome>>>,
    /// Reads waiting for their read index to be confirmed.
    reads: HashMap<u64, oneshot::Sender<Result<()>>>,
    /// Confirmed reads waiting for this member to apply up to their index.
    ready_reads: Vec<(u64, oneshot::Sender<Result<()>>)>,
    next_request: u64,
    applied: u64,
    last_snapshot: u64,
    /// Size of the latest snapshot's data.
    snapshot_bytes: u64,
    /// Bytes of the entries applied since the latest snapshot.
    log_bytes: u64,
    /// The snapshot being serialised and written off this thread; it
    /// returns its data's size.
    snapshotting: Option<std::thread::JoinHandle<u64>>,
    /// Leader probes' verdicts ([`Input::LeaderGone`]), on a channel of
    /// their own: a sender of the main one held here would keep the thread
    /// from ever seeing its inputs closed.
    probes: (Sender<Input>, Receiver<Input>),
    /// The (term, leader) probed in the current silence, so each silence
    /// of a leader is probed once.
    probed: Option<(u64, u64)>,
    /// The last leader this member followed (0: none yet).
    last_leader: u64,
    /// A leader a probe found gone (0: none since this member last
    /// followed a leader).
    gone: u64,
    /// The term in which this member, a candidate in a split election,
    /// last started the election again ([`Member::resolve_split`]).
    split_retried: u64,
}

/// A state whose snapshot is at most this large is snapshotted every
/// `snapshot_every` entries. A larger one waits, besides, until the entries
/// applied since its last snapshot hold as many bytes as that snapshot:
/// a snapshot of a busy cluster's state (megabytes, serialised and written
/// on the raft thread) every thousand small entries made the cost of each
/// write grow with the state (seen: 4,500 writes/s at 64 clients, the raft
/// thread busy serialising most of the time); this way snapshots cost at
/// most as much as the log they replace, and the log on disk stays under
/// about twice the state.
pub const SNAPSHOT_BYTES_FREE: u64 = 1 << 20;

/// What an entry costs in the log besides its data (index, term, type).
const ENTRY_OVERHEAD: u64 = 24;

/// How much later each follower in turn probes a silent leader (see
/// [`Member::watch_leader`]): more than a campaign takes to reach the
/// other voters on a LAN.
const PROBE_STAGGER: Duration = Duration::from_millis(150);

/// Whether a TCP connection to `addr` is refused (nothing listens there),
/// within 300 ms.
fn leader_refuses(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Some(sa) = addr
        .split("://")
        .last()
        .and_then(|a| a.to_socket_addrs().ok())
        .and_then(|mut it| it.next())
    else {
        return false;
    };
    matches!(
        std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// What a member's raft says of it when a probe's verdict comes.
struct RoleNow {
    follower: bool,
    term: u64,
    /// The leader it follows (0: none).
    leader: u64,
    /// Whom it voted for in `term` (0: nobody).
    vote: u64,
}

impl RoleNow {
    /// Whether the probe's verdict that `leader`, leader of `term`, is gone
    /// makes this member campaign: still following it, or following nobody
    /// since and having voted for nobody in its present term. A member that
    /// voted for a candidate since (another follower's probe was quicker)
    /// leaves the election to it: campaigning too would end an election
    /// about to be won and wait out a whole timeout (seen: 2.0-2.6 s
    /// failovers, where 0.6 s was usual).
    fn campaigns_for_gone(&self, term: u64, leader: u64) -> bool {
        self.follower
            && ((self.term == term && self.leader == leader)
                || (self.term >= term && self.leader == 0 && self.vote == 0))
    }
}

/// Whether candidate `me` starts a split election again: every voter but
/// one answered, neither side holds a majority (so only the missing vote,
/// the gone leader's, could decide), and `me` is the lowest-numbered voter
/// besides `gone`.
fn restarts_split(voters: &[u64], granted: usize, rejected: usize, gone: u64, me: u64) -> bool {
    let quorum = voters.len() / 2 + 1;
    let stuck = granted < quorum && rejected < quorum && granted + rejected + 1 == voters.len();
    let lowest = voters.iter().copied().filter(|id| *id != gone).min();
    stuck && lowest == Some(me)
}

/// Persistence failed: raft cannot go on from memory. Crash; restart from disk.
fn fatal(storage: &SledStorage, what: &str, e: impl std::fmt::Display) -> ! {
    let dir = storage.dir().display().to_string();
    let e = e.to_string();
    let place = if e.contains(&dir) {
        String::new()
    } else {
        format!(" in the data dir {dir}")
    };
    stop_member(&format!(
        "raft storage failure{place} while {what}: {e}; the member must restart from disk"
    ))
}

/// Ends the whole process: a member that cannot go on must not keep
/// answering as if it could (the RM exits; a supervisor restarts it, and it
/// recovers from disk).
fn stop_member(why: &str) -> ! {
    tracing::error!(reason = %why, "resource manager member stopping");
    eprintln!("resource-manager: fatal: {why}");
    std::process::exit(70)
}

/// Runs `body`; if it panics, calls `stop` with the panic's message. The
/// raft thread runs under it with [`stop_member`]: a member whose raft
/// thread died (a bug in apply, an invariant check, raft-rs itself) would
/// otherwise keep serving reads and taking proposals that never commit.
fn stop_on_panic(body: impl FnOnce(), stop: impl FnOnce(String)) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        stop(format!("the raft thread panicked: {what}"));
    }
}

impl Member {
    fn run(&mut self, rx: Receiver<Input>) {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.settings.tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(input) => {
                    self.handle(input);
                    // Batch whatever else is queued into this round.
                    for input in rx.try_iter().take(4096) {
                        self.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The storage is let go only once the snapshot being
                    // written is.
                    if let Some(job) = self.snapshotting.take() {
                        let _ = job.join();
                    }
                    return;
                }
            }
            while let Ok(verdict) = self.probes.1.try_recv() {
                self.handle(verdict);
            }
            if last_tick.elapsed() >= self.settings.tick {
                self.raw.tick();
                last_tick = Instant::now();
                self.watch_leader();
                self.resolve_split();
                self.promote_learners();
            }
            self.on_ready();
        }
    }

    /// A follower that has not heard from its leader for more than a
    /// heartbeat interval looks whether the leader's process is still
    /// there: one TCP connection to its address (off this thread). The
    /// followers take turns, by id: the lowest-numbered voter other than
    /// the leader probes at once, the next one [`PROBE_STAGGER`] later, and
    /// so on (plus a few ms of jitter), so that two of them seldom campaign
    /// at the same moment: two candidates at once split the vote, and the
    /// next election waits out a whole randomized timeout (seen: 1.8-2.6 s
    /// failovers where 0.5 s was usual). A later one that finds a new
    /// leader already elected does nothing. A refused connection means nothing listens on the
    /// leader's port: it was killed, crashed or is restarting, and this
    /// member campaigns at once ([`Input::LeaderGone`]) instead of waiting
    /// out the election timeout (1-2 s by default). A leader that is frozen,
    /// slow or cut off still accepts connections, or does not answer at
    /// all, and is left to the ordinary timeout (and check-quorum).
    ///
    /// A follower of nobody (a candidate that lost, its log behind, moved
    /// it to a later term without a leader) probes the last leader it
    /// followed the same way, rather than wait out a whole timeout.
    fn watch_leader(&mut self) {
        let r = &self.raw.raft;
        if r.state != StateRole::Follower {
            return;
        }
        if r.leader_id != 0 && r.leader_id != self.settings.id {
            self.last_leader = r.leader_id;
            self.gone = 0;
        }
        let Some(target) = self.watched() else {
            return;
        };
        let r = &self.raw.raft;
        if r.leader_id == 0 && target == self.gone {
            // Found gone already, and this member refused the candidate
            // since (its log was behind): no need to look again.
            let term = r.term;
            self.campaign_for_gone(term, target, "the gone leader's replacement was refused (its log behind this member's): campaigning now");
            return;
        }
        let key = (r.term, target);
        if r.leader_id != 0 && r.election_elapsed <= self.settings.heartbeat_ticks {
            // Heard from it lately: a later silence is probed again (a
            // leader probed alive during a flapping link can die later).
            self.probed = None;
            return;
        }
        if self.probed == Some(key) || r.election_elapsed <= self.settings.heartbeat_ticks {
            return;
        }
        self.probed = Some(key);
        self.probe(key.0, target);
    }

    /// Looks (off this thread) whether `leader`, the leader of `term`, still
    /// listens; if its port refuses, [`Input::LeaderGone`] follows. The
    /// followers take turns, by id, as [`Member::watch_leader`] says.
    fn probe(&self, term: u64, leader: u64) {
        let Some(addr) = self.address_of(leader) else {
            return;
        };
        let tx = self.probes.0.clone();
        let mut others: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .filter(|id| *id != leader)
            .collect();
        others.sort_unstable();
        let turn = others
            .iter()
            .position(|id| *id == self.settings.id)
            .unwrap_or(others.len()) as u32;
        let pause = PROBE_STAGGER * turn + Duration::from_millis(fastrand::u64(0..20));
        let _ = std::thread::Builder::new()
            .name("raft-probe".into())
            .spawn(move || {
                std::thread::sleep(pause);
                if leader_refuses(&addr) {
                    let _ = tx.send(Input::LeaderGone { term, leader });
                }
            });
    }

    /// The stream of messages from `peer` ended (its connection closed): if
    /// `peer` is the leader this member follows, its process may have died
    /// (the kernel closes a killed process's connections at once), so it is
    /// probed now rather than after a heartbeat interval of silence. A
    /// leader found listening is left alone, and the silence probe of
    /// [`Member::watch_leader`] still comes if it then goes quiet.
    fn stream_ended(&self, peer: u64) {
        if self.watched() == Some(peer) {
            debug!(peer, "the leader's stream ended: probing it now");
            self.probe(self.raw.raft.term, peer);
        }
    }

    /// The leader a follower looks after: the one it follows, or without
    /// one the last it followed. Without a leader, only a member that has
    /// voted for nobody in this term looks: one that voted for a candidate
    /// leaves the election to it (campaigning would only move everyone to a
    /// later term), and a candidate that lost (its log behind) voted for
    /// itself. One that refused a candidate whose log was behind its own is
    /// the one to campaign next.
    fn watched(&self) -> Option<u64> {
        let r = &self.raw.raft;
        let target = if r.leader_id != 0 {
            r.leader_id
        } else {
            self.last_leader
        };
        let looks = r.state == StateRole::Follower
            && target != 0
            && target != self.settings.id
            && (r.leader_id != 0 || r.vote == 0);
        looks.then_some(target)
    }

    /// Campaigns at once, if [`RoleNow::campaigns_for_gone`] says so, to
    /// replace `leader` of `term`, found gone.
    fn campaign_for_gone(&mut self, term: u64, leader: u64, why: &str) {
        let r = &self.raw.raft;
        let now = RoleNow {
            follower: r.state == StateRole::Follower,
            term: r.term,
            leader: r.leader_id,
            vote: r.vote,
        };
        if !now.campaigns_for_gone(term, leader) {
            return;
        }
        info!(leader, term, "{why}");
        // What a leader sends to hand its leadership over: the election
        // starts at once, without pre-vote, and voters that still count the
        // old leader's lease vote anyway.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgTimeoutNow);
        m.from = leader;
        m.to = self.settings.id;
        m.term = r.term;
        if let Err(e) = self.raw.step(m) {
            debug!(error = %e, "campaign refused");
        }
    }

    /// A candidate in an election that only the gone leader's vote could
    /// decide (every other voter answered, neither side has a majority: two
    /// followers campaigned at the same moment and each voted for itself)
    /// would wait out a whole randomized timeout (1-2 s). Of the voters
    /// besides that leader, the lowest-numbered starts the election again at
    /// once (with pre-vote; the others grant it, their own candidacy being
    /// stuck as well); the rest wait for its request. Once per term, on a
    /// tick, so answers still on their way have a tick to come.
    fn resolve_split(&mut self) {
        let r = &self.raw.raft;
        if r.state != StateRole::Candidate || self.split_retried == r.term || self.last_leader == 0
        {
            return;
        }
        let voters: Vec<u64> = r.prs().conf().voters().ids().iter().collect();
        let (granted, rejected, _) = r.prs().tally_votes();
        if !restarts_split(
            &voters,
            granted,
            rejected,
            self.last_leader,
            self.settings.id,
        ) {
            return;
        }
        self.split_retried = r.term;
        info!(
            term = r.term,
            granted,
            rejected,
            "election stuck (only the gone leader's vote could decide it): campaigning again now"
        );
        if let Err(e) = self.raw.campaign() {
            debug!(error = %e, "campaign refused");
        }
    }

    fn leader_address(&self) -> Option<String> {
        self.address_of(self.raw.raft.leader_id)
    }

    fn address_of(&self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        self.shared
            .state
            .read()
            .expect("state lock")
            .members
            .get(&id)
            .cloned()
            .or_else(|| self.settings.peers.get(&id).cloned())
    }

    /// Points the transport at the replicated membership (the config's peers
    /// until a snapshot or conf change tells this member better).
    fn sync_transport(&mut self) {
        let members = self
            .shared
            .state
            .read()
            .expect("state lock")
            .members
            .clone();
        if members.is_empty() {
            self.transport.sync(&self.settings.peers);
        } else {
            self.transport.sync(&members);
        }
    }

    /// A request number for a leader-only input and its reply channel; None
    /// (the caller answered NotLeader) when this member is not the leader.
    fn leader_request<T>(
        &mut self,
        reply: oneshot::Sender<Result<T>>,
    ) -> Option<(u64, oneshot::Sender<Result<T>>)> {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(Error::NotLeader {
                leader: self.leader_address(),
            }));
            return None;
        }
        let request = self.next_request;
        self.next_request += 1;
        Some((request, reply))
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { command, reply } => {
                let Some((request, reply)) = self.leader_request(reply) else {
                    return;
                };
                let env = Envelope {
                    version: COMMAND_VERSION,
                    origin: self.settings.id,
                    request,
                    command,
                };
                match self.raw.propose(vec![], env.encode()) {
                    Ok(()) => {
                        self.pending.insert(request, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Unavailable(format!(
                            "proposal dropped: {e}; retry"
                        ))));
                    }
                }
            }
            Input::ChangeMembers { change, reply } => {
                let Some((request, reply)) = self.leader_request(reply) else {
                    return;
                };
                let mut cc = ConfChange::default();
                match &change {
                    // A new member joins as a learner: it takes the log
                    // (a snapshot, then entries) without counting for a
                    // quorum, and the leader makes it a voter once it has
                    // caught up ([`Node::promote_learners`]), so a slow or
                    // mistaken joiner never costs the group its majority.
                    MemberChange::Add { id, address } => {
                        cc.set_change_type(ConfChangeType::AddLearnerNode);
                        cc.node_id = *id;
                        cc.set_context(address.clone().into_bytes().into());
                    }
                    MemberChange::Remove { id } => {
                        cc.set_change_type(ConfChangeType::RemoveNode);
                        cc.node_id = *id;
                    }
                }
                let ctx = serde_json::to_vec(&ConfOrigin {
                    origin: self.settings.id,
                    request,
                })
                .expect("origin serialises");
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        info!(?change, "membership change proposed");
                        self.pending.insert(request, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Unavailable(format!(
                            "membership change not accepted: {e} (one change at a time); retry"
                        ))));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                let Some((request, reply)) = self.leader_request(reply) else {
                    return;
                };
                self.raw.read_index(request.to_be_bytes().to_vec());
                self.reads.insert(request, reply);
            }
            Input::StreamEnded { peer } => self.stream_ended(peer),
            Input::LeaderGone { term, leader } => {
                self.gone = leader;
                self.campaign_for_gone(
                    term,
                    leader,
                    "the leader's port refuses connections (its process is gone): campaigning now",
                );
            }
            Input::Message(m) => {
                if let Err(e) = self.raw.step(*m) {
                    debug!(error = %e, "raft step refused a message");
                }
            }
        }
    }

    fn on_ready(&mut self) {
        if !self.raw.has_ready() {
            return;
        }
        let mut rd = self.raw.ready();
        let mut snapshots = self.transport.send(rd.take_messages());

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let index = snap.get_metadata().index;
            self.storage
                .apply_snapshot(&snap)
                .unwrap_or_else(|e| fatal(&self.storage, "installing a snapshot", e));
            let state = ClusterState::from_snapshot(snap.get_data())
                .unwrap_or_else(|e| fatal(&self.storage, "decoding a snapshot", e));
            *self.shared.state.write().expect("state lock") = state;
            self.applied = index;
            self.last_snapshot = index;
            self.snapshot_bytes = snap.get_data().len() as u64;
            self.log_bytes = 0;
            info!(index, "installed snapshot from the leader");
            self.sync_transport();
        }

        if let Some(ss) = rd.ss() {
            info!(role = ?ss.raft_state, leader = ss.leader_id, term = self.raw.raft.term, "raft role changed");
            if ss.raft_state != StateRole::Leader {
                self.fail_pending();
            }
        }

        for rs in rd.take_read_states() {
            let id = rs
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if let Some(reply) = self.reads.remove(&id) {
                self.ready_reads.push((rs.index, reply));
            }
        }

        let committed = rd.take_committed_entries();
        self.apply_entries(committed);

        self.storage
            .append(rd.entries())
            .unwrap_or_else(|e| fatal(&self.storage, "appending entries", e));
        if let Some(hs) = rd.hs() {
            self.storage
                .set_hard_state(hs)
                .unwrap_or_else(|e| fatal(&self.storage, "writing the hard state", e));
        }
        if rd.must_sync() {
            self.storage
                .sync()
                .unwrap_or_else(|e| fatal(&self.storage, "syncing", e));
        }
        snapshots.extend(self.transport.send(rd.take_persisted_messages()));

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.storage
                .set_commit(commit)
                .unwrap_or_else(|e| fatal(&self.storage, "writing the commit index", e));
        }
        snapshots.extend(self.transport.send(light.take_messages()));
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply();
        // Snapshots handed to the transport count as sent: the recipient's
        // progress resumes, and a lost one is simply sent again.
        for (to, queued) in snapshots {
            let status = if queued {
                SnapshotStatus::Finish
            } else {
                SnapshotStatus::Failure
            };
            self.raw.report_snapshot(to, status);
        }
        self.maybe_snapshot();
        self.answer_reads();
        self.publish_status();
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let mut state = shared.state.write().expect("state lock");
        let mut members_changed = false;
        for e in entries {
            self.applied = e.index;
            self.log_bytes += (e.data.len() + e.context.len()) as u64 + ENTRY_OVERHEAD;
            if e.data.is_empty() {
                continue; // a new leader's empty entry
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let env = match Envelope::decode(&e.data) {
                        Ok(env) => env,
                        Err(err) => {
                            // Skipping it would let this member's state part
                            // from the others' for good: stop instead.
                            stop_member(&format!(
                                "log entry {} cannot be decoded by this member ({err}): it was written by a newer version, or the log is corrupt; upgrade this member (it stops rather than skip the entry and diverge)",
                                e.index
                            ))
                        }
                    };
                    let outcome = state.apply(&env.command);
                    if env.origin == self.settings.id {
                        if let Some(reply) = self.pending.remove(&env.request) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .unwrap_or_else(|err| fatal(&self.storage, "decoding a conf change", err));
                    let outcome = match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => {
                            info!(voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                            self.storage.set_conf_state(&cs).unwrap_or_else(|err| {
                                fatal(&self.storage, "writing the conf state", err)
                            });
                            match cc.get_change_type() {
                                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                    let addr =
                                        String::from_utf8_lossy(cc.get_context()).into_owned();
                                    state.members.insert(cc.node_id, addr);
                                }
                                ConfChangeType::RemoveNode => {
                                    state.members.remove(&cc.node_id);
                                    state.member_http.remove(&cc.node_id);
                                }
                            }
                            members_changed = true;
                            Outcome::Done
                        }
                        Err(err) => {
                            warn!(error = %err, "conf change refused");
                            Outcome::Rejected(format!("membership change refused: {err}"))
                        }
                    };
                    if let Ok(o) = serde_json::from_slice::<ConfOrigin>(e.get_context()) {
                        if o.origin == self.settings.id {
                            if let Some(reply) = self.pending.remove(&o.request) {
                                let _ = reply.send(Ok(outcome));
                            }
                        }
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    // This member proposes only v1 conf changes.
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .unwrap_or_else(|err| fatal(&self.storage, "decoding a conf change", err));
                    match self.raw.apply_conf_change(&cc) {
                        Ok(cs) => self.storage.set_conf_state(&cs).unwrap_or_else(|err| {
                            fatal(&self.storage, "writing the conf state", err)
                        }),
                        Err(err) => warn!(error = %err, "conf change refused"),
                    }
                }
            }
        }
        // Test and debug builds check DESIGN §4's invariants after every batch.
        if cfg!(debug_assertions) {
            if let Err(e) = state.check_invariants() {
                panic!(
                    "replicated state broke an invariant at index {}: {e}",
                    self.applied
                );
            }
        }
        drop(state);
        if members_changed {
            self.sync_transport();
        }
    }

    fn fail_pending(&mut self) {
        let leader = self.leader_address();
        let not_leader = || Error::NotLeader {
            leader: leader.clone(),
        };
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(not_leader()));
        }
        for (_, reply) in self.reads.drain() {
            let _ = reply.send(Err(not_leader()));
        }
        for (_, reply) in self.ready_reads.drain(..) {
            let _ = reply.send(Err(not_leader()));
        }
    }

    /// Answers confirmed reads whose index this member has applied.
    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.ready_reads = waiting;
        for (_, reply) in done {
            let _ = reply.send(Ok(()));
        }
    }

    /// Takes a snapshot when one is due: the state is copied here (its
    /// lock held only for that), then serialised, stored and synced on a
    /// thread of its own while this one goes on applying and answering;
    /// one at a time. The storage keeps whichever snapshot is newer, so a
    /// leader's snapshot installed meanwhile is never overwritten by it.
    fn maybe_snapshot(&mut self) {
        if let Some(job) = self.snapshotting.take_if(|j| j.is_finished()) {
            match job.join() {
                Ok(bytes) => self.snapshot_bytes = bytes,
                Err(_) => stop_member("the snapshot thread panicked"),
            }
        }
        if self.snapshotting.is_some()
            || self.applied < self.last_snapshot + self.settings.snapshot_every
            || (self.snapshot_bytes > SNAPSHOT_BYTES_FREE && self.log_bytes < self.snapshot_bytes)
        {
            return;
        }
        let took = Instant::now();
        let state = self.shared.state.read().expect("state lock").stored_part();
        let copied = took.elapsed();
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let (index, storage) = (self.applied, self.storage.clone());
        self.last_snapshot = index;
        self.log_bytes = 0;
        let job = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                let data = state.to_snapshot();
                drop(state);
                let encoded = started.elapsed();
                let bytes = data.len() as u64;
                storage
                    .create_snapshot(index, cs, data)
                    .unwrap_or_else(|e| fatal(&storage, "writing a snapshot", e));
                storage
                    .sync()
                    .unwrap_or_else(|e| fatal(&storage, "syncing a snapshot", e));
                debug!(
                    index,
                    bytes,
                    copy_us = copied.as_micros() as u64,
                    encode_ms = encoded.as_millis() as u64,
                    store_ms = (started.elapsed() - encoded).as_millis() as u64,
                    "snapshot taken; log compacted"
                );
                bytes
            })
            .unwrap_or_else(|e| fatal(&self.storage, "starting the snapshot thread", e));
        self.snapshotting = Some(job);
    }

    /// A leader makes a learner that has caught up a voter: its log is
    /// streaming (not being probed or sent a snapshot) and within
    /// [`LEARNER_LAG`] entries of the commit index. One conf change at a
    /// time; the proposal answers nobody (no caller waits on it).
    fn promote_learners(&mut self) {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader || r.has_pending_conf() {
            return;
        }
        let committed = r.raft_log.committed;
        let Some(id) = r
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .filter(|id| {
                r.prs().get(*id).is_some_and(|p| {
                    p.state == ProgressState::Replicate && p.matched + LEARNER_LAG >= committed
                })
            })
            .min()
        else {
            return;
        };
        let address = self.address_of(id).unwrap_or_default();
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        cc.set_context(address.into_bytes().into());
        let ctx = serde_json::to_vec(&ConfOrigin {
            origin: self.settings.id,
            request: 0,
        })
        .expect("origin serialises");
        let matched = r.prs().get(id).map_or(0, |p| p.matched);
        match self.raw.propose_conf_change(ctx, cc) {
            Ok(()) => info!(
                id,
                matched, committed, "learner caught up: promoting it to voter"
            ),
            Err(e) => debug!(id, error = %e, "learner promotion not proposed"),
        }
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let mut members: Vec<u64> = r.prs().iter().map(|(id, _)| *id).collect();
        members.sort_unstable();
        let mut learners: Vec<u64> = r.prs().conf().learners().iter().copied().collect();
        learners.sort_unstable();
        let caught_up = r.state == StateRole::Leader
            && r.raft_log.term(self.applied).is_ok_and(|t| t == r.term);
        // Leader tasks start only once this member has applied an entry of
        // its own term (its first, empty one), and so everything committed
        // before it: a new leader whose passes ran on a state still missing
        // the last leader's entries saw a job's recorded attempt as never
        // made, and started a second one that replaced the first.
        let role = Leadership {
            is_leader: caught_up,
            term: r.term,
        };
        // The status first: whoever wakes on the role reads a status at
        // least as new.
        let seen = self.shared.status.read().expect("status lock").leader_id;
        if r.leader_id != 0 && r.leader_id != seen {
            self.shared.metrics.leader_changes.inc();
        }
        *self.shared.status.write().expect("status lock") = RaftStatus {
            id: self.settings.id,
            is_leader: r.state == StateRole::Leader,
            leader_id: r.leader_id,
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            snapshot_index: self.storage.snapshot_index(),
            members,
            learners,
            caught_up,
        };
        self.shared.role.send_if_modified(|now| {
            let changed = *now != role;
            *now = role;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{restarts_split, stop_on_panic, RoleNow};

    #[test]
    fn a_member_that_voted_for_another_candidate_does_not_campaign_over_it() {
        let following = |term, leader, vote| RoleNow {
            follower: true,
            term,
            leader,
            vote,
        };
        // Still following the gone leader 2 of term 42: campaign.
        assert!(following(42, 2, 2).campaigns_for_gone(42, 2));
        // Member 1's probe was quicker: it campaigned in term 43 and this
        // member voted for it before its own probe's verdict came (seen in
        // the harness: the verdict's campaign moved everyone to term 44 and
        // the election waited out a whole timeout).
        assert!(!following(43, 0, 1).campaigns_for_gone(42, 2));
        // A candidate in 43 whose log was behind: refused, no vote given in
        // 43, no leader: this member is the one to campaign.
        assert!(following(43, 0, 0).campaigns_for_gone(42, 2));
        // A new leader since: nothing to do.
        assert!(!following(43, 3, 3).campaigns_for_gone(42, 2));
        // An older verdict than this member's term, about another leader.
        assert!(!following(42, 2, 2).campaigns_for_gone(41, 1));
        // Not a follower (a candidate already).
        let candidate = RoleNow {
            follower: false,
            term: 43,
            leader: 0,
            vote: 0,
        };
        assert!(!candidate.campaigns_for_gone(42, 2));
    }

    #[test]
    fn a_split_election_is_started_again_by_the_lowest_live_voter_only() {
        // Three voters, leader 2 gone; 1 and 3 each voted for themselves
        // and refused the other.
        assert!(restarts_split(&[1, 2, 3], 1, 1, 2, 1));
        assert!(!restarts_split(&[1, 2, 3], 1, 1, 2, 3));
        // Leader 1 gone: 2 is the lowest live voter.
        assert!(restarts_split(&[1, 2, 3], 1, 1, 1, 2));
        // An answer still missing besides the gone leader's: not stuck yet.
        assert!(!restarts_split(&[1, 2, 3], 1, 0, 2, 1));
        // Five voters split 2 to 2, the gone leader's vote missing.
        assert!(restarts_split(&[1, 2, 3, 4, 5], 2, 2, 1, 2));
        assert!(!restarts_split(&[1, 2, 3, 4, 5], 2, 2, 1, 4));
        // Won or lost already: raft ends those elections itself.
        assert!(!restarts_split(&[1, 2, 3, 4, 5], 3, 1, 1, 2));
        assert!(!restarts_split(&[1, 2, 3, 4, 5], 1, 3, 1, 2));
    }

    #[test]
    fn a_panicking_raft_thread_stops_the_member_and_says_why() {
        let mut stopped = None;
        stop_on_panic(|| panic!("apply failed"), |why| stopped = Some(why));
        assert_eq!(
            stopped.as_deref(),
            Some("the raft thread panicked: apply failed")
        );
        let mut stopped = None;
        let entry = 7;
        stop_on_panic(
            || panic!("cannot apply entry {entry}"),
            |why| stopped = Some(why),
        );
        assert_eq!(
            stopped.as_deref(),
            Some("the raft thread panicked: cannot apply entry 7")
        );
        // A thread that returns stops nothing.
        let mut stopped = None;
        stop_on_panic(|| {}, |why| stopped = Some(why));
        assert_eq!(stopped, None);
    }
}
