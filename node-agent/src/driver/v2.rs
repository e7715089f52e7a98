//! cgroup v2: one directory per container in the unified hierarchy, with the
//! memory, cpu and pids controllers. `memory.oom.group` makes the kernel kill
//! the whole tree at once when it reaches its limit; `cgroup.kill` ends a group
//! atomically. v2 has no devices controller: the GPUs a container was not
//! given are denied by a BPF device program attached to its group
//! ([`super::bpf`]), where the kernel and the agent's rights allow one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cgroupfs::{self, Mounts};
use super::{not_usable, Driver, DriverKind, Group, GroupStats, Limits};
use crate::error::Result;

/// Controllers a container group needs.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
pub const CPU_PERIOD_US: u64 = 100_000;

pub struct CgroupV2 {
    /// `<mount>/<parent>`.
    parent_dir: PathBuf,
    /// Whether device programs can be loaded here; why not when they cannot.
    device_filter: std::result::Result<(), String>,
}

impl CgroupV2 {
    /// Usable when a unified hierarchy is mounted, offers every controller of
    /// [`CONTROLLERS`], and the agent can create its parent group and delegate
    /// the controllers to it.
    pub fn new(mounts: &Mounts, parent: &str) -> Result<Self> {
        let root = mounts
            .v2
            .as_ref()
            .ok_or_else(|| not_usable("no cgroup v2 hierarchy is mounted"))?;
        let available = cgroupfs::read(&root.join("cgroup.controllers")).unwrap_or_default();
        let missing = missing_controllers(&available);
        if !missing.is_empty() {
            return Err(not_usable(format!(
                "the cgroup v2 hierarchy at {} lacks controllers {} (bound to v1 hierarchies?)",
                root.display(),
                missing.join(",")
            )));
        }
        enable_controllers(root)?;
        let parent_dir = root.join(parent);
        cgroupfs::mkdir(&parent_dir)?;
        enable_controllers(&parent_dir)?;
        let device_filter = super::bpf::probe();
        if let Err(why) = &device_filter {
            tracing::warn!(
                reason = %why,
                "cgroup v2: no BPF device filter; a container sees the node's other GPUs' device files (CUDA_VISIBLE_DEVICES still hides them)"
            );
        }
        Ok(CgroupV2 {
            parent_dir,
            device_filter,
        })
    }
}

/// Controllers of [`CONTROLLERS`] absent from a `cgroup.controllers` line.
pub fn missing_controllers(available: &str) -> Vec<&'static str> {
    let have: Vec<&str> = available.split_whitespace().collect();
    CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !have.contains(c))
        .collect()
}

fn enable_controllers(dir: &Path) -> Result<()> {
    let enabled = cgroupfs::read(&dir.join("cgroup.subtree_control")).unwrap_or_default();
    let need = missing_controllers(&enabled);
    if need.is_empty() {
        return Ok(());
    }
    let line: Vec<String> = need.iter().map(|c| format!("+{c}")).collect();
    cgroupfs::write(&dir.join("cgroup.subtree_control"), &line.join(" "))
}

/// `cpu.max` for `vcores_milli` thousandths of a core.
pub fn cpu_max(vcores_milli: u64) -> String {
    if vcores_milli == 0 {
        format!("max {CPU_PERIOD_US}")
    } else {
        format!(
            "{} {CPU_PERIOD_US}",
            (vcores_milli * CPU_PERIOD_US / 1000).max(1000)
        )
    }
}

impl Driver for CgroupV2 {
    fn kind(&self) -> DriverKind {
        DriverKind::CgroupV2
    }

    fn describe(&self) -> String {
        match &self.device_filter {
            Ok(()) => format!(
                "cgroup v2 under {} (devices: BPF filter)",
                self.parent_dir.display()
            ),
            Err(_) => format!(
                "cgroup v2 under {} (devices: not filtered)",
                self.parent_dir.display()
            ),
        }
    }

    fn create(&self, id: &str, limits: &Limits) -> Result<Arc<dyn Group>> {
        // The parent may have been removed under us (an operator, another
        // agent's cleanup): a recreated one needs its controllers again, or
        // the group would have no memory.max to write.
        cgroupfs::mkdir(&self.parent_dir)?;
        enable_controllers(&self.parent_dir)?;
        let g = V2Group {
            dir: self.parent_dir.join(id),
            peak_seen: AtomicU64::new(0),
        };
        if let Err(e) = g.setup(limits, self.device_filter.is_ok()) {
            let _ = g.destroy();
            return Err(e);
        }
        Ok(Arc::new(g))
    }

    fn leftovers(&self) -> Vec<String> {
        cgroupfs::subdirs(&self.parent_dir)
    }

    fn open(&self, id: &str) -> Arc<dyn Group> {
        Arc::new(V2Group {
            dir: self.parent_dir.join(id),
            peak_seen: AtomicU64::new(0),
        })
    }

    fn cleanup(&self) {
        let _ = std::fs::remove_dir(&self.parent_dir);
    }
}

pub struct V2Group {
    dir: PathBuf,
    /// Highest `memory.current` sampled, for kernels without `memory.peak`.
    peak_seen: AtomicU64,
}

impl V2Group {
    fn setup(&self, limits: &Limits, filter_devices: bool) -> Result<()> {
        let d = &self.dir;
        cgroupfs::mkdir(d)?;
        // Before any process joins: nothing in the group ever opens a device
        // it was not given.
        if filter_devices && !limits.denied_devices.is_empty() {
            super::bpf::attach_deny(d, &limits.denied_devices)?;
        }
        cgroupfs::write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
        let swap = d.join("memory.swap.max");
        if swap.exists() {
            cgroupfs::write(&swap, "0")?;
        }
        // Kill the whole tree, not one member, when the limit is hit.
        let group = d.join("memory.oom.group");
        if group.exists() {
            cgroupfs::write(&group, "1")?;
        }
        cgroupfs::write(&d.join("cpu.max"), &cpu_max(limits.vcores_milli))?;
        cgroupfs::write(&d.join("pids.max"), &limits.pids.to_string())?;
        Ok(())
    }
}

impl Group for V2Group {
    fn join_paths(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn set_leader(&self, _pid: i32) {}

    fn pids(&self) -> Vec<i32> {
        cgroupfs::procs(&self.dir)
    }

    fn stats(&self) -> GroupStats {
        let current = cgroupfs::read_u64(&self.dir.join("memory.current")).unwrap_or(0);
        let seen = self
            .peak_seen
            .fetch_max(current, Ordering::Relaxed)
            .max(current);
        let events = cgroupfs::read(&self.dir.join("memory.events")).unwrap_or_default();
        GroupStats {
            memory_bytes: current,
            memory_peak_bytes: cgroupfs::read_u64(&self.dir.join("memory.peak"))
                .unwrap_or(0)
                .max(seen),
            oom_kills: cgroupfs::keyed(&events, "oom_kill").unwrap_or(0),
            under_oom: false,
            cpu_usec: cgroupfs::read(&self.dir.join("cpu.stat"))
                .and_then(|s| cgroupfs::keyed(&s, "usage_usec"))
                .unwrap_or(0),
        }
    }

    fn kernel_enforces_memory(&self) -> bool {
        true
    }

    fn memory_events(&self) -> Option<OwnedFd> {
        // The kernel notifies file modification on memory.events when its
        // counters change (max, oom, oom_kill...).
        let path = std::ffi::CString::new(
            self.dir
                .join("memory.events")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .ok()?;
        // SAFETY: inotify_init1 has no memory-safety preconditions; checked below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: path is a valid NUL-terminated string; fd is open.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
        (wd >= 0).then_some(fd)
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        cgroupfs::signal(&self.pids(), signal);
    }

    fn kill_all(&self) -> Vec<i32> {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            let _ = cgroupfs::write(&kill, "1");
        } else {
            let _ = cgroupfs::write(&self.dir.join("cgroup.freeze"), "1");
            self.signal_all(nix::sys::signal::Signal::SIGKILL);
            let _ = cgroupfs::write(&self.dir.join("cgroup.freeze"), "0");
        }
        cgroupfs::kill_until_empty(&self.dir)
    }

    fn destroy(&self) -> Result<()> {
        cgroupfs::rmdir(&self.dir)
    }

    fn thaw(&self) -> bool {
        let f = self.dir.join("cgroup.freeze");
        let frozen = cgroupfs::read(&f).is_some_and(|s| s.trim() == "1");
        if frozen {
            let _ = cgroupfs::write(&f, "0");
        }
        frozen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers_needed() {
        assert_eq!(
            missing_controllers("cpuset cpu io memory hugetlb pids rdma"),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_controllers("hugetlb"),
            vec!["memory", "cpu", "pids"]
        );
        assert_eq!(missing_controllers("memory pids"), vec!["cpu"]);
    }

    #[test]
    fn cpu_max_format() {
        assert_eq!(cpu_max(0), "max 100000");
        assert_eq!(cpu_max(500), "50000 100000");
        assert_eq!(cpu_max(4000), "400000 100000");
    }

    /// Exercises a real v2 group where this machine offers one (pure v2
    /// machines); elsewhere says why it did nothing.
    #[test]
    fn real_group_where_available() {
        let parent = format!("weft-unit-{}", std::process::id());
        let d = match CgroupV2::new(&Mounts::read(), &parent) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("cgroup v2 not usable here: {e}");
                return;
            }
        };
        let limits = Limits {
            memory_bytes: 64 << 20,
            vcores_milli: 500,
            pids: 16,
            denied_devices: vec![],
        };
        let g = d.create("c1", &limits).unwrap();
        let dir = d.parent_dir.join("c1");
        assert_eq!(
            cgroupfs::read(&dir.join("memory.max")).unwrap().trim(),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            cgroupfs::read(&dir.join("cpu.max")).unwrap().trim(),
            "50000 100000"
        );
        assert_eq!(cgroupfs::read(&dir.join("pids.max")).unwrap().trim(), "16");
        assert_eq!(d.leftovers(), vec!["c1".to_string()]);
        assert!(g.pids().is_empty());
        assert!(g.kill_all().is_empty());
        g.destroy().unwrap();
        // The parent removed under the agent: the next group still gets its limits.
        d.cleanup();
        assert!(!d.parent_dir.exists());
        let g = d.create("c2", &limits).unwrap();
        assert_eq!(
            cgroupfs::read(&d.parent_dir.join("c2").join("memory.max"))
                .unwrap()
                .trim(),
            (64u64 << 20).to_string()
        );
        g.destroy().unwrap();
        d.cleanup();
        assert!(!d.parent_dir.exists());
    }
}
