//! Which nodes changed, in apply order: the log the leader's scheduler view
//! follows so that a round patches the nodes that changed since the last one
//! instead of rebuilding the view of every node (O(change), not O(nodes)).
//!
//! Derived, never replicated or stored: every state value gets an epoch of
//! its own (a state read from a snapshot, or a clone, is a new epoch), and a
//! reader whose epoch differs, or whose position the bounded log no longer
//! reaches, rebuilds its view from the state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries kept; a reader further behind rebuilds.
pub const KEPT: usize = 1 << 18;

static EPOCHS: AtomicU64 = AtomicU64::new(1);

pub struct NodeChanges {
    epoch: u64,
    /// Sequence number of `log[0]`.
    first: u64,
    log: VecDeque<String>,
}

/// Where a reader stands in a state's change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

impl NodeChanges {
    /// Records that node `id` changed (its record, or what runs on it).
    pub fn mark(&mut self, id: &str) {
        if self.log.len() == KEPT {
            self.log.pop_front();
            self.first += 1;
        }
        self.log.push_back(id.to_string());
    }

    /// The position after the latest change.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            epoch: self.epoch,
            seq: self.first + self.log.len() as u64,
        }
    }

    /// Nodes changed since `at` (repeats included), or None when `at` is of
    /// another epoch or older than the log reaches: then rebuild.
    pub fn since(&self, at: Cursor) -> Option<impl Iterator<Item = &str>> {
        if at.epoch != self.epoch || at.seq < self.first {
            return None;
        }
        let skip = (at.seq - self.first) as usize;
        (skip <= self.log.len()).then(|| self.log.iter().skip(skip).map(String::as_str))
    }
}

impl Default for NodeChanges {
    fn default() -> Self {
        NodeChanges {
            epoch: EPOCHS.fetch_add(1, Ordering::Relaxed),
            first: 0,
            log: VecDeque::new(),
        }
    }
}

/// A clone is a new state: readers of the original rebuild from it.
impl Clone for NodeChanges {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Bookkeeping, not state: two states are equal whatever their logs.
impl PartialEq for NodeChanges {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for NodeChanges {}

impl std::fmt::Debug for NodeChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeChanges")
            .field("epoch", &self.epoch)
            .field("cursor", &self.cursor().seq)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_sees_what_changed_since_its_cursor_or_is_told_to_rebuild() {
        let mut c = NodeChanges::default();
        let start = c.cursor();
        c.mark("a");
        c.mark("b");
        let mid = c.cursor();
        c.mark("a");
        assert_eq!(c.since(start).unwrap().collect::<Vec<_>>(), ["a", "b", "a"]);
        assert_eq!(c.since(mid).unwrap().collect::<Vec<_>>(), ["a"]);
        assert_eq!(c.since(c.cursor()).unwrap().count(), 0);
        // Another state (a clone, a snapshot read) is another epoch.
        let other = c.clone();
        assert!(other.since(mid).is_none());
        assert_ne!(other.cursor().epoch, c.cursor().epoch);
        // A reader the bounded log no longer reaches rebuilds.
        for i in 0..KEPT {
            c.mark(&format!("n{i}"));
        }
        assert!(c.since(start).is_none());
        assert_eq!(c.since(c.cursor()).unwrap().count(), 0);
    }
}
