//! The agent's Unix socket: the same API for the node's own containers (a
//! master starting its tasks without a TLS handshake), told to every
//! container in its environment, and taken only from the agent's user and
//! the users of containers running here.

use std::time::Duration;

use weft_proto::v1 as pb;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

use crate::harness::*;

/// What `python3` sees connecting to `sock` as `uid`: `open` when the agent
/// answered its HTTP/2 preface, `closed` when the agent hung up at once
/// (before the preface was written, too: a broken pipe).
fn probe_as(sock: &std::path::Path, uid: u32) -> String {
    let script = format!(
        "import os, socket, sys\n\
         s = socket.socket(socket.AF_UNIX)\n\
         os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n\
         s.connect({sock:?})\n\
         s.settimeout(5)\n\
         try:\n    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes([0,0,0,4,0,0,0,0,0]))\n    d = s.recv(64)\nexcept (ConnectionResetError, BrokenPipeError):\n    d = b''\n\
         print('open' if d else 'closed')\n",
        sock = sock.display().to_string()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The agent's Unix socket, once it is there (the test's TCP listener
/// answers before the agent has set up).
async fn socket_of(agent: &TestAgent) -> std::path::PathBuf {
    let sock = agent.work_dir().join("agent.sock");
    eventually("the agent's socket", Duration::from_secs(10), || {
        sock.exists()
    })
    .await;
    sock
}

/// What a container running `script` printed; it must succeed.
async fn output_of(agent: &mut TestAgent, id: &str, script: &str) -> String {
    start(&mut agent.client, spec(id, script, 32 * MIB)).await;
    let done = wait_end(&mut agent.client, id, Duration::from_secs(20)).await;
    assert_eq!(done.state(), pb::ContainerState::Succeeded, "{done:?}");
    read_log(&mut agent.client, id, pb::LogStream::Stdout, 0, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_node_on_a_unix_socket_and_only_to_its_users() {
    let mut agent = TestAgent::start("local", |_| {}).await;
    let sock = socket_of(&agent).await;

    // Every container is told where it is and which node it is on.
    let out = output_of(
        &mut agent,
        "envs",
        "echo \"$WEFT_NODE_ID $WEFT_AGENT_SOCKET\"",
    )
    .await;
    assert_eq!(out.trim(), format!("{TEST_NODE} {}", sock.display()));

    // The same API over it: a start (its token checked as ever) and a
    // status.
    let ch = over_socket(sock.clone()).await;
    let mut local = ContainerManagerClient::new(ch);
    let mut unsigned = spec("local-1", "true", 32 * MIB);
    unsigned.token = vec![1, 2, 3];
    let refused = local.start_container(unsigned).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    local
        .start_container(signed(spec("local-1", "true", 32 * MIB)))
        .await
        .unwrap();
    let done = wait_end(&mut agent.client, "local-1", Duration::from_secs(20)).await;
    assert_eq!(done.state(), pb::ContainerState::Succeeded, "{done:?}");
    let status = local
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: "local-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state(), pb::ContainerState::Succeeded);

    // Taken from the agent's user; a user with nothing running here is
    // hung up on.
    if is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(agent.work_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(probe_as(&sock, 0), "open");
        assert_eq!(probe_as(&sock, 65534), "closed");
    } else {
        println!("skipped: the uid check needs root to connect as another user");
    }
    agent.shutdown().await;
}

/// A channel to the agent's Unix socket at `path`.
async fn over_socket(path: std::path::PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// The relays (an agent that knows an RM group passes its containers'
/// calls on): refused over TCP; a start passed on to another node's agent
/// only with a token of the group for that node, to a plain host:port; an
/// agent it cannot reach is said so, with the marker that tells a master to
/// call directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_pass_on_only_over_the_socket_and_only_what_a_token_grants() {
    use weft_proto::v1::agent_relay_client::AgentRelayClient;
    use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
    // (No RM answers at this address: the relays are served all the same.)
    let mut agent = TestAgent::start("relay", |c| {
        c.rm_addresses = vec!["127.0.0.1:1".into()];
    })
    .await;
    let mut peer = TestAgent::start("relay-peer", |c| c.node_id = Some("peer".into())).await;
    let sock = socket_of(&agent).await;

    // Told to its containers.
    let out = output_of(&mut agent, "relay-env", "echo \"relay=$WEFT_AGENT_RELAY\"").await;
    assert_eq!(out.trim(), "relay=1");

    let relayed = |id: &str, address: String, node: &str, token_node: &str| {
        let mut start = spec(id, "echo relayed", 32 * MIB);
        start.token = token_for(&start, token_node);
        pb::RelayedStartRequest {
            agent_address: address,
            node_id: node.into(),
            start: Some(start),
        }
    };
    let peer_addr = peer.addr.to_string();

    // Over TCP: refused, both.
    let tcp = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = AgentRelayClient::new(tcp.clone())
        .start_container_on(relayed("r-tcp", peer_addr.clone(), "peer", "peer"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("Unix socket"), "{e:?}");
    let e = ApplicationMasterServiceClient::new(tcp)
        .allocate(pb::AllocateRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let mut relay = AgentRelayClient::new(over_socket(sock.clone()).await);
    // Not a plain host:port.
    for bad in [
        format!("http://{peer_addr}"),
        "unix:///run/agent.sock".to_string(),
        "127.0.0.1".to_string(),
    ] {
        let e = relay
            .start_container_on(relayed("r-bad", bad.clone(), "peer", "peer"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains("agent_address"), "{e:?}");
    }
    // A token not the group's, or for another node than named.
    let mut forged = relayed("r-forged", peer_addr.clone(), "peer", "peer");
    forged.start.as_mut().unwrap().token = vec![1, 2, 3];
    let e = relay.start_container_on(forged).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = relay
        .start_container_on(relayed("r-other", peer_addr.clone(), "peer", "elsewhere"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("node_id"), "{e:?}");
    // Nothing reached the peer.
    let listed = peer
        .client
        .list_containers(pb::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.containers.is_empty(), "{listed:?}");

    // Passed on: the peer starts it.
    relay
        .start_container_on(relayed("r-ok", peer_addr.clone(), "peer", "peer"))
        .await
        .unwrap();
    let done = wait_end(&mut peer.client, "r-ok", Duration::from_secs(20)).await;
    assert_eq!(done.state(), pb::ContainerState::Succeeded, "{done:?}");
    // The peer's own refusal comes back as it gave it (the container
    // exists now).
    let e = relay
        .start_container_on(relayed("r-ok", peer_addr.clone(), "peer", "peer"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.metadata().get("weft-relay").is_none(), "{e:?}");

    // An agent that does not answer: UNAVAILABLE, marked as the relay's.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = relay
        .start_container_on(relayed("r-gone", closed.to_string(), "peer", "peer"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert_eq!(
        e.metadata().get("weft-relay").and_then(|v| v.to_str().ok()),
        Some("unreachable"),
        "{e:?}"
    );
    peer.shutdown().await;
    agent.shutdown().await;
}
