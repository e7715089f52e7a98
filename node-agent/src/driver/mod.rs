//! Isolation drivers: how a container's process tree is grouped, limited,
//! measured and killed. Three drivers behind one trait, picked at start:
//!
//! - [`v2::CgroupV2`]: a cgroup in the unified hierarchy (memory, cpu, pids);
//! - [`v1::CgroupV1`]: a cgroup in each v1 hierarchy (memory, cpu, pids,
//!   freezer, devices): what hybrid machines offer;
//! - [`procfs::ProcfsDriver`]: no cgroup rights; the tree is followed through
//!   `/proc` and an environment marker, and the monitor enforces memory itself.
//!
//! Every method may block on cgroupfs or `/proc`: call from a blocking thread.

pub mod bpf;
pub mod cgroupfs;
pub mod procfs;
pub mod v1;
pub mod v2;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::DriverChoice;
use crate::error::{Error, Result};

/// Which driver runs the containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    CgroupV2,
    CgroupV1,
    Procfs,
}

impl std::fmt::Display for DriverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DriverKind::CgroupV2 => "cgroup-v2",
            DriverKind::CgroupV1 => "cgroup-v1",
            DriverKind::Procfs => "procfs",
        })
    }
}

/// Limits a container's group is created with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Hard memory limit in bytes.
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a core; 0 = unlimited.
    pub vcores_milli: u64,
    /// Maximum tasks.
    pub pids: u32,
    /// Character devices (major, minor) the container must not open: the
    /// node's GPUs that were not given to it.
    pub denied_devices: Vec<(u32, u32)>,
}

/// A group's memory figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Memory in use now.
    pub memory_bytes: u64,
    /// Highest use seen.
    pub memory_peak_bytes: u64,
    /// Processes the kernel killed for the memory limit.
    pub oom_kills: u64,
    /// Processes wait in the group's OOM handler (cgroup v1 with the kernel's
    /// OOM killer off): the group hit its limit and must be killed.
    pub under_oom: bool,
    /// CPU time its processes used, in microseconds (0 where unknown).
    pub cpu_usec: u64,
}

/// Creates groups. One per agent, shared by all containers.
pub trait Driver: Send + Sync + 'static {
    fn kind(&self) -> DriverKind;
    /// One line for the start-up log: where groups go and what is enforced.
    fn describe(&self) -> String;
    /// Creates the group of container `id` with `limits`.
    fn create(&self, id: &str, limits: &Limits) -> Result<Arc<dyn Group>>;
    /// Ids of containers left by an earlier agent with the same cgroup parent.
    fn leftovers(&self) -> Vec<String>;
    /// A handle on a leftover group, to kill its processes and remove it.
    fn open(&self, id: &str) -> Arc<dyn Group>;
    /// Removes the agent's own parent groups when they are empty.
    fn cleanup(&self);
}

/// One container's group.
pub trait Group: Send + Sync + 'static {
    /// Files a new process writes "0" into, before exec, to join the group.
    fn join_paths(&self) -> Vec<PathBuf>;
    /// Tells the group the pid of its leading process.
    fn set_leader(&self, pid: i32);
    /// Every live process of the group.
    fn pids(&self) -> Vec<i32>;
    fn stats(&self) -> GroupStats;
    /// True when the kernel enforces the memory limit; false when the monitor
    /// must compare `stats().memory_bytes` with the limit itself.
    fn kernel_enforces_memory(&self) -> bool;
    /// A descriptor that becomes readable when the group's memory state
    /// changes: an eventfd for OOM on v1, an inotify watch on `memory.events`
    /// on v2 (limit reached, OOM kills). The reader drains it and looks at
    /// [`Group::stats`].
    fn memory_events(&self) -> Option<OwnedFd>;
    /// Sends `signal` to every process of the group.
    fn signal_all(&self, signal: nix::sys::signal::Signal);
    /// SIGKILLs every process of the group, again until none is left or the
    /// attempts run out. Returns the pids still alive (empty on success).
    fn kill_all(&self) -> Vec<i32>;
    /// Removes the group. Call after `kill_all`.
    fn destroy(&self) -> Result<()>;
    /// Thaws the group if it is frozen; true when it was. A group is frozen
    /// only inside [`Group::kill_all`]: one found frozen was being killed
    /// by an agent that died before thawing it (its processes would stay
    /// stopped for good, their SIGKILL undelivered); the caller finishes
    /// the kill.
    fn thaw(&self) -> bool {
        false
    }
}

/// Picks the driver for `choice`, trying v2, then v1, then procfs for `Auto`.
pub fn select(choice: DriverChoice, parent: &str) -> Result<Arc<dyn Driver>> {
    let mounts = cgroupfs::Mounts::read();
    let try_v2 = || v2::CgroupV2::new(&mounts, parent).map(|d| Arc::new(d) as Arc<dyn Driver>);
    let try_v1 = || v1::CgroupV1::new(&mounts, parent).map(|d| Arc::new(d) as Arc<dyn Driver>);
    let procfs = || Arc::new(procfs::ProcfsDriver::new(parent)) as Arc<dyn Driver>;
    match choice {
        DriverChoice::CgroupV2 => try_v2(),
        DriverChoice::CgroupV1 => try_v1(),
        DriverChoice::Procfs => Ok(procfs()),
        DriverChoice::Auto => {
            let v2_err = match try_v2() {
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            tracing::info!(reason = %v2_err, "cgroup v2 driver not usable");
            match try_v1() {
                Ok(d) => Ok(d),
                Err(v1_err) => {
                    tracing::warn!(reason = %v1_err, "cgroup v1 driver not usable; falling back to the procfs monitor");
                    Ok(procfs())
                }
            }
        }
    }
}

/// Marker put in every container's environment: `WEFT_CONTAINER_SCOPE=<parent>/<id>`.
/// Children inherit it, so the procfs driver and leftover recovery find
/// processes that left the tree.
pub const SCOPE_VAR: &str = "WEFT_CONTAINER_SCOPE";

pub fn scope_marker(parent: &str, id: &str) -> String {
    format!("{SCOPE_VAR}={parent}/{id}")
}

pub(crate) fn not_usable(what: impl Into<String>) -> Error {
    Error::FailedPrecondition(what.into())
}

/// Makes `cmd`'s process start a new session and join the groups whose
/// `cgroup.procs` files are `join`, after fork and before exec, so every byte
/// it allocates is charged to its group.
pub fn join_on_exec(cmd: &mut std::process::Command, join: Vec<PathBuf>) {
    use std::os::unix::process::CommandExt;
    let join: Vec<std::ffi::CString> = join
        .into_iter()
        .map(|p| {
            std::ffi::CString::new(p.into_os_string().into_encoded_bytes())
                .expect("cgroup paths hold no NUL")
        })
        .collect();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe calls (setsid, open, write, close) on data prepared
    // before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for p in &join {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
