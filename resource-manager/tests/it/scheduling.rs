//! The scheduler wired into the RM: an application master's asks are placed
//! on real registered agents, the containers run there, their ends come back
//! through the agents' heartbeats, and released containers are stopped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use weft_client::proto as pb;
use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

use crate::cluster::Cluster;
use crate::nodes::AgentProcess;

/// Calls Allocate with `asks` (counts lowered as allocations arrive) until
/// `want` allocations came, within 20 s.
async fn allocate_until(
    am: &mut ApplicationMasterServiceClient<tonic::transport::Channel>,
    app: &str,
    token: &[u8],
    asks: &mut [pb::ResourceAsk],
    want: usize,
) -> Vec<pb::Allocation> {
    let mut got: Vec<pb::Allocation> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "only {} allocations: {got:?}",
            got.len()
        );
        let r = am
            .allocate(pb::AllocateRequest {
                application_id: app.to_string(),
                application_token: token.to_vec(),
                asks: asks.to_vec(),
                wait_ms: 2000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for a in &r.allocations {
            if let Some(x) = asks.iter_mut().find(|x| x.ask_id == a.ask_id) {
                x.count -= 1;
            }
        }
        got.extend(r.allocations);
    }
    got
}

fn ask(id: &str, count: u32, cores: u64, gpus: u32, gang: &str) -> pb::ResourceAsk {
    pb::ResourceAsk {
        ask_id: id.into(),
        count,
        resources: Some(pb::Resources {
            vcores_milli: cores * 1000,
            memory_bytes: 64 << 20,
            gpus,
            ..Default::default()
        }),
        gang_id: gang.into(),
        placement: if gang.is_empty() {
            0
        } else {
            pb::PlacementPolicy::Spread as i32
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asks_are_placed_on_agents_run_and_reported_back() {
    let cluster = Cluster::start(3, 1000);
    let leader = cluster.leader().await;
    let client = cluster.client();
    let _a1 = AgentProcess::start("node-a", &cluster.addrs());
    let _a2 = AgentProcess::start("node-b", &cluster.addrs());
    crate::cluster::wait_nodes(&client, 2).await;
    // A task bigger than any registered node is refused at submit.
    let big = "name: big\nstages:\n  - name: train\n    gang: true\n    framework: pytorch\n    command: x\n    roles:\n      worker: { instances: 2, resources: { vcores: 64, memory: 1GiB } }\n";
    let e = client.submit(big, "yaml", "eve").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "stages[0].roles.worker.resources.vcores: 64 is more than any node has (largest 8)"
    );
    // The submitter runs the master: the answer carries its token.
    let submitted = client
        .submit_with(&crate::cluster::job("sched", "root"), "yaml", "eve", true)
        .await
        .unwrap();
    let (app, token) = (submitted.application_id, submitted.application_token);
    assert!(!token.is_empty(), "an unmanaged master gets its token");
    let mut am = ApplicationMasterServiceClient::new(
        crate::secure::channel(&cluster.members[leader].addr, weft_common::tls::Role::Rm).await,
    );
    // No token, a forged one, or another application's: refused.
    let other = client
        .submit_with(&crate::cluster::job("other", "root"), "yaml", "eve", true)
        .await
        .unwrap();
    let register = |token: Vec<u8>| pb::RegisterApplicationMasterRequest {
        application_id: app.clone(),
        attempt: 1,
        application_token: token,
        ..Default::default()
    };
    for (bad, why) in [
        (vec![], "application_token: no token was given"),
        (
            b"not a token".to_vec(),
            "application_token: the token is malformed",
        ),
        (
            other.application_token.clone(),
            "application_token: issued for app-000002, not app-000001",
        ),
    ] {
        let e = am
            .register_application_master(register(bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().starts_with(why), "{}", e.message());
    }
    am.register_application_master(register(token.clone()))
        .await
        .unwrap();
    // The other application's master cannot allocate for this one.
    let e = am
        .allocate(pb::AllocateRequest {
            application_id: app.clone(),
            application_token: other.application_token.clone(),
            asks: vec![ask("stolen", 1, 1, 0, "")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        client.get_application(&app).await.unwrap().state(),
        pb::ApplicationState::Running
    );

    // Bad asks are refused naming the ask and the field.
    let e = am
        .allocate(pb::AllocateRequest {
            application_id: app.clone(),
            application_token: token.clone(),
            asks: vec![ask("huge", 1, 64, 0, "")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with(
            "asks[0] (huge): resources.vcores: 64 is more than any node has (largest 8)"
        ),
        "{}",
        e.message()
    );

    // Three workers and a two-member gang, one GPU each (each node has one).
    let mut asks = vec![ask("worker", 3, 1, 0, ""), ask("ps", 2, 1, 1, "ps-gang")];
    let got = allocate_until(&mut am, &app, &token, &mut asks, 5).await;
    let ids: HashSet<&String> = got.iter().map(|a| &a.container_id).collect();
    assert_eq!(ids.len(), 5, "container ids are unique");
    let ps: Vec<&pb::Allocation> = got.iter().filter(|a| a.ask_id == "ps").collect();
    assert_eq!(ps.len(), 2);
    assert_ne!(
        ps[0].node_id, ps[1].node_id,
        "one GPU per node: the gang spans both"
    );
    assert!(ps.iter().all(|a| a.gpu_indices == vec![0]));

    // A node reports another node's container as failed: nothing of it
    // reaches the state (the ends the master sees below are the real ones).
    {
        use weft_proto::v1::resource_tracker_client::ResourceTrackerClient;
        let mut rt = ResourceTrackerClient::new(
            crate::secure::channel_as_node(&cluster.members[leader].addr, "node-x").await,
        );
        // No token key: never offered work, so nothing is placed on it.
        rt.register_node(pb::RegisterNodeRequest {
            node_id: "node-x".into(),
            hostname: "node-x".into(),
            container_manager_address: "127.0.0.1:9".into(),
            capacity: Some(pb::NodeCapacity {
                vcores_milli: 1000,
                memory_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let forged = pb::ContainerStatus {
            container_id: got[0].container_id.clone(),
            state: pb::ContainerState::Failed as i32,
            ..Default::default()
        };
        let r = rt
            .node_heartbeat(pb::NodeHeartbeatRequest {
                node_id: "node-x".into(),
                containers: vec![forged],
                sequence: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.containers_acknowledged, vec![got[0].container_id.clone()]);
    }

    // Run them on their agents.
    for a in &got {
        let mut cm = ContainerManagerClient::new(
            crate::secure::channel(&a.node_address, weft_common::tls::Role::Agent).await,
        );
        cm.start_container(pb::StartContainerRequest {
            container_id: a.container_id.clone(),
            command: "sh".into(),
            args: vec!["-c".into(), "sleep 0.5".into()],
            resources: Some(pb::ContainerResources {
                vcores_milli: a.resources.unwrap().vcores_milli,
                memory_bytes: 64 << 20,
                gpu_indices: a.gpu_indices.clone(),
                ..Default::default()
            }),
            token: a.container_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Their ends come back to the master.
    let mut done: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() < 5 {
        assert!(Instant::now() < deadline, "completions seen: {done:?}");
        let r = am
            .allocate(pb::AllocateRequest {
                application_id: app.clone(),
                application_token: token.clone(),
                wait_ms: 2000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for c in r.completed {
            assert_eq!(c.state(), pb::ContainerState::Succeeded, "{c:?}");
            done.insert(c.container_id);
        }
    }
    assert_eq!(
        client
            .cluster_status()
            .await
            .unwrap()
            .used
            .unwrap()
            .vcores_milli,
        0
    );

    // Two half-GPU notebooks share one device (pack keeps the other whole).
    let mut nb = ask("notebook", 2, 1, 0, "");
    if let Some(r) = nb.resources.as_mut() {
        r.gpu_share_milli = 500;
        r.gpu_memory_bytes = 10 << 30;
    }
    let mut asks = vec![nb];
    let shares = allocate_until(&mut am, &app, &token, &mut asks, 2).await;
    assert_eq!(shares[0].node_id, shares[1].node_id);
    assert_eq!(shares[0].gpu_indices, shares[1].gpu_indices);
    assert!(shares
        .iter()
        .all(|a| a.gpu_share_milli == 500 && a.gpu_memory_bytes == 10 << 30));
    assert_eq!(
        client.cluster_status().await.unwrap().used.unwrap().gpus,
        0,
        "no whole GPU taken"
    );
    for a in &shares {
        let mut cm = ContainerManagerClient::new(
            crate::secure::channel(&a.node_address, weft_common::tls::Role::Agent).await,
        );
        cm.start_container(pb::StartContainerRequest {
            container_id: a.container_id.clone(),
            command: "true".into(),
            resources: Some(pb::ContainerResources {
                vcores_milli: a.resources.unwrap().vcores_milli,
                memory_bytes: 64 << 20,
                gpu_indices: a.gpu_indices.clone(),
                gpu_share_milli: a.gpu_share_milli,
                gpu_memory_bytes: a.gpu_memory_bytes,
                ..Default::default()
            }),
            token: a.container_token.clone(),
            ..Default::default()
        })
        .await
        .expect("the agent takes both shares of one GPU");
    }

    // A released container is stopped by its agent.
    let mut one = vec![ask("extra", 1, 1, 0, "")];
    let extra = allocate_until(&mut am, &app, &token, &mut one, 1)
        .await
        .remove(0);
    let mut cm = ContainerManagerClient::new(
        crate::secure::channel(&extra.node_address, weft_common::tls::Role::Agent).await,
    );
    cm.start_container(pb::StartContainerRequest {
        container_id: extra.container_id.clone(),
        command: "sleep".into(),
        args: vec!["1000".into()],
        resources: Some(pb::ContainerResources {
            vcores_milli: extra.resources.unwrap().vcores_milli,
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        token: extra.container_token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    am.allocate(pb::AllocateRequest {
        application_id: app.clone(),
        application_token: token.clone(),
        releases: vec![extra.container_id.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = cm
            .get_container_status(pb::GetContainerStatusRequest {
                container_id: extra.container_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state() == pb::ContainerState::Killed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "released container still {:?}",
            s.state()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    am.finish_application_master(pb::FinishApplicationMasterRequest {
        application_id: app.clone(),
        application_token: token.clone(),
        final_status: pb::FinalStatus::Succeeded as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        client.get_application(&app).await.unwrap().state(),
        pb::ApplicationState::Succeeded
    );
}
