//! Applications on a real group: what the state keeps of finished ones,
//! and how they are listed.

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

/// ListApplications goes page by page in id order, with filters that
/// combine; a bad page size or token is refused naming the field; `rmctl
/// app list` filters the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_are_listed_in_pages_with_filters() {
    use weft_client::proto as pb;
    let cluster = Cluster::start(3, 1000);
    let client = cluster.client();
    let mut ids = Vec::new();
    for i in 0..7 {
        let spec = SPEC.replace("name: job", &format!("name: job{}", i % 2));
        let user = if i < 4 { "ann" } else { "bob" };
        ids.push(client.submit(&spec, "yaml", user).await.unwrap());
    }
    client.kill_application(&ids[1]).await.unwrap();
    client.kill_application(&ids[5]).await.unwrap();
    // Pages of 3: 3 + 3 + 1, in id order, each token leading to the next.
    let mut req = pb::ListApplicationsRequest {
        page_size: 3,
        ..Default::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = client.list_applications_page(req.clone()).await.unwrap();
        pages.push(
            page.applications
                .iter()
                .map(|a| a.application_id.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(pages, [&ids[0..3], &ids[3..6], &ids[6..7]]);
    // Filters combine; the client follows the pages itself.
    let listed = |req: pb::ListApplicationsRequest| {
        let client = &client;
        async move {
            client
                .list_applications(req)
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.application_id)
                .collect::<Vec<_>>()
        }
    };
    let killed = pb::ApplicationState::Killed as i32;
    assert_eq!(
        listed(pb::ListApplicationsRequest {
            states: vec![killed],
            page_size: 1,
            ..Default::default()
        })
        .await,
        [ids[1].clone(), ids[5].clone()]
    );
    assert_eq!(
        listed(pb::ListApplicationsRequest {
            user: "bob".into(),
            name: "job0".into(),
            ..Default::default()
        })
        .await,
        [ids[4].clone(), ids[6].clone()]
    );
    for (req, field) in [
        (
            pb::ListApplicationsRequest {
                page_size: 10_001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListApplicationsRequest {
                page_token: "x".repeat(65),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let e = client.list_applications_page(req).await.unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    // The same filters from rmctl.
    let all = cluster.addrs().join(",");
    let out = tokio::task::spawn_blocking(move || {
        crate::rmctl::run(
            &[
                "app", "list", "--state", "killed", "--user", "ann", "-o", "json",
            ],
            &all,
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&crate::rmctl::stdout(&out)).unwrap();
    let got: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[1].as_str()]);
}
