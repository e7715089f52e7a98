//! Membership changes at runtime, under a stream of submissions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use weft_client::proto as pb;

use crate::cluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_added_and_removed_under_load() {
    let mut cluster = Cluster::start(3, 50);
    let leader = cluster.leader().await;
    // The load: submissions until told to stop; every one must be acknowledged.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let client = cluster.client();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = client
                    .submit(&crate::cluster::job("load", "root"), "yaml", "ops")
                    .await
                    .expect("submission under membership change");
                acked.lock().unwrap().push(id);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Add member 4: start it empty with --join, then add it.
    let new = cluster.spawn_joiner();
    let (new_id, new_addr) = (cluster.members[new].id, cluster.members[new].addr.clone());
    let admin = cluster.client();
    admin.add_member(new_id, &new_addr).await.unwrap();
    let commit = admin.cluster_status().await.unwrap().commit_index;
    let caught = cluster.wait_applied(new, commit).await;
    assert!(
        caught.snapshot_index > 0,
        "the new member started from a snapshot: {caught:?}"
    );
    assert!(cluster
        .log_text(new)
        .contains("installed snapshot from the leader"));
    // It joined as a learner, and the leader made it a voter once it had
    // caught up (under the load): wait for that, as an operator would
    // before removing an old member.
    let mut voted = false;
    for _ in 0..200 {
        let s = admin.cluster_status().await.unwrap();
        if s.members.iter().any(|m| m.id == new_id && !m.is_learner) {
            voted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(voted, "the new member was never promoted");
    // (Log lines as text: without their colour codes.)
    let raw: String = (0..3).map(|i| cluster.log_text(i)).collect();
    let mut logs = String::with_capacity(raw.len());
    let mut in_escape = false;
    for c in raw.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => logs.push(c),
        }
    }
    assert!(
        logs.contains(&format!("learners=[{new_id}]")),
        "it was not added as a learner"
    );
    assert!(
        logs.contains("learner caught up: promoting it to voter"),
        "no member promoted it"
    );

    // Remove a follower that is not the new member.
    let gone = (0..3).find(|&i| i != leader).unwrap();
    let gone_id = cluster.members[gone].id;
    admin.remove_member(gone_id).await.unwrap();
    cluster.kill(gone);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();

    let status = admin.cluster_status().await.unwrap();
    let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert!(ids.contains(&new_id) && !ids.contains(&gone_id), "{ids:?}");
    assert_eq!(ids.len(), 3);
    let m = status.members.iter().find(|m| m.id == new_id).unwrap();
    assert_eq!(m.address, new_addr);

    // Bad changes are refused, naming the field.
    let e = admin.add_member(new_id, &new_addr).await.unwrap_err();
    assert_eq!(e.to_string(), format!("id: {new_id} is already a member"));
    let e = admin.remove_member(99).await.unwrap_err();
    assert_eq!(e.to_string(), "id: 99 is not a member");

    // The new member is a full voter: with the leader gone, it and the last
    // original member elect a leader and take writes.
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let client = cluster.client();
    let after = client
        .submit(&crate::cluster::job("after", "root"), "yaml", "ops")
        .await
        .unwrap();
    let all: Vec<String> = client
        .list_applications(pb::ListApplicationsRequest::default())
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.application_id)
        .collect();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "the load ran: {} submissions",
        acked.len()
    );
    for id in acked.iter().chain([&after]) {
        assert!(all.contains(id), "acknowledged {id} missing");
    }
    assert_eq!(all.len(), acked.len() + 1, "no duplicates");
}
