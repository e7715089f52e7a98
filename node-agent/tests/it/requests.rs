//! Every bad request is refused with a gRPC error naming the field.

use std::time::Duration;

use bytesize::ByteSize;
use tonic::Code;

use crate::harness::*;

async fn refused(client: &mut Client, req: weft_proto::v1::StartContainerRequest) -> tonic::Status {
    client
        .start_container(signed(req))
        .await
        .expect_err("request should be refused")
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_field() {
    let mut agent = TestAgent::start("bad", |c| {
        c.resources.vcores = Some(2.0);
        c.resources.memory = Some(ByteSize::mib(256));
        fake_gpus(c, "GPU-", 2);
    })
    .await;
    let c = &mut agent.client;

    let mut r = spec("a", "true", 16 * MIB);
    r.command = String::new();
    let e = refused(c, r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), "command: must not be empty");

    let e = refused(c, spec("a", "true", 0)).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "resources.memory_bytes: must be greater than zero"
    );

    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().vcores_milli = 3000;
    let e = refused(c, r).await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "resources.vcores_milli: asks 3000 but the node has 2000 free of 2000"
    );

    let e = refused(c, spec("a", "true", 512 * MIB)).await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "resources.memory_bytes: asks 512.0 MiB but the node has 256.0 MiB free of 256.0 MiB"
    );

    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().gpu_indices = vec![7];
    let e = refused(c, r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "resources.gpu_indices: GPU 7 does not exist: this node has GPUs 0..=1"
    );

    let mut r = spec("a", "true", 16 * MIB);
    r.command = "/nonexistent/program".into();
    let e = refused(c, r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .starts_with("command: cannot run \"/nonexistent/program\""),
        "{}",
        e.message()
    );

    // A running container holds GPU 1, 1 vcore and 200 MiB.
    let mut holder = spec("holder", "sleep 30", 200 * MIB);
    holder.resources.as_mut().unwrap().gpu_indices = vec![1];
    holder.resources.as_mut().unwrap().vcores_milli = 1000;
    start(c, holder).await;

    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().gpu_indices = vec![1];
    let e = refused(c, r).await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "resources.gpu_indices: GPU 1 is already given to container holder"
    );

    let e = refused(c, spec("a", "true", 100 * MIB)).await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "resources.memory_bytes: asks 100.0 MiB but the node has 56.0 MiB free of 256.0 MiB"
    );

    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().vcores_milli = 1500;
    let e = refused(c, r).await;
    assert_eq!(
        e.message(),
        "resources.vcores_milli: asks 1500 but the node has 1000 free of 2000"
    );

    let e = refused(c, spec("holder", "true", 16 * MIB)).await;
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(
        e.message(),
        "container_id: holder already exists on this node"
    );

    // GPU 0 shared: two halves fit, a third share and a whole grant do not.
    for (id, milli) in [("half1", 500), ("half2", 500)] {
        let mut r = spec(id, "sleep 30", 16 * MIB);
        r.resources.as_mut().unwrap().gpu_indices = vec![0];
        r.resources.as_mut().unwrap().gpu_share_milli = milli;
        start(c, r).await;
    }
    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().gpu_indices = vec![0];
    r.resources.as_mut().unwrap().gpu_share_milli = 100;
    let e = refused(c, r).await;
    assert_eq!(
        e.message(),
        "resources.gpu_share_milli: GPU 0 has 0/1000 free, 100 asked"
    );
    let mut r = spec("a", "true", 16 * MIB);
    r.resources.as_mut().unwrap().gpu_indices = vec![0];
    let e = refused(c, r).await;
    assert_eq!(
        e.message(),
        "resources.gpu_indices: GPU 0 is shared (1000/1000 in use); it cannot be given whole"
    );
    stop(c, "half1", 100).await;
    stop(c, "half2", 100).await;

    // Nothing refused was kept; what fits still starts.
    let mut ok = spec("a", "true", 16 * MIB);
    ok.resources.as_mut().unwrap().gpu_indices = vec![0];
    start(c, ok).await;
    wait_end(c, "a", Duration::from_secs(5)).await;

    let e = c
        .get_container_status(weft_proto::v1::GetContainerStatusRequest {
            container_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "container_id: no container nope on this node");
    agent.shutdown().await;
}

/// The agent starts nothing without a token the RM signed for exactly that
/// container on this node; forged, expired and stretched tokens are refused.
#[tokio::test]
async fn container_tokens_are_checked() {
    let mut agent = TestAgent::start("tokens", |_| {}).await;
    let c = &mut agent.client;
    let deny = |e: tonic::Status| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        e.message().to_string()
    };
    let req = spec("t1", "true", 16 * MIB);

    let e = c.start_container(req.clone()).await.unwrap_err();
    assert!(deny(e).starts_with("token: no token was given"));

    let mut forged = req.clone();
    let now = weft_proto::token::now_ms();
    forged.token = weft_proto::token::TokenSigner::generate().sign_container(
        &weft_proto::v1::ContainerTokenBody {
            container_id: "t1".into(),
            node_id: TEST_NODE.into(),
            memory_bytes: 16 * MIB,
            expires_at_ms: now + 60_000,
            ..Default::default()
        },
    );
    let e = c.start_container(forged).await.unwrap_err();
    assert_eq!(
        deny(e),
        "token: the token's signature is not the resource manager's"
    );

    let mut expired = req.clone();
    expired.token = test_signer().sign_container(&weft_proto::v1::ContainerTokenBody {
        container_id: "t1".into(),
        node_id: TEST_NODE.into(),
        memory_bytes: 16 * MIB,
        expires_at_ms: now - 5_000,
        ..Default::default()
    });
    let e = c.start_container(expired).await.unwrap_err();
    assert!(deny(e).starts_with("token: the token expired"));

    // A real token, but the request asks for more memory than it grants.
    let mut stretched = req.clone();
    stretched.token = token_for(&req, TEST_NODE);
    stretched.resources.as_mut().unwrap().memory_bytes = 64 * MIB;
    let e = c.start_container(stretched).await.unwrap_err();
    assert!(deny(e).contains("grants memory_bytes 16777216"));

    // Another node's token.
    let mut foreign = req.clone();
    foreign.token = token_for(&req, "other-node");
    let e = c.start_container(foreign).await.unwrap_err();
    assert!(deny(e).contains("grants node other-node"));

    // Nothing refused ran or was kept; the right token starts it.
    assert!(c
        .list_containers(weft_proto::v1::ListContainersRequest {
            include_finished: true
        })
        .await
        .unwrap()
        .into_inner()
        .containers
        .is_empty());
    start(c, req).await;
    let s = wait_end(c, "t1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), weft_proto::v1::ContainerState::Succeeded);
    agent.shutdown().await;
}
