//! An in-memory network for in-process raft tests: every member's raft
//! thread runs for real (real storage, real ticks), but messages go straight
//! from one member's [`Network::send`] to the recipient's [`RaftHandle::step`]
//! through a hub that can cut links, one way or both, and heal them. A group
//! of three elects, fails over and catches up in well under a second, with
//! no sockets and no processes, so partitions are tested exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use raft::prelude::{Message, MessageType};

use super::Network;
use crate::raft_node::RaftHandle;

/// The hub: which members are attached and which links are cut.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    hub: Arc<Mutex<Hub>>,
}

#[derive(Default)]
struct Hub {
    members: HashMap<u64, RaftHandle>,
    /// Directed links (from, to) whose messages are dropped.
    cut: HashSet<(u64, u64)>,
    /// Kinds of message dropped on every link.
    dropped_kinds: HashSet<MessageType>,
    /// Messages delivered and dropped so far.
    delivered: u64,
    dropped: u64,
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sending side for member `me`, to hand to `raft_node::start`.
    pub fn endpoint(&self, me: u64) -> Box<dyn Network> {
        Box::new(Endpoint {
            me,
            hub: self.hub.clone(),
            peers: BTreeSet::new(),
        })
    }

    /// Makes member `id` reachable through `handle`.
    pub fn attach(&self, id: u64, handle: RaftHandle) {
        self.lock().members.insert(id, handle);
    }

    /// Makes member `id` unreachable and drops the hub's handle to it (as a
    /// crash would: once its other handles are gone its raft thread ends).
    pub fn detach(&self, id: u64) {
        self.lock().members.remove(&id);
    }

    /// Drops messages from `from` to `to` (one way).
    pub fn cut(&self, from: u64, to: u64) {
        self.lock().cut.insert((from, to));
    }

    /// Cuts every link between the groups (both ways); links inside a group
    /// stay up.
    pub fn partition(&self, groups: &[&[u64]]) {
        let mut hub = self.lock();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for &x in a.iter() {
                        for &y in b.iter() {
                            hub.cut.insert((x, y));
                        }
                    }
                }
            }
        }
    }

    /// Cuts `id` off from every other member, both ways.
    pub fn isolate(&self, id: u64, all: &[u64]) {
        let rest: Vec<u64> = all.iter().copied().filter(|&m| m != id).collect();
        self.partition(&[&[id], &rest]);
    }

    /// Drops every message of kind `t`, on every link.
    pub fn drop_kind(&self, t: MessageType) {
        self.lock().dropped_kinds.insert(t);
    }

    /// Restores every link and lets every kind of message through.
    pub fn heal(&self) {
        let mut hub = self.lock();
        hub.cut.clear();
        hub.dropped_kinds.clear();
    }

    /// (delivered, dropped) message counts so far.
    pub fn counts(&self) -> (u64, u64) {
        let hub = self.lock();
        (hub.delivered, hub.dropped)
    }

    /// Drops every handle the hub holds, so that raft threads whose other
    /// handles are gone end (members hold the hub through their endpoints:
    /// without this the cycle keeps them alive).
    pub fn shutdown(&self) {
        self.lock().members.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().expect("memory network lock")
    }
}

struct Endpoint {
    me: u64,
    hub: Arc<Mutex<Hub>>,
    peers: BTreeSet<u64>,
}

impl Network for Endpoint {
    fn sync(&mut self, members: &BTreeMap<u64, String>) {
        self.peers = members
            .keys()
            .copied()
            .filter(|&id| id != self.me)
            .collect();
    }

    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, bool)> {
        let mut hub = self.hub.lock().expect("memory network lock");
        let mut snapshots = Vec::new();
        for m in msgs {
            let to = m.to;
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let target = (self.peers.contains(&to)
                && !hub.cut.contains(&(self.me, to))
                && !hub.dropped_kinds.contains(&m.get_msg_type()))
            .then(|| hub.members.get(&to).cloned())
            .flatten();
            let sent = match target {
                Some(h) => {
                    h.step(m);
                    hub.delivered += 1;
                    true
                }
                None => {
                    hub.dropped += 1;
                    false
                }
            };
            if is_snapshot {
                snapshots.push((to, sent));
            }
        }
        snapshots
    }
}

#[cfg(test)]
mod tests {
    //! A real raft group of real members (their raft threads, sled storage
    //! in temp dirs, real ticks) over the in-memory network.

    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use super::MemoryNetwork;
    use crate::fsm::{Command, Outcome, PortRange};
    use crate::raft_node::{self, RaftHandle, RaftSettings};
    use crate::storage::SledStorage;

    const TICK: Duration = Duration::from_millis(10);
    /// Bound on every wait below: elections take a few hundred ms here.
    const WAIT: Duration = Duration::from_secs(10);

    struct Group {
        net: MemoryNetwork,
        ids: Vec<u64>,
        handles: BTreeMap<u64, RaftHandle>,
        threads: BTreeMap<u64, std::thread::JoinHandle<()>>,
        dir: tempfile::TempDir,
        snapshot_every: u64,
    }

    impl Group {
        fn start(n: u64, snapshot_every: u64) -> Group {
            let mut g = Group {
                net: MemoryNetwork::new(),
                ids: (1..=n).collect(),
                handles: BTreeMap::new(),
                threads: BTreeMap::new(),
                dir: tempfile::tempdir().unwrap(),
                snapshot_every,
            };
            for id in g.ids.clone() {
                g.boot(id);
            }
            g
        }

        /// Starts member `id` from its data dir (new or left by a crash).
        fn boot(&mut self, id: u64) {
            let settings = RaftSettings {
                id,
                peers: self.ids.iter().map(|&i| (i, format!("mem-{i}"))).collect(),
                tick: TICK,
                election_ticks: 10,
                heartbeat_ticks: 2,
                snapshot_every: self.snapshot_every,
                join: false,
            };
            let storage = SledStorage::open(&self.dir.path().join(format!("m{id}"))).unwrap();
            let (h, t) = raft_node::start(settings, storage, self.net.endpoint(id)).unwrap();
            self.net.attach(id, h.clone());
            self.handles.insert(id, h);
            self.threads.insert(id, t);
        }

        /// Stops member `id` as a crash would (nothing flushed beyond what
        /// raft already persisted) and waits, bounded, for its raft thread.
        fn crash(&mut self, id: u64) {
            self.net.detach(id);
            self.handles.remove(&id);
            // Its raft thread ends once the last handle to it is gone.
            let t = self.threads.remove(&id).expect("member runs");
            let deadline = Instant::now() + WAIT;
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "member {id}'s raft thread did not end"
                );
                std::thread::sleep(TICK);
            }
            t.join().unwrap();
        }

        fn h(&self, id: u64) -> &RaftHandle {
            &self.handles[&id]
        }

        /// The member that leads with `among` agreeing on it, waiting up to WAIT.
        fn leader_among(&self, among: &[u64]) -> u64 {
            let deadline = Instant::now() + WAIT;
            loop {
                let st: Vec<_> = among.iter().map(|&i| self.h(i).status()).collect();
                let leaders: Vec<u64> = st.iter().filter(|s| s.is_leader).map(|s| s.id).collect();
                if let [l] = leaders[..] {
                    if st.iter().all(|s| s.leader_id == l) {
                        return l;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no agreed leader among {among:?}: {st:?}"
                );
                std::thread::sleep(TICK);
            }
        }

        /// Waits until every member in `among` has applied what `leader` has
        /// and holds the same state, then returns their states (as snapshot
        /// bytes). The states are compared again by the caller: a member that
        /// diverged fails here after WAIT, showing the difference.
        fn converged(&self, among: &[u64], leader: u64) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + WAIT;
            loop {
                let target = self.h(leader).status().applied;
                let st: Vec<_> = among.iter().map(|&i| self.h(i).status()).collect();
                let states: Vec<Vec<u8>> = among
                    .iter()
                    .map(|&i| self.h(i).state().to_snapshot())
                    .collect();
                let caught_up = st.iter().all(|s| s.applied >= target);
                if (caught_up && states.iter().all(|s| *s == states[0]))
                    || Instant::now() >= deadline
                {
                    assert!(
                        caught_up,
                        "members {among:?} did not apply up to {target}: {st:?}"
                    );
                    return states;
                }
                std::thread::sleep(TICK);
            }
        }
    }

    /// Panics naming the first member whose state differs from the first's.
    fn assert_same(states: &[Vec<u8>]) {
        for (i, s) in states.iter().enumerate() {
            assert!(
                *s == states[0],
                "members diverged: member #{i}:\n{}\nvs #0:\n{}",
                String::from_utf8_lossy(s),
                String::from_utf8_lossy(&states[0])
            );
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            self.net.shutdown();
            self.handles.clear();
            for (_, t) in std::mem::take(&mut self.threads) {
                let _ = t.join();
            }
        }
    }

    fn node(name: &str) -> Command {
        Command::RegisterNode {
            node_id: name.into(),
            address: format!("{name}:7070"),
            vcores_milli: 4000,
            memory_bytes: 8 << 30,
            gpus: Vec::new(),
            labels: BTreeMap::new(),
            running: Vec::new(),
            ended: vec![],
            ready: true,
            ports: PortRange {
                first: 20000,
                last: 20100,
            },
            at_ms: 1,
        }
    }

    fn nodes_of(h: &RaftHandle) -> Vec<String> {
        h.state().nodes.keys().map(|k| k.to_string()).collect()
    }

    #[tokio::test]
    async fn three_members_elect_one_leader_and_apply_the_same_writes_in_the_same_order() {
        let g = Group::start(3, 1000);
        let l = g.leader_among(&g.ids);
        for i in 0..20 {
            g.h(l).propose(node(&format!("n{i:02}"))).await.unwrap();
        }
        // A follower refuses writes and names the leader.
        let f = *g.ids.iter().find(|&&i| i != l).unwrap();
        let e = g.h(f).propose(node("nope")).await.unwrap_err();
        assert!(
            matches!(e, crate::Error::NotLeader { leader: Some(ref a) } if *a == format!("mem-{l}")),
            "{e:?}"
        );
        let states = g.converged(&g.ids, l);
        assert_same(&states);
        assert_eq!(nodes_of(g.h(f)).len(), 20);
    }

    #[tokio::test]
    async fn a_partitioned_leader_steps_down_the_majority_goes_on_and_the_healed_member_catches_up()
    {
        let g = Group::start(3, 1000);
        let old = g.leader_among(&g.ids);
        let old_term = g.h(old).status().term;
        g.h(old).propose(node("before")).await.unwrap();
        let mut role = g.h(old).leadership();
        assert!(role.borrow().is_leader);

        g.net.isolate(old, &g.ids);
        // Its write cannot commit: it fails (on step-down), never acknowledged.
        let e = g.h(old).propose(node("lost")).await.unwrap_err();
        eprintln!("isolated leader answered: {e}");
        // check_quorum: hearing no one, it steps down on its own; the watch says so.
        tokio::time::timeout(WAIT, role.wait_for(|r| !r.is_leader))
            .await
            .expect("the isolated leader never stepped down")
            .unwrap();

        let rest: Vec<u64> = g.ids.iter().copied().filter(|&i| i != old).collect();
        let new = g.leader_among(&rest);
        assert!(g.h(new).status().term > old_term);
        for i in 0..10 {
            g.h(new).propose(node(&format!("after{i}"))).await.unwrap();
        }
        // Pre-vote: the isolated member's failed elections did not raise the
        // term it would disrupt the group with.
        assert!(g.h(old).status().term <= g.h(new).status().term);

        g.net.heal();
        let states = g.converged(&g.ids, new);
        assert_same(&states);
        assert_eq!(g.h(old).status().leader_id, new);
        let names = nodes_of(g.h(old));
        assert!(names.contains(&"before".to_string()));
        assert!(
            !names.contains(&"lost".to_string()),
            "an unacknowledged write applied"
        );
        assert_eq!(names.len(), 11);
    }

    #[tokio::test]
    async fn leader_tasks_start_only_once_the_new_leader_has_applied_what_came_before() {
        let mut g = Group::start(3, 1000);
        let old = g.leader_among(&g.ids);
        for i in 0..5 {
            g.h(old).propose(node(&format!("before{i}"))).await.unwrap();
        }
        let acknowledged = g.h(old).status().commit;
        // Append acknowledgements are lost from here on: a new leader is
        // elected (votes go through) but cannot commit its first entry,
        // so it cannot know what the last leader committed.
        g.net
            .drop_kind(raft::prelude::MessageType::MsgAppendResponse);
        g.crash(old);
        let rest: Vec<u64> = g.ids.iter().copied().filter(|&i| i != old).collect();
        let deadline = Instant::now() + WAIT;
        let new = loop {
            if let Some(&l) = rest.iter().find(|&&i| g.h(i).status().is_leader) {
                break l;
            }
            assert!(Instant::now() < deadline, "no new leader");
            std::thread::sleep(TICK);
        };
        let role = g.h(new).leadership();
        // Raft says leader; the leadership its tasks start on says not yet.
        for _ in 0..30 {
            let st = g.h(new).status();
            if !st.is_leader {
                break; // deposed meanwhile (check-quorum): nothing to see
            }
            assert!(
                !role.borrow().is_leader && !st.caught_up,
                "leader tasks would start on a state that has not applied its own term's first entry: {st:?}"
            );
            std::thread::sleep(TICK);
        }
        g.net.heal();
        let l = g.leader_among(&rest);
        let mut role = g.h(l).leadership();
        tokio::time::timeout(WAIT, role.wait_for(|r| r.is_leader))
            .await
            .expect("the leader never published its leadership")
            .unwrap();
        let st = g.h(l).status();
        assert!(
            st.applied > acknowledged,
            "leadership published before what was acknowledged was applied: {st:?}"
        );
        assert_eq!(nodes_of(g.h(l)).len(), 5);
    }

    #[tokio::test]
    async fn a_leader_that_hears_no_one_steps_down_and_the_group_elects_again() {
        // One-way loss: the leader's messages arrive, its followers' replies do not.
        let g = Group::start(3, 1000);
        let old = g.leader_among(&g.ids);
        let mut role = g.h(old).leadership();
        for &f in &g.ids {
            if f != old {
                g.net.cut(f, old);
            }
        }
        tokio::time::timeout(WAIT, role.wait_for(|r| !r.is_leader))
            .await
            .expect("a leader without acknowledgements kept leading")
            .unwrap();
        let rest: Vec<u64> = g.ids.iter().copied().filter(|&i| i != old).collect();
        let new = g.leader_among(&rest);
        assert_ne!(new, old);
        g.h(new).propose(node("one-way")).await.unwrap();
        g.net.heal();
        let states = g.converged(&g.ids, new);
        assert_same(&states);
    }

    #[tokio::test]
    async fn a_minority_side_of_a_split_commits_nothing_and_adopts_the_majoritys_log() {
        let g = Group::start(5, 1000);
        let old = g.leader_among(&g.ids);
        let other = *g.ids.iter().find(|&&i| i != old).unwrap();
        let minority = [old, other];
        let majority: Vec<u64> = g
            .ids
            .iter()
            .copied()
            .filter(|i| !minority.contains(i))
            .collect();
        g.net.partition(&[&minority, &majority]);
        assert!(g.h(old).propose(node("minority")).await.is_err());
        let new = g.leader_among(&majority);
        for i in 0..5 {
            g.h(new).propose(node(&format!("m{i}"))).await.unwrap();
        }
        g.net.heal();
        let states = g.converged(&g.ids, new);
        assert_same(&states);
        let names = nodes_of(g.h(old));
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(!names.contains(&"minority".to_string()));
    }

    #[tokio::test]
    async fn a_follower_behind_a_compacted_log_catches_up_from_a_snapshot_and_a_crash_loses_nothing(
    ) {
        let mut g = Group::start(3, 5);
        let l = g.leader_among(&g.ids);
        let f = *g.ids.iter().find(|&&i| i != l).unwrap();
        g.net.isolate(f, &g.ids);
        for i in 0..30 {
            g.h(l).propose(node(&format!("n{i:02}"))).await.unwrap();
        }
        assert!(
            g.h(l).status().snapshot_index > 0,
            "the leader never compacted"
        );
        let (_, dropped_before) = g.net.counts();
        assert!(dropped_before > 0);
        g.net.heal();
        let states = g.converged(&g.ids, l);
        assert_same(&states);
        assert!(
            g.h(f).status().snapshot_index > 0,
            "the follower caught up without the leader's snapshot: {:?}",
            g.h(f).status()
        );

        // The caught-up follower crashes and restarts from its disk alone.
        g.crash(f);
        g.h(l).propose(node("while-down")).await.unwrap();
        g.boot(f);
        let states = g.converged(&g.ids, l);
        assert_same(&states);
        assert_eq!(nodes_of(g.h(f)).len(), 31);
    }

    #[tokio::test]
    async fn a_large_state_is_snapshotted_once_the_log_since_holds_as_many_bytes() {
        let g = Group::start(1, 5);
        let l = g.leader_among(&g.ids);
        let spec = format!("name: big\n# {}\n", "x".repeat(200_000));
        for i in 0..34 {
            let submitted = g
                .h(l)
                .propose(Command::SubmitApplication {
                    request_id: String::new(),
                    name: format!("big{i}"),
                    queue: "root".into(),
                    user: "u".into(),
                    spec: spec.clone(),
                    spec_format: "yaml".into(),
                    unmanaged: true,
                    accepted: false,
                    service: false,
                    priority: 0,
                    at_ms: 0,
                })
                .await
                .unwrap();
            assert!(matches!(submitted, Outcome::Submitted { .. }));
        }
        let st = g.h(l).status();
        // Every 5 entries while the state is small; past 1 MiB (about six
        // of these), only once the log since holds the state's size again:
        // about 10, 20, 40 applications in, so the last one came about 14
        // entries ago.
        assert!(st.snapshot_index > 5, "{st:?}");
        assert!(
            st.applied - st.snapshot_index >= 8,
            "snapshotted every 5 entries whatever the state's size: {st:?}"
        );
    }
}
