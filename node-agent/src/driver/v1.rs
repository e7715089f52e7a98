//! cgroup v1: one directory per container in each hierarchy we use.
//!
//! The kernel's OOM killer is switched off in the container's memory cgroup
//! (`memory.oom_control = 1`): a tree that reaches its limit is paused, not
//! half-killed, the agent is woken through an eventfd, takes the process-tree
//! snapshot for the diagnostic while every process is still there, and kills
//! the whole group.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::cgroupfs::{self, Mounts};
use super::{not_usable, Driver, DriverKind, Group, GroupStats, Limits};
use crate::error::Result;

/// CFS period used for CPU quotas.
pub const CPU_PERIOD_US: u64 = 100_000;

pub struct CgroupV1 {
    parent: String,
    memory: PathBuf,
    cpu: Option<PathBuf>,
    pids: Option<PathBuf>,
    freezer: Option<PathBuf>,
    devices: Option<PathBuf>,
}

impl CgroupV1 {
    /// Usable when the memory hierarchy is mounted and the agent can create its
    /// parent group there.
    pub fn new(mounts: &Mounts, parent: &str) -> Result<Self> {
        let memory = mounts
            .v1_controller("memory")
            .ok_or_else(|| not_usable("no cgroup v1 memory hierarchy is mounted"))?
            .to_path_buf();
        let d = CgroupV1 {
            parent: parent.to_string(),
            cpu: mounts.v1_controller("cpu").map(Path::to_path_buf),
            pids: mounts.v1_controller("pids").map(Path::to_path_buf),
            freezer: mounts.v1_controller("freezer").map(Path::to_path_buf),
            devices: mounts.v1_controller("devices").map(Path::to_path_buf),
            memory,
        };
        for h in d.hierarchies() {
            cgroupfs::mkdir(&h.join(parent))?;
        }
        Ok(d)
    }

    fn hierarchies(&self) -> Vec<&Path> {
        let mut v = vec![self.memory.as_path()];
        for h in [&self.cpu, &self.pids, &self.freezer, &self.devices]
            .into_iter()
            .flatten()
        {
            if !v.contains(&h.as_path()) {
                v.push(h);
            }
        }
        v
    }

    fn group(&self, id: &str) -> V1Group {
        let at = |h: &Option<PathBuf>| h.as_ref().map(|h| h.join(&self.parent).join(id));
        V1Group {
            memory: self.memory.join(&self.parent).join(id),
            cpu: at(&self.cpu),
            pids: at(&self.pids),
            freezer: at(&self.freezer),
            devices: at(&self.devices),
        }
    }
}

impl Driver for CgroupV1 {
    fn kind(&self) -> DriverKind {
        DriverKind::CgroupV1
    }

    fn describe(&self) -> String {
        let missing: Vec<&str> = [
            ("cpu", &self.cpu),
            ("pids", &self.pids),
            ("freezer", &self.freezer),
            ("devices", &self.devices),
        ]
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
        format!(
            "cgroup v1 under {}/{}; controllers missing: {}",
            self.memory.display(),
            self.parent,
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(",")
            }
        )
    }

    fn create(&self, id: &str, limits: &Limits) -> Result<Arc<dyn Group>> {
        let g = self.group(id);
        if let Err(e) = g.setup(limits) {
            // Leave nothing half-made behind.
            let _ = g.destroy();
            return Err(e);
        }
        Ok(Arc::new(g))
    }

    fn leftovers(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for h in self.hierarchies() {
            for id in cgroupfs::subdirs(&h.join(&self.parent)) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn open(&self, id: &str) -> Arc<dyn Group> {
        Arc::new(self.group(id))
    }

    fn cleanup(&self) {
        for h in self.hierarchies() {
            let _ = std::fs::remove_dir(h.join(&self.parent));
        }
    }
}

pub struct V1Group {
    memory: PathBuf,
    cpu: Option<PathBuf>,
    pids: Option<PathBuf>,
    freezer: Option<PathBuf>,
    devices: Option<PathBuf>,
}

impl V1Group {
    fn dirs(&self) -> Vec<&Path> {
        let mut v = vec![self.memory.as_path()];
        for d in [&self.cpu, &self.pids, &self.freezer, &self.devices]
            .into_iter()
            .flatten()
        {
            if !v.contains(&d.as_path()) {
                v.push(d);
            }
        }
        v
    }

    fn setup(&self, limits: &Limits) -> Result<()> {
        for d in self.dirs() {
            cgroupfs::mkdir(d)?;
        }
        let m = &self.memory;
        cgroupfs::write(
            &m.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        // Swap would let the tree go past its limit unseen.
        let memsw = m.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            cgroupfs::write(&memsw, &limits.memory_bytes.to_string())?;
        }
        cgroupfs::write(&m.join("memory.oom_control"), "1")?;
        if let Some(cpu) = &self.cpu {
            cgroupfs::write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            cgroupfs::write(
                &cpu.join("cpu.cfs_quota_us"),
                &cpu_quota_us(limits.vcores_milli).to_string(),
            )?;
        }
        if let Some(p) = &self.pids {
            cgroupfs::write(&p.join("pids.max"), &limits.pids.to_string())?;
        }
        if let Some(dev) = &self.devices {
            for rule in device_deny_rules(&limits.denied_devices) {
                cgroupfs::write(&dev.join("devices.deny"), &rule)?;
            }
        }
        Ok(())
    }

    fn freeze(&self, state: &str) -> bool {
        let Some(f) = &self.freezer else { return false };
        if cgroupfs::write(&f.join("freezer.state"), state).is_err() {
            return false;
        }
        for _ in 0..100 {
            if cgroupfs::read(&f.join("freezer.state")).is_some_and(|s| s.trim() == state) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }
}

/// CFS quota for `vcores_milli` thousandths of a core; -1 = unlimited.
pub fn cpu_quota_us(vcores_milli: u64) -> i64 {
    if vcores_milli == 0 {
        -1
    } else {
        // The kernel refuses quotas under 1 ms.
        ((vcores_milli * CPU_PERIOD_US / 1000).max(1000)) as i64
    }
}

/// `devices.deny` lines for character devices.
pub fn device_deny_rules(devices: &[(u32, u32)]) -> Vec<String> {
    devices
        .iter()
        .map(|(maj, min)| format!("c {maj}:{min} rwm"))
        .collect()
}

impl Group for V1Group {
    fn join_paths(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn set_leader(&self, _pid: i32) {}

    fn pids(&self) -> Vec<i32> {
        cgroupfs::procs(&self.memory)
    }

    fn stats(&self) -> GroupStats {
        let m = &self.memory;
        let oom = cgroupfs::read(&m.join("memory.oom_control")).unwrap_or_default();
        GroupStats {
            memory_bytes: cgroupfs::read_u64(&m.join("memory.usage_in_bytes")).unwrap_or(0),
            memory_peak_bytes: cgroupfs::read_u64(&m.join("memory.max_usage_in_bytes"))
                .unwrap_or(0),
            oom_kills: cgroupfs::keyed(&oom, "oom_kill").unwrap_or(0),
            under_oom: cgroupfs::keyed(&oom, "under_oom").unwrap_or(0) > 0,
            // cpuacct, mounted with cpu (`cpu,cpuacct`, as most systems do),
            // counts nanoseconds; where the cpu hierarchy has no
            // cpuacct.usage (cpuacct mounted apart), the live processes'
            // own times (what exited children used is not counted).
            cpu_usec: match self
                .cpu
                .as_ref()
                .and_then(|d| cgroupfs::read_u64(&d.join("cpuacct.usage")))
            {
                Some(ns) => ns / 1000,
                None => {
                    let ticks: u64 = cgroupfs::procs(m)
                        .into_iter()
                        .filter_map(crate::procfs::stat)
                        .map(|s| s.cpu_ticks)
                        .sum();
                    ticks.saturating_mul(1_000_000) / crate::procfs::ticks_per_second()
                }
            },
        }
    }

    fn kernel_enforces_memory(&self) -> bool {
        true
    }

    fn memory_events(&self) -> Option<OwnedFd> {
        // cgroup.event_control: "<eventfd> <fd of memory.oom_control>".
        let ctl = std::fs::File::open(self.memory.join("memory.oom_control")).ok()?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return None;
        }
        // SAFETY: efd is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let line = format!("{} {}", efd.as_raw_fd(), ctl.as_raw_fd());
        cgroupfs::write(&self.memory.join("cgroup.event_control"), &line).ok()?;
        // The registration lives as long as the eventfd; the control file may close.
        Some(efd)
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        cgroupfs::signal(&self.pids(), signal);
    }

    fn kill_all(&self) -> Vec<i32> {
        // Fast path: one round of SIGKILL usually empties the group (a tree
        // paused at its memory limit cannot even be frozen quickly).
        cgroupfs::signal(&self.pids(), nix::sys::signal::Signal::SIGKILL);
        for _ in 0..5 {
            if self.pids().is_empty() {
                return Vec::new();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Something keeps forking: freeze so nothing new starts, kill, thaw
        // (SIGKILL is delivered on thaw).
        let frozen = self.freeze("FROZEN");
        cgroupfs::signal(&self.pids(), nix::sys::signal::Signal::SIGKILL);
        if frozen {
            self.freeze("THAWED");
        }
        cgroupfs::kill_until_empty(&self.memory)
    }

    fn thaw(&self) -> bool {
        let Some(f) = &self.freezer else { return false };
        let frozen = cgroupfs::read(&f.join("freezer.state")).is_some_and(|s| s.trim() != "THAWED");
        if frozen {
            self.freeze("THAWED");
        }
        frozen
    }

    fn destroy(&self) -> Result<()> {
        let mut first_err = None;
        for d in self.dirs() {
            if let Err(e) = cgroupfs::rmdir(d) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota() {
        assert_eq!(cpu_quota_us(0), -1);
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(2000), 200_000);
        assert_eq!(cpu_quota_us(1), 1000, "clamped to the kernel's minimum");
    }

    #[test]
    fn deny_rules() {
        assert_eq!(
            device_deny_rules(&[(195, 1), (195, 3)]),
            vec!["c 195:1 rwm", "c 195:3 rwm"]
        );
    }
}
