//! What the agent keeps on disk so that its containers outlive it (nomad's
//! `RecoverTask`, YARN's NM recovery): one small record per container in
//! `<work_dir>/state/`, written once its shim reports the container's pid,
//! and the files that say how it ended. The next agent reads them at start
//! ([`crate::manager::Manager::recover`]) and takes over every container that
//! still runs: same pid, same group (so the same quotas), its end still
//! reported with its reason.
//!
//! Files of container `<id>`:
//! - `<id>.json`: [`Persisted`], what the agent needs to supervise it again;
//! - `<id>.exit`: written by the shim when the container's process ended
//!   (its raw wait status), also while no agent runs;
//! - `<id>.end`: written by the agent once it decided how the container
//!   ended (the reported exit, with Weft's reason for kills it made).
//!
//! They are removed when the agent forgets the container (its logs are
//! swept). None is synced to disk: they must survive the agent's death,
//! not the machine's (a machine that restarts has no container left to
//! take over; an unreadable or missing file then reads as "lost").

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde::{Deserialize, Serialize};
use weft_proto::v1 as pb;

use crate::model::{ContainerSpec, Exit, ExitReason, ResourceRequest};
use crate::procfs::{self, ProcessSample};

/// Version of [`Persisted`]; a record of another version is not taken over.
pub const VERSION: u32 = 1;

/// One container as the agent that started it left it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Persisted {
    pub version: u32,
    pub id: String,
    pub command: String,
    pub resources: ResourceRequest,
    pub gpu_uuids: Vec<String>,
    /// The container's leading process, and its start time in clock ticks
    /// after boot (a pid reused by another process has another).
    pub pid: u32,
    pub pid_start: u64,
    /// The shim that waits for it.
    pub shim_pid: u32,
    pub shim_start: u64,
    /// `/proc/sys/kernel/random/boot_id` when it started: after a reboot
    /// nothing of it runs, whatever the pids say.
    pub boot_id: String,
    pub started_at_ms: u64,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The public key (hex) of the RM group whose token started it (empty
    /// in records of earlier agents): see [`crate::model::Record::group_key`].
    #[serde(default)]
    pub group_key: String,
    /// The application its token was granted to (empty in records of
    /// earlier agents).
    #[serde(default)]
    pub application_id: String,
}

impl Persisted {
    /// The spec a recovered record carries: no environment (it held the
    /// container's tokens and is not needed once it runs).
    pub fn spec(&self) -> ContainerSpec {
        ContainerSpec {
            id: self.id.clone(),
            command: self.command.clone(),
            args: Vec::new(),
            env: Default::default(),
            files: Default::default(),
            checkpoint_key: String::new(),
            resources: self.resources.clone(),
        }
    }

    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_at_ms)
    }
}

/// The state directory and the paths in it.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(work_dir: &Path) -> Self {
        StateDir {
            dir: work_dir.join("state"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn record(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn exit_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.exit"))
    }

    pub fn end_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.end"))
    }

    pub fn write_record(&self, p: &Persisted) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(p).expect("records encode");
        crate::shim::write_atomically(&self.record(&p.id), &bytes)
    }

    /// Writes how the container ended, as it is reported.
    pub fn write_end(&self, id: &str, exit: &Exit) -> std::io::Result<()> {
        let bytes = crate::model::exit_to_proto(exit).encode_to_vec();
        crate::shim::write_atomically(&self.end_file(id), &bytes)
    }

    pub fn read_end(&self, id: &str) -> Option<Exit> {
        let bytes = std::fs::read(self.end_file(id)).ok()?;
        exit_from_proto(&pb::ContainerExit::decode(bytes.as_slice()).ok()?)
    }

    /// Every record in the directory; unreadable ones are named with why.
    pub fn records(&self) -> Vec<std::result::Result<Persisted, (PathBuf, String)>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let read = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Persisted>(&b).map_err(|e| e.to_string()))
                .and_then(|p| {
                    if p.version != VERSION {
                        Err(format!(
                            "record version {} (this agent reads {VERSION})",
                            p.version
                        ))
                    } else if Some(p.id.as_str()) != path.file_stem().and_then(|s| s.to_str()) {
                        Err(format!("names container {:?}", p.id))
                    } else {
                        Ok(p)
                    }
                });
            out.push(read.map_err(|why| (path, why)));
        }
        out
    }

    /// Removes every file of container `id`.
    pub fn remove(&self, id: &str) {
        for p in [self.record(id), self.exit_file(id), self.end_file(id)] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// This boot's id ("" where the kernel does not say).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// True when `pid` is a live process (not a zombie) started at `start`.
/// Blocks on `/proc`.
pub fn alive(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    let Some(s) = procfs::stat(pid as i32) else {
        return false;
    };
    s.start_time == start && !procfs::is_zombie(pid as i32)
}

/// Start time of `pid` in clock ticks after boot; 0 if it is gone.
pub fn start_time(pid: u32) -> u64 {
    procfs::stat(pid as i32).map_or(0, |s| s.start_time)
}

/// A descriptor that becomes readable when process `pid` ends, for a
/// process that is not the agent's child (`pidfd_open`, Linux 5.3).
pub fn pidfd(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The reason an ordinary end (no kill Weft decided) reports.
pub fn reason_of(status: std::process::ExitStatus) -> ExitReason {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => ExitReason::Succeeded,
        (code, signal) => ExitReason::Failed {
            exit_code: code,
            signal,
        },
    }
}

/// The reverse of [`crate::model::exit_to_proto`]; `None` for an exit
/// without a reason.
pub fn exit_from_proto(e: &pb::ContainerExit) -> Option<Exit> {
    use pb::container_exit::Reason as R;
    let reason = match e.reason.as_ref()? {
        R::Succeeded(_) => ExitReason::Succeeded,
        R::Failed(f) => ExitReason::Failed {
            exit_code: f.exit_code,
            signal: f.signal,
        },
        R::OverMemoryQuota(q) => ExitReason::OverMemoryQuota {
            limit: q.limit_bytes,
            peak: q.peak_bytes,
        },
        R::OverGpuMemoryQuota(q) => ExitReason::OverGpuMemoryQuota {
            limit: q.limit_bytes,
            used: q.used_bytes,
        },
        R::WallTimeExceeded(w) => ExitReason::WallTimeExceeded {
            limit: Duration::from_millis(w.limit_ms),
        },
        R::UserRequested(_) => ExitReason::UserRequested,
        R::AgentShutdown(_) => ExitReason::AgentShutdown,
        R::Lost(_) => ExitReason::Lost,
        R::Fenced(f) => ExitReason::Fenced {
            silent: Duration::from_millis(f.silent_ms),
            expiry: Duration::from_millis(f.node_expiry_ms),
        },
        R::Preempted(_) => ExitReason::Preempted {
            grace: Duration::ZERO,
        },
        // Reasons the RM gives, never an agent.
        R::NodeLost(_) | R::LaunchFailed(_) => return None,
    };
    Some(Exit {
        reason,
        diagnostic: e.diagnostic.clone(),
        top_processes: e
            .top_processes
            .iter()
            .map(|p| ProcessSample {
                pid: p.pid as i32,
                command_line: p.command_line.clone(),
                rss_bytes: p.rss_bytes,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn persisted(id: &str) -> Persisted {
        Persisted {
            version: VERSION,
            id: id.into(),
            command: "sleep".into(),
            resources: ResourceRequest {
                vcores_milli: 500,
                memory_bytes: 64 << 20,
                max_runtime: Some(Duration::from_secs(90)),
                gpu_indices: vec![1],
                ..Default::default()
            },
            gpu_uuids: vec!["GPU-1".into()],
            pid: 10,
            pid_start: 20,
            shim_pid: 9,
            shim_start: 19,
            boot_id: "b".into(),
            started_at_ms: 1_700_000_000_000,
            work_dir: "/w/containers/c1".into(),
            log_dir: "/w/logs/c1".into(),
            group_key: "ab".into(),
            application_id: "app-000001".into(),
        }
    }

    #[test]
    fn records_and_ends_read_back_and_bad_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        std::fs::create_dir_all(dir.path()).unwrap();
        let p = persisted("c1");
        dir.write_record(&p).unwrap();
        let spec = p.spec();
        assert_eq!(spec.resources.max_runtime, Some(Duration::from_secs(90)));
        assert_eq!(spec.resources.gpu_indices, vec![1]);
        assert!(spec.env.is_empty());
        // A record under another container's name, a newer version and junk.
        let mut other = persisted("c3");
        std::fs::write(dir.record("c2"), serde_json::to_vec(&other).unwrap()).unwrap();
        other.id = "c4".into();
        other.version = VERSION + 1;
        std::fs::write(dir.record("c4"), serde_json::to_vec(&other).unwrap()).unwrap();
        std::fs::write(dir.record("c5"), b"{").unwrap();
        let mut read = dir.records();
        read.sort_by_key(|r| match r {
            Ok(p) => p.id.clone(),
            Err((path, _)) => path.file_stem().unwrap().to_string_lossy().into_owned(),
        });
        assert_eq!(read.len(), 4);
        assert_eq!(read[0].as_ref().unwrap(), &p);
        let errs: Vec<String> = read[1..]
            .iter()
            .map(|r| r.as_ref().unwrap_err().1.clone())
            .collect();
        assert!(errs[0].contains("names container \"c3\""), "{errs:?}");
        assert!(errs[1].contains("record version 2"), "{errs:?}");
        assert!(errs[2].contains("EOF"), "{errs:?}");

        let exit = Exit::new(
            ExitReason::OverMemoryQuota {
                limit: 1 << 20,
                peak: 2 << 20,
            },
            vec![ProcessSample {
                pid: 7,
                command_line: "python3 x.py".into(),
                rss_bytes: 2 << 20,
            }],
        );
        dir.write_end("c1", &exit).unwrap();
        assert_eq!(dir.read_end("c1"), Some(exit));
        dir.remove("c1");
        assert!(!dir.record("c1").exists() && !dir.end_file("c1").exists());
    }

    #[test]
    fn a_live_process_is_told_from_a_reused_pid_and_a_zombie() {
        let me = std::process::id();
        let start = start_time(me);
        assert!(start > 0);
        assert!(alive(me, start));
        assert!(!alive(me, start + 1), "another start time: another process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid);
        // Not reaped yet: a zombie once it exited.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !procfs::is_zombie(pid as i32) {
            assert!(std::time::Instant::now() < deadline, "true did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!alive(pid, start), "a zombie is not alive");
        child.wait().unwrap();
        assert!(!alive(pid, start));
    }
}
