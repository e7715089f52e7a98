//! The agent's view of a container: what was asked, what state it is in, and
//! why it ended; with conversions to and from the wire format.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_proto::exit_codes;
use weft_proto::v1 as pb;

use crate::procfs::ProcessSample;

/// What StartContainer asked for, validated.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub id: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: ResourceRequest,
    /// Written into the working directory before the command starts.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The task it runs, the same across reruns: names its checkpoint
    /// directory (empty: none).
    pub checkpoint_key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceRequest {
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    /// 0 = the agent's default.
    pub pids_limit: u32,
    pub gpu_indices: Vec<u32>,
    /// 0 = unlimited.
    pub gpu_memory_bytes: u64,
    /// Above 0: a share (thousandths) of the one GPU in `gpu_indices`.
    pub gpu_share_milli: u32,
    pub max_runtime: Option<Duration>,
}

/// Why a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Succeeded,
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    OverMemoryQuota {
        limit: u64,
        peak: u64,
    },
    OverGpuMemoryQuota {
        limit: u64,
        used: u64,
    },
    WallTimeExceeded {
        limit: Duration,
    },
    UserRequested,
    AgentShutdown,
    /// Found at agent start, left by an agent that died.
    Lost,
    /// Killed by its node, cut off from the RM for `expiry` (see
    /// [`crate::fence`]).
    Fenced {
        silent: Duration,
        expiry: Duration,
    },
    /// Preempted by the resource manager: SIGTERM, its notice file, then
    /// SIGKILL after `grace`.
    Preempted {
        grace: Duration,
    },
}

impl ExitReason {
    /// The exit status reported: the process's own for ordinary ends, a
    /// negative code of [`exit_codes`] for kills Weft decided.
    pub fn exit_status(&self) -> i32 {
        match self {
            ExitReason::Succeeded => 0,
            ExitReason::Failed {
                exit_code: Some(c), ..
            } => *c,
            ExitReason::Failed {
                signal: Some(s), ..
            } => 128 + s,
            ExitReason::Failed { .. } => 1,
            ExitReason::OverMemoryQuota { .. } => exit_codes::OVER_MEMORY_QUOTA,
            ExitReason::OverGpuMemoryQuota { .. } => exit_codes::OVER_GPU_MEMORY_QUOTA,
            ExitReason::WallTimeExceeded { .. } => exit_codes::WALL_TIME_EXCEEDED,
            ExitReason::UserRequested => exit_codes::USER_REQUESTED,
            ExitReason::AgentShutdown => exit_codes::AGENT_SHUTDOWN,
            ExitReason::Lost => exit_codes::LOST,
            ExitReason::Fenced { .. } => exit_codes::FENCED,
            ExitReason::Preempted { .. } => exit_codes::PREEMPTED,
        }
    }

    pub fn state(&self) -> pb::ContainerState {
        match self {
            ExitReason::Succeeded => pb::ContainerState::Succeeded,
            ExitReason::Failed { .. } => pb::ContainerState::Failed,
            ExitReason::Lost => pb::ContainerState::Lost,
            _ => pb::ContainerState::Killed,
        }
    }
}

/// A terminal status: the reason, a one-line diagnostic, and for quota kills
/// the biggest processes of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    pub diagnostic: String,
    pub top_processes: Vec<ProcessSample>,
}

impl Exit {
    pub fn new(reason: ExitReason, top_processes: Vec<ProcessSample>) -> Self {
        let diagnostic = diagnostic(&reason, &top_processes);
        Exit {
            reason,
            diagnostic,
            top_processes,
        }
    }
}

/// The line a user reads to learn why their container ended.
pub fn diagnostic(reason: &ExitReason, top: &[ProcessSample]) -> String {
    let biggest = || {
        if top.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = top
                .iter()
                .map(|p| {
                    format!(
                        "pid {} `{}` rss {}",
                        p.pid,
                        p.command_line,
                        human_bytes(p.rss_bytes)
                    )
                })
                .collect();
            format!(" Biggest processes: {}.", list.join("; "))
        }
    };
    match reason {
        ExitReason::Succeeded => "exited with code 0".into(),
        ExitReason::Failed {
            exit_code: Some(c), ..
        } => format!("exited with code {c}"),
        ExitReason::Failed { signal: Some(s), .. } => format!("killed by signal {s} ({})", signal_name(*s)),
        ExitReason::Failed { .. } => "ended without an exit code".into(),
        ExitReason::OverMemoryQuota { limit, peak } => format!(
            "killed: over its memory quota (limit {}, peak {}); ask for more memory or use less.{}",
            human_bytes(*limit),
            human_bytes(*peak),
            biggest()
        ),
        ExitReason::OverGpuMemoryQuota { limit, used } => format!(
            "killed: over its GPU memory quota (limit {}, used {}); ask for a bigger GPU share or use less.{}",
            human_bytes(*limit),
            human_bytes(*used),
            biggest()
        ),
        ExitReason::WallTimeExceeded { limit } => format!(
            "killed: ran past its max_runtime of {}",
            humantime::format_duration(*limit)
        ),
        ExitReason::UserRequested => "stopped on request".into(),
        ExitReason::AgentShutdown => "stopped because the node agent shut down".into(),
        ExitReason::Lost => {
            "lost: found running when the node agent started (the previous agent died); its processes were killed"
                .into()
        }
        ExitReason::Preempted { grace } => format!(
            "preempted by the resource manager: SIGTERM, then SIGKILL after its grace of {} (not the task's fault; it reruns)",
            humantime::format_duration(*grace)
        ),
        ExitReason::Fenced { silent, expiry } => format!(
            "killed by its node: no answer from the resource manager for {} (its node_expiry is {}), after which the RM runs the node's tasks elsewhere; not the task's fault",
            humantime::format_duration(Duration::from_millis(silent.as_millis() as u64)),
            humantime::format_duration(*expiry)
        ),
    }
}

fn signal_name(s: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(s)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

/// 1536 -> "1.5 KiB".
pub fn human_bytes(b: u64) -> String {
    bytesize::ByteSize::b(b).display().iec().to_string()
}

/// Where a container is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Done(Exit),
}

/// Everything reported about one container.
#[derive(Debug, Clone)]
pub struct Record {
    pub spec: ContainerSpec,
    pub phase: Phase,
    pub pid: u32,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    /// CPU time its processes used so far, in microseconds (last sample).
    pub cpu_usec: u64,
    /// GPU memory its processes use (last sample; containers with a GPU).
    pub gpu_memory_used_bytes: u64,
    pub gpu_uuids: Vec<String>,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The public key (hex) that checked the token it was started with: the
    /// RM group that granted it (empty: not known). Every new RM group
    /// numbers its containers from the same first id, so an agent that
    /// outlives its group (a rebuilt group, a standalone cluster started
    /// again on the same work dir) meets ids it already holds; an ended
    /// container of another group gives way to the new grant, while a new
    /// token of the same group for an id this agent already ran is refused
    /// (it would run that container twice).
    pub group_key: String,
    /// The application its token was granted to (empty: not known): its
    /// master may ask after it with that application's token.
    pub application_id: String,
}

impl Record {
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    pub fn to_proto(&self) -> pb::ContainerStatus {
        let (state, exit) = match &self.phase {
            Phase::Starting => (pb::ContainerState::Starting, None),
            Phase::Running => (pb::ContainerState::Running, None),
            Phase::Stopping => (pb::ContainerState::Stopping, None),
            Phase::Done(e) => (e.reason.state(), Some(exit_to_proto(e))),
        };
        pb::ContainerStatus {
            container_id: self.spec.id.clone(),
            state: state as i32,
            exit,
            pid: self.pid,
            started_at_ms: self.started_at.map(millis).unwrap_or(0),
            finished_at_ms: self.finished_at.map(millis).unwrap_or(0),
            memory_bytes: self.memory_bytes,
            memory_peak_bytes: self.memory_peak_bytes,
            gpu_uuids: self.gpu_uuids.clone(),
            work_dir: self.work_dir.display().to_string(),
        }
    }
}

pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn exit_to_proto(e: &Exit) -> pb::ContainerExit {
    use pb::container_exit::Reason as R;
    let reason = match &e.reason {
        ExitReason::Succeeded => R::Succeeded(pb::Succeeded {}),
        ExitReason::Failed { exit_code, signal } => R::Failed(pb::Failed {
            exit_code: *exit_code,
            signal: *signal,
        }),
        ExitReason::OverMemoryQuota { limit, peak } => R::OverMemoryQuota(pb::OverMemoryQuota {
            limit_bytes: *limit,
            peak_bytes: *peak,
        }),
        ExitReason::OverGpuMemoryQuota { limit, used } => {
            R::OverGpuMemoryQuota(pb::OverGpuMemoryQuota {
                limit_bytes: *limit,
                used_bytes: *used,
            })
        }
        ExitReason::WallTimeExceeded { limit } => R::WallTimeExceeded(pb::WallTimeExceeded {
            limit_ms: limit.as_millis() as u64,
        }),
        ExitReason::UserRequested => R::UserRequested(pb::UserRequested {}),
        ExitReason::AgentShutdown => R::AgentShutdown(pb::AgentShutdown {}),
        ExitReason::Lost => R::Lost(pb::Lost {}),
        ExitReason::Preempted { .. } => R::Preempted(pb::Preempted {}),
        ExitReason::Fenced { silent, expiry } => R::Fenced(pb::Fenced {
            silent_ms: silent.as_millis() as u64,
            node_expiry_ms: expiry.as_millis() as u64,
        }),
    };
    pb::ContainerExit {
        reason: Some(reason),
        exit_status: e.reason.exit_status(),
        diagnostic: e.diagnostic.clone(),
        top_processes: e
            .top_processes
            .iter()
            .map(|p| pb::ProcessInfo {
                pid: p.pid as u32,
                command_line: p.command_line.clone(),
                rss_bytes: p.rss_bytes,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_kills_have_distinct_negative_statuses() {
        let kills = [
            ExitReason::OverMemoryQuota { limit: 1, peak: 2 },
            ExitReason::OverGpuMemoryQuota { limit: 1, used: 2 },
            ExitReason::WallTimeExceeded {
                limit: Duration::from_secs(1),
            },
        ];
        let codes: Vec<i32> = kills.iter().map(|k| k.exit_status()).collect();
        assert!(codes.iter().all(|c| *c < 0), "{codes:?}");
        assert_eq!(
            codes.len(),
            codes.iter().collect::<std::collections::HashSet<_>>().len()
        );
        let failed = ExitReason::Failed {
            exit_code: None,
            signal: Some(9),
        };
        assert_eq!(failed.exit_status(), 137);
    }

    #[test]
    fn memory_diagnostic_lists_limit_peak_and_processes() {
        let top = vec![ProcessSample {
            pid: 42,
            command_line: "python3 train.py".into(),
            rss_bytes: 3 << 20,
        }];
        let d = diagnostic(
            &ExitReason::OverMemoryQuota {
                limit: 2 << 20,
                peak: 3 << 20,
            },
            &top,
        );
        assert!(d.contains("limit 2.0 MiB"), "{d}");
        assert!(d.contains("peak 3.0 MiB"), "{d}");
        assert!(d.contains("pid 42 `python3 train.py` rss 3.0 MiB"), "{d}");
        assert_eq!(
            diagnostic(
                &ExitReason::Failed {
                    exit_code: None,
                    signal: Some(11)
                },
                &[]
            ),
            "killed by signal 11 (SIGSEGV)"
        );
    }
}
