//! The real `node-agent` binary: SIGTERM stops its containers and removes their
//! cgroups; after a kill -9, the next agent finds the leftovers, kills them and
//! reports them lost.

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

#[tokio::test]
async fn binary_recovers_leftovers_and_cleans_up_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let parent = unique_parent("bin");
    let _guard = CleanGuard(parent.clone());
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "work_dir = {:?}\nnode_id = {TEST_NODE:?}\n[containers]\ncgroup_parent = {parent:?}\nstop_grace_period = \"300ms\"\n[gpu]\nprobe = \"none\"\n[security]\ntoken_public_key = {:?}\n",
            work.path().join("agent").display().to_string(),
            hex::encode(test_signer().public_key()),
        ),
    )
    .unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // First agent: start a container, then die hard.
    let mut first = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    start(&mut c, spec("survivor", "exec sleep 1000", 16 * MIB)).await;
    eventually("container running", Duration::from_secs(5), || {
        marked_pids(&parent).len() == 1
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    first.0.wait().unwrap();
    drop(c);
    // The container outlives its agent: it is in its own session (and cgroup).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        marked_pids(&parent).len(),
        1,
        "the container survived the agent"
    );

    // Second agent: finds it, kills it, reports it lost.
    let mut second = spawn_agent(&config, port);
    let mut c = connect(addr).await;
    eventually("leftover killed", Duration::from_secs(5), || {
        marked_pids(&parent).is_empty()
    })
    .await;
    let s = c
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: "survivor".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::ContainerState::Lost);
    assert!(s.exit.unwrap().diagnostic.contains("previous agent died"));

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
