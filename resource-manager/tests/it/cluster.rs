//! A sandbox of N real resource-manager processes on loopback ports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_client::RmClient;

pub struct Member {
    pub id: u64,
    /// Started with `--join` (added to a running group).
    pub join: bool,
    pub addr: String,
    /// A port of its own for `[http] listen`: `{http}` in the extra config.
    pub http: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub members: Vec<Member>,
    snapshot_every: u64,
    /// Extra TOML appended to every member's config.
    extra: String,
    /// Extra environment of every member process.
    pub env: Vec<(String, String)>,
    _tmp: tempfile::TempDir,
}

/// `n` distinct ports free now: each held until all are chosen (a port
/// given back at once may be handed out again by the next bind).
fn free_ports(n: usize) -> Vec<u16> {
    free_ports_on("127.0.0.1", n)
}

/// `n` ports free on the loopback address `ip` now.
fn free_ports_on(ip: &str, n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A loopback address no other cluster of this test process uses
/// (127.77.X.Y: all of 127.0.0.0/8 reaches this host's loopback).
pub fn own_loopback() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("127.77.{}.{}", std::process::id() % 256, n % 250 + 2)
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

impl Cluster {
    /// Starts `n` members that snapshot every `snapshot_every` entries.
    pub fn start(n: u64, snapshot_every: u64) -> Cluster {
        Self::start_with(n, snapshot_every, "")
    }

    /// Like [`Cluster::start`], with `extra` TOML in every member's config.
    pub fn start_with(n: u64, snapshot_every: u64, extra: &str) -> Cluster {
        let mut c = Self::prepare(n, snapshot_every, extra);
        for i in 0..n as usize {
            c.spawn(i);
        }
        c
    }

    /// Like [`Cluster::start_with`], without starting anything: a test
    /// changes members (their data dirs) first, then spawns each.
    pub fn prepare(n: u64, snapshot_every: u64, extra: &str) -> Cluster {
        Self::prepare_on("127.0.0.1", n, snapshot_every, extra)
    }

    /// Like [`Cluster::start_with`], the members on their own loopback
    /// address ([`own_loopback`]): while they are down (a whole-group
    /// outage), no other test's daemon can take their ports and answer
    /// their agents and masters in their place.
    pub fn start_on_own_address(n: u64, snapshot_every: u64, extra: &str) -> Cluster {
        let mut c = Self::prepare_on(&own_loopback(), n, snapshot_every, extra);
        for i in 0..n as usize {
            c.spawn(i);
        }
        c
    }

    /// [`Cluster::prepare`] with the members listening on `ip`.
    pub fn prepare_on(ip: &str, n: u64, snapshot_every: u64, extra: &str) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports_on(ip, 2 * n as usize);
        let members = (1..=n)
            .map(|id| Member {
                id,
                join: false,
                addr: format!("{ip}:{}", ports[id as usize - 1]),
                http: format!("{ip}:{}", ports[(n + id) as usize - 1]),
                dir: tmp.path().join(format!("rm{id}")),
                log: tmp.path().join(format!("rm{id}.log")),
                child: None,
            })
            .collect();
        let c = Cluster {
            members,
            snapshot_every,
            // Tests play the application master unless they ask the RM to.
            extra: if extra.contains("[masters]") {
                extra.to_string()
            } else {
                format!("{extra}\n[masters]\nlaunch = false\n")
            },
            env: Vec::new(),
            _tmp: tmp,
        };
        c
    }

    pub fn peers_flag(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.id, m.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn spawn(&mut self, i: usize) {
        let peers = self.peers_flag();
        let env = self.env.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.id);
        std::fs::create_dir_all(&m.dir).unwrap();
        let config = m.dir.with_extension("toml");
        // 3 s unless the test sets its own: agents fence themselves half a
        // second before it passes without an answer, which an election
        // (0.5-1 s here) must not come near.
        let expiry = if self.extra.contains("node_expiry") {
            ""
        } else {
            "node_expiry = \"3s\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "heartbeat_interval = \"200ms\"\n{expiry}{}\n[raft]\ntick = \"50ms\"\nelection_ticks = 10\nheartbeat_ticks = 2\nsnapshot_every = {}\n{}",
                // `{id}` in the extra config is the member's id (its own
                // certificate's file, say).
                // `{http}` its own HTTP address.
                self.extra
                    .replace("{id}", &m.id.to_string())
                    .replace("{http}", &m.http),
                self.snapshot_every,
                crate::secure::member_toml(&self.extra),
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_resource-manager"));
        if m.join {
            cmd.arg("--join");
        }
        let child = cmd
            .args(["--config", config.to_str().unwrap()])
            .args(["--id", &m.id.to_string(), "--listen", &m.addr])
            .args(["--data-dir", m.dir.to_str().unwrap(), "--peers", &peers])
            .env("RUST_LOG", "info,raft=warn")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting resource-manager");
        m.child = Some(child);
    }

    /// Starts a new member process that joins the group (it must then be
    /// added with `add_member`). Returns its index.
    pub fn spawn_joiner(&mut self) -> usize {
        let id = self.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let root = self.members[0].dir.parent().unwrap().to_path_buf();
        self.members.push(Member {
            id,
            join: true,
            addr: format!("127.0.0.1:{}", free_port()),
            http: format!("127.0.0.1:{}", free_port()),
            dir: root.join(format!("rm{id}")),
            log: root.join(format!("rm{id}.log")),
            child: None,
        });
        let i = self.members.len() - 1;
        self.spawn(i);
        i
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            c.wait().unwrap();
        }
    }

    /// Waits up to `within` for member `i` to exit on its own; returns its
    /// status, or `None` (it still runs).
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let c = self.members[i].child.as_mut().expect("member runs");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                self.members[i].child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; returns the exit status, or panics if the member takes over 10 s.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let mut c = self.members[i].child.take().expect("member runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("member {} did not stop within 10s of SIGTERM", i + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: member `i` freezes (a GC pause, a stalled VM): its kernel
    /// still accepts connections, nothing answers them.
    /// Returns once every thread of the process is stopped (SIGSTOP takes
    /// effect per thread, a moment after `kill` returns): a request sent
    /// after this reaches a member that cannot act on it until thawed.
    pub fn freeze(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
        let pid = self.members[i].child.as_ref().expect("member runs").id();
        let stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("status"))
                            .map(|s| s.lines().any(|l| l.starts_with("State:\tT")))
                            .unwrap_or(true)
                    })
                })
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stopped() {
            assert!(Instant::now() < deadline, "member {} did not stop", i + 1);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGSTOP without waiting for it to take effect (what a stalled VM does
    /// to requests already on their way).
    pub fn freeze_now(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT: a frozen member goes on where it stopped.
    pub fn thaw(&self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let c = self.members[i].child.as_ref().expect("member runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// The pid of member `i`'s process, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    pub fn client(&self) -> RmClient {
        crate::secure::client(self.addrs()).with_deadline(Duration::from_secs(30))
    }

    /// Index of a running member that says it leads, waiting up to 20 s.
    /// Followers may not have heard from it yet: see [`Cluster::agreed_leader`].
    pub async fn leader(&self) -> usize {
        self.leader_among(&(0..self.members.len()).collect::<Vec<_>>())
            .await
    }

    /// Index of the member that leads once every running member names it,
    /// waiting up to 20 s (a follower learns of an election a moment after
    /// the leader itself).
    pub async fn agreed_leader(&self) -> usize {
        let probe = self.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leader = self.leader().await;
            let id = self.members[leader].id;
            let mut agreed = true;
            for (i, m) in self.members.iter().enumerate() {
                if !self.is_running(i) {
                    continue;
                }
                let answer =
                    tokio::time::timeout(Duration::from_secs(1), probe.member_status(&m.addr))
                        .await;
                agreed &= matches!(answer, Ok(Ok(s)) if s.leader_id == id);
            }
            if agreed {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "the running members did not agree on a leader within 20s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Index of the member among `among` that says it leads, waiting up to
    /// 20 s; a member that does not answer within 1 s is passed over.
    pub async fn leader_among(&self, among: &[usize]) -> usize {
        let probe = self.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for &i in among {
                let m = &self.members[i];
                if !self.is_running(i) {
                    continue;
                }
                let answer =
                    tokio::time::timeout(Duration::from_secs(1), probe.member_status(&m.addr))
                        .await;
                if let Ok(Ok(s)) = answer {
                    if s.leader_id == m.id && s.member_id == m.id {
                        return i;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!("no leader elected within 20s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The commit index of the member that leads now.
    pub async fn leader_commit(&self) -> u64 {
        let leader = self.leader().await;
        self.client()
            .member_status(&self.members[leader].addr)
            .await
            .unwrap()
            .commit_index
    }

    /// Waits until member `i` has applied at least `index`; returns its status.
    pub async fn wait_applied(
        &self,
        i: usize,
        index: u64,
    ) -> weft_client::proto::ClusterStatusResponse {
        let probe = self.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = probe.member_status(&self.members[i].addr).await {
                if s.applied_index >= index {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "member {} did not apply {index} within 20s",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }
}

impl Cluster {
    /// Prints the last `n` lines of every member's log to stderr.
    pub fn print_log_tails(&self, n: usize) {
        for m in &self.members {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(n).collect();
            eprintln!("--- member {} log tail:", m.id);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Debian's libfaketime (package `libfaketime`, which `.ci/run` installs),
/// through which a test steps a member's wall clock while it runs.
pub fn libfaketime() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// The environment that makes a process's wall clock read `file`'s offset
/// ("+0", "-1h"; re-read at most once a second), its monotonic clock left
/// alone (clocks step; monotonic ones do not).
pub fn stepped_clock_env(lib: &str, file: &std::path::Path) -> Vec<(String, String)> {
    std::fs::write(file, "+0\n").unwrap();
    vec![
        ("LD_PRELOAD".into(), lib.into()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test shows what each member was doing.
        if std::thread::panicking() {
            self.print_log_tails(40);
        }
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // Every test checks that the leaders' master passes over only the
        // new and watched jobs missed nothing a pass over every job found.
        if !std::thread::panicking() {
            for i in 0..self.members.len() {
                if let Some(line) = self
                    .log_text(i)
                    .lines()
                    .find(|l| l.contains("found jobs the watched passes missed"))
                {
                    panic!("member {i}: {line}");
                }
            }
        }
    }
}

/// A minimal valid job spec named `name` in `queue`.
pub fn job(name: &str, queue: &str) -> String {
    format!(
        "name: {name}\nqueue: {queue}\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: {{ vcores: 1, memory: 64MiB }}\n"
    )
}

/// Waits (up to 20 s) until `n` nodes are RUNNING.
pub async fn wait_nodes(client: &RmClient, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = client
            .list_nodes()
            .await
            .unwrap()
            .iter()
            .filter(|x| x.state() == weft_client::proto::NodeState::Running)
            .count();
        if running >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{running} of {n} agents registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
