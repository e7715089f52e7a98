//! What the benches that run real resource-manager groups share: a 3-member
//! group of `resource-manager` processes on loopback ports, and reading a
//! process's memory from /proc.

#![allow(dead_code)] // each bench uses its own part

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

/// `n` distinct ports free now: each held until all are chosen (a port
/// given back at once may be handed out again by the next bind).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A `/proc/PID/status` field in KiB (0 when absent).
pub fn status_kib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

pub fn rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

/// Whether the bench runs its cluster over mutual TLS (`WEFT_BENCH_TLS=1`).
pub fn tls_on() -> bool {
    std::env::var("WEFT_BENCH_TLS").is_ok_and(|v| v == "1")
}

/// With [`tls_on`]: a certificate of `role` named `name` in `dir` (the CA
/// made there first), as a `[tls]` TOML section naming its files; and this
/// process's clients set to TLS with that CA and the first member
/// certificate. Empty otherwise.
/// Whether users are on too (`WEFT_BENCH_ACL=1`, with `WEFT_BENCH_TLS=1`).
pub fn acl_on() -> bool {
    tls_on() && std::env::var("WEFT_BENCH_ACL").is_ok_and(|v| v == "1")
}

pub fn tls_section(dir: &std::path::Path, role: weft_common::tls::Role, name: &str) -> String {
    use weft_common::tls;
    if !tls_on() {
        return String::new();
    }
    let ca = tls::ca_paths(dir);
    if !ca.cert.exists() {
        tls::create_ca(dir, 1).unwrap();
    }
    let made = tls::create_cert(
        &ca,
        dir,
        &tls::CertRequest {
            role,
            name: name.into(),
            dns: vec![],
            ips: vec![],
            days: 1,
        },
    )
    .unwrap();
    // The bench acts as the operator: the members' certificate (it lists
    // the agents' containers).
    if role == tls::Role::Rm && tls::installed().is_none() {
        tls::setup_client(Some(&ca.cert), Some(&made.cert), Some(&made.key)).unwrap();
    }
    format!(
        "\n[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        ca.cert.display().to_string(),
        made.cert.display().to_string(),
        made.key.display().to_string()
    )
}

/// Three members (raft ids 1-3) in a temp dir; killed when dropped.
pub struct Group {
    pub children: Vec<Child>,
    pub addrs: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts three members with `config` (TOML; may be empty) as their config
/// file, logging warnings only (or as `WEFT_BENCH_RM_LOG` says, e.g.
/// `weft_resource_manager::raft_node=debug` for each snapshot's timings),
/// on the bench's stderr.
pub fn start_group(config: &str) -> Group {
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = free_ports(3)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let peers: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let file = dir.path().join("rm.toml");
    // With WEFT_BENCH_TLS=1 the members share one rm certificate.
    let tls = tls_section(dir.path(), weft_common::tls::Role::Rm, "bench-rm");
    // With WEFT_BENCH_ACL=1 as well, users are on: every call is
    // authenticated (the bench's own as the members' certificate, an admin).
    let acl = if acl_on() {
        "\n[acl]\nenabled = true\n"
    } else {
        ""
    };
    std::fs::write(&file, format!("{config}{tls}{acl}")).unwrap();
    let children = (0..3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_resource-manager"))
                .args(["--config", file.to_str().unwrap()])
                .args(["--id", &(i + 1).to_string(), "--listen", &addrs[i]])
                .args([
                    "--data-dir",
                    dir.path().join(format!("rm{i}")).to_str().unwrap(),
                ])
                .args(["--peers", &peers.join(",")])
                .env(
                    "RUST_LOG",
                    std::env::var("WEFT_BENCH_RM_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    Group {
        children,
        addrs,
        dir,
    }
}

/// A round's writes/s, p50 ms and p99 ms.
pub type Row = (f64, f64, f64);

/// One round at `concurrency` clients, `total` writes in all.
pub async fn round<F, Fut>(concurrency: usize, total: usize, write: F) -> Row
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let per = total / concurrency;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let write = write.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let s = Instant::now();
                    write(c, i).await;
                    lat.push(s.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    (lat.len() as f64 / secs, pct(0.5), pct(0.99))
}

/// Removes the cgroups whose names start with `prefix` (under every
/// mounted hierarchy), after thawing them and killing what they hold: an
/// agent killed while it had a group frozen leaves its tree where SIGKILL
/// cannot land until the group is thawed.
pub fn clean_cgroups(prefix: &str) {
    let mounts = weft_node_agent::driver::cgroupfs::Mounts::read();
    let mut roots: Vec<std::path::PathBuf> = mounts.v1.iter().map(|(p, _)| p.clone()).collect();
    roots.extend(mounts.v2.clone());
    let parents: Vec<std::path::PathBuf> = roots
        .iter()
        .filter_map(|r| std::fs::read_dir(r).ok())
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    let groups = |p: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()
    };
    for p in &parents {
        for g in groups(p) {
            for pid in std::fs::read_to_string(g.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = std::fs::write(g.join("freezer.state"), "THAWED");
            let _ = std::fs::write(g.join("cgroup.freeze"), "0");
        }
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        for p in &parents {
            for g in groups(p) {
                let _ = std::fs::remove_dir(g);
            }
            let _ = std::fs::remove_dir(p);
        }
        if parents.iter().all(|p| !p.exists()) || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
