//! The procfs monitor: for agents without cgroup rights. A container's members
//! are its leader's process tree plus every process carrying its environment
//! marker (which catches members that double-forked out of the tree) plus every
//! member seen before and still alive. The kernel enforces nothing here: the
//! monitor compares the tree's summed RSS with the limit and kills. CPU and pids
//! limits are not enforced by this driver.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{scope_marker, Driver, DriverKind, Group, GroupStats, Limits, SCOPE_VAR};
use crate::error::Result;
use crate::procfs;

pub struct ProcfsDriver {
    parent: String,
}

impl ProcfsDriver {
    pub fn new(parent: &str) -> Self {
        ProcfsDriver {
            parent: parent.to_string(),
        }
    }
}

impl Driver for ProcfsDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Procfs
    }

    fn describe(&self) -> String {
        "procfs monitor: memory enforced by the agent from RSS; cpu and pids limits not enforced"
            .into()
    }

    fn create(&self, id: &str, _limits: &Limits) -> Result<Arc<dyn Group>> {
        Ok(Arc::new(ProcfsGroup::new(&self.parent, id)))
    }

    fn leftovers(&self) -> Vec<String> {
        let prefix = format!("{SCOPE_VAR}={}/", self.parent);
        let mut ids = Vec::new();
        for pid in procfs::all_pids() {
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            for kv in env.split(|b| *b == 0) {
                if let Some(id) = kv.strip_prefix(prefix.as_bytes()) {
                    let id = String::from_utf8_lossy(id).into_owned();
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
        }
        ids.sort();
        ids
    }

    fn open(&self, id: &str) -> Arc<dyn Group> {
        Arc::new(ProcfsGroup::new(&self.parent, id))
    }

    fn cleanup(&self) {}
}

pub struct ProcfsGroup {
    marker: Vec<u8>,
    leader: AtomicI32,
    /// Members seen so far: pid -> start time (a reused pid has another).
    seen: Mutex<HashMap<i32, u64>>,
    peak: AtomicU64,
}

impl ProcfsGroup {
    fn new(parent: &str, id: &str) -> Self {
        ProcfsGroup {
            marker: scope_marker(parent, id).into_bytes(),
            leader: AtomicI32::new(0),
            seen: Mutex::new(HashMap::new()),
            peak: AtomicU64::new(0),
        }
    }

    /// Live members from one `/proc` scan: the leader's tree plus members seen
    /// before. With `deep`, also every process carrying the marker.
    fn members(&self, deep: bool) -> Vec<procfs::Stat> {
        let all: Vec<procfs::Stat> = procfs::all_pids()
            .into_iter()
            .filter_map(procfs::stat)
            .collect();
        let leader = self.leader.load(Ordering::Relaxed);
        let mut out = if leader > 0 {
            procfs::tree_of(leader, &all)
        } else {
            Vec::new()
        };
        let mut seen = self.seen.lock().expect("procfs group lock poisoned");
        for s in &all {
            let known = seen.get(&s.pid) == Some(&s.start_time);
            let marked = deep && procfs::environ_has(s.pid, &self.marker);
            if (known || marked) && !out.iter().any(|o| o.pid == s.pid) {
                out.push(*s);
            }
        }
        seen.retain(|pid, _| all.iter().any(|s| s.pid == *pid));
        for s in &out {
            seen.insert(s.pid, s.start_time);
        }
        out
    }
}

impl Group for ProcfsGroup {
    fn join_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn set_leader(&self, pid: i32) {
        self.leader.store(pid, Ordering::Relaxed);
    }

    fn pids(&self) -> Vec<i32> {
        self.members(false).iter().map(|s| s.pid).collect()
    }

    fn stats(&self) -> GroupStats {
        let page = procfs::page_size();
        let members = self.members(false);
        let rss: u64 = members.iter().map(|s| s.rss_pages * page).sum();
        let peak = self.peak.fetch_max(rss, Ordering::Relaxed).max(rss);
        // The live processes' own time (what exited children used is not
        // counted here).
        let ticks: u64 = members.iter().map(|s| s.cpu_ticks).sum();
        GroupStats {
            memory_bytes: rss,
            memory_peak_bytes: peak,
            oom_kills: 0,
            under_oom: false,
            cpu_usec: ticks.saturating_mul(1_000_000) / procfs::ticks_per_second(),
        }
    }

    fn kernel_enforces_memory(&self) -> bool {
        false
    }

    fn memory_events(&self) -> Option<OwnedFd> {
        None
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        let pids: Vec<i32> = self.members(true).iter().map(|s| s.pid).collect();
        super::cgroupfs::signal(&pids, signal);
    }

    fn kill_all(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        for attempt in 0..100 {
            // Zombies are dead already; only their parent can reap them.
            let left: Vec<i32> = self
                .members(true)
                .iter()
                .map(|s| s.pid)
                .filter(|&p| p != me && !procfs::is_zombie(p))
                .collect();
            if left.is_empty() {
                return left;
            }
            super::cgroupfs::signal(&left, nix::sys::signal::Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(if attempt < 10 { 2 } else { 20 }));
        }
        self.members(true)
            .iter()
            .map(|s| s.pid)
            .filter(|&p| !procfs::is_zombie(p))
            .collect()
    }

    fn destroy(&self) -> Result<()> {
        Ok(())
    }
}
