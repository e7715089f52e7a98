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
use raft::StateRole;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::fsm::{ClusterState, Command, Envelope, Outcome, COMMAND_VERSION};
use crate::storage::SledStorage;
use crate::transport::Transport;

/// Raft settings of one member.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    /// Every initial member: raft id -> address (gRPC, all services).
    pub peers: BTreeMap<u64, String>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log every this many applied entries.
    pub snapshot_every: u64,
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
    pub members: Vec<u64>,
}

/// State shared between the raft thread (writer) and the services (readers).
pub struct Shared {
    pub state: RwLock<ClusterState>,
    pub status: RwLock<RaftStatus>,
}

enum Input {
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    Message(Box<Message>),
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

impl RaftHandle {
    /// Proposes `command`; resolves once it is committed and applied here,
    /// with its outcome. NotLeader when this member is not the leader.
    pub async fn propose(&self, command: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose { command, reply })
            .map_err(|_| Error::Unavailable("raft member is stopping".into()))?;
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

    pub fn status(&self) -> RaftStatus {
        self.shared.status.read().expect("status lock").clone()
    }

    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, ClusterState> {
        self.shared.state.read().expect("state lock")
    }

    pub fn address_of(&self, id: u64) -> Option<String> {
        self.peers.get(&id).cloned()
    }

    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    /// Ok when this member leads; NotLeader with the leader's address otherwise.
    pub fn ensure_leader(&self) -> Result<()> {
        let st = self.status();
        if st.is_leader {
            Ok(())
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
    transport: Transport,
) -> Result<(RaftHandle, std::thread::JoinHandle<()>)> {
    if storage.is_empty()? {
        // Every initial member starts from the same configuration.
        let mut cs = ConfState::default();
        cs.voters = settings.peers.keys().copied().collect();
        storage.set_conf_state(&cs)?;
        storage.sync()?;
        info!(id = settings.id, voters = ?cs.voters, "bootstrapped new raft storage");
    }
    let (state, applied) = match storage.latest_snapshot()? {
        Some((meta, data)) => (
            ClusterState::from_snapshot(&data)
                .map_err(|e| Error::Storage(format!("snapshot data: {e}")))?,
            meta.index,
        ),
        None => (ClusterState::default(), 0),
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
        next_request: 1,
        applied,
        last_snapshot: applied,
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || member.run(rx))
        .map_err(|e| Error::Storage(format!("starting the raft thread: {e}")))?;
    Ok((handle, thread))
}

struct Member {
    raw: RawNode<SledStorage>,
    storage: SledStorage,
    shared: Arc<Shared>,
    transport: Transport,
    settings: RaftSettings,
    /// Proposals of this member waiting for their entry to apply.
    pending: HashMap<u64, oneshot::Sender<Result<Outcome>>>,
    next_request: u64,
    applied: u64,
    last_snapshot: u64,
}

/// Persistence failed: raft cannot go on from memory. Crash; restart from disk.
fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
    panic!("raft storage failure while {what}: {e}; the member must restart from disk")
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
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if last_tick.elapsed() >= self.settings.tick {
                self.raw.tick();
                last_tick = Instant::now();
            }
            self.on_ready();
        }
    }

    fn leader_address(&self) -> Option<String> {
        let id = self.raw.raft.leader_id;
        (id != 0)
            .then(|| self.settings.peers.get(&id).cloned())
            .flatten()
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { command, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(Error::NotLeader {
                        leader: self.leader_address(),
                    }));
                    return;
                }
                let request = self.next_request;
                self.next_request += 1;
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
        self.transport.send(rd.take_messages());

        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let index = snap.get_metadata().index;
            self.storage
                .apply_snapshot(&snap)
                .unwrap_or_else(|e| fatal("installing a snapshot", e));
            let state = ClusterState::from_snapshot(snap.get_data())
                .unwrap_or_else(|e| fatal("decoding a snapshot", e));
            *self.shared.state.write().expect("state lock") = state;
            self.applied = index;
            self.last_snapshot = index;
            info!(index, "installed snapshot from the leader");
        }

        if let Some(ss) = rd.ss() {
            info!(role = ?ss.raft_state, leader = ss.leader_id, term = self.raw.raft.term, "raft role changed");
            if ss.raft_state != StateRole::Leader {
                self.fail_pending();
            }
        }

        let committed = rd.take_committed_entries();
        self.apply_entries(committed);

        self.storage
            .append(rd.entries())
            .unwrap_or_else(|e| fatal("appending entries", e));
        if let Some(hs) = rd.hs() {
            self.storage
                .set_hard_state(hs)
                .unwrap_or_else(|e| fatal("writing the hard state", e));
        }
        if rd.must_sync() {
            self.storage.sync().unwrap_or_else(|e| fatal("syncing", e));
        }
        self.transport.send(rd.take_persisted_messages());

        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.storage
                .set_commit(commit)
                .unwrap_or_else(|e| fatal("writing the commit index", e));
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed);
        self.raw.advance_apply();
        self.maybe_snapshot();
        self.publish_status();
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let mut state = shared.state.write().expect("state lock");
        for e in entries {
            self.applied = e.index;
            if e.data.is_empty() {
                continue; // a new leader's empty entry
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let env = match Envelope::decode(&e.data) {
                        Ok(env) => env,
                        Err(err) => {
                            // Every member skips it alike, so states stay equal.
                            warn!(index = e.index, error = %err, "skipping an entry this member cannot decode");
                            continue;
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
                        .unwrap_or_else(|err| fatal("decoding a conf change", err));
                    let r = self.raw.apply_conf_change(&cc);
                    self.conf_changed(r);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .unwrap_or_else(|err| fatal("decoding a conf change", err));
                    let r = self.raw.apply_conf_change(&cc);
                    self.conf_changed(r);
                }
            }
        }
    }

    /// Persists the configuration a committed conf change produced.
    fn conf_changed(&self, result: raft::Result<ConfState>) {
        match result {
            Ok(cs) => {
                info!(voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                self.storage
                    .set_conf_state(&cs)
                    .unwrap_or_else(|e| fatal("writing the conf state", e));
            }
            Err(e) => warn!(error = %e, "conf change refused"),
        }
    }

    fn fail_pending(&mut self) {
        let leader = self.leader_address();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(Error::NotLeader {
                leader: leader.clone(),
            }));
        }
    }

    fn maybe_snapshot(&mut self) {
        if self.applied < self.last_snapshot + self.settings.snapshot_every {
            return;
        }
        let data = self.shared.state.read().expect("state lock").to_snapshot();
        let cs = self.raw.raft.prs().conf().to_conf_state();
        self.storage
            .create_snapshot(self.applied, cs, data)
            .unwrap_or_else(|e| fatal("writing a snapshot", e));
        self.storage
            .sync()
            .unwrap_or_else(|e| fatal("syncing a snapshot", e));
        debug!(index = self.applied, "snapshot taken; log compacted");
        self.last_snapshot = self.applied;
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let mut members: Vec<u64> = r.prs().iter().map(|(id, _)| *id).collect();
        members.sort_unstable();
        *self.shared.status.write().expect("status lock") = RaftStatus {
            id: self.settings.id,
            is_leader: r.state == StateRole::Leader,
            leader_id: r.leader_id,
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            snapshot_index: self.last_snapshot.max(self.storage.snapshot_index()),
            members,
        };
    }
}
