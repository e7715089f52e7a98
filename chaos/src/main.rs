//! `weft-chaos`: a Weft cluster of separate hosts under load while its
//! parts fail, and the checks that say whether the work survived.
//!
//! The harness enters a network namespace of its own (loopback only;
//! nothing leaves it) and gives each RM member (127.0.0.11-13) and each
//! node agent (127.0.0.21-23) its own address: every daemon's connections
//! leave from the address it serves on, so a packet filter rule between two
//! addresses is a partition between two hosts. It starts the real
//! `resource-manager`, `node-agent` (with `weft-shim`) and `app-master`
//! programs found beside its own, submits a stream of jobs (quick ones,
//! multi-stage ones, gangs) and kills some, and meanwhile injects faults
//! one after another: kill -9 and restart of the leader, SIGSTOP/SIGCONT of
//! the leader and of a follower, kill -9 and restart of an agent, the leader
//! cut off from the other members (iptables), an agent cut off from
//! everything for longer than `node_expiry`, the leader's wall clock
//! stepped an hour back or ahead (through libfaketime), a member's data
//! disk full (a small tmpfs; the member must exit saying why and catch up
//! once there is room), a member's data dir corrupted (its start must be
//! refused, naming the file), and (long profile) a 3-minute outage of the
//! whole group.
//!
//! After the faults it checks: every acknowledged submission exists exactly
//! once and unacknowledged ones at most once; no node was ever seen with
//! more in use than it has (sampled through the run); every job reached a
//! final state, with a reason when it did not succeed, and none FAILED (the
//! load's jobs succeed on their own); no task ran twice at
//! once (from the tasks' own start/end lines); and once the daemons are
//! stopped, no container process or cgroup is left. It prints a table, and
//! exits non-zero if any check failed.
//!
//! `weft-chaos` runs the short profile (a few minutes); `--long` the long one
//! (50 leader kills, 20 partitions, 10 agent restarts, 1 outage). Needs root
//! (a network namespace, cgroups) and `iptables`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use weft_client::proto as pb;
use weft_client::RmClient;

mod history;

#[derive(Parser, Debug)]
#[command(about = "Weft's fault harness (needs root and iptables)")]
struct Opts {
    /// The long profile: 50 leader kills, 20 partitions, 10 agent
    /// restarts, 1 whole-group outage of 3 minutes.
    #[arg(long)]
    long: bool,
    /// Seed of the fault order and the job mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only this many leader kills (-9, then restarted), for measuring
    /// failover: no other fault.
    #[arg(long, conflicts_with = "long")]
    kills: Option<usize>,
    /// Only these faults, in this order, the whole list `--repeat` times
    /// (to reproduce a sequence), e.g. `--only one-way-loss,leader-kill`.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with_all = ["long", "kills"])]
    only: Vec<Fault>,
    /// How many times `--only`'s list runs.
    #[arg(long, default_value_t = 1, requires = "only")]
    repeat: usize,
    /// Keep the work directory (logs of every daemon) after the run.
    #[arg(long)]
    keep: bool,
}

const MEMBERS: usize = 3;
const AGENTS: usize = 3;
/// The RM's node_expiry in the harness (an agent partition lasts longer).
const NODE_EXPIRY: Duration = Duration::from_secs(10);

/// Members snapshot and compact their logs this rarely in the harness, so
/// that the audit replays the whole run from the first entry.
const SNAPSHOT_EVERY: u64 = 1_000_000;

fn member_ip(i: usize) -> String {
    format!("127.0.0.{}", 11 + i)
}

fn agent_ip(i: usize) -> String {
    format!("127.0.0.{}", 21 + i)
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("weft-chaos: needs root (a network namespace of its own, cgroups, iptables)");
        return ExitCode::from(2);
    }
    // Still one thread: the whole process, and all it starts, enters a
    // network namespace of its own.
    // SAFETY: unshare(2) with no memory involved.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "weft-chaos: unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::from(2);
    }
    if let Err(e) = sh(&["ip", "link", "set", "lo", "up"]).and_then(|_| sh(&["iptables", "-S"])) {
        eprintln!("weft-chaos: {e:#}");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("weft-chaos: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Now as UTC `HH:MM:SS.mmm`, to match the daemons' log lines.
fn wall() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (s, ms) = (t.as_secs() % 86_400, t.subsec_millis());
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60)
}

fn sh(cmd: &[&str]) -> Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {}", cmd[0]))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One daemon: how to start it, and its process while it runs.
struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Extra environment (the members' clock seam).
    env: Vec<(String, String)>,
    child: Option<Child>,
    stopped: bool,
}

impl Daemon {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info,raft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .as_ref()
            .map(|c| nix::unistd::Pid::from_raw(c.id() as i32))
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(pid, s);
        }
    }

    /// Why it is no longer running, when it exited without being told to
    /// (with the end of its log).
    fn died(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Some(format!(
            "{} exited on its own ({status}); its log ends: {}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    /// SIGKILL (a stopped process dies of it too).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    fn freeze(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        self.stopped = true;
    }

    fn thaw(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.stopped = false;
    }

    /// Waits (up to `within`) for it to exit on its own; how it exited.
    async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.as_mut()?.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// Its log from byte `from` on.
    fn log_since(&self, from: u64) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) {
        if self.stopped {
            self.thaw();
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let Some(mut c) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The cluster's processes and where they keep things.
struct Hosts {
    members: Vec<Daemon>,
    agents: Vec<Daemon>,
    /// Each agent's cgroup parent (its containers' scope marker too).
    parents: Vec<String>,
    addrs: Vec<String>,
    /// The work directory (logs, data dirs, clock files).
    work: PathBuf,
    /// The small disk of one member's data dir.
    _disk: Mount,
}

/// A run that stops on an error still stops what it started: the agents
/// first (each stops its containers on SIGTERM), then the members.
impl Drop for Hosts {
    fn drop(&mut self) {
        for a in self.agents.iter_mut() {
            a.terminate(Duration::from_secs(15));
        }
        for m in self.members.iter_mut() {
            m.terminate(Duration::from_secs(10));
        }
    }
}

impl Hosts {
    /// Notes every daemon that exited without being told to.
    fn note_deaths(&mut self, died: &mut Vec<String>) {
        for d in self.members.iter_mut().chain(self.agents.iter_mut()) {
            if let Some(why) = d.died() {
                eprintln!("{why}");
                died.push(why);
            }
        }
    }
}

fn beside_me(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build the workspace's programs first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// Where Debian's `libfaketime` puts the library the members' wall clocks
/// are moved through.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

fn libfaketime() -> Option<&'static str> {
    LIBFAKETIME.iter().copied().find(|p| Path::new(p).exists())
}

/// The file that sets member `i`'s wall-clock offset (libfaketime's
/// format: "+0", "-1h", "+1h").
fn clock_file(work: &Path, i: usize) -> PathBuf {
    work.join(format!("rm{}.clock", i + 1))
}

/// Member `i`'s wall clock, as the other programs on the machine see it,
/// moved by what its clock file says (re-read at most once a second): a
/// clock stepped while the member runs, as NTP or an operator steps one.
/// The monotonic clock is left alone (it does not step). Without
/// libfaketime, no environment: the clock steps are skipped.
fn clock_seam(work: &Path, i: usize) -> Result<Vec<(String, String)>> {
    let Some(lib) = libfaketime() else {
        return Ok(Vec::new());
    };
    let file = clock_file(work, i);
    std::fs::write(&file, "+0\n")?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ])
}

/// The member whose data dir is on a small disk of its own (a tmpfs of
/// `SMALL_DISK`), which the disk-full fault fills.
const SMALL_DISK_MEMBER: usize = 2;
const SMALL_DISK: &str = "1g";

fn small_disk(work: &Path) -> PathBuf {
    work.join(format!("disk{}", SMALL_DISK_MEMBER + 1))
}

/// Member `i`'s data dir.
fn data_dir(work: &Path, i: usize) -> PathBuf {
    let name = format!("rm{}", i + 1);
    if i == SMALL_DISK_MEMBER {
        small_disk(work).join(name)
    } else {
        work.join(name)
    }
}

/// A tmpfs mounted for the run; unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let dir_s = dir.display().to_string();
        sh(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &dir_s,
        ])?;
        Ok(Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes a file on the disk of `dir` until the disk is full; its path.
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![7u8; 1 << 20];
    loop {
        match f.write_all(&chunk).and_then(|_| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(path),
            Err(e) => return Err(e).context("filling the small disk"),
        }
    }
}

/// Copies directory `from` (a member's data dir) to `to`, as it is.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    sh(&[
        "cp",
        "-a",
        &from.display().to_string(),
        &to.display().to_string(),
    ])
}

/// Replaces `dir` with the copy in `backup` (and removes the copy).
fn restore(dir: &Path, backup: &Path) -> Result<()> {
    std::fs::remove_dir_all(dir)?;
    copy_dir(backup, dir)?;
    std::fs::remove_dir_all(backup)?;
    Ok(())
}

/// Waits until member `m` has applied what the leader had committed when
/// it was asked.
async fn caught_up(client: &RmClient, hosts: &Hosts, m: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut target = None;
    loop {
        // The members may still name a leader that just died: asked again
        // until the one they name answers.
        if target.is_none() {
            if let Ok(l) = leader(client, hosts, Duration::from_secs(1)).await {
                if let Ok(s) = client.member_status(&hosts.addrs[l]).await {
                    target = Some(s.commit_index);
                }
            }
        }
        if let Some(t) = target {
            if let Ok(s) = client.member_status(&hosts.addrs[m]).await {
                if s.applied_index >= t {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "rm{} did not catch up (to index {target:?}) within {within:?}",
                m + 1
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn set_up(work: &Path) -> Result<Hosts> {
    let rm = beside_me("resource-manager")?;
    let agent = beside_me("node-agent")?;
    let am = beside_me("app-master")?;
    beside_me("weft-shim")?;
    let addrs: Vec<String> = (0..MEMBERS)
        .map(|i| format!("{}:7100", member_ip(i)))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let disk = Mount::tmpfs(&small_disk(work), SMALL_DISK)?;
    let mut members = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let config = work.join(format!("rm{}.toml", i + 1));
        // Production raft timing (tick 100 ms, election 10 ticks,
        // pre-vote and check-quorum on); a shorter node expiry so that
        // agent partitions fit in a run.
        std::fs::write(
            &config,
            format!(
                "node_expiry = \"{}s\"\n[raft]\nsnapshot_every = {SNAPSHOT_EVERY}\n[masters]\nlaunch = true\ncommand = {:?}\n",
                NODE_EXPIRY.as_secs(),
                am.display().to_string()
            ),
        )?;
        members.push(Daemon {
            name: format!("rm{}", i + 1),
            program: rm.clone(),
            args: vec![
                "--config".into(),
                config.display().to_string(),
                "--id".into(),
                (i + 1).to_string(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                data_dir(work, i).display().to_string(),
                "--peers".into(),
                peers.clone(),
            ],
            log: work.join(format!("rm{}.log", i + 1)),
            env: clock_seam(work, i)?,
            child: None,
            stopped: false,
        });
    }
    let mut agents = Vec::new();
    let mut parents = Vec::new();
    for i in 0..AGENTS {
        let parent = format!("weft-chaos-{}-a{}", std::process::id(), i + 1);
        let config = work.join(format!("agent{}.toml", i + 1));
        std::fs::write(
            &config,
            format!(
                "node_id = \"chaos-a{}\"\nlisten = \"{}:7200\"\nwork_dir = {:?}\n\
                 [resources]\nvcores = 4.0\nmemory = \"4GiB\"\n\
                 [containers]\ncgroup_parent = {parent:?}\n\
                 [heartbeat]\nmax_backoff = \"500ms\"\n[gpu]\nprobe = \"none\"\n",
                i + 1,
                agent_ip(i),
                work.join(format!("agent{}", i + 1)).display().to_string(),
            ),
        )?;
        agents.push(Daemon {
            name: format!("agent{}", i + 1),
            program: agent.clone(),
            args: vec![
                "--config".into(),
                config.display().to_string(),
                "--rm".into(),
                addrs.join(","),
            ],
            log: work.join(format!("agent{}.log", i + 1)),
            env: Vec::new(),
            child: None,
            stopped: false,
        });
        parents.push(parent);
    }
    Ok(Hosts {
        members,
        agents,
        parents,
        addrs,
        work: work.to_path_buf(),
        _disk: disk,
    })
}

/// What the submitter saw.
#[derive(Default)]
struct Ledger {
    /// name -> (application id, acknowledged at).
    acked: BTreeMap<String, (String, Instant)>,
    /// Names whose submission failed (no answer within the deadline).
    unacked: Vec<String>,
    /// Applications killed on purpose.
    killed: Vec<String>,
    /// Node use above capacity, as sampled.
    overcommit: Vec<String>,
    samples: u64,
}

/// A job of the mix; its tasks note their start and end in `tasks_log`.
fn job_spec(n: u64, tasks_log: &Path) -> String {
    let note = |work: &str| {
        format!(
            "echo \"$WEFT_APP_ID $WEFT_STAGE $WEFT_TASK_INDEX $$ start $(date +%s%N)\" >> {log}; {work}; rc=$?; echo \"$WEFT_APP_ID $WEFT_STAGE $WEFT_TASK_INDEX $$ end $(date +%s%N)\" >> {log}; exit $rc",
            log = tasks_log.display()
        )
    };
    let res = "resources: { vcores: 0.25, memory: 32MiB }";
    match n % 10 {
        0..=5 => format!(
            "name: chaos-{n}\nstages:\n  - name: quick\n    instances: {}\n    command: '{}'\n    {res}\n",
            1 + n % 2,
            note("true")
        ),
        6..=8 => format!(
            "name: chaos-{n}\nstages:\n  - name: prep\n    instances: 2\n    command: '{}'\n    {res}\n  - name: train\n    after: [prep]\n    instances: 1\n    command: '{}'\n    {res}\n",
            note("sleep 1"),
            note("sleep 1")
        ),
        _ => format!(
            "name: chaos-{n}\nstages:\n  - name: gang\n    gang: true\n    instances: 2\n    command: '{}'\n    {res}\n",
            note("sleep 2")
        ),
    }
}

/// What the workers share: the names submitted so far, with their ids
/// once acknowledged, and the history of every operation.
#[derive(Default)]
struct Shared {
    next: u64,
    /// Acknowledged (name, id), most recent last.
    known: Vec<(String, String)>,
    events: Vec<history::Event>,
}

/// The most recent acknowledged applications that reads and kills pick
/// from (bounds each application's history, so the check stays quick).
const RECENT: usize = 16;

/// Clients working at once.
const WORKERS: u32 = 4;

/// One client of the cluster until `stop`: submits the job mix, reads
/// applications back (by id, and by name through a filtered list), kills
/// some; every operation goes into the history with when it was invoked
/// and when (and what) it returned.
async fn worker(
    w: u32,
    client: RmClient,
    shared: Arc<Mutex<Shared>>,
    ledger: Arc<Mutex<Ledger>>,
    tasks_log: PathBuf,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed ^ (u64::from(w) << 32));
    let mut incarnation = 0u32;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.u64(150..350))).await;
        let pick = {
            let s = shared.lock().unwrap();
            let recent = &s.known[s.known.len().saturating_sub(RECENT)..];
            (!recent.is_empty()).then(|| recent[rng.usize(0..recent.len())].clone())
        };
        let roll = rng.u32(0..100);
        let thread = (w, incarnation);
        let invoked = Instant::now();
        let (key, op, returned) = match (roll, pick) {
            (0..=29, _) | (_, None) => {
                let n = {
                    let mut s = shared.lock().unwrap();
                    s.next += 1;
                    s.next
                };
                let name = format!("chaos-{n}");
                let r = client
                    .submit(&job_spec(n, &tasks_log), "yaml", "chaos")
                    .await;
                let returned = match r {
                    Ok(id) => {
                        ledger
                            .lock()
                            .unwrap()
                            .acked
                            .insert(name.clone(), (id.clone(), Instant::now()));
                        shared
                            .lock()
                            .unwrap()
                            .known
                            .push((name.clone(), id.clone()));
                        Some((Instant::now(), history::Ret::Submitted(id)))
                    }
                    Err(e) => {
                        eprintln!("submission {name} not acknowledged: {e}");
                        ledger.lock().unwrap().unacked.push(name.clone());
                        None
                    }
                };
                (name, history::Op::Submit, returned)
            }
            (30..=64, Some((name, id))) => {
                let returned = match client.get_application(&id).await {
                    Ok(a) => Some(history::Ret::Seen(Some((a.application_id, a.state)))),
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                        Some(history::Ret::Seen(None))
                    }
                    Err(_) => continue, // a failed read changed nothing
                };
                (
                    name,
                    history::Op::Read,
                    returned.map(|r| (Instant::now(), r)),
                )
            }
            (65..=96, Some((name, _))) => {
                let req = pb::ListApplicationsRequest {
                    name: name.clone(),
                    ..Default::default()
                };
                let returned = match client.list_applications(req).await {
                    Ok(apps) => match apps.as_slice() {
                        [] => history::Ret::Seen(None),
                        [a] => history::Ret::Seen(Some((a.application_id.clone(), a.state))),
                        many => history::Ret::Many(many.len()),
                    },
                    Err(_) => continue,
                };
                (name, history::Op::Read, Some((Instant::now(), returned)))
            }
            (_, Some((name, id))) => {
                let returned = match client.kill_application(&id).await {
                    Ok(()) => {
                        ledger.lock().unwrap().killed.push(id);
                        Some(history::Ret::Killed)
                    }
                    Err(e) if e.code() == Some(tonic::Code::NotFound) => {
                        Some(history::Ret::NoSuchApp)
                    }
                    Err(_) => None,
                };
                (
                    name,
                    history::Op::Kill,
                    returned.map(|r| (Instant::now(), r)),
                )
            }
        };
        if returned.is_none() {
            incarnation += 1;
        }
        shared.lock().unwrap().events.push(history::Event {
            key,
            thread,
            op,
            invoked,
            returned,
        });
    }
}

async fn sampler(client: RmClient, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(nodes) = client.list_nodes().await {
            let mut l = ledger.lock().unwrap();
            l.samples += 1;
            for n in nodes {
                let (cap, used) = (n.capacity.unwrap_or_default(), n.used.unwrap_or_default());
                if used.vcores_milli > cap.vcores_milli || used.memory_bytes > cap.memory_bytes {
                    l.overcommit.push(format!(
                        "{}: {} of {} millicores, {} of {} bytes",
                        n.node_id,
                        used.vcores_milli,
                        cap.vcores_milli,
                        used.memory_bytes,
                        cap.memory_bytes
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The member every running member names as leader (index), once they agree.
async fn leader(client: &RmClient, hosts: &Hosts, within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut named = Vec::new();
        for (i, addr) in hosts.addrs.iter().enumerate() {
            if hosts.members[i].child.is_none() || hosts.members[i].stopped {
                continue;
            }
            if let Ok(s) = client.member_status(addr).await {
                named.push(s.leader_id);
            }
        }
        if let Some(&l) = named.first() {
            if l > 0 && named.iter().all(|x| *x == l) {
                return Ok(l as usize - 1);
            }
        }
        if Instant::now() > deadline {
            bail!("no agreed leader within {within:?} (members name {named:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits the probe job of fault `k` (a job of the mix, named `probe-`);
/// its id once acknowledged.
async fn submit_probe(client: &RmClient, k: u64, tasks_log: &Path) -> Result<String> {
    let spec = job_spec(k * 10, tasks_log).replace("name: chaos-", "name: probe-");
    client
        .submit(&spec, "yaml", "chaos")
        .await
        .context("the submission after a fault")
}

/// Time from `t0` until a write submitted from then on is acknowledged.
async fn next_write(client: &RmClient, t0: Instant, k: u64, tasks_log: &Path) -> Result<Duration> {
    submit_probe(client, k, tasks_log).await?;
    Ok(t0.elapsed())
}

/// Time from `t0` until a job submitted from then on has a task running:
/// the leader placed its master, an agent accepted the master's container
/// token and started it, the master was given a container for the task
/// and an agent accepted that token too (the task's own start line says
/// so); within 30 s.
async fn task_started(
    client: &RmClient,
    t0: Instant,
    k: u64,
    tasks_log: &Path,
) -> Result<Duration> {
    let id = submit_probe(client, k, tasks_log).await?;
    let deadline = t0 + Duration::from_secs(30);
    let started = format!("{id} ");
    loop {
        let log = std::fs::read_to_string(tasks_log).unwrap_or_default();
        if log.lines().any(|l| l.starts_with(&started)) {
            return Ok(t0.elapsed());
        }
        let report = client.get_application(&id).await?;
        if matches!(
            report.state(),
            pb::ApplicationState::Failed | pb::ApplicationState::Killed
        ) {
            bail!("{id} ended {:?}: {}", report.state(), report.diagnostics)
        }
        if Instant::now() > deadline {
            bail!("no task of {id} started within 30 s ({:?})", report.state());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Fault {
    LeaderKill,
    LeaderFreeze,
    FollowerFreeze,
    AgentRestart,
    LeaderIsolated,
    AgentPartition,
    OneWayLoss,
    Flapping,
    Split,
    ClockBack,
    ClockAhead,
    DiskFull,
    CorruptDataDir,
    Outage,
}

impl Fault {
    fn label(&self) -> &'static str {
        match self {
            Fault::LeaderKill => "leader kill -9, restarted",
            Fault::LeaderFreeze => "leader SIGSTOP 5 s",
            Fault::FollowerFreeze => "follower SIGSTOP 5 s",
            Fault::AgentRestart => "agent kill -9, restarted",
            Fault::LeaderIsolated => "leader cut off from the members 5 s",
            Fault::AgentPartition => "agent cut off from all 15 s",
            Fault::OneWayLoss => "leader's packets to the members dropped (one way) 5 s",
            Fault::Flapping => "leader's links to the members flapping (0.5 s) for 10 s",
            Fault::Split => "split: leader and one agent | the rest, 15 s",
            Fault::ClockBack => "leader's wall clock stepped 1 h back for 10 s",
            Fault::ClockAhead => "leader's wall clock stepped 1 h ahead for 10 s",
            Fault::DiskFull => "a member's data disk full (rm3, a small tmpfs), then room again",
            Fault::CorruptDataDir => {
                "a member killed, its data dir corrupted, restarted, then restored"
            }
            Fault::Outage => "whole RM group down 3 min",
        }
    }
}

fn profile(long: bool, rng: &mut fastrand::Rng) -> Vec<Fault> {
    let counts: &[(Fault, usize)] = if long {
        &[
            (Fault::LeaderKill, 50),
            (Fault::LeaderFreeze, 5),
            (Fault::FollowerFreeze, 5),
            (Fault::AgentRestart, 10),
            (Fault::LeaderIsolated, 10),
            (Fault::AgentPartition, 10),
            (Fault::OneWayLoss, 5),
            (Fault::Flapping, 5),
            (Fault::Split, 5),
            (Fault::ClockBack, 3),
            (Fault::ClockAhead, 3),
            (Fault::DiskFull, 3),
            (Fault::CorruptDataDir, 3),
            (Fault::Outage, 1),
        ]
    } else {
        &[
            (Fault::LeaderKill, 4),
            (Fault::LeaderFreeze, 1),
            (Fault::FollowerFreeze, 1),
            (Fault::AgentRestart, 1),
            (Fault::LeaderIsolated, 1),
            (Fault::AgentPartition, 1),
            (Fault::OneWayLoss, 1),
            (Fault::Flapping, 1),
            (Fault::Split, 1),
            (Fault::ClockBack, 1),
            (Fault::ClockAhead, 1),
            (Fault::DiskFull, 1),
            (Fault::CorruptDataDir, 1),
        ]
    };
    let mut faults: Vec<Fault> = counts
        .iter()
        .flat_map(|(f, n)| std::iter::repeat_n(*f, *n))
        .collect();
    rng.shuffle(&mut faults);
    faults
}

/// Drops every packet between `a` and `b` (both ways), or lets them through
/// again (`op` "-D").
fn cut(a: &str, b: Option<&str>, op: &str) -> Result<()> {
    match b {
        Some(b) => {
            sh(&["iptables", op, "INPUT", "-s", a, "-d", b, "-j", "DROP"])?;
            sh(&["iptables", op, "INPUT", "-s", b, "-d", a, "-j", "DROP"])
        }
        None => {
            sh(&["iptables", op, "INPUT", "-s", a, "-j", "DROP"])?;
            sh(&["iptables", op, "INPUT", "-d", a, "-j", "DROP"])
        }
    }
}

/// Injects one fault and undoes it; returns the time from the fault to the
/// next acknowledged write where that is what the fault measures.
async fn inject(
    f: Fault,
    hosts: &mut Hosts,
    client: &RmClient,
    rng: &mut fastrand::Rng,
    k: u64,
    tasks_log: &Path,
) -> Result<Option<Duration>> {
    let l = leader(client, hosts, Duration::from_secs(30)).await?;
    Ok(match f {
        Fault::LeaderKill => {
            let t0 = Instant::now();
            hosts.members[l].kill9();
            let took = next_write(client, t0, k, tasks_log).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            hosts.members[l].start()?;
            Some(took?)
        }
        Fault::LeaderFreeze => {
            let t0 = Instant::now();
            hosts.members[l].freeze();
            let took = next_write(client, t0, k, tasks_log).await;
            let wait = Duration::from_secs(5).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            hosts.members[l].thaw();
            Some(took?)
        }
        Fault::FollowerFreeze => {
            let f = (l + 1 + rng.usize(0..MEMBERS - 1)) % MEMBERS;
            hosts.members[f].freeze();
            tokio::time::sleep(Duration::from_secs(5)).await;
            hosts.members[f].thaw();
            None
        }
        Fault::AgentRestart => {
            let a = rng.usize(0..AGENTS);
            hosts.agents[a].kill9();
            tokio::time::sleep(Duration::from_millis(500)).await;
            hosts.agents[a].start()?;
            None
        }
        Fault::LeaderIsolated => {
            let t0 = Instant::now();
            let ip = member_ip(l);
            for m in (0..MEMBERS).filter(|m| *m != l) {
                cut(&ip, Some(&member_ip(m)), "-A")?;
            }
            let took = next_write(client, t0, k, tasks_log).await;
            let wait = Duration::from_secs(5).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            for m in (0..MEMBERS).filter(|m| *m != l) {
                cut(&ip, Some(&member_ip(m)), "-D")?;
            }
            Some(took?)
        }
        Fault::AgentPartition => {
            let ip = agent_ip(rng.usize(0..AGENTS));
            cut(&ip, None, "-A")?;
            tokio::time::sleep(NODE_EXPIRY + Duration::from_secs(5)).await;
            cut(&ip, None, "-D")?;
            None
        }
        Fault::OneWayLoss => {
            let t0 = Instant::now();
            let ip = member_ip(l);
            let others: Vec<String> = (0..MEMBERS).filter(|m| *m != l).map(member_ip).collect();
            for o in &others {
                sh(&["iptables", "-A", "INPUT", "-s", &ip, "-d", o, "-j", "DROP"])?;
            }
            let took = next_write(client, t0, k, tasks_log).await;
            let wait = Duration::from_secs(5).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            for o in &others {
                sh(&["iptables", "-D", "INPUT", "-s", &ip, "-d", o, "-j", "DROP"])?;
            }
            Some(took?)
        }
        Fault::Flapping => {
            let ip = member_ip(l);
            let others: Vec<String> = (0..MEMBERS).filter(|m| *m != l).map(member_ip).collect();
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                for o in &others {
                    cut(&ip, Some(o), "-A")?;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                for o in &others {
                    cut(&ip, Some(o), "-D")?;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None
        }
        Fault::Split => {
            // The leader and one agent on one side; the other members and
            // agents on the other. Each side reaches itself; the harness
            // (127.0.0.1) reaches both.
            let a = rng.usize(0..AGENTS);
            let small = [member_ip(l), agent_ip(a)];
            let big: Vec<String> = (0..MEMBERS)
                .filter(|m| *m != l)
                .map(member_ip)
                .chain((0..AGENTS).filter(|x| *x != a).map(agent_ip))
                .collect();
            let t0 = Instant::now();
            for x in &small {
                for y in &big {
                    cut(x, Some(y), "-A")?;
                }
            }
            let took = next_write(client, t0, k, tasks_log).await;
            let wait = (NODE_EXPIRY + Duration::from_secs(5)).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            for x in &small {
                for y in &big {
                    cut(x, Some(y), "-D")?;
                }
            }
            Some(took?)
        }
        Fault::ClockBack | Fault::ClockAhead => {
            let step = if f == Fault::ClockBack { "-1h" } else { "+1h" };
            let file = clock_file(&hosts.work, l);
            std::fs::write(&file, format!("{step}\n"))?;
            // libfaketime reads the file again within a second.
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            let t0 = Instant::now();
            let took = task_started(client, t0, k, tasks_log).await;
            let wait = Duration::from_secs(10).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            std::fs::write(&file, "+0\n")?;
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            Some(took?)
        }
        Fault::DiskFull => {
            // The member exits at its next write of the log (code 70, a
            // line naming its data dir and the cause); once there is room
            // it starts again and catches up.
            let m = SMALL_DISK_MEMBER;
            let from = hosts.members[m].log_len();
            let filling = Instant::now();
            let filler = fill(&small_disk(&hosts.work))?;
            eprintln!("  disk filled in {:?}", filling.elapsed());
            let t0 = Instant::now();
            let status = hosts.members[m].exited(Duration::from_secs(30)).await;
            let took = t0.elapsed();
            std::fs::remove_file(&filler)?;
            let Some(status) = status else {
                bail!("rm{} still runs 30 s after its disk filled", m + 1);
            };
            let log = hosts.members[m].log_since(from);
            let dir = data_dir(&hosts.work, m).display().to_string();
            let fatal = log
                .lines()
                .find(|l| l.starts_with("resource-manager: fatal:"));
            match fatal {
                Some(f)
                    if status.code() == Some(70)
                        && f.contains(&dir)
                        && f.contains("No space left on device") =>
                {
                    eprintln!("  rm{} exited ({status}): {f}", m + 1)
                }
                _ => {
                    hosts.members[m].start()?;
                    bail!(
                        "rm{} on a full disk exited {status} without saying why: {}",
                        m + 1,
                        log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                    )
                }
            }
            hosts.members[m].start()?;
            caught_up(client, hosts, m, Duration::from_secs(30)).await?;
            Some(took)
        }
        Fault::CorruptDataDir => {
            // Any member, the leader too: killed, 4 KiB of its data file
            // overwritten (the file's start half the time, else anywhere),
            // started. It must refuse to start, naming the file; then its
            // data dir as it was, and it catches up. Bytes sled no longer
            // uses may be overwritten harmlessly: a member that starts is
            // left running on that file, must catch up, and its whole log
            // is checked against the others' at the end.
            let m = rng.usize(0..MEMBERS);
            hosts.members[m].kill9();
            let dir = data_dir(&hosts.work, m);
            let backup = hosts.work.join(format!("rm{}.backup", m + 1));
            copy_dir(&dir, &backup)?;
            let db = dir.join("db");
            let mut bytes = std::fs::read(&db)?;
            let blocks = bytes.len().div_ceil(4096).max(1);
            let at = if rng.bool() {
                0
            } else {
                rng.usize(0..blocks) * 4096
            };
            for b in bytes.iter_mut().skip(at).take(4096) {
                *b ^= 0xff;
            }
            std::fs::write(&db, bytes)?;
            let from = hosts.members[m].log_len();
            let t0 = Instant::now();
            hosts.members[m].start()?;
            let status = hosts.members[m].exited(Duration::from_secs(10)).await;
            let took = t0.elapsed();
            let log = hosts.members[m].log_since(from);
            let refusal = log.lines().find(|l| l.contains("refusing the data dir"));
            let outcome = match (status, refusal) {
                (Some(st), Some(r)) if !st.success() && r.contains(&db.display().to_string()) => {
                    eprintln!(
                        "  rm{} refused to start (bytes {at}.. of {} overwritten; {st}): {r}",
                        m + 1,
                        db.display()
                    );
                    restore(&dir, &backup)?;
                    hosts.members[m].start()?;
                    Corruption::Refused(took)
                }
                (None, _) => {
                    eprintln!(
                        "  rm{} started with bytes {at}.. of {} overwritten (space sled no longer used?): left running, its log checked at the end",
                        m + 1,
                        db.display()
                    );
                    std::fs::remove_dir_all(&backup)?;
                    Corruption::Unused
                }
                (Some(st), _) => {
                    restore(&dir, &backup)?;
                    hosts.members[m].start()?;
                    bail!(
                        "rm{} on a corrupted data dir (bytes {at}.. overwritten) exited {st} without naming the file: {}",
                        m + 1,
                        log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                    )
                }
            };
            caught_up(client, hosts, m, Duration::from_secs(30)).await?;
            match outcome {
                Corruption::Refused(took) => Some(took),
                Corruption::Unused => None,
            }
        }
        Fault::Outage => {
            for m in hosts.members.iter_mut() {
                m.kill9();
            }
            tokio::time::sleep(Duration::from_secs(180)).await;
            let t0 = Instant::now();
            for m in hosts.members.iter_mut() {
                m.start()?;
            }
            let took = next_write(client, t0, k, tasks_log).await?;
            eprintln!("after the outage, the first write took {took:?} from the restart");
            None
        }
    })
}

/// What a member did on a corrupted data file.
enum Corruption {
    /// Refused to start, naming the file, after this long.
    Refused(Duration),
    /// Started: the bytes overwritten were ones sled no longer used.
    Unused,
}

/// A task's runs, from the tasks' own lines: (pid, start ns, end ns).
type Runs = HashMap<(String, String, String), Vec<(String, u128, Option<u128>)>>;

fn task_runs(tasks_log: &Path) -> Runs {
    let mut runs: Runs = HashMap::new();
    let text = std::fs::read_to_string(tasks_log).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 6 {
            continue;
        }
        let key = (f[0].to_string(), f[1].to_string(), f[2].to_string());
        let Ok(t) = f[5].parse::<u128>() else {
            continue;
        };
        let v = runs.entry(key).or_default();
        match f[4] {
            "start" => v.push((f[3].to_string(), t, None)),
            _ => {
                if let Some(r) = v.iter_mut().find(|r| r.0 == f[3] && r.2.is_none()) {
                    r.2 = Some(t);
                }
            }
        }
    }
    runs
}

/// Processes carrying one of the agents' scope markers, and their cgroups.
fn leftovers(parents: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for pid in weft_node_agent::procfs::all_pids() {
        if weft_node_agent::procfs::is_zombie(pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for p in parents {
            let marker = format!("WEFT_CONTAINER_SCOPE={p}/");
            if env
                .split(|b| *b == 0)
                .any(|kv| kv.starts_with(marker.as_bytes()))
            {
                found.push(format!("process {pid} of {p}"));
            }
        }
    }
    let mounts = weft_node_agent::driver::cgroupfs::Mounts::read();
    let mut roots: Vec<PathBuf> = mounts.v1.iter().map(|(p, _)| p.clone()).collect();
    roots.extend(mounts.v2.clone());
    for r in roots {
        for p in parents {
            if r.join(p).exists() {
                found.push(format!("cgroup {}", r.join(p).display()));
            }
        }
    }
    found
}

/// A leader kill should be followed by an acknowledged write within this.
const FAILOVER_BOUND: Duration = Duration::from_millis(1500);

/// The last lines of every container log under the agents' work dirs that
/// names `app` (its masters' logs, mostly).
fn master_logs(work: &Path, app: &str) -> Vec<(PathBuf, Vec<String>)> {
    let mut found = Vec::new();
    for i in 0..AGENTS {
        let logs = work.join(format!("agent{}", i + 1)).join("logs");
        let Ok(dirs) = std::fs::read_dir(&logs) else {
            continue;
        };
        for d in dirs.flatten() {
            let path = d.path().join("stderr");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if text.contains(&format!("app={app}")) {
                let lines: Vec<String> = text.lines().map(String::from).collect();
                let tail = lines[lines.len().saturating_sub(15)..].to_vec();
                found.push((path, tail));
            }
        }
    }
    found
}

fn stats(v: &mut [Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "min {:.0} ms, median {:.0} ms, max {:.0} ms (n={})",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

async fn run(opts: Opts) -> Result<bool> {
    // Removed at the end when every check passed; kept (with every
    // daemon's log) when a check failed or the run stopped on an error.
    let work = tempfile::Builder::new()
        .prefix("weft-chaos-")
        .tempdir()?
        .keep();
    eprintln!("work dir: {}", work.display());
    let mut hosts = set_up(&work)?;
    let started = Instant::now();
    for m in hosts.members.iter_mut() {
        m.start()?;
    }
    let client = RmClient::new(hosts.addrs.clone())?.with_deadline(Duration::from_secs(60));
    // Agents and the load start at once: as users do.
    for a in hosts.agents.iter_mut() {
        a.start()?;
    }
    let tasks_log = work.join("tasks.log");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let new_client =
        || RmClient::new(hosts.addrs.clone()).map(|c| c.with_deadline(Duration::from_secs(60)));
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut load = Vec::new();
    for w in 0..WORKERS {
        load.push(tokio::spawn(worker(
            w,
            new_client()?,
            shared.clone(),
            ledger.clone(),
            tasks_log.clone(),
            stop.clone(),
            opts.seed,
        )));
    }
    let sampling = tokio::spawn(sampler(new_client()?, ledger.clone(), stop.clone()));

    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let faults = match opts.kills {
        Some(n) => vec![Fault::LeaderKill; n],
        None if !opts.only.is_empty() => opts.only.repeat(opts.repeat),
        None => profile(opts.long, &mut rng),
    };
    let faults: Vec<Fault> = if libfaketime().is_some() {
        faults
    } else {
        eprintln!(
            "skipped: the leader clock steps (libfaketime is not installed; .ci/run installs it)"
        );
        faults
            .into_iter()
            .filter(|f| !matches!(f, Fault::ClockBack | Fault::ClockAhead))
            .collect()
    };
    let mut by_kind: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut failover: Vec<Duration> = Vec::new();
    let mut freeze: Vec<Duration> = Vec::new();
    let mut isolated: Vec<Duration> = Vec::new();
    let mut clock: Vec<Duration> = Vec::new();
    let mut disk_full: Vec<Duration> = Vec::new();
    let mut refused: Vec<Duration> = Vec::new();
    let mut harmless = 0;
    let mut ok = true;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut died: Vec<String> = Vec::new();
    for (k, f) in faults.iter().enumerate() {
        hosts.note_deaths(&mut died);
        eprintln!(
            "[{:>6.1}s {}] fault {}/{}: {}",
            started.elapsed().as_secs_f64(),
            wall(),
            k + 1,
            faults.len(),
            f.label()
        );
        match inject(*f, &mut hosts, &client, &mut rng, k as u64 + 1, &tasks_log).await {
            Ok(took) => {
                if let Some(d) = took {
                    eprintln!(
                        "  {} {d:?} after the fault ({})",
                        match f {
                            Fault::ClockBack | Fault::ClockAhead =>
                                "a new job's first task started",
                            Fault::DiskFull => "the member exited",
                            Fault::CorruptDataDir => "the member refused to start",
                            _ => "next acknowledged write",
                        },
                        wall()
                    );
                }
                *by_kind.entry(*f).or_default() += 1;
                match (f, took) {
                    (Fault::LeaderKill, Some(d)) => failover.push(d),
                    (Fault::LeaderFreeze, Some(d)) => freeze.push(d),
                    (Fault::LeaderIsolated | Fault::OneWayLoss | Fault::Split, Some(d)) => {
                        isolated.push(d)
                    }
                    (Fault::ClockBack | Fault::ClockAhead, Some(d)) => clock.push(d),
                    (Fault::DiskFull, Some(d)) => disk_full.push(d),
                    (Fault::CorruptDataDir, Some(d)) => refused.push(d),
                    (Fault::CorruptDataDir, None) => harmless += 1,
                    _ => {}
                }
            }
            Err(e) => {
                eprintln!("fault {f:?} failed: {e:#}");
                ok = false;
            }
        }
        // Settle between faults.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in load {
        let _ = w.await;
    }
    let _ = sampling.await;

    // Every job to a final state.
    let deadline = Instant::now() + Duration::from_secs(180);
    let apps = loop {
        let apps = client
            .list_applications(pb::ListApplicationsRequest::default())
            .await?;
        let open = apps
            .iter()
            .filter(|a| {
                !matches!(
                    a.state(),
                    pb::ApplicationState::Succeeded
                        | pb::ApplicationState::Failed
                        | pb::ApplicationState::Killed
                )
            })
            .count();
        if open == 0 || Instant::now() > deadline {
            break apps;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let mut by_name: HashMap<&str, Vec<&pb::ApplicationReport>> = HashMap::new();
    for a in &apps {
        by_name.entry(a.name.as_str()).or_default().push(a);
    }
    let mut lost = Vec::new();
    let mut duplicated = Vec::new();
    for (name, (id, _)) in &ledger.acked {
        match by_name.get(name.as_str()).map(Vec::as_slice) {
            Some([one]) if one.application_id == *id => {}
            None | Some([]) => lost.push(name.clone()),
            Some(many) => duplicated.push(format!("{name}: {} applications", many.len())),
        }
    }
    for name in &ledger.unacked {
        if by_name.get(name.as_str()).is_some_and(|v| v.len() > 1) {
            duplicated.push(format!("{name} (unacknowledged): more than one"));
        }
    }
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut unfinished = Vec::new();
    let mut no_reason = Vec::new();
    for a in &apps {
        *states.entry(format!("{:?}", a.state())).or_default() += 1;
        match a.state() {
            pb::ApplicationState::Succeeded => {}
            pb::ApplicationState::Failed | pb::ApplicationState::Killed => {
                if a.diagnostics.trim().is_empty() {
                    no_reason.push(a.application_id.clone());
                }
            }
            s => unfinished.push(format!("{} {s:?}", a.application_id)),
        }
    }
    let failed: Vec<String> = apps
        .iter()
        .filter(|a| a.state() == pb::ApplicationState::Failed)
        .map(|a| format!("{} {}: {}", a.application_id, a.name, a.diagnostics))
        .collect();
    let events = std::mem::take(&mut shared.lock().unwrap().events);
    let checked = Instant::now();
    let lin = history::check(&events);
    let check_took = checked.elapsed();
    let runs = task_runs(&tasks_log);
    let mut reruns = 0;
    let mut overlapping = Vec::new();
    for (task, v) in &runs {
        reruns += v.len().saturating_sub(1);
        for (i, a) in v.iter().enumerate() {
            for b in &v[i + 1..] {
                // Two runs at once: one started before the other ended.
                let (first, second) = if a.1 <= b.1 { (a, b) } else { (b, a) };
                if first.2.is_some_and(|end| end > second.1) {
                    overlapping.push(format!("{task:?}: pids {} and {}", first.0, second.0));
                }
            }
        }
    }

    hosts.note_deaths(&mut died);
    // The leaders' master passes over only new and watched jobs missed
    // nothing that a pass over every job found (it warns naming them).
    let missed: Vec<String> = hosts
        .members
        .iter()
        .flat_map(|m| {
            std::fs::read_to_string(&m.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("found jobs the watched passes missed"))
                .map(|l| format!("{}: {l}", m.name))
                .collect::<Vec<_>>()
        })
        .collect();
    // Stop everything; nothing may be left.
    for a in hosts.agents.iter_mut() {
        a.terminate(Duration::from_secs(15));
    }
    for m in hosts.members.iter_mut() {
        m.terminate(Duration::from_secs(10));
    }
    let mut left = leftovers(&hosts.parents);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = leftovers(&hosts.parents);
    }

    // The replicated history: each member's log replayed with the
    // invariants checked after every entry; committed entries compared.
    let audit_started = Instant::now();
    let mut audits = Vec::new();
    let mut audit_errors = Vec::new();
    // One member's replay stands for all once their committed entries are
    // the same: every member's entries are read once, and the one that
    // committed the most is replayed.
    for i in 0..MEMBERS {
        match weft_resource_manager::audit::digests(&data_dir(&work, i)) {
            Ok(a) => audits.push((i, a)),
            Err(e) => audit_errors.push(format!("rm{}: {e}", i + 1)),
        }
    }
    let replayed = audits
        .iter()
        .max_by_key(|(_, a)| a.commit)
        .map_or(0, |(i, _)| *i);
    if let Some(slot) = audits.iter_mut().find(|(i, _)| *i == replayed) {
        match weft_resource_manager::audit::audit(&data_dir(&work, replayed)) {
            Ok(a) => slot.1 = a,
            Err(e) => audit_errors.push(format!("rm{}: {e}", replayed + 1)),
        }
    }
    let history_violations: Vec<String> = audits
        .iter()
        .flat_map(|(i, a)| {
            a.violations
                .iter()
                .map(move |(idx, e)| format!("rm{} index {idx}: {e}", i + 1))
        })
        .chain(audit_errors.iter().cloned())
        .collect();
    let mut disagreements = Vec::new();
    let mut committed: BTreeMap<u64, (u64, u64, usize)> = BTreeMap::new();
    for (i, a) in &audits {
        for &(index, term, digest) in &a.digests {
            match committed.get(&index) {
                Some(&(t, d, j)) if (t, d) != (term, digest) => disagreements.push(format!(
                    "index {index}: rm{} has term {t}, rm{} term {term} (or different data)",
                    j + 1,
                    i + 1
                )),
                Some(_) => {}
                None => {
                    committed.insert(index, (term, digest, *i));
                }
            }
        }
    }
    let audited = audits
        .iter()
        .filter(|(i, _)| *i == replayed)
        .map(|(i, a)| {
            format!(
                "rm{}'s log {}..={}, {} commands",
                i + 1,
                a.snapshot_index,
                a.commit,
                a.commands
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let audit_took = audit_started.elapsed();

    let pass = |b: bool| if b { "ok" } else { "FAIL" };
    println!(
        "\nweft-chaos {} profile, seed {}, {:.0} s",
        match (opts.long, opts.kills, opts.only.is_empty()) {
            (true, _, _) => "long",
            (_, Some(_), _) => "leader-kills",
            (_, _, false) => "chosen",
            _ => "short",
        },
        opts.seed,
        started.elapsed().as_secs_f64()
    );
    println!("| faults injected | count |\n|---|---|");
    for (f, n) in &by_kind {
        println!("| {} | {n} |", f.label());
    }
    println!("\n| check | result | |\n|---|---|---|");
    println!("| acknowledged submissions | {} | |", ledger.acked.len());
    println!(
        "| unacknowledged (deadline passed) | {} | |",
        ledger.unacked.len()
    );
    println!("| lost | {} | {} |", lost.len(), pass(lost.is_empty()));
    println!(
        "| duplicated | {} | {} |",
        duplicated.len(),
        pass(duplicated.is_empty())
    );
    println!(
        "| over-committed node samples | {} of {} | {} |",
        ledger.overcommit.len(),
        ledger.samples,
        pass(ledger.overcommit.is_empty())
    );
    println!(
        "| linearizability of submit/read/kill ({} operations on {} applications, checked in {:.1} s) | {} violations | {} |",
        lin.ops,
        lin.keys,
        check_took.as_secs_f64(),
        lin.violations.len(),
        pass(lin.violations.is_empty())
    );
    println!(
        "| replicated history: invariants (no node over-committed) after every entry ({audited}; {:.1} s) | {} violations | {} |",
        audit_took.as_secs_f64(),
        history_violations.len(),
        pass(history_violations.is_empty())
    );
    println!(
        "| committed entries that differ between members ({} indexes) | {} | {} |",
        committed.len(),
        disagreements.len(),
        pass(disagreements.is_empty())
    );
    println!(
        "| jobs a master pass over every job found missed by the watched passes | {} | {} |",
        missed.len(),
        pass(missed.is_empty())
    );
    println!(
        "| daemons that exited on their own | {} | {} |",
        died.len(),
        pass(died.is_empty())
    );
    println!("| jobs by final state | {states:?} | |");
    println!(
        "| jobs FAILED (the load's jobs succeed on their own: a failed one lost its work to a fault) | {} | {} |",
        failed.len(),
        pass(failed.is_empty())
    );
    println!(
        "| jobs not finished | {} | {} |",
        unfinished.len(),
        pass(unfinished.is_empty())
    );
    println!(
        "| failed or killed without a reason | {} | {} |",
        no_reason.len(),
        pass(no_reason.is_empty())
    );
    println!(
        "| task runs / reruns | {} / {reruns} | |",
        runs.values().map(Vec::len).sum::<usize>()
    );
    println!(
        "| a task running twice at once | {} | {} |",
        overlapping.len(),
        pass(overlapping.is_empty())
    );
    println!(
        "| processes or cgroups left | {} | {} |",
        left.len(),
        pass(left.is_empty())
    );
    println!(
        "| leader kill -9 -> next acknowledged write | {} | |",
        stats(&mut failover)
    );
    println!(
        "| leader SIGSTOP -> next acknowledged write | {} | |",
        stats(&mut freeze)
    );
    println!(
        "| leader cut off, one-way loss or split -> next acknowledged write | {} | |",
        stats(&mut isolated)
    );
    println!(
        "| leader's clock stepped 1 h -> a new job's first task running | {} | |",
        stats(&mut clock)
    );
    println!(
        "| a member's disk filled -> it exited (code 70, naming its data dir and the cause; started again with room, caught up) | {} | |",
        stats(&mut disk_full)
    );
    println!(
        "| a member's data file corrupted -> its start refused, naming the file (restored, caught up) | {} | |",
        stats(&mut refused)
    );
    println!(
        "| a member's data file corrupted where sled no longer kept data -> started, caught up, its log checked | {harmless} | |"
    );
    for (what, v) in [
        ("lost", &lost),
        ("duplicated", &duplicated),
        ("not linearizable", &lin.violations),
        ("history", &history_violations),
        ("logs differ", &disagreements),
        ("died", &died),
        ("master pass missed", &missed),
        ("over-committed", &ledger.overcommit),
        ("unfinished", &unfinished),
        ("without a reason", &no_reason),
        ("twice at once", &overlapping),
        ("left behind", &left),
        ("failed", &failed),
    ] {
        for x in v.iter().take(10) {
            println!("{what}: {x}");
        }
    }
    ok &= lost.is_empty()
        && duplicated.is_empty()
        && lin.violations.is_empty()
        && history_violations.is_empty()
        && disagreements.is_empty()
        && died.is_empty()
        && missed.is_empty()
        && ledger.overcommit.is_empty()
        && unfinished.is_empty()
        && failed.is_empty()
        && no_reason.is_empty()
        && overlapping.is_empty()
        && left.is_empty();
    // A failed job shows its master's log; a failover over the bound keeps
    // the logs even when every check passed.
    for a in apps
        .iter()
        .filter(|a| a.state() == pb::ApplicationState::Failed)
    {
        for (path, tail) in master_logs(&work, &a.application_id) {
            println!("master log of {} ({}):", a.application_id, path.display());
            for l in tail {
                println!("  {l}");
            }
        }
    }
    let slow = failover.iter().any(|d| *d > FAILOVER_BOUND);
    if opts.keep || !ok || slow || !failed.is_empty() {
        println!("logs kept in {}", work.display());
    } else {
        drop(hosts); // unmounts the small disk
        std::fs::remove_dir_all(&work)?;
    }
    Ok(ok)
}
