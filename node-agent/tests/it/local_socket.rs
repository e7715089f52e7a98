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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_own_node_on_a_unix_socket_and_only_to_its_users() {
    let mut agent = TestAgent::start("local", |_| {}).await;
    let sock = agent.work_dir().join("agent.sock");
    // (The test's TCP listener answers before the agent has set up.)
    eventually("the agent's socket", Duration::from_secs(10), || {
        sock.exists()
    })
    .await;

    // Every container is told where it is and which node it is on.
    start(
        &mut agent.client,
        spec(
            "envs",
            "echo \"$WEFT_NODE_ID $WEFT_AGENT_SOCKET\"",
            32 * MIB,
        ),
    )
    .await;
    let done = wait_end(&mut agent.client, "envs", Duration::from_secs(20)).await;
    assert_eq!(done.state(), pb::ContainerState::Succeeded, "{done:?}");
    let out = read_log(&mut agent.client, "envs", pb::LogStream::Stdout, 0, false).await;
    assert_eq!(out.trim(), format!("{TEST_NODE} {}", sock.display()));

    // The same API over it: a start (its token checked as ever) and a
    // status.
    let path = sock.clone();
    let ch = tonic::transport::Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
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
