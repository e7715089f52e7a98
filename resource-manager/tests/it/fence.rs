//! A node cut off from the RM group by a packet filter fences itself: its
//! agent's lease runs out before the RM's `node_expiry`, its shims kill the
//! task, and only then does the RM declare it lost and the task run again
//! elsewhere, once.
//!
//! The test runs in a network namespace of its own (loopback only), where
//! each agent has its own loopback address and the partition is an
//! iptables rule dropping every packet to or from one agent's address.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weft_client::proto as pb;

use crate::cluster::Cluster;
use crate::nodes::AgentProcess;

/// Why the test cannot run here, if it cannot.
fn unable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("a network namespace and packet filter rules need root".into());
    }
    match Command::new("iptables").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("iptables is not installed (.ci/run installs it)".into()),
    }
}

/// Runs `body` on a thread of its own inside a new network namespace (with
/// its loopback up): every thread and process the body starts, its tokio
/// runtime's included, lives there, and the namespace goes with them.
fn in_own_netns<F>(body: F)
where
    F: FnOnce() + Send + 'static,
{
    let t = std::thread::spawn(move || {
        // SAFETY: unshare(2) on this thread only; no memory involved.
        let rc = unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        run(&["ip", "link", "set", "lo", "up"]);
        body();
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

fn run(cmd: &[&str]) {
    let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

/// Every packet to or from `ip` dropped (`-A`), or let through again (`-D`).
fn partition(ip: &str, op: &str) {
    run(&["iptables", op, "INPUT", "-s", ip, "-j", "DROP"]);
    run(&["iptables", op, "INPUT", "-d", ip, "-j", "DROP"]);
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn gone(pid: i32) -> bool {
    weft_node_agent::procfs::is_zombie(pid)
}

#[test]
fn a_partitioned_node_fences_itself_and_its_task_reruns_elsewhere_once() {
    if let Some(why) = unable() {
        eprintln!("skipped: {why}");
        return;
    }
    in_own_netns(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(partitioned_node())
    });
}

async fn partitioned_node() {
    let extra = format!(
        "[masters]\nlaunch = true\ncommand = {:?}\n",
        crate::apps::app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    cluster.leader().await;
    let rm = cluster.addrs();
    let nodes = [
        ("fence-am", "127.0.0.21", "role = \"am\""),
        ("fence-w1", "127.0.0.22", "role = \"work\""),
        ("fence-w2", "127.0.0.23", "role = \"work\""),
    ];
    let agents: Vec<AgentProcess> = nodes
        .iter()
        .map(|(id, ip, labels)| AgentProcess::start_at(id, &rm, ip, labels))
        .collect();
    let client = cluster.client();
    crate::cluster::wait_nodes(&client, 3).await;
    // The registered addresses are the agents' own.
    for n in client.list_nodes().await.unwrap() {
        let (_, ip, _) = nodes.iter().find(|(id, _, _)| *id == n.node_id).unwrap();
        assert!(n.address.starts_with(&format!("{ip}:")), "{n:?}");
    }

    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    // The first run sleeps (and is fenced); a rerun finds its line and ends.
    let spec = format!(
        "name: fence\nmax_attempts: 1\nam: {{ vcores: 0.5, memory: 256MiB, node_labels: {{ role: am }} }}\n\
         stages:\n  - name: work\n    instances: 1\n    max_retries: 0\n    \
         command: 'n=$(cat {p} 2>/dev/null | wc -l); echo \"$$ $(date +%s%N) $WEFT_WORK_DIR\" >> {p}; [ $n -gt 0 ] || exec sleep 120'\n    \
         resources: {{ vcores: 0.5, memory: 64MiB, node_labels: {{ role: work }} }}\n",
        p = starts.display()
    );
    let app = client.submit(&spec, "yaml", "mia").await.unwrap();
    let read = || -> Vec<(i32, u128, String)> {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut f = l.splitn(3, ' ');
                (
                    f.next().unwrap().parse().unwrap(),
                    f.next().unwrap().parse().unwrap(),
                    f.next().unwrap().to_string(),
                )
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while read().is_empty() {
        assert!(Instant::now() < deadline, "the task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (pid, _, work_dir) = read().remove(0);
    let victim = agents
        .iter()
        .position(|a| work_dir.starts_with(&a.work_dir.display().to_string()))
        .unwrap_or_else(|| panic!("{work_dir} is on no agent"));
    assert_ne!(victim, 0, "the task runs on a work node");
    let (victim_id, victim_ip, _) = nodes[victim];

    // Cut the node off, then watch: the task's death, the RM's verdict.
    partition(victim_ip, "-A");
    let cut = Instant::now();
    let mut died: Option<(Instant, u128)> = None;
    let mut lost: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while died.is_none() || lost.is_none() {
        assert!(
            Instant::now() < deadline,
            "after 30 s: task dead {died:?}, node lost {lost:?}"
        );
        if died.is_none() && gone(pid) {
            died = Some((Instant::now(), now_ns()));
        }
        if lost.is_none() {
            let state = client
                .list_nodes()
                .await
                .unwrap()
                .into_iter()
                .find(|n| n.node_id == victim_id)
                .unwrap()
                .state();
            if state == pb::NodeState::Lost {
                lost = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (died_at, died_ns) = died.unwrap();
    let lost_at = lost.unwrap();
    eprintln!(
        "partition at 0: task dead at {:?}, node lost at {:?}",
        died_at - cut,
        lost_at - cut
    );
    assert!(
        died_at < lost_at,
        "the task died ({:?}) before the RM declared its node lost ({:?})",
        died_at - cut,
        lost_at - cut
    );

    // The job finishes with its first master: the task ran again, once, on
    // the other work node, after the first run was dead.
    let r = crate::apps::wait_state(&client, &app, Duration::from_secs(60)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 1, "the master was not disturbed");
    let runs = read();
    assert_eq!(runs.len(), 2, "the task ran twice in all: {runs:?}");
    let (_, rerun_ns, rerun_dir) = &runs[1];
    let other = 3 - victim;
    assert!(
        rerun_dir.starts_with(&agents[other].work_dir.display().to_string()),
        "the rerun ran on the other work node: {rerun_dir}"
    );
    assert!(
        died_ns < *rerun_ns,
        "the rerun started after the first run was seen dead"
    );

    // Healed: the node comes back, and its agent says why the task ended.
    partition(victim_ip, "-D");
    let deadline = Instant::now() + Duration::from_secs(30);
    let fenced = loop {
        let mut agent = weft_proto::v1::container_manager_client::ContainerManagerClient::new(
            weft_common::net::endpoint(
                &client
                    .list_nodes()
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|n| n.node_id == victim_id)
                    .unwrap()
                    .address,
                weft_common::tls::Role::Agent,
                Duration::from_secs(1),
                Some(Duration::from_secs(2)),
            )
            .unwrap()
            .connect_lazy(),
        );
        if let Ok(list) = agent
            .list_containers(pb::ListContainersRequest {
                include_finished: true,
            })
            .await
        {
            if let Some(c) = list
                .into_inner()
                .containers
                .into_iter()
                .find(|c| c.exit.as_ref().is_some_and(|e| e.exit_status == -111))
            {
                break c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the healed agent never reported a fenced container"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let diag = fenced.exit.unwrap().diagnostic;
    assert!(diag.contains("node_expiry is 3s"), "{diag}");
    crate::cluster::wait_nodes(&client, 3).await;
    drop(agents);
}
