//! The real `node-agent` binary: after a kill -9, the next agent takes its
//! running containers over (same pids, same quotas; one left frozen by a
//! kill cut short has its kill finished) and reports the ends it missed;
//! SIGTERM stops its containers and removes their cgroups.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weft_proto::v1 as pb;

use crate::harness::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_agent(config: &std::path::Path, port: u16) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting node-agent"),
    )
}

async fn status(c: &mut Client, id: &str) -> pb::ContainerStatus {
    c.get_container_status(pb::GetContainerStatusRequest {
        container_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Freezes container `id`'s group (cgroup v1 freezer or v2
/// `cgroup.freeze`): the file and what it reads once thawed, or None
/// where the driver has no freezer.
fn freeze(parent: &str, id: &str) -> Option<(std::path::PathBuf, &'static str)> {
    for root in cgroups_of(parent) {
        let v1 = root.join(id).join("freezer.state");
        if v1.exists() {
            std::fs::write(&v1, "FROZEN").unwrap();
            return Some((v1, "THAWED"));
        }
        let v2 = root.join(id).join("cgroup.freeze");
        if v2.exists() && root.join(id).join("memory.max").exists() {
            std::fs::write(&v2, "1").unwrap();
            return Some((v2, "0"));
        }
    }
    None
}

fn pid_alive(pid: u32) -> bool {
    !weft_node_agent::procfs::is_zombie(pid as i32)
}

#[tokio::test]
async fn binary_restart_keeps_containers_and_cleans_up_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let parent = unique_parent("bin");
    let _guard = CleanGuard(parent.clone());
    let config = work.path().join("agent.toml");
    let agent_dir = work.path().join("agent");
    std::fs::write(
        &config,
        format!(
            "work_dir = {:?}\nnode_id = {TEST_NODE:?}\n[containers]\ncgroup_parent = {parent:?}\nstop_grace_period = \"300ms\"\nmonitor_interval = \"100ms\"\n[gpu]\nprobe = \"none\"\n[security]\ntoken_public_key = {:?}\n",
            agent_dir.display().to_string(),
            hex::encode(test_signer().public_key()),
        ),
    )
    .unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // First agent: four containers, then it dies hard.
    let mut first = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    let survivor = start(
        &mut c,
        spec(
            "survivor",
            "echo before; sleep 4; echo after; exit 7",
            16 * MIB,
        ),
    )
    .await;
    // Goes over its quota only once the first agent is gone.
    let hog = start(
        &mut c,
        spec("hog", "sleep 2; exec tail /dev/zero", 48 * MIB),
    )
    .await;
    // Ends while no agent runs.
    let quick = start(&mut c, spec("quick", "sleep 0.5; exit 5", 16 * MIB)).await;
    // Its record is lost (as if the agent died before writing it).
    let orphan = start(&mut c, spec("orphan", "exec sleep 1000", 16 * MIB)).await;
    // Stopped the moment the next agent answers.
    let stopme = start(&mut c, spec("stopme", "exec sleep 1000", 16 * MIB)).await;
    // Left frozen, as by an agent killed inside a kill (freeze, SIGKILL,
    // thaw) before it thawed.
    let frozen = start(
        &mut c,
        spec(
            "frozen",
            "while :; do date +%s%N > ticks; sleep 0.05; done",
            16 * MIB,
        ),
    )
    .await;
    for s in [&survivor, &hog, &quick, &orphan, &stopme, &frozen] {
        assert_eq!(s.state(), pb::ContainerState::Running, "{s:?}");
        assert!(pid_alive(s.pid), "{s:?}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.0.wait().unwrap();
    drop(c);
    std::fs::remove_file(agent_dir.join("state/orphan.json")).unwrap();
    let freezer = freeze(&parent, "frozen");
    let ticks = agent_dir.join("containers/frozen/ticks");
    let frozen_at = std::fs::read_to_string(&ticks).unwrap_or_default();
    if freezer.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            std::fs::read_to_string(&ticks).unwrap_or_default(),
            frozen_at,
            "a frozen container does not run"
        );
    }
    eventually("quick ended", Duration::from_secs(5), || {
        !pid_alive(quick.pid)
    })
    .await;
    assert!(pid_alive(survivor.pid), "the container outlives its agent");

    // Second agent: takes the running ones over, records the one that
    // ended as it ended, kills the one without a record.
    let mut second = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    let s = stop(&mut c, "stopme", 300).await;
    assert_eq!(s.state(), pb::ContainerState::Killed, "{s:?}");
    assert!(
        matches!(
            s.exit.unwrap().reason,
            Some(pb::container_exit::Reason::UserRequested(_))
        ),
        "a container taken over is stopped like any other"
    );
    assert!(!pid_alive(stopme.pid));
    let s = status(&mut c, "survivor").await;
    assert_eq!(s.state(), pb::ContainerState::Running, "{s:?}");
    assert_eq!(s.pid, survivor.pid, "the same process, taken over");
    // The frozen one was being killed: the kill is finished, and said.
    match &freezer {
        Some(_) => {
            let s = status(&mut c, "frozen").await;
            assert_eq!(s.state(), pb::ContainerState::Lost, "{s:?}");
            assert!(
                s.exit.unwrap().diagnostic.contains("found frozen"),
                "the reason says why"
            );
            assert!(!pid_alive(frozen.pid), "its processes are gone");
            for root in cgroups_of(&parent) {
                assert!(
                    !root.join("frozen").exists(),
                    "{}: its group is removed",
                    root.display()
                );
            }
        }
        None => {
            println!(
                "skip: no freezer for this driver; a frozen container's take-over is not checked"
            );
            stop(&mut c, "frozen", 300).await;
        }
    }
    let s = status(&mut c, "quick").await;
    assert_eq!(s.state(), pb::ContainerState::Failed, "{s:?}");
    assert_eq!(s.exit.unwrap().exit_status, 5);
    let s = status(&mut c, "orphan").await;
    assert_eq!(s.state(), pb::ContainerState::Lost, "{s:?}");
    assert!(s.exit.unwrap().diagnostic.contains("previous agent died"));
    assert!(
        !pid_alive(orphan.pid),
        "a container without a record is killed"
    );

    // Its quota still holds.
    let s = wait_end(&mut c, "hog", Duration::from_secs(30)).await;
    assert_eq!(s.state(), pb::ContainerState::Killed, "{s:?}");
    let exit = s.exit.unwrap();
    assert!(
        matches!(
            exit.reason,
            Some(pb::container_exit::Reason::OverMemoryQuota(_))
        ),
        "{exit:?}"
    );
    assert!(!pid_alive(hog.pid));
    // And the taken-over container ends as it ended, its log whole.
    let s = wait_end(&mut c, "survivor", Duration::from_secs(30)).await;
    assert_eq!(s.state(), pb::ContainerState::Failed, "{s:?}");
    let exit = s.exit.unwrap();
    assert_eq!(exit.exit_status, 7, "{exit:?}");
    assert_eq!(
        read_log(&mut c, "survivor", pb::LogStream::Stdout, 0, false).await,
        "before\nafter\n"
    );

    // SIGTERM with a running container: it is stopped, its cgroup removed, the agent exits 0.
    start(&mut c, spec("running", "exec sleep 1000", 16 * MIB)).await;
    eventually("second container running", Duration::from_secs(5), || {
        marked_pids(&parent).len() == 1
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = second.0.wait().unwrap();
        std::mem::forget(second);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "agent exit status {status:?}");
    assert_nothing_left(&parent);
}

#[test]
fn binary_refuses_bad_config_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[containers]\nmonitor_interval = \"1ms\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("containers.monitor_interval: must be at least 10ms"),
        "{err}"
    );
    std::fs::write(&config, "[containers]\ndriver = \"cgroup-v3\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("driver") && err.contains("cgroup-v3"), "{err}");
}

/// The node's lease runs out while its agent is dead (kill -9, not
/// restarted): the shim kills the container by itself, at the deadline.
/// The next agent reports the end as Fenced and, its lease still out (no
/// RM answers it), refuses to start work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agents_containers_die_when_the_nodes_lease_runs_out() {
    use weft_node_agent::fence;
    let work = tempfile::tempdir().unwrap();
    let parent = unique_parent("fence");
    let _guard = CleanGuard(parent.clone());
    let config = work.path().join("agent.toml");
    let agent_dir = work.path().join("agent");
    std::fs::write(
        &config,
        format!(
            "work_dir = {:?}\nnode_id = {TEST_NODE:?}\n[containers]\ncgroup_parent = {parent:?}\nstop_grace_period = \"300ms\"\nmonitor_interval = \"100ms\"\n[gpu]\nprobe = \"none\"\n[security]\ntoken_public_key = {:?}\n",
            agent_dir.display().to_string(),
            hex::encode(test_signer().public_key()),
        ),
    )
    .unwrap();
    // The lease an RM's answers would have given: 3 s from now, for a
    // node_expiry of 4 s.
    std::fs::create_dir_all(agent_dir.join("state")).unwrap();
    let now = fence::now_ms();
    let lease = fence::LeaseFile {
        renewed_ms: now - 500,
        expiry_ms: 4000,
        deadline_ms: now + 3000,
    };
    std::fs::write(
        agent_dir.join("state/lease"),
        serde_json::to_vec(&lease).unwrap(),
    )
    .unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut first = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    let s = start(&mut c, spec("fenced", "exec sleep 1000", 16 * MIB)).await;
    assert_eq!(s.state(), pb::ContainerState::Running, "{s:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.0.wait().unwrap();
    drop(c);
    assert!(pid_alive(s.pid), "the container outlives its agent");
    eventually(
        "the shim fenced the container",
        Duration::from_secs(10),
        || !pid_alive(s.pid),
    )
    .await;
    let late = fence::now_ms().saturating_sub(lease.deadline_ms);
    eprintln!("container dead {late} ms after the lease's deadline");
    assert!(
        fence::now_ms() >= lease.deadline_ms,
        "killed before the deadline"
    );

    let _second = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    let st = status(&mut c, "fenced").await;
    assert_eq!(st.state(), pb::ContainerState::Killed, "{st:?}");
    let exit = st.exit.unwrap();
    assert_eq!(exit.exit_status, weft_proto::exit_codes::FENCED, "{exit:?}");
    assert!(
        matches!(
            exit.reason,
            Some(pb::container_exit::Reason::Fenced(pb::Fenced {
                node_expiry_ms: 4000,
                ..
            }))
        ),
        "{exit:?}"
    );
    assert!(
        exit.diagnostic
            .contains("no answer from the resource manager for 3s")
            && exit.diagnostic.contains("node_expiry is 4s"),
        "{}",
        exit.diagnostic
    );
    // Still fenced: no new work until an RM answers.
    let refused = c
        .start_container(signed(spec("later", "true", 16 * MIB)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("the node is fenced"),
        "{refused:?}"
    );
}
