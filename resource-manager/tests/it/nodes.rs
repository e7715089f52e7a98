//! Node agents registering and heartbeating against the real RM group.

use std::time::{Duration, Instant};

use weft_client::proto as pb;

use crate::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registers_with_the_group_and_heartbeats() {
    let cluster = Cluster::start(3, 1000);
    cluster.leader().await;
    let work = tempfile::tempdir().unwrap();
    let mut cfg = weft_node_agent::AgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        work_dir: work.path().to_path_buf(),
        node_id: Some("gpu-node-1".into()),
        rm_addresses: cluster.addrs(),
        ..Default::default()
    };
    cfg.containers.cgroup_parent = format!("weft-rm-it-{}", std::process::id());
    cfg.gpu.probe = weft_node_agent::config::GpuProbeChoice::Fake;
    cfg.gpu
        .fake
        .devices
        .push(weft_node_agent::config::FakeGpuDevice {
            uuid: "GPU-0".into(),
            model: "Fake H100".into(),
            memory: bytesize::ByteSize::gib(80),
        });
    cfg.resources.vcores = Some(8.0);
    cfg.labels.insert("gpu".into(), "h100".into());
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(weft_node_agent::run(cfg, listener, async {
        let _ = stopped.await;
    }));
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let node = loop {
        if let Some(n) = client
            .list_nodes()
            .await
            .unwrap()
            .into_iter()
            .find(|n| n.node_id == "gpu-node-1")
        {
            break n;
        }
        assert!(Instant::now() < deadline, "the agent never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(node.state(), pb::NodeState::Running);
    let cap = node.capacity.unwrap();
    assert_eq!(cap.vcores_milli, 8000);
    assert_eq!(cap.gpus.len(), 1);
    assert_eq!(cap.gpus[0].model, "Fake H100");
    assert_eq!(node.labels.get("gpu").map(String::as_str), Some("h100"));
    let status = client.cluster_status().await.unwrap();
    assert_eq!(status.nodes, 1);
    assert_eq!(status.capacity.unwrap().gpus, 1);
    // Heartbeats keep arriving at the leader.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let n = client.list_nodes().await.unwrap().remove(0);
    assert!(n.last_heartbeat_ms > 0);
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
