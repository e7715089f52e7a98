//! How containers end: exit codes, stop with a grace period, escaped
//! grandchildren, the v1 devices controller and the v2 device filter.

use std::time::Duration;

use weft_node_agent::config::DriverChoice;
use weft_proto::exit_codes;
use weft_proto::v1 as pb;
use weft_proto::v1::container_exit::Reason;

use crate::harness::*;

#[tokio::test]
async fn exit_codes_and_success() {
    let mut agent = TestAgent::start("exit", |_| {}).await;
    start(&mut agent.client, spec("ok", "echo fine", 16 * MIB)).await;
    start(&mut agent.client, spec("bad", "exit 3", 16 * MIB)).await;
    start(&mut agent.client, spec("segv", "kill -SEGV $$", 16 * MIB)).await;
    let ok = wait_end(&mut agent.client, "ok", Duration::from_secs(10)).await;
    assert_eq!(ok.state(), pb::ContainerState::Succeeded);
    assert_eq!(ok.exit.as_ref().unwrap().exit_status, 0);
    let bad = wait_end(&mut agent.client, "bad", Duration::from_secs(10)).await;
    assert_eq!(bad.state(), pb::ContainerState::Failed);
    let e = bad.exit.unwrap();
    assert!(
        matches!(e.reason, Some(Reason::Failed(ref f)) if f.exit_code == Some(3)),
        "{e:?}"
    );
    assert_eq!(e.exit_status, 3);
    assert_eq!(e.diagnostic, "exited with code 3");
    let segv = wait_end(&mut agent.client, "segv", Duration::from_secs(10)).await;
    let e = segv.exit.unwrap();
    assert!(
        matches!(e.reason, Some(Reason::Failed(ref f)) if f.signal == Some(11)),
        "{e:?}"
    );
    assert_eq!(e.exit_status, 128 + 11);
    assert!(e.diagnostic.contains("SIGSEGV"), "{}", e.diagnostic);
    // Work directories go, logs stay.
    let ok_dir = agent.work_dir().join("containers/ok");
    eventually("work dir removed", Duration::from_secs(5), || {
        !ok_dir.exists()
    })
    .await;
    assert!(agent.work_dir().join("logs/ok/stdout").exists());
    let listed = agent
        .client
        .list_containers(pb::ListContainersRequest {
            include_finished: true,
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), 3);
    let running = agent
        .client
        .list_containers(pb::ListContainersRequest {
            include_finished: false,
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(running.is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn stop_sends_sigterm_then_waits() {
    let mut agent = TestAgent::start("stop", |_| {}).await;
    let script = "trap 'echo got term; exit 0' TERM; echo ready; while :; do sleep 0.05; done";
    start(&mut agent.client, spec("polite", script, 16 * MIB)).await;
    let mut c = agent.client.clone();
    eventually("ready", Duration::from_secs(5), || {
        std::fs::read_to_string(agent.work_dir().join("logs/polite/stdout"))
            .is_ok_and(|s| s.contains("ready"))
    })
    .await;
    let resp = c
        .stop_container(pb::StopContainerRequest {
            container_id: "polite".into(),
            grace_period_ms: 3000,
            wait: true,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(resp.state(), pb::ContainerState::Killed);
    let exit = resp.exit.unwrap();
    assert!(
        matches!(exit.reason, Some(Reason::UserRequested(_))),
        "{exit:?}"
    );
    assert_eq!(exit.exit_status, exit_codes::USER_REQUESTED);
    let out = read_log(&mut c, "polite", pb::LogStream::Stdout, 0, false).await;
    assert!(
        out.contains("got term"),
        "the trap ran during the grace period: {out:?}"
    );
    agent.shutdown().await;
}

/// A grandchild that double-forked into its own session leaves the container's
/// process group; stopping the container must still kill it.
async fn escaped_grandchild_dies(driver: DriverChoice) {
    let mut agent = TestAgent::start("escape", |c| c.containers.driver = driver).await;
    let script = "(setsid sleep 1000 &); echo forked; exec sleep 1000";
    let st = start(&mut agent.client, spec("esc", script, 32 * MIB)).await;
    let parent = agent.parent().to_string();
    let leader = st.pid as i32;
    // Wait for the grandchild to have left the leader's session.
    let escaped = || {
        marked_pids(&parent)
            .into_iter()
            .filter(|&p| p != leader)
            .filter_map(weft_node_agent::procfs::stat)
            .find(|s| {
                s.session != leader
                    && weft_node_agent::procfs::command_line(s.pid, 100) == "sleep 1000"
            })
    };
    eventually("an escaped grandchild", Duration::from_secs(5), || {
        escaped().is_some()
    })
    .await;
    let esc = escaped().unwrap();
    assert_ne!(esc.ppid, leader, "the grandchild was orphaned");
    stop(&mut agent.client, "esc", 200).await;
    eventually("escaped grandchild gone", Duration::from_secs(5), || {
        marked_pids(&parent).is_empty()
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test]
async fn escaped_grandchild_killed_on_stop_cgroup() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    escaped_grandchild_dies(DriverChoice::Auto).await;
}

#[tokio::test]
async fn escaped_grandchild_killed_on_stop_procfs() {
    escaped_grandchild_dies(DriverChoice::Procfs).await;
}

/// The v1 devices controller denies what the limits list: here /dev/null
/// (1:3) stands in for a GPU that was not given.
#[test]
fn v1_devices_controller_denies_listed_devices() {
    use weft_node_agent::driver::{cgroupfs::Mounts, v1::CgroupV1, Driver, Limits};
    if !is_root() || Mounts::read().v1_controller("devices").is_none() {
        eprintln!("skipped: needs root and a v1 devices hierarchy");
        return;
    }
    let parent = unique_parent("devices");
    let _guard = CleanGuard(parent.clone());
    let d = CgroupV1::new(&Mounts::read(), &parent).unwrap();
    let g = d
        .create(
            "c",
            &Limits {
                memory_bytes: 32 * MIB,
                vcores_milli: 0,
                pids: 16,
                denied_devices: vec![(1, 3)],
            },
        )
        .unwrap();
    let run = |script: &str, join: bool| {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", script]);
        if join {
            weft_node_agent::driver::join_on_exec(&mut cmd, g.join_paths());
        }
        cmd.output().unwrap()
    };
    let inside = run("echo x > /dev/null", true);
    assert!(
        !inside.status.success(),
        "writing /dev/null should be denied"
    );
    assert!(
        String::from_utf8_lossy(&inside.stderr).contains("ermission denied")
            || String::from_utf8_lossy(&inside.stderr).contains("not permitted"),
        "{:?}",
        String::from_utf8_lossy(&inside.stderr)
    );
    assert!(run("echo x > /dev/null", false).status.success());
    assert!(g.kill_all().is_empty());
    g.destroy().unwrap();
    d.cleanup();
    assert_nothing_left(&parent);
}

/// A StartContainerRequest for `id` with a token of `signer`'s group.
fn granted_by(
    signer: &weft_proto::token::TokenSigner,
    id: &str,
    script: &str,
) -> pb::StartContainerRequest {
    let mut req = spec(id, script, 16 * MIB);
    let now = weft_proto::token::now_ms();
    req.token = signer.sign_container(&pb::ContainerTokenBody {
        container_id: id.into(),
        application_id: "app-000001".into(),
        node_id: TEST_NODE.into(),
        memory_bytes: 16 * MIB,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ..Default::default()
    });
    req
}

/// A start of c2-1 that its group already granted (a token signed anew) is
/// refused: it would run that container twice.
async fn refused_again(client: &mut Client, group: &weft_proto::token::TokenSigner) {
    let again = client
        .start_container(granted_by(group, "c2-1", "echo twice"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
}

/// Every new RM group numbers its containers from the same first id. An
/// agent whose work dir outlives its group (the group rebuilt, a standalone
/// cluster started again on the same dir) holds an ended `c2-1` when the
/// new group grants its own `c2-1`: that one starts, and the old record and
/// logs give way. A new token of the same group for an id the agent already
/// ran is refused, whatever else it says: that would run the container
/// twice.
#[tokio::test]
async fn an_ended_container_of_another_rm_group_gives_way_to_a_new_grant_of_its_id() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().to_path_buf();
    let first_group = test_signer();
    let mut agent = TestAgent::start("regroup1", |c| c.work_dir = dir.clone()).await;
    let ran = agent
        .client
        .start_container(granted_by(&first_group, "c2-1", "echo first"))
        .await
        .unwrap();
    assert!(ran.into_inner().status.is_some());
    let s = wait_end(&mut agent.client, "c2-1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), pb::ContainerState::Succeeded);
    tokio::time::sleep(Duration::from_millis(5)).await;
    refused_again(&mut agent.client, &first_group).await;
    agent.shutdown().await;

    // The group is rebuilt: a new key, the same first container id.
    let second_group = weft_proto::token::TokenSigner::from_seed([8; 32]);
    let key = hex::encode(second_group.public_key());
    let mut agent = TestAgent::start("regroup2", |c| {
        c.work_dir = dir.clone();
        c.security.token_public_key = Some(key.clone());
    })
    .await;
    let old = agent
        .client
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: "c2-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        old.state(),
        pb::ContainerState::Succeeded,
        "recovered: {old:?}"
    );
    agent
        .client
        .start_container(granted_by(&second_group, "c2-1", "echo second"))
        .await
        .expect("the new group's c2-1 starts");
    let s = wait_end(&mut agent.client, "c2-1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), pb::ContainerState::Succeeded);
    let out = read_log(&mut agent.client, "c2-1", pb::LogStream::Stdout, 0, false).await;
    assert_eq!(out, "second\n", "only the new container's output");
    refused_again(&mut agent.client, &second_group).await;
    agent.shutdown().await;
}

/// cgroup v2 has no devices controller: a BPF device program attached to the
/// group denies what the limits list. A v2 hierarchy is mounted in a mount
/// namespace of this test's own thread (this machine's hierarchies are v1 and
/// the mount is seen by no other test); /dev/null (1:3) stands in for a GPU
/// that was not given, /dev/zero (1:5) for everything else.
#[test]
fn v2_bpf_device_filter_denies_listed_devices() {
    use std::ffi::CString;
    use weft_node_agent::driver::bpf;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    if let Err(why) = bpf::probe() {
        if why.contains("not permitted") || why.contains("not implemented") {
            eprintln!("skipped: this kernel or these rights allow no BPF device program: {why}");
            return;
        }
        panic!("loading the device program failed: {why}");
    }
    std::thread::spawn(|| {
        let c = |s: &str| CString::new(s).unwrap();
        // SAFETY: plain system calls on NUL-terminated strings that outlive them.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare");
            let root = c("/");
            let r = libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            assert_eq!(
                r,
                0,
                "making / private: {}",
                std::io::Error::last_os_error()
            );
        }
        let mnt = tempfile::tempdir().unwrap();
        let point = c(mnt.path().to_str().unwrap());
        let (none, fstype) = (c("none"), c("cgroup2"));
        // SAFETY: as above.
        let r = unsafe {
            libc::mount(
                none.as_ptr(),
                point.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(
            r,
            0,
            "mounting cgroup2: {}",
            std::io::Error::last_os_error()
        );
        let dir = mnt.path().join(unique_parent("bpf"));
        std::fs::create_dir(&dir).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            bpf::attach_deny(&dir, &[(1, 3), (195, 7)]).unwrap();
            let run = |script: &str| {
                let mut cmd = std::process::Command::new("sh");
                cmd.args(["-c", script]);
                weft_node_agent::driver::join_on_exec(&mut cmd, vec![dir.join("cgroup.procs")]);
                cmd.output().unwrap()
            };
            let denied = run("echo x > /dev/null");
            let err = String::from_utf8_lossy(&denied.stderr).to_string();
            assert!(
                !denied.status.success(),
                "writing /dev/null should be denied"
            );
            assert!(
                err.contains("ermission denied") || err.contains("not permitted"),
                "{err:?}"
            );
            let read = run("head -c 4 /dev/zero | wc -c");
            assert!(read.status.success(), "{read:?}");
            assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "4");
            // Outside the group the device opens.
            assert!(std::process::Command::new("sh")
                .args(["-c", "echo x > /dev/null"])
                .status()
                .unwrap()
                .success());
        });
        let removed = std::fs::remove_dir(&dir);
        // SAFETY: as above.
        let r = unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
        if let Err(e) = outcome {
            std::panic::resume_unwind(e);
        }
        removed.unwrap();
        assert_eq!(r, 0, "unmounting: {}", std::io::Error::last_os_error());
    })
    .join()
    .unwrap();
}

/// An empty group left under the agent's parent (one whose removal found
/// it busy when its container ended, say) is removed at shutdown, and the
/// parent with it.
#[tokio::test]
async fn an_empty_group_left_behind_goes_at_shutdown() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    let mut agent = TestAgent::start("leftover", |_| {}).await;
    start(&mut agent.client, spec("one", "true", 32 * MIB)).await;
    wait_end(&mut agent.client, "one", Duration::from_secs(20)).await;
    let parents = cgroups_of(agent.parent());
    assert!(!parents.is_empty(), "the agent made its parent groups");
    for p in &parents {
        std::fs::create_dir(p.join("stale-1")).unwrap();
    }
    // (shutdown asserts that no group of the agent is left.)
    agent.shutdown().await;
}

/// Starts racing the agent's shutdown: each is refused or stopped with the
/// rest, and nothing of any is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_racing_a_shutdown_leave_nothing_behind() {
    let agent = TestAgent::start("racing", |_| {}).await;
    let mut starts = Vec::new();
    for i in 0..16 {
        let mut c = agent.client.clone();
        starts.push(tokio::spawn(async move {
            c.start_container(signed(spec(&format!("race-{i}"), "sleep 30", 16 * MIB)))
                .await
                .map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    // (shutdown asserts that no process or group of the agent is left.)
    agent.shutdown().await;
    let mut refused = 0;
    for s in starts {
        if s.await.unwrap().is_err() {
            refused += 1;
        }
    }
    println!("{refused} of 16 starts refused as the agent stopped");
}
