//! Fencing: a node cut off from the resource manager kills its own
//! containers before the RM may run their tasks elsewhere, so that no task
//! runs twice at once.
//!
//! The RM declares a node LOST once it has heard nothing from it for its
//! `node_expiry`, counted from the arrival of the node's last heartbeat (a
//! new leader counts from its election, plus a grace for a deposed leader
//! that still answered), and gives the node's tasks to others from then on.
//! It tells every agent that bound in its answers. The agent counts from the
//! moment it *sent* its last answered heartbeat, which is earlier, and the
//! node's lease ends [`margin`] before the bound: by then every container of
//! the node is dead.
//!
//! The lease lives in a file (`<work_dir>/state/lease`) that every shim
//! reads while its container runs; the shims kill their containers when it
//! runs out, so the fence holds when the agent itself is dead, frozen or
//! restarting. Times are `CLOCK_BOOTTIME` (one clock for every process of
//! the machine, never set, counting suspend). An agent refuses to start a
//! container while the lease is out.
//!
//! An outage of the whole RM group is not a partition: when a majority of
//! the members the agent knows refuse its connections (their hosts answer,
//! no member listens), no quorum exists that could declare the node lost,
//! and the lease is renewed from that moment. A partition (packets dropped,
//! hosts silent) is not mistaken for one; a filter that answers with
//! resets is, and such a node is not fenced. A new quorum's leader counts
//! its `node_expiry` from its election, which comes after the members that
//! refused were started again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::ExitReason;

/// The lease as the file holds it (milliseconds of `CLOCK_BOOTTIME`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseFile {
    /// When the last answered heartbeat (or refusal by a majority) was sent.
    pub renewed_ms: u64,
    /// The RM's `node_expiry`.
    pub expiry_ms: u64,
    /// When the containers must be dead.
    pub deadline_ms: u64,
}

impl LeaseFile {
    /// The fence's reason when the lease ran out at `now_ms`, else `None`.
    pub fn expired_at(&self, now_ms: u64) -> Option<ExitReason> {
        (now_ms >= self.deadline_ms).then(|| ExitReason::Fenced {
            silent: Duration::from_millis(now_ms.saturating_sub(self.renewed_ms)),
            expiry: Duration::from_millis(self.expiry_ms),
        })
    }
}

/// How long before the RM's bound the lease ends: time for the shims to see
/// it and kill. A shim reads the lease again at its deadline, and at least
/// every [`SHIM_POLL`] or this margin, whichever is shorter: a lease file
/// replaced by one with an earlier deadline (the agent never moves it back
/// itself) is still honoured before the RM's bound.
pub fn margin(expiry: Duration) -> Duration {
    (expiry / 10)
        .max(Duration::from_millis(500))
        .min(expiry / 2)
}

/// How long a shim goes at most without reading the lease.
pub const SHIM_POLL: Duration = Duration::from_millis(500);

/// How long a shim waits before it reads the lease `l` again at `now_ms`:
/// until its deadline, at most [`SHIM_POLL`] and the lease's [`margin`]. A
/// renewal moves the deadline
/// later, so a shim reads a healthy lease about twice a second, not
/// every tenth of one; an expiring lease is read at its deadline.
pub fn next_read(l: Option<&LeaseFile>, now_ms: u64) -> Duration {
    match l {
        Some(l) if now_ms >= l.deadline_ms => Duration::ZERO,
        // At least 10 ms: a file with no expiry (margin 0) must not spin.
        Some(l) => {
            let left = Duration::from_millis(l.deadline_ms - now_ms);
            left.min(SHIM_POLL)
                .min(margin(Duration::from_millis(l.expiry_ms)))
                .max(Duration::from_millis(10))
                .min(left)
        }
        None => SHIM_POLL,
    }
}

/// `CLOCK_BOOTTIME` now, in milliseconds.
pub fn now_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
    assert_eq!(rc, 0, "CLOCK_BOOTTIME is readable");
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
}

/// Reads a lease file; `None` when absent or unreadable (no fence).
pub fn read(path: &Path) -> Option<LeaseFile> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The agent's side: renews the lease and says whether it is out.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    expiry: Option<Duration>,
    /// The lease as last written (or found at start, left by an earlier
    /// agent: it stands until this agent renews it).
    file: Option<LeaseFile>,
}

impl Lease {
    /// The lease at `path`, as an earlier agent may have left it.
    pub fn open(path: PathBuf) -> Lease {
        let file = read(&path);
        Lease {
            state: Mutex::new(State {
                expiry: file.map(|f| Duration::from_millis(f.expiry_ms)),
                file,
            }),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The RM's `node_expiry`, from its answers (0: it gave none; the
    /// lease keeps the last one).
    pub fn set_expiry(&self, expiry_ms: u64) {
        if expiry_ms > 0 {
            self.state.lock().expect("lease lock").expiry = Some(Duration::from_millis(expiry_ms));
        }
    }

    /// A heartbeat sent at `sent_ms` (or a probe that found a majority of
    /// members refusing) was answered: the lease runs from then. Never moves
    /// the deadline back.
    pub fn renew(&self, sent_ms: u64) {
        let mut st = self.state.lock().expect("lease lock");
        let Some(expiry) = st.expiry else {
            return;
        };
        let deadline_ms = sent_ms + (expiry - margin(expiry)).as_millis() as u64;
        if st.file.is_some_and(|f| f.deadline_ms >= deadline_ms) {
            return;
        }
        let file = LeaseFile {
            renewed_ms: sent_ms,
            expiry_ms: expiry.as_millis() as u64,
            deadline_ms,
        };
        match crate::shim::write_atomically(
            &self.path,
            &serde_json::to_vec(&file).expect("leases encode"),
        ) {
            Ok(()) => st.file = Some(file),
            Err(e) => {
                // The shims keep the older deadline: they fence early rather
                // than late.
                tracing::warn!(path = %self.path.display(), error = %e, "writing the node's lease failed");
            }
        }
    }

    /// Why the node is fenced now, if it is.
    pub fn fenced(&self) -> Option<ExitReason> {
        let st = self.state.lock().expect("lease lock");
        st.file?.expired_at(now_ms())
    }

    /// The lease as it stands.
    pub fn current(&self) -> Option<LeaseFile> {
        self.state.lock().expect("lease lock").file
    }
}

/// How the members answered a connection attempt each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub refused: usize,
    pub members: usize,
}

impl Probe {
    /// A majority refused: no quorum can be up.
    pub fn no_quorum_possible(&self) -> bool {
        self.members > 0 && self.refused > self.members / 2
    }
}

/// Tries a TCP connection to each member at once (each for at most
/// `timeout`) and counts those refused.
pub async fn probe(members: &[String], timeout: Duration) -> Probe {
    let tries = members.iter().map(|m| async move {
        let addr = m.split("://").last().unwrap_or(m).trim_end_matches('/');
        matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    let refused = futures::future::join_all(tries)
        .await
        .into_iter()
        .filter(|r| *r)
        .count();
    Probe {
        refused,
        members: members.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_ends_before_the_rms_bound_and_never_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease");
        let lease = Lease::open(path.clone());
        lease.renew(1_000);
        assert!(lease.current().is_none(), "no expiry known: no lease");
        assert!(lease.fenced().is_none());
        lease.set_expiry(30_000);
        lease.renew(1_000);
        let f = read(&path).unwrap();
        assert_eq!(f.deadline_ms, 1_000 + 27_000);
        lease.renew(500);
        assert_eq!(
            read(&path).unwrap(),
            f,
            "an older send does not move it back"
        );
        assert!(f.expired_at(27_999).is_none());
        assert_eq!(
            f.expired_at(28_000),
            Some(ExitReason::Fenced {
                silent: Duration::from_millis(27_000),
                expiry: Duration::from_secs(30)
            })
        );
        // A shim reads it again at its deadline, at least twice a second.
        assert_eq!(next_read(Some(&f), 1_000), SHIM_POLL);
        assert_eq!(next_read(Some(&f), 27_800), Duration::from_millis(200));
        assert_eq!(next_read(Some(&f), 28_000), Duration::ZERO);
        assert_eq!(next_read(None, 28_000), SHIM_POLL);
        let short = LeaseFile {
            renewed_ms: 0,
            expiry_ms: 400,
            deadline_ms: 10_000,
        };
        assert_eq!(next_read(Some(&short), 0), Duration::from_millis(200));
        // A new agent finds it.
        assert_eq!(Lease::open(path).current(), Some(f));
        assert_eq!(margin(Duration::from_secs(1)), Duration::from_millis(500));
        assert_eq!(margin(Duration::from_secs(60)), Duration::from_secs(6));
    }

    #[tokio::test]
    async fn a_probe_counts_refusals() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let members = vec![
            open.local_addr().unwrap().to_string(),
            closed.to_string(),
            format!("http://{closed}"),
        ];
        let p = probe(&members, Duration::from_secs(1)).await;
        assert_eq!(
            p,
            Probe {
                refused: 2,
                members: 3
            }
        );
        assert!(p.no_quorum_possible());
        assert!(!Probe {
            refused: 1,
            members: 2
        }
        .no_quorum_possible());
    }
}
