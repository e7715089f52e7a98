//! Registration and heartbeats against a ResourceTracker served in the test
//! (the real resource manager comes with its own crate): the agent retries
//! while nothing answers, registers with its capacity, reports containers,
//! and stops what the RM asks it to stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};
use weft_proto::v1 as pb;
use weft_proto::v1::resource_tracker_server::{ResourceTracker, ResourceTrackerServer};

use crate::harness::*;

#[derive(Default)]
struct Seen {
    registrations: Vec<pb::RegisterNodeRequest>,
    heartbeats: Vec<pb::NodeHeartbeatRequest>,
}

#[derive(Clone, Default)]
struct FakeRm {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<Mutex<Vec<String>>>,
    /// The node_expiry it tells agents (0: none).
    expiry_ms: u64,
}

#[tonic::async_trait]
impl ResourceTracker for FakeRm {
    async fn register_node(
        &self,
        r: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.seen.lock().unwrap().registrations.push(r.into_inner());
        Ok(Response::new(pb::RegisterNodeResponse {
            heartbeat_interval_ms: 100,
            leader_address: String::new(),
            token_public_key: test_signer().public_key().to_vec(),
            node_expiry_ms: self.expiry_ms,
            leader_clock_ms: weft_proto::token::now_ms(),
            // An RM that sends no key list: the one key is the group's.
            ..Default::default()
        }))
    }

    async fn node_heartbeat(
        &self,
        r: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        let hb = r.into_inner();
        // Ended containers are stored at once, as the RM does: acknowledged.
        let ended: Vec<String> = hb
            .containers
            .iter()
            .filter(|c| is_terminal(c))
            .map(|c| c.container_id.clone())
            .collect();
        self.seen.lock().unwrap().heartbeats.push(hb);
        Ok(Response::new(pb::NodeHeartbeatResponse {
            containers_to_stop: std::mem::take(&mut *self.stop.lock().unwrap()),
            containers_acknowledged: ended,
            node_expiry_ms: self.expiry_ms,
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn registers_when_an_rm_appears_and_heartbeats() {
    // Reserve a port, but serve nothing on it yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rm_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut agent = TestAgent::start("tracker", |c| {
        c.rm_addresses = vec![rm_addr.to_string()];
        c.heartbeat.max_backoff = Duration::from_millis(300);
        c.labels.insert("zone".into(), "a".into());
        c.node_id = Some("test-tracker".into());
        // No configured key: the agent learns the RM's at registration.
        c.security.token_public_key = None;
    })
    .await;
    // No RM yet: the agent serves, but cannot check a token, so starts
    // nothing; the refusal is transient (UNAVAILABLE: try later or elsewhere).
    let mut work = spec("work", "exec sleep 30", 16 * MIB);
    work.resources.as_mut().unwrap().vcores_milli = 500;
    work.token = token_for(&work, "test-tracker");
    let e = agent
        .client
        .start_container(work.clone())
        .await
        .expect_err("no key yet");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(
        e.message().contains("no resource-manager key yet"),
        "{}",
        e.message()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;

    let rm = FakeRm::default();
    let listener = tokio::net::TcpListener::bind(rm_addr).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ResourceTrackerServer::new(rm.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let seen = rm.seen.clone();
    eventually("registration", Duration::from_secs(10), || {
        !seen.lock().unwrap().registrations.is_empty()
    })
    .await;
    {
        let s = seen.lock().unwrap();
        let reg = &s.registrations[0];
        assert_eq!(reg.node_id, "test-tracker");
        assert_eq!(reg.container_manager_address, agent.addr.to_string());
        let cap = reg.capacity.as_ref().unwrap();
        assert_eq!(cap.vcores_milli, 4000);
        assert_eq!(cap.memory_bytes, 4 << 30);
        assert_eq!(reg.labels.get("zone").map(String::as_str), Some("a"));
        assert!(reg.token_public_key.is_empty(), "it held no key yet");
    }
    // Registered: the RM's key is known (once the answer is read) and the
    // same token now works.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Err(e) = agent.client.start_container(work.clone()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after registration: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually(
        "heartbeats with the running container",
        Duration::from_secs(5),
        || {
            seen.lock().unwrap().heartbeats.iter().any(|h| {
                h.containers
                    .iter()
                    .any(|c| c.container_id == "work" && c.state() == pb::ContainerState::Running)
            })
        },
    )
    .await;
    // Heartbeats say which key the agent holds: the RM's (so the RM can
    // offer it work).
    assert!(seen
        .lock()
        .unwrap()
        .heartbeats
        .iter()
        .all(|h| h.token_public_key == test_signer().public_key()));
    // The RM asks for the container to be stopped.
    rm.stop.lock().unwrap().push("work".into());
    let s = wait_end(&mut agent.client, "work", Duration::from_secs(10)).await;
    assert_eq!(s.state(), pb::ContainerState::Killed);
    eventually("the stop is reported", Duration::from_secs(5), || {
        seen.lock().unwrap().heartbeats.iter().any(|h| {
            h.containers
                .iter()
                .any(|c| c.container_id == "work" && c.state() == pb::ContainerState::Killed)
        })
    })
    .await;
    // Acknowledged: later heartbeats no longer carry it, and what they say
    // is in use counts only running containers (none now; one before).
    let acked_at = seen.lock().unwrap().heartbeats.len();
    eventually(
        "three heartbeats after the ack",
        Duration::from_secs(5),
        || seen.lock().unwrap().heartbeats.len() >= acked_at + 3,
    )
    .await;
    {
        let s = seen.lock().unwrap();
        for h in &s.heartbeats[acked_at..] {
            assert!(
                h.containers.iter().all(|c| c.container_id != "work"),
                "an acknowledged container was reported again: {h:?}"
            );
            assert_eq!(h.utilization.as_ref().unwrap().running_containers, 0);
        }
        let running = s
            .heartbeats
            .iter()
            .find(|h| {
                h.containers
                    .iter()
                    .any(|c| c.container_id == "work" && c.state() == pb::ContainerState::Running)
            })
            .unwrap();
        let used = running.utilization.as_ref().unwrap();
        assert_eq!(used.running_containers, 1);
        assert_eq!(used.vcores_used_milli, 500);
    }
    let seqs: Vec<u64> = seen
        .lock()
        .unwrap()
        .heartbeats
        .iter()
        .map(|h| h.sequence)
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    agent.shutdown().await;
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// With `node_expiry` 2 s: an RM that is down (its port refuses
/// connections) is ridden out, the container keeps running well past the
/// expiry; an RM that accepts connections and never answers (a partition's
/// far side, a frozen member) is not, and the node kills its container
/// before the expiry would have passed on the RM's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_rm_is_ridden_out_and_a_silent_one_fences_the_node() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rm_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut agent = TestAgent::start("fence", |c| {
        c.rm_addresses = vec![rm_addr.to_string()];
        c.heartbeat.interval = Duration::from_millis(100);
        c.heartbeat.max_backoff = Duration::from_millis(200);
        c.node_id = Some("test-fence".into());
    })
    .await;
    let rm = FakeRm {
        expiry_ms: 2000,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(rm_addr).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ResourceTrackerServer::new(rm.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    let seen = rm.seen.clone();
    eventually("registration", Duration::from_secs(10), || {
        !seen.lock().unwrap().registrations.is_empty()
    })
    .await;
    let mut work = spec("work", "exec sleep 1000", 16 * MIB);
    work.token = token_for(&work, "test-fence");
    let s = agent
        .client
        .start_container(work)
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let pid = s.pid as i32;
    eventually(
        "a heartbeat renews the lease",
        Duration::from_secs(5),
        || seen.lock().unwrap().heartbeats.len() >= 2,
    )
    .await;

    // Down: nothing listens on the RM's port.
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !weft_node_agent::procfs::is_zombie(pid),
        "the container rode out 5 s of an RM that refuses connections"
    );
    let s = agent
        .client
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: "work".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::ContainerState::Running, "{s:?}");

    // Silent: the port accepts connections, nothing answers.
    let silent = std::net::TcpListener::bind(rm_addr).unwrap();
    let cut = std::time::Instant::now();
    let s = wait_end(&mut agent.client, "work", Duration::from_secs(10)).await;
    let after = cut.elapsed();
    assert!(
        weft_node_agent::procfs::is_zombie(pid),
        "the container's process is gone"
    );
    eprintln!("fenced {after:?} after the RM went silent");
    assert!(
        after < Duration::from_millis(2000),
        "killed within the RM's node_expiry: {after:?}"
    );
    assert_eq!(s.state(), pb::ContainerState::Killed, "{s:?}");
    let exit = s.exit.unwrap();
    assert_eq!(exit.exit_status, weft_proto::exit_codes::FENCED, "{exit:?}");
    assert!(
        exit.diagnostic.contains("node_expiry is 2s"),
        "{}",
        exit.diagnostic
    );
    drop(silent);
}
