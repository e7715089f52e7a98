//! The audit of a member's data dir: its latest snapshot, then every
//! committed entry after it applied in order, with DESIGN §4's invariants
//! (no node over-committed, per resource and per GPU; usage and indexes
//! agree with the containers) checked after each one; and a digest of each
//! committed entry, so that members' logs can be compared (committed
//! entries are the same on every member: Raft's state machine safety).
//!
//! `resource-manager audit --data-dir DIR` runs it on a stopped member;
//! the fault harness runs it on every member after its run.

use std::hash::{Hash, Hasher};
use std::path::Path;

use raft::eraftpb::EntryType;
use raft::Storage as _;

use crate::fsm::{ClusterState, Envelope};
use crate::storage::SledStorage;
use crate::{Error, Result};

/// What the audit of one data dir found.
#[derive(Debug, Default)]
pub struct Audit {
    /// The snapshot the replay started from.
    pub snapshot_index: u64,
    /// The last committed index (the replay's end).
    pub commit: u64,
    /// Entries applied (commands; empty and membership entries counted in
    /// `other_entries`).
    pub commands: u64,
    pub other_entries: u64,
    /// (index, term, digest of the entry's type and data) of every
    /// committed entry after the snapshot.
    pub digests: Vec<(u64, u64, u64)>,
    /// Invariant violations: (index, what), the first few.
    pub violations: Vec<(u64, String)>,
    /// Invariant violations in all.
    pub violation_count: u64,
}

/// The most violations an audit lists (it counts them all).
const LISTED: usize = 20;

/// Audits the data dir of a stopped member (sled holds a lock: a running
/// member's dir is refused).
pub fn audit(dir: &Path) -> Result<Audit> {
    replay(dir, true)
}

/// The digests of a stopped member's committed entries only (no replay):
/// for comparing members' logs, where one member's replay stands for all
/// (the same committed entries applied in order make the same state).
pub fn digests(dir: &Path) -> Result<Audit> {
    replay(dir, false)
}

fn replay(dir: &Path, check: bool) -> Result<Audit> {
    let storage = SledStorage::open(dir)?;
    let mut a = Audit::default();
    let snapshot = storage.latest_snapshot()?;
    let (mut state, from) = match snapshot {
        // Digests alone need no state.
        Some((meta, _)) if !check => (ClusterState::default(), meta.index),
        Some((meta, data)) => (
            ClusterState::from_snapshot(&data).map_err(|e| {
                Error::Storage(format!(
                    "{}: its snapshot at index {} does not decode: {e}",
                    dir.display(),
                    meta.index
                ))
            })?,
            meta.index,
        ),
        None => (ClusterState::default(), 0),
    };
    a.snapshot_index = from;
    a.commit = storage.hard_state()?.commit;
    let note = |a: &mut Audit, index: u64, state: &ClusterState| {
        if let Err(e) = state.check_invariants() {
            a.violation_count += 1;
            if a.violations.len() < LISTED {
                a.violations.push((index, e));
            }
        }
    };
    if check {
        note(&mut a, from, &state);
    }
    let mut next = from + 1;
    while next <= a.commit {
        let high = (next + 1024).min(a.commit + 1);
        let entries = storage
            .entries(next, high, None, raft::GetEntriesContext::empty(false))
            .map_err(|e| {
                Error::Storage(format!(
                    "{}: reading committed entries {next}..{high}: {e}",
                    dir.display()
                ))
            })?;
        for e in &entries {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (e.get_entry_type() as i32).hash(&mut h);
            e.data.hash(&mut h);
            a.digests.push((e.index, e.term, h.finish()));
            if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                a.other_entries += 1;
                continue;
            }
            if !check {
                continue;
            }
            let env = Envelope::decode(&e.data).map_err(|err| {
                Error::Storage(format!(
                    "{}: committed entry {} does not decode: {err}",
                    dir.display(),
                    e.index
                ))
            })?;
            state.apply(&env.command);
            a.commands += 1;
            note(&mut a, e.index, &state);
        }
        next = entries.last().map_or(high, |e| e.index + 1);
    }
    Ok(a)
}

impl std::fmt::Display for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "replayed from the snapshot at index {} to the commit index {}: {} commands, {} other entries",
            self.snapshot_index, self.commit, self.commands, self.other_entries
        )?;
        if self.violation_count == 0 {
            write!(f, "no invariant broken at any index")
        } else {
            write!(f, "{} invariant violations:", self.violation_count)?;
            for (i, e) in &self.violations {
                write!(f, "\n  index {i}: {e}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{Entry, HardState};

    use super::*;
    use crate::fsm::tests::{alloc, node, submit};
    use crate::fsm::{Command, COMMAND_VERSION};

    fn entry(index: u64, command: Command) -> Entry {
        Entry {
            index,
            term: 2,
            data: Envelope {
                version: COMMAND_VERSION,
                origin: 1,
                request: index,
                command,
            }
            .encode()
            .into(),
            ..Default::default()
        }
    }

    fn commit(storage: &SledStorage, index: u64) {
        let hs = HardState {
            term: 2,
            commit: index,
            ..Default::default()
        };
        storage.set_hard_state(&hs).unwrap();
    }

    #[test]
    fn a_clean_log_is_replayed_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        storage
            .bootstrap(vec![1], ClusterState::default().to_snapshot())
            .unwrap();
        let allocated = Command::ContainersAllocated {
            allocations: vec![alloc("c1", "app-000001", "n1", 2000, 1 << 30, &[])],
            at_ms: 1,
        };
        storage
            .append(&[
                entry(2, node("n1", 4000, 8 << 30, 0)),
                entry(3, submit("r1", 1)),
                entry(4, allocated),
                entry(5, submit("r2", 2)), // appended, not committed
            ])
            .unwrap();
        commit(&storage, 4);
        drop(storage);
        let a = audit(dir.path()).unwrap();
        assert_eq!((a.snapshot_index, a.commit, a.commands), (1, 4, 3));
        assert_eq!(a.violation_count, 0, "{a}");
        let indexes: Vec<u64> = a.digests.iter().map(|d| d.0).collect();
        assert_eq!(indexes, vec![2, 3, 4]);
        // Digests tell entries apart.
        assert_ne!(a.digests[1].2, a.digests[2].2);
    }

    #[test]
    fn an_over_committed_node_is_found_at_each_index_it_lasts() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SledStorage::open(dir.path()).unwrap();
        let mut s = ClusterState::default();
        s.apply(&node("n1", 4000, 8 << 30, 0));
        s.apply(&submit("r1", 1));
        s.apply(&Command::ContainersAllocated {
            allocations: vec![alloc("c1", "app-000001", "n1", 3000, 1 << 30, &[])],
            at_ms: 1,
        });
        s.check_invariants().unwrap();
        // A state in which the node has less than its containers use (the
        // state machine refuses every command that would make one, so the
        // test writes it as a snapshot).
        s.nodes.get_mut("n1").unwrap().vcores_milli = 2000;
        storage.bootstrap(vec![1], s.to_snapshot()).unwrap();
        storage.append(&[entry(2, submit("r2", 2))]).unwrap();
        commit(&storage, 2);
        drop(storage);
        let a = audit(dir.path()).unwrap();
        assert_eq!(a.violation_count, 2, "{a}");
        assert_eq!(a.violations[0].0, 1);
        assert!(a.violations[0].1.contains("over-committed"), "{a}");
    }
}
