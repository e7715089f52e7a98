//! Queue configuration from the members' config: replicated by the leader,
//! listed, and enforced at submit.

use std::time::{Duration, Instant};

use crate::cluster::Cluster;

const QUEUES: &str = r#"
[[queues]]
name = "root.research"
guaranteed = { vcores = 64.0, memory = "256GiB", gpus = 8 }
maximum = { vcores = 128.0 }
weight = 2

[[queues]]
name = "root.research.vision"
submit_acl = ["ann"]

[[queues]]
name = "root.prod"
guaranteed = { vcores = 32.0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_queues_are_listed_and_enforced_at_submit() {
    // TOML arrays of tables must follow the top-level keys: the harness puts
    // `extra` before [raft].
    let mut cluster = Cluster::start_with(3, 1000, QUEUES);
    cluster.leader().await;
    let client = cluster.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    let queues = loop {
        let q = client.list_queues().await.unwrap();
        if q.len() == 4 {
            break q;
        }
        assert!(Instant::now() < deadline, "queues not applied: {q:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["root", "root.prod", "root.research", "root.research.vision"]
    );
    let research = queues.iter().find(|q| q.name == "root.research").unwrap();
    assert_eq!(research.guaranteed.as_ref().unwrap().vcores_milli, 64_000);
    assert_eq!(research.guaranteed.as_ref().unwrap().gpus, 8);
    assert_eq!(research.maximum.as_ref().unwrap().vcores_milli, 128_000);

    let ok = client
        .submit(&crate::cluster::job("a", "root.prod"), "yaml", "bob")
        .await
        .unwrap();
    let e = client
        .submit(&crate::cluster::job("a", "root.nope"), "yaml", "bob")
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "queue: no queue root.nope");
    let e = client
        .submit(&crate::cluster::job("a", "root.research"), "yaml", "bob")
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "queue: root.research has sub-queues; submit to one of them"
    );
    let e = client
        .submit(
            &crate::cluster::job("a", "root.research.vision"),
            "yaml",
            "bob",
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "queue: user bob may not submit to root.research.vision"
    );
    client
        .submit(
            &crate::cluster::job("a", "root.research.vision"),
            "yaml",
            "ann",
        )
        .await
        .unwrap();
    let apps = client.list_applications(Default::default()).await.unwrap();
    assert_eq!(apps.len(), 2, "refused submissions stored nothing");
    assert!(apps.iter().any(|a| a.application_id == ok));
    let listed = client.list_queues().await.unwrap();
    let prod = listed.iter().find(|q| q.name == "root.prod").unwrap();
    assert_eq!(prod.pending_applications, 1);

    // Changed at runtime: nothing accepted may lose its queue...
    let without_prod =
        "[[queues]]\nname = \"root.research\"\n[[queues]]\nname = \"root.research.vision\"\n";
    let e = client.set_queues(without_prod).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("queues: root.prod is missing but application {ok} runs in it")
    );
    // ...bad input names the field...
    let e = client
        .set_queues("[[queues]]\nname = \"root.x\"\nwieght = 2\n")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
    assert!(e.to_string().contains("wieght"), "{e}");
    // ...and a valid tree replaces the old one, through the log.
    let new_tree = format!(
        "{QUEUES}\n[[queues]]\nname = \"root.batch\"\nweight = 3\nuser_limit = {{ vcores = 4.0 }}\n"
    );
    client.set_queues(&new_tree).await.unwrap();
    let listed = client.list_queues().await.unwrap();
    let batch = listed
        .iter()
        .find(|q| q.name == "root.batch")
        .expect("root.batch listed");
    assert_eq!(batch.weight, 3);
    assert_eq!(batch.user_limit.as_ref().unwrap().vcores_milli, 4000);
    client
        .submit(&crate::cluster::job("b", "root.batch"), "yaml", "bob")
        .await
        .unwrap();
    // A new leader keeps the runtime tree (its config file only seeds an empty one).
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let client = cluster.client();
    let listed = client.list_queues().await.unwrap();
    assert!(listed.iter().any(|q| q.name == "root.batch"), "{listed:?}");
}
