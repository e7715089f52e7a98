//! The real `rmctl` binary against a real 3-member group.

use std::process::{Command, Output};

use crate::cluster::Cluster;

/// `rmctl` sits beside `resource-manager` in the target directory once the
/// workspace's binaries are built (README's test command does that first).
fn rmctl() -> Command {
    let rm = std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager"));
    let path = rm.with_file_name("rmctl");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (README's test command does)",
        path.display()
    );
    Command::new(path)
}

pub fn run(args: &[&str], rm: &str) -> Output {
    let mut cmd = rmctl();
    cmd.args(["--rm", rm]).env_remove("WEFT_RM");
    crate::secure::rmctl_setup(&mut cmd);
    cmd.args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmctl_cluster_status_node_list_and_apps() {
    let cluster = Cluster::start(3, 1000);
    // The follower asked below answers for itself: it must have heard of
    // the election (a moment after the leader knows) to name the leader.
    let leader = cluster.agreed_leader().await;
    let all = cluster.addrs().join(",");
    // Only a follower's address: rmctl still finds the leader.
    let follower = cluster.members[(leader + 1) % 3].addr.clone();
    let st =
        tokio::task::spawn_blocking(move || run(&["cluster", "status", "-o", "json"], &follower))
            .await
            .unwrap();
    assert!(st.status.success(), "{st:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&st)).unwrap();
    assert_eq!(v["leader_id"], cluster.members[leader].id);
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
    let a = all.clone();
    let table = tokio::task::spawn_blocking(move || run(&["cluster", "status"], &a))
        .await
        .unwrap();
    let t = stdout(&table);
    assert!(t.starts_with("MEMBER  ADDRESS"), "{t}");
    assert_eq!(
        t.lines().filter(|l| l.ends_with("leader")).count(),
        1,
        "{t}"
    );

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.yaml");
    std::fs::write(&spec, crate::cluster::job("etl", "root")).unwrap();
    let (a, s) = (all.clone(), spec.clone());
    let sub = tokio::task::spawn_blocking(move || {
        run(&["submit", "-f", s.to_str().unwrap(), "--user", "dana"], &a)
    })
    .await
    .unwrap();
    assert!(sub.status.success(), "{sub:?}");
    let id = stdout(&sub).trim().to_string();
    assert!(id.starts_with("app-"), "{id}");
    let (a, i) = (all.clone(), id.clone());
    let status = tokio::task::spawn_blocking(move || run(&["app", "status", &i, "-o", "json"], &a))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(v["name"], "etl");
    assert_eq!(v["queue"], "root");
    assert_eq!(v["user"], "dana");
    assert_eq!(v["state"], "SUBMITTED");

    let a = all.clone();
    let nodes = tokio::task::spawn_blocking(move || run(&["node", "list"], &a))
        .await
        .unwrap();
    assert!(nodes.status.success());
    assert!(
        stdout(&nodes).starts_with("NODE  ADDRESS  STATE"),
        "{}",
        stdout(&nodes)
    );

    let a = all.clone();
    let queues = tokio::task::spawn_blocking(move || run(&["queue", "list", "-o", "json"], &a))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout(&queues)).unwrap();
    assert_eq!(v[0]["name"], "root");
    assert_eq!(v[0]["pending_applications"], 1);

    // Errors: one line, non-zero exit.
    let a = all.clone();
    let missing = tokio::task::spawn_blocking(move || run(&["app", "status", "app-424242"], &a))
        .await
        .unwrap();
    assert!(!missing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "rmctl: application_id: no application app-424242"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("127.0.0.1:{port}");
    let n = nowhere.clone();
    let down = tokio::task::spawn_blocking(move || {
        rmctl()
            .args(["--rm", &n, "--timeout", "1", "cluster", "status"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.starts_with(&format!(
            "rmctl: cannot reach a resource-manager leader at {nowhere}"
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
