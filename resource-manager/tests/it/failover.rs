//! Crashes: the leader killed during a stream of submissions, a member
//! restarted behind a compacted log, the whole group restarted.

use std::collections::BTreeSet;
use std::time::Duration;

use weft_client::proto as pb;

use crate::cluster::Cluster;

const SPEC: &str = "name: job\nqueue: root\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: { vcores: 1, memory: 64MiB }\n";

pub async fn all_app_ids(c: &weft_client::RmClient) -> Vec<String> {
    c.list_applications(pb::ListApplicationsRequest::default())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.application_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_submissions_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3, 1000);
    let leader = cluster.leader().await;
    let client = cluster.client();
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            cluster.kill(leader);
        }
        // The client retries across the election; no error reaches the caller.
        let id = client
            .submit(SPEC, "yaml", "alice")
            .await
            .unwrap_or_else(|e| panic!("submission {i} failed: {e}"));
        acked.push(id);
    }
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader, "a new leader was elected");
    let ids = all_app_ids(&client).await;
    let present: BTreeSet<&String> = ids.iter().collect();
    for id in &acked {
        assert!(
            present.contains(id),
            "acknowledged {id} missing on the new leader"
        );
    }
    // Retries never created a second application.
    assert_eq!(ids.len(), acked.len(), "{ids:?}");
    let unique: BTreeSet<&String> = acked.iter().collect();
    assert_eq!(
        unique.len(),
        acked.len(),
        "an application id was handed out twice"
    );

    // The killed member comes back and catches up.
    let status = client.cluster_status().await.unwrap();
    cluster.spawn(leader);
    let back = cluster.wait_applied(leader, status.commit_index).await;
    assert_eq!(back.leader_id, cluster.members[new_leader].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_behind_a_compacted_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start(3, 20);
    let leader = cluster.leader().await;
    let client = cluster.client();
    let follower = (leader + 1) % 3;
    client.submit(SPEC, "yaml", "bob").await.unwrap();
    let before = client
        .member_status(&cluster.members[follower].addr)
        .await
        .unwrap();
    cluster.kill(follower);
    for _ in 0..100 {
        client.submit(SPEC, "yaml", "bob").await.unwrap();
    }
    let leader_status = client.cluster_status().await.unwrap();
    assert!(
        leader_status.snapshot_index > before.applied_index,
        "the leader compacted past the follower's position ({} <= {})",
        leader_status.snapshot_index,
        before.applied_index
    );
    cluster.spawn(follower);
    let caught = cluster
        .wait_applied(follower, leader_status.commit_index)
        .await;
    assert!(caught.snapshot_index > before.applied_index, "{caught:?}");
    assert!(
        cluster
            .log_text(follower)
            .contains("installed snapshot from the leader"),
        "the follower caught up through a snapshot"
    );
    assert_eq!(all_app_ids(&client).await.len(), 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_group_restarted_keeps_its_state() {
    let mut cluster = Cluster::start(3, 7);
    cluster.leader().await;
    let client = cluster.client();
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(client.submit(SPEC, "yaml", "carol").await.unwrap());
    }
    client.kill_application(&ids[3]).await.unwrap();
    for i in 0..3 {
        cluster.kill(i);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..3 {
        cluster.spawn(i);
    }
    cluster.leader().await;
    let client = cluster.client();
    let after = all_app_ids(&client).await;
    assert_eq!(after, ids);
    let killed = client.get_application(&ids[3]).await.unwrap();
    assert_eq!(killed.state(), pb::ApplicationState::Killed);
    let other = client.get_application(&ids[4]).await.unwrap();
    assert_eq!(other.state(), pb::ApplicationState::Submitted);
    // New ids continue the sequence: none is handed out twice.
    let next = client.submit(SPEC, "yaml", "carol").await.unwrap();
    assert!(!ids.contains(&next), "{next} reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_send_callers_to_the_leader_and_bad_input_is_named() {
    let mut cluster = Cluster::start(3, 1000);
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    // Straight to a follower: NotLeader with the leader's address.
    let mut raw = pb::client_service_client::ClientServiceClient::new(
        crate::secure::channel(&cluster.members[follower].addr, weft_common::tls::Role::Rm).await,
    );
    let e = raw
        .submit_application(crate::secure::request(pb::SubmitApplicationRequest {
            spec: SPEC.into(),
            spec_format: "yaml".into(),
            user: "x".into(),
            request_id: "r1".into(),
            unmanaged_master: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(
        e.metadata().get("weft-leader").unwrap().to_str().unwrap(),
        cluster.members[leader].addr
    );
    assert!(
        e.message().contains(&cluster.members[leader].addr),
        "{}",
        e.message()
    );
    // The client library follows it.
    let client = crate::secure::client([cluster.members[follower].addr.clone()]);
    client.submit(SPEC, "yaml", "x").await.unwrap();
    // Bad input: one clear error naming the field; nothing stored.
    let e = client.submit("", "yaml", "x").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert_eq!(e.to_string(), "spec: must not be empty");
    let e = client.submit("name = ", "toml", "x").await.unwrap_err();
    assert!(
        e.to_string().starts_with("spec: not a valid job spec"),
        "{e}"
    );
    let cyclic = "name: c\nstages:\n  - name: a\n    after: [b]\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n  - name: b\n    after: [a]\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n";
    let e = client.submit(cyclic, "yaml", "x").await.unwrap_err();
    assert_eq!(e.to_string(), "stages.after: a cycle: a -> b -> a");
    let e = client.get_application("app-999999").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::NotFound));
    assert_eq!(e.to_string(), "application_id: no application app-999999");
    assert_eq!(all_app_ids(&client).await.len(), 1);
    // SIGTERM stops a member cleanly (its peers' open streams do not hold it).
    assert!(cluster.terminate(follower).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_acknowledges_nothing_and_follows_the_new_leader_when_thawed() {
    // A real fault, not a switch in the code: the leader process is stopped
    // (SIGSTOP) while its peers and clients go on. Partitions proper are
    // tested in-process over the in-memory network (transport::memory).
    let cluster = Cluster::start(3, 1000);
    let old = cluster.leader().await;
    let client = cluster.client();
    let mut acked = vec![client.submit(SPEC, "yaml", "erin").await.unwrap()];
    cluster.freeze(old);
    // Straight to the frozen member: nothing is acknowledged.
    let lonely = crate::secure::client([cluster.members[old].addr.clone()])
        .with_deadline(Duration::from_secs(2));
    let e = lonely.submit(SPEC, "yaml", "erin").await.unwrap_err();
    eprintln!("frozen member answered: {e}");
    // The other two elect a leader and go on.
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = cluster.leader_among(&others).await;
    let majority = crate::secure::client(others.iter().map(|&i| cluster.members[i].addr.clone()))
        .with_deadline(Duration::from_secs(30));
    for _ in 0..10 {
        acked.push(majority.submit(SPEC, "yaml", "erin").await.unwrap());
    }
    // Thawed, it still believes it leads until it hears the new term: a
    // client that reaches it at once is answered by the new leader (sent on,
    // or the stale leader's proposal fails and the client retries).
    cluster.thaw(old);
    let thawed = crate::secure::client([cluster.members[old].addr.clone()])
        .with_deadline(Duration::from_secs(30));
    acked.push(thawed.submit(SPEC, "yaml", "erin").await.unwrap());
    // Its leader-only tasks stopped together when it stepped down, and the
    // new leader's started on its election (from the role watch).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cluster
        .log_text(old)
        .contains("stepped down: leader tasks stopped")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the thawed member never stopped its leader tasks"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cluster
        .log_text(new)
        .contains("elected: leader tasks starting"));
    // It follows the new leader and catches up; exactly the acknowledged
    // submissions exist, each once.
    let commit = majority.cluster_status().await.unwrap().commit_index;
    let back = cluster.wait_applied(old, commit).await;
    assert_eq!(back.leader_id, cluster.members[new].id);
    let ids = all_app_ids(&client).await;
    assert_eq!(ids, acked, "exactly the acknowledged submissions exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_racing_a_leader_freeze_takes_effect_at_most_once() {
    // The impatient case of the test above: the submission leaves the
    // instant the leader is signalled, so the leader may still replicate it
    // before it stops. Unanswered, it may or may not take effect (Raft lets
    // the next leader commit it); it must never take effect twice, and
    // nothing acknowledged may be lost.
    let cluster = Cluster::start(3, 1000);
    let old = cluster.leader().await;
    let client = cluster.client();
    let mut acked = vec![client.submit(SPEC, "yaml", "erin").await.unwrap()];
    let racing = crate::secure::client([cluster.members[old].addr.clone()])
        .with_deadline(Duration::from_secs(2));
    cluster.freeze_now(old);
    let in_doubt = racing.submit(SPEC, "yaml", "erin").await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let majority = crate::secure::client(others.iter().map(|&i| cluster.members[i].addr.clone()))
        .with_deadline(Duration::from_secs(30));
    for _ in 0..3 {
        acked.push(majority.submit(SPEC, "yaml", "erin").await.unwrap());
    }
    cluster.thaw(old);
    let commit = majority.cluster_status().await.unwrap().commit_index;
    cluster.wait_applied(old, commit).await;
    let ids = all_app_ids(&client).await;
    match in_doubt {
        Ok(id) => {
            acked.push(id);
            acked.sort();
            assert_eq!(ids, acked, "an acknowledged submission is there once");
        }
        Err(e) => {
            eprintln!("racing submission unanswered: {e}");
            for id in &acked {
                assert!(ids.contains(id), "acknowledged {id} lost: {ids:?}");
            }
            assert!(
                ids.len() == acked.len() || ids.len() == acked.len() + 1,
                "the unanswered submission took effect more than once: {ids:?} (acknowledged {acked:?})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_holds_no_client_that_was_given_the_others() {
    // A frozen process's kernel still accepts connections; nothing answers.
    // The request timeout is set far beyond the call's deadline, so a
    // client can only succeed by leaving the frozen member early (its
    // connection's keepalive pings go unanswered) and trying the others.
    let cluster = Cluster::start(3, 1000);
    let old = cluster.leader().await;
    let client = crate::secure::client(cluster.addrs())
        .with_deadline(Duration::from_secs(15))
        .with_request_timeout(Duration::from_secs(120));
    // The client learns the leader, which then freezes.
    let first = client.submit(SPEC, "yaml", "erin").await.unwrap();
    cluster.freeze(old);
    let started = std::time::Instant::now();
    let second = client
        .submit(SPEC, "yaml", "erin")
        .await
        .unwrap_or_else(|e| panic!("a submission after the leader froze failed: {e}"));
    eprintln!(
        "submission with the known leader frozen took {:?}",
        started.elapsed()
    );
    // A new client that lists the frozen member first.
    let mut frozen_first = cluster.addrs();
    frozen_first.rotate_left(old);
    let fresh = crate::secure::client(frozen_first)
        .with_deadline(Duration::from_secs(15))
        .with_request_timeout(Duration::from_secs(120));
    let started = std::time::Instant::now();
    for id in [&first, &second] {
        let r = fresh
            .get_application(id)
            .await
            .unwrap_or_else(|e| panic!("reading {id} with the first member frozen failed: {e}"));
        assert_eq!(&r.application_id, id);
    }
    let third = fresh.submit(SPEC, "yaml", "erin").await.unwrap();
    eprintln!(
        "two reads and a submission with the first-listed member frozen took {:?}",
        started.elapsed()
    );
    cluster.thaw(old);
    let ids = all_app_ids(&client).await;
    assert_eq!(ids, vec![first, second, third]);
}
