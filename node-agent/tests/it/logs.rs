//! Logs: read back, from an offset, followed while running, and retention.

use std::time::{Duration, Instant};

use weft_proto::v1 as pb;

use crate::harness::*;

#[tokio::test]
async fn logs_read_back_and_followed() {
    let mut agent = TestAgent::start("logs", |_| {}).await;
    let script = "echo one; sleep 0.6; echo two; echo err >&2; sleep 0.3; echo three";
    start(&mut agent.client, spec("talk", script, 16 * MIB)).await;
    let t0 = Instant::now();
    // Following from the start returns everything, in order, and ends with the container.
    let followed = read_log(&mut agent.client, "talk", pb::LogStream::Stdout, 0, true).await;
    assert_eq!(followed, "one\ntwo\nthree\n");
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "follow waited for the container"
    );
    let s = wait_end(&mut agent.client, "talk", Duration::from_secs(5)).await;
    assert_eq!(s.state(), pb::ContainerState::Succeeded);
    // After the end: by offset, and stderr.
    assert_eq!(
        read_log(&mut agent.client, "talk", pb::LogStream::Stdout, 4, false).await,
        "two\nthree\n"
    );
    assert_eq!(
        read_log(&mut agent.client, "talk", pb::LogStream::Stderr, 0, false).await,
        "err\n"
    );
    assert_eq!(
        read_log(
            &mut agent.client,
            "talk",
            pb::LogStream::Stdout,
            1000,
            false
        )
        .await,
        ""
    );
    // Big output arrives whole, in several chunks.
    start(
        &mut agent.client,
        spec("big", "head -c 300000 /dev/zero | tr '\\0' x", 32 * MIB),
    )
    .await;
    wait_end(&mut agent.client, "big", Duration::from_secs(10)).await;
    let big = read_log(&mut agent.client, "big", pb::LogStream::Stdout, 0, false).await;
    assert_eq!(big.len(), 300000);
    assert!(big.bytes().all(|b| b == b'x'));
    agent.shutdown().await;
}

#[tokio::test]
async fn logs_removed_after_retention() {
    let mut agent = TestAgent::start("retention", |c| {
        c.logs.retention = Duration::from_millis(500);
        c.logs.sweep_interval = Duration::from_millis(100);
    })
    .await;
    start(&mut agent.client, spec("brief", "echo bye", 16 * MIB)).await;
    wait_end(&mut agent.client, "brief", Duration::from_secs(5)).await;
    let dir = agent.work_dir().join("logs/brief");
    assert!(dir.exists());
    eventually("logs removed", Duration::from_secs(5), || !dir.exists()).await;
    let err = agent
        .client
        .read_logs(pb::ReadLogsRequest {
            container_id: "brief".into(),
            stream: 0,
            offset: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("retention"), "{}", err.message());
    // The record went with its logs.
    let st = agent
        .client
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: "brief".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound);
    agent.shutdown().await;
}

#[tokio::test]
async fn logs_kept_within_disk_budget() {
    let mut agent = TestAgent::start("budget", |c| {
        c.logs.disk_budget = bytesize::ByteSize::kib(150);
        c.logs.sweep_interval = Duration::from_millis(100);
    })
    .await;
    for id in ["b1", "b2", "b3"] {
        start(
            &mut agent.client,
            spec(id, "head -c 100000 /dev/zero", 16 * MIB),
        )
        .await;
        wait_end(&mut agent.client, id, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = agent.work_dir().join("logs");
    // 300 kB of logs with a 150 KiB budget: the two oldest go, the newest stays.
    eventually("oldest logs removed", Duration::from_secs(5), || {
        !logs.join("b1").exists() && !logs.join("b2").exists()
    })
    .await;
    assert!(logs.join("b3/stdout").exists());
    agent.shutdown().await;
}

/// A client following a running container's log must not hold up the agent's
/// shutdown: the container is stopped, the stream ends, the agent returns.
#[tokio::test]
async fn shutdown_with_a_log_follower_connected() {
    let mut agent = TestAgent::start("follower", |_| {}).await;
    start(
        &mut agent.client,
        spec("long", "echo started; exec sleep 1000", 16 * MIB),
    )
    .await;
    let mut follower = agent.client.clone();
    let follow = tokio::spawn(async move {
        read_log(&mut follower, "long", pb::LogStream::Stdout, 0, true).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    agent.shutdown().await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let out = tokio::time::timeout(Duration::from_secs(5), follow)
        .await
        .expect("stream ended")
        .unwrap();
    assert_eq!(out, "started\n");
}

/// Log reads served at once are bounded (`logs.max_streams`): with every
/// place taken by followers of a running container, one more read is
/// refused naming the bound (RESOURCE_EXHAUSTED), and served once a
/// follower goes away. Before, every follower held a task and an open file
/// for as long as it liked, without bound.
#[tokio::test]
async fn log_reads_at_once_are_bounded_and_a_freed_place_is_served() {
    let mut agent = TestAgent::start("streams", |c| c.logs.max_streams = 3).await;
    start(
        &mut agent.client,
        spec("chatty", "echo hi; exec sleep 30", 16 * MIB),
    )
    .await;
    let req = |follow| pb::ReadLogsRequest {
        container_id: "chatty".into(),
        stream: pb::LogStream::Stdout as i32,
        offset: 0,
        follow,
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = agent
            .client
            .read_logs(req(true))
            .await
            .unwrap()
            .into_inner();
        // Served: the output so far arrives.
        assert_eq!(s.message().await.unwrap().unwrap().data, b"hi\n");
        held.push(s);
    }
    let e = agent.client.read_logs(req(false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().starts_with("logs: 3 log reads"), "{e}");
    assert!(e.message().contains("logs.max_streams"), "{e}");
    // A follower goes away: its place is given back (the agent sees the
    // stream closed within its poll).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = loop {
        match agent.client.read_logs(req(false)).await {
            Ok(s) => break s.into_inner(),
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut got = got;
    assert_eq!(got.message().await.unwrap().unwrap().data, b"hi\n");
    drop(held);
    agent.shutdown().await;
}
