//! The container shim: one small process between the agent and each
//! container, so that a container outlives its agent. The agent starts the
//! shim (this program again, as `<program> __weft-shim`) and writes it a
//! [`Plan`]; the shim starts the container (its own session, its group,
//! its environment and logs), tells the agent the container's pid, waits for
//! it and writes how it ended to the plan's exit file before exiting the same
//! way. The shim ignores the signals that stop a session (SIGHUP, SIGINT,
//! SIGTERM) and lives in a session of its own, so an agent killed or
//! restarted leaves it and its container running; the next agent reads the
//! exit file (see `Manager::recover`).
//!
//! With systemd, the agent's unit needs `KillMode=process`: the default
//! (`control-group`) kills the shims with the agent.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First argument that makes a program that hosts an agent act as a shim.
pub const SHIM_ARG: &str = "__weft-shim";

/// What the shim starts, and where it writes the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub command: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// `cgroup.procs` files the container joins before exec.
    pub join: Vec<PathBuf>,
    pub exit_file: PathBuf,
    /// The node's lease (see [`crate::fence`]): when it runs out, the shim
    /// kills the container. `None`: never fenced.
    #[serde(default)]
    pub lease: Option<PathBuf>,
    /// The user the container runs as (after joining its groups); None:
    /// the shim's own.
    #[serde(default)]
    pub run_as: Option<crate::users::RunAs>,
}

/// The shim's one line to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Started {
    Pid(u32),
    /// The command could not be started; `unrunnable`: it does not exist or
    /// may not be run (a user error), else the node's fault.
    Failed {
        unrunnable: bool,
        message: String,
    },
}

/// How the container ended, as the shim saw it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    /// The raw `waitpid` status.
    pub wait_status: i32,
    /// Set when the shim killed the container because the node's lease ran
    /// out.
    #[serde(default)]
    pub fenced: Option<Fenced>,
}

/// The lease that ran out, as the shim saw it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fenced {
    pub silent_ms: u64,
    pub expiry_ms: u64,
}

impl ExitRecord {
    pub fn status(&self) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(self.wait_status)
    }

    /// Why Weft ended it, when the shim did.
    pub fn reason(&self) -> Option<crate::model::ExitReason> {
        self.fenced.map(|f| crate::model::ExitReason::Fenced {
            silent: std::time::Duration::from_millis(f.silent_ms),
            expiry: std::time::Duration::from_millis(f.expiry_ms),
        })
    }
}

/// Reads an exit file; `None` while the container runs (or if the file is
/// unreadable: a shim that died before writing it).
pub fn read_exit(path: &Path) -> Option<ExitRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Call first thing in `main` of every program that runs an agent: when the
/// program was started as a shim, it runs the shim and exits.
pub fn run_if_shim() {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(SHIM_ARG)) {
        std::process::exit(run());
    }
}

/// The shim itself: reads its plan, runs the container, returns the exit
/// code to end with. `weft-shim`'s `main` and [`run_if_shim`] call it.
pub fn run() -> i32 {
    // SAFETY: plain syscalls on this single-threaded process before any
    // thread exists.
    unsafe {
        libc::setsid();
        for s in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
            libc::signal(s, libc::SIG_IGN);
        }
    }
    let mut input = Vec::new();
    let plan: Plan = match std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&input).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => {
            report(&Started::Failed {
                unrunnable: false,
                message: format!("shim: reading its plan: {e}"),
            });
            return 70;
        }
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("opening {}: {e}", p.display()))
    };
    let (out, err) = match (open(&plan.stdout), open(&plan.stderr)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            report(&Started::Failed {
                unrunnable: false,
                message: format!("shim: {e}"),
            });
            return 70;
        }
    };
    let mut cmd = std::process::Command::new(&plan.command);
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: signal() is async-signal-safe; the container gets the default
    // dispositions the shim itself ignores.
    unsafe {
        cmd.pre_exec(|| {
            for s in [libc::SIGHUP, libc::SIGINT, libc::SIGTERM] {
                libc::signal(s, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    crate::driver::join_on_exec(&mut cmd, plan.join.clone());
    if let Some(who) = &plan.run_as {
        crate::users::drop_on_exec(&mut cmd, who);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            report(&Started::Failed {
                unrunnable: matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ),
                message: format!("cannot run {:?}: {e}", plan.command),
            });
            return 70;
        }
    };
    report(&Started::Pid(child.id()));
    // Nothing more goes to the agent: its end of the pipes may be gone.
    detach_stdio();
    let fenced = plan
        .lease
        .as_deref()
        .and_then(|lease| watch_lease(&child, lease, &plan.join));
    let status = loop {
        match child.wait() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Cannot happen for our own child; exit as a lost container.
            Err(_) => return 70,
        }
    };
    let record = ExitRecord {
        wait_status: status.into_raw(),
        fenced,
    };
    let _ = write_atomically(
        &plan.exit_file,
        &serde_json::to_vec(&record).expect("exit records encode"),
    );
    // Exit as the container did: an agent watching this shim as its child
    // reads the same status.
    if let Some(code) = status.code() {
        return code;
    }
    if let Some(sig) = status.signal() {
        // SAFETY: plain syscalls; no core file from the shim.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return 128 + sig;
    }
    70
}

/// Waits for `child` to exit (without reaping it), reading the node's lease
/// at its deadline and at least every [`crate::fence::SHIM_POLL`]
/// ([`crate::fence::next_read`]); when the lease runs out first, kills
/// the container (its session, then every process of its groups) and says
/// so.
fn watch_lease(child: &std::process::Child, lease: &Path, join: &[PathBuf]) -> Option<Fenced> {
    let pid = child.id() as i32;
    // SAFETY: pidfd_open on our own unreaped child; the descriptor is ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // Without a pidfd the child's exit is only seen by looking.
    const NO_PIDFD_POLL: std::time::Duration = std::time::Duration::from_millis(100);
    let mut wait = std::time::Duration::ZERO;
    loop {
        let poll_ms = wait.as_millis() as i32;
        if fd >= 0 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            let n = unsafe { libc::poll(&mut p, 1, poll_ms) };
            if n > 0 {
                // SAFETY: closing the descriptor opened above.
                unsafe { libc::close(fd) };
                return None;
            }
        } else {
            // No pidfd (old kernel): look at the child's state instead.
            std::thread::sleep(wait.min(NO_PIDFD_POLL));
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with WNOWAIT leaves the child unreaped.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: si_pid is set by waitid when a child changed state.
            if rc == 0 && unsafe { info.si_pid() } != 0 {
                return None;
            }
        }
        let l = crate::fence::read(lease);
        let now = crate::fence::now_ms();
        wait = crate::fence::next_read(l.as_ref(), now);
        let Some(l) = l else {
            continue;
        };
        if now < l.deadline_ms {
            continue;
        }
        kill_container(pid, join);
        if fd >= 0 {
            // SAFETY: closing the descriptor opened above.
            unsafe { libc::close(fd) };
        }
        return Some(Fenced {
            silent_ms: now.saturating_sub(l.renewed_ms),
            expiry_ms: l.expiry_ms,
        });
    }
}

/// SIGKILL to the container's session and to every process of its groups,
/// until they are empty (bounded).
fn kill_container(pid: i32, join: &[PathBuf]) {
    // SAFETY: plain kill(2) calls.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let me = std::process::id();
    for _ in 0..50 {
        let mut left = false;
        for procs in join {
            let Ok(text) = std::fs::read_to_string(procs) else {
                continue;
            };
            for p in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if p != me {
                    left = true;
                    // SAFETY: as above.
                    unsafe { libc::kill(p as i32, libc::SIGKILL) };
                }
            }
        }
        if !left {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn report(s: &Started) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(s).expect("reports encode"));
    let _ = out.flush();
}

/// Points stdin, stdout and stderr at /dev/null.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which stay open.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that a
/// reader sees all of it or nothing. Not synced: these files must outlive
/// the agent's process, not the machine (see [`crate::recovery`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
