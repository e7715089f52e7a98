//! What the state keeps of finished applications, on a real group.

use std::time::{Duration, Instant};

use crate::cluster::Cluster;

const SPEC: &str = "name: job\nqueue: root\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: { vcores: 1, memory: 64MiB }\n";

/// With `max_finished_apps = 3`, six submissions of which five are killed
/// leave the three killed last and the one still pending; the first two
/// are gone (NOT_FOUND) and a new submission gets a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_applications_beyond_the_most_kept_are_dropped() {
    // Pruning runs every container_retention / 10: 1 s here.
    let cluster = Cluster::start_with(
        3,
        1000,
        "container_retention = \"10s\"\nmax_finished_apps = 3\n",
    );
    let client = cluster.client();
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(client.submit(SPEC, "yaml", "ann").await.unwrap());
    }
    for id in &ids[..5] {
        client.kill_application(id).await.unwrap();
    }
    let expected: Vec<String> = ids[2..].to_vec();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut now = crate::failover::all_app_ids(&client).await;
        now.sort();
        if now == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {now:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = client.get_application(&ids[0]).await.unwrap_err();
    assert!(gone.to_string().contains("app-000001"), "{gone}");
    let next = client.submit(SPEC, "yaml", "ann").await.unwrap();
    assert_eq!(next, "app-000007");
}
