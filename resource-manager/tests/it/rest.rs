//! The REST API over real sockets, as curl and scripts call it: a
//! standalone cluster that runs real jobs (submit in three formats, wait,
//! list, logs with follow, kill, nodes, queues, cluster, bad input of every
//! kind), and three members over mutual TLS with users on (who may see and
//! kill what, a follower passing token callers' calls to the leader and
//! sending certificate callers there with a 307, a leader killed).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use serde_json::json;
use weft_common::http::call::{Http, Reply};

use crate::cluster::Cluster;
use crate::standalone::Standalone;
use crate::tls::{ca_dir, cert, ok, rmctl, trusting};

/// Waits until `addr` takes connections (a user's first try), bounded.
pub(crate) async fn port_answers(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A 4xx/5xx answer's JSON error: its code and field.
fn error(r: &Reply, status: u16, code: &str, field: Option<&str>) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json();
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["field"].as_str(), field, "{v}");
    let m = v["message"].as_str().unwrap().to_string();
    assert!(!m.is_empty());
    m
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn wait_done(api: &Http, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = api.get(&format!("/v1/apps/{id}/wait?timeout=20s")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        if ["succeeded", "failed", "killed"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never finished: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_runs_follows_reads_and_kills_jobs_and_names_every_bad_field() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; the TLS test below covers the secured REST API") {
        return;
    }
    let solo = Standalone::start_with_http();
    let http = solo.http.clone().unwrap();
    let api = Http::plain(&http);
    // A script submits the instant the port answers: no leader yet, no
    // node yet.
    port_answers(&http).await;
    let yaml = "name: hello\nstages:\n  - name: run\n    instances: 2\n    command: 'echo hello-from-rest-$WEFT_TASK_INDEX'\n    resources: { vcores: 0.2, memory: 64MiB }\n";
    let key = [
        ("content-type", "application/yaml"),
        ("idempotency-key", "hello-1"),
    ];
    let r = api.send("POST", "/v1/apps", &key, yaml).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let hello = r.json()["application_id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/apps/{hello}").as_str())
    );
    // A retry with the same key (its answer lost) is the same application.
    let again = api.send("POST", "/v1/apps", &key, yaml).await;
    assert_eq!(again.status, 201, "{}", again.text());
    assert_eq!(again.json()["application_id"], hello.as_str());

    // JSON and TOML specs.
    let json = r#"{"name": "as-json", "stages": [{"name": "run", "command": "true", "resources": {"vcores": 0.2, "memory": "32MiB"}}]}"#;
    let r = api.post("/v1/apps", "application/json", json).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let as_json = r.json()["application_id"].as_str().unwrap().to_string();
    let toml = "name = \"as-toml\"\n[[stages]]\nname = \"run\"\ncommand = \"true\"\nresources = { vcores = 0.2, memory = \"32MiB\" }\n";
    let r = api
        .post("/v1/apps?format=toml", "application/toml", toml)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let as_toml = r.json()["application_id"].as_str().unwrap().to_string();

    // Long polls until each ends.
    let v = wait_done(&api, &hello).await;
    assert_eq!(v["state"], "succeeded", "{v}");
    assert_eq!(v["name"], "hello");
    assert_eq!(v["stages"][0]["done"], 2, "{v}");
    assert_eq!(v["progress"], 1.0);
    assert!(v["finished_at_ms"].as_u64().unwrap() >= v["submitted_at_ms"].as_u64().unwrap());
    for id in [&as_json, &as_toml] {
        assert_eq!(wait_done(&api, id).await["state"], "succeeded");
    }
    let r = api.get(&format!("/v1/apps/{as_json}")).await;
    assert_eq!(r.json()["name"], "as-json", "{}", r.text());

    // A task's output.
    let r = api.get(&format!("/v1/apps/{hello}/logs?task=run/1")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hello-from-rest-1\n");
    let r = api
        .get(&format!("/v1/apps/{hello}/logs?task=run/0&offset=6"))
        .await;
    assert_eq!(r.text(), "from-rest-0\n");
    let r = api
        .get(&format!("/v1/apps/{hello}/logs?task=run/0&stream=stderr"))
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, ""));

    // Followed while it is written, to the task's end.
    let slow = "name: slow\nstages:\n  - name: talk\n    command: 'for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.4; done'\n    resources: { vcores: 0.2, memory: 32MiB }\n";
    let r = api.post("/v1/apps", "application/yaml", slow).await;
    let slow_id = r.json()["application_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let resp = loop {
        let resp = api
            .open(
                "GET",
                &format!("/v1/apps/{slow_id}/logs?task=talk/0&follow=true"),
                &[],
                Vec::new(),
            )
            .await;
        if resp.status() == 200 {
            break resp;
        }
        // Not started yet: its task has no container, or it is not running.
        let (_, body) = resp.into_parts();
        let text = String::from_utf8_lossy(&body.collect().await.unwrap().to_bytes()).into_owned();
        assert!(Instant::now() < deadline, "never followed: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut body = resp.into_body();
    let mut got = String::new();
    let mut first_at = None;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.unwrap().into_data() {
                if !d.is_empty() && first_at.is_none() {
                    first_at = Some(now_ms());
                }
                got.push_str(&String::from_utf8_lossy(&d));
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the follow did not end with the task: {got:?}"
    );
    assert_eq!(
        got,
        (1..=6).map(|i| format!("line-{i}\n")).collect::<String>()
    );
    let v = wait_done(&api, &slow_id).await;
    assert!(
        first_at.unwrap() < v["finished_at_ms"].as_u64().unwrap(),
        "the first line came only after the task ended: {v}"
    );

    // Killed while it runs.
    let sleeper = "name: sleeper\nstages:\n  - name: nap\n    command: 'sleep 600'\n    resources: { vcores: 0.2, memory: 32MiB }\n";
    let r = api.post("/v1/apps", "application/yaml", sleeper).await;
    let nap = r.json()["application_id"].as_str().unwrap().to_string();
    let r = api.post(&format!("/v1/apps/{nap}/kill"), "", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["application_id"], nap.as_str());
    assert_eq!(wait_done(&api, &nap).await["state"], "killed");
    // A wait that times out answers the application as it is.
    let r = api.post("/v1/apps", "application/yaml", sleeper).await;
    let nap2 = r.json()["application_id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let r = api.get(&format!("/v1/apps/{nap2}/wait?timeout=1s")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        ["submitted", "accepted", "running"].contains(&r.json()["state"].as_str().unwrap()),
        "{}",
        r.text()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // Lists: filters and pages.
    let r = api.get("/v1/apps?state=succeeded").await;
    let ids: Vec<String> = r.json()["applications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["application_id"].as_str().unwrap().to_string())
        .collect();
    for id in [&hello, &as_json, &as_toml, &slow_id] {
        assert!(ids.contains(id), "{id} not in {ids:?}");
    }
    assert!(!ids.contains(&nap), "{ids:?}");
    let r = api.get("/v1/apps?state=killed,running&name=sleeper").await;
    let apps = r.json()["applications"].as_array().unwrap().clone();
    assert!(apps.iter().all(|a| a["name"] == "sleeper"), "{apps:?}");
    assert!(
        apps.iter().any(|a| a["application_id"] == nap.as_str()),
        "{apps:?}"
    );
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let path = match &token {
            Some(t) => format!("/v1/apps?page_size=2&page_token={t}"),
            None => "/v1/apps?page_size=2".into(),
        };
        let v = api.get(&path).await.json();
        let page = v["applications"].as_array().unwrap();
        assert!(page.len() <= 2, "{v}");
        seen.extend(
            page.iter()
                .map(|a| a["application_id"].as_str().unwrap().to_string()),
        );
        match v["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 6, "{seen:?}");
    let r = api.post(&format!("/v1/apps/{nap2}/kill"), "", "").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Nodes, queues, the group, the caller.
    let v = api.get("/v1/nodes").await.json();
    assert_eq!(v["nodes"][0]["node_id"], "solo", "{v}");
    assert_eq!(v["nodes"][0]["state"], "running", "{v}");
    assert_eq!(v["nodes"][0]["capacity"]["vcores_milli"], 4000, "{v}");
    let v = api.get("/v1/queues").await.json();
    assert!(
        v["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "root"),
        "{v}"
    );
    let v = api.get("/v1/cluster").await.json();
    assert_eq!(v["leader_id"], 1, "{v}");
    assert_eq!(v["members"][0]["http_url"], format!("http://{http}"), "{v}");
    assert_eq!(v["nodes"], 1, "{v}");
    let v = api.get("/v1/whoami").await.json();
    assert_eq!(
        (v["method"].as_str(), v["acl_enabled"].as_bool()),
        (Some("none"), Some(false)),
        "{v}"
    );

    // The document it serves is the one kept in docs/.
    let r = api.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), weft_resource_manager::rest::openapi_json());
    // /metrics beside it.
    let r = api.get("/metrics").await;
    assert!(r.text().contains("weft_submissions_total"), "{}", r.text());

    // A service: its endpoints, scaled, bad scales named.
    let svc = "name: svc\nkind: service\nstages:\n  - name: serve\n    replicas: 1\n    ports: [http]\n    command: 'exec python3 -m http.server --bind 127.0.0.1 $WEFT_PORT_HTTP'\n    resources: { vcores: 0.2, memory: 64MiB }\n    health: { tcp: { port: http }, interval: 300ms, timeout: 250ms }\n";
    let r = api.post("/v1/apps", "application/yaml", svc).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let svc_id = r.json()["application_id"].as_str().unwrap().to_string();
    let endpoints = |n: usize| {
        let (api, id) = (&api, &svc_id);
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let v = api.get(&format!("/v1/apps/{id}/endpoints")).await.json();
                let eps = v["endpoints"].as_array().unwrap().clone();
                if eps.len() == n {
                    return eps;
                }
                assert!(Instant::now() < deadline, "not {n} endpoints: {v}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let eps = endpoints(1).await;
    assert_eq!(eps[0]["node_id"], "solo", "{eps:?}");
    assert!(eps[0]["ports"]["http"].as_u64().unwrap() > 0, "{eps:?}");
    let r = api
        .post(&format!("/v1/apps/{svc_id}/scale?replicas=2"), "", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["stage"].as_str(), r.json()["previous"].as_u64()),
        (Some("serve"), Some(1))
    );
    let eps = endpoints(2).await;
    assert_ne!(eps[0]["ports"]["http"], eps[1]["ports"]["http"]);
    let v = api.get(&format!("/v1/apps/{svc_id}")).await.json();
    assert_eq!(
        (v["kind"].as_str(), v["replicas"]["serve"].as_u64()),
        (Some("service"), Some(2)),
        "{v}"
    );
    let r = api
        .post(&format!("/v1/apps/{svc_id}/scale?replicas=100001"), "", "")
        .await;
    error(&r, 400, "invalid_argument", Some("replicas"));
    let r = api
        .post(
            &format!("/v1/apps/{svc_id}/scale?replicas=1&stage=web"),
            "",
            "",
        )
        .await;
    error(&r, 400, "invalid_argument", Some("stage"));
    let r = api
        .post(&format!("/v1/apps/{svc_id}/scale?replicas=few"), "", "")
        .await;
    error(&r, 400, "invalid_argument", Some("replicas"));
    let r = api
        .post(&format!("/v1/apps/{hello}/scale?replicas=2"), "", "")
        .await;
    let m = error(&r, 400, "invalid_argument", Some("application_id"));
    assert!(m.contains("not a service"), "{m}");
    let r = api.post(&format!("/v1/apps/{svc_id}/kill"), "", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(wait_done(&api, &svc_id).await["state"], "killed");
    // An impatient user updates a service the instant it is submitted,
    // before any replica runs: the update is rolled out all the same.
    let r = api.post("/v1/apps", "application/yaml", svc).await;
    let eager = r.json()["application_id"].as_str().unwrap().to_string();
    let v2 = svc.replace("command: 'exec", "env: { V: '2' }\n    command: 'exec");
    let r = api
        .post(&format!("/v1/apps/{eager}/update"), "application/yaml", v2)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["spec_revision"], 1, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = api.get(&format!("/v1/apps/{eager}")).await.json();
        if v["rollout"] == "revision 1 rolled out" && v["endpoints"].as_array().unwrap().len() == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "not rolled out: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = api.post(&format!("/v1/apps/{eager}/kill"), "", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(wait_done(&api, &eager).await["state"], "killed");

    // Bad input: each names its field, and nothing is submitted.
    let before = api.get("/v1/apps?page_size=1000").await.json()["applications"]
        .as_array()
        .unwrap()
        .len();
    let r = api.post("/v1/apps", "application/yaml", "").await;
    error(&r, 400, "invalid_argument", Some("spec"));
    let r = api
        .post("/v1/apps", "application/yaml", "name: [unclosed")
        .await;
    let m = error(&r, 400, "invalid_argument", Some("spec"));
    assert!(m.contains("not a valid job spec"), "{m}");
    let bad_mem = "name: x\nstages:\n  - name: run\n    command: 'true'\n    resources: { vcores: 0.2, memory: 0 }\n";
    let r = api.post("/v1/apps", "application/yaml", bad_mem).await;
    let m = error(
        &r,
        400,
        "invalid_argument",
        Some("stages[0].resources.memory"),
    );
    assert!(m.starts_with("stages[0].resources.memory: "), "{m}");
    // A form's or plain text's type (what a page of another site could
    // send without asking), or none: refused.
    for ct in ["text/plain", "application/x-www-form-urlencoded", ""] {
        let r = api.post("/v1/apps", ct, yaml).await;
        error(&r, 415, "invalid_argument", Some("Content-Type"));
    }
    let r = api
        .send(
            "POST",
            "/v1/apps",
            &[
                ("content-type", "application/yaml"),
                ("origin", "http://evil.example"),
            ],
            yaml,
        )
        .await;
    let m = error(&r, 403, "permission_denied", Some("Origin"));
    assert!(m.contains("cross-site"), "{m}");
    let r = api
        .send(
            "POST",
            &format!("/v1/apps/{nap2}/kill"),
            &[("origin", "http://evil.example")],
            "",
        )
        .await;
    error(&r, 403, "permission_denied", Some("Origin"));
    // A page the member serves itself may.
    let own = format!("http://{http}");
    let r = api
        .send(
            "POST",
            &format!("/v1/apps/{nap2}/kill"),
            &[("origin", own.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = api
        .post("/v1/apps?format=xml", "application/yaml", yaml)
        .await;
    error(&r, 400, "invalid_argument", Some("format"));
    let r = api
        .post("/v1/apps?colour=red", "application/yaml", yaml)
        .await;
    let m = error(&r, 400, "invalid_argument", Some("colour"));
    assert!(m.contains("unknown field"), "{m}");
    let to_nowhere = yaml.replace("name: hello", "name: hello\nqueue: root.nowhere");
    let r = api.post("/v1/apps", "application/yaml", to_nowhere).await;
    let m = error(&r, 400, "invalid_argument", Some("queue"));
    assert!(m.contains("no queue root.nowhere"), "{m}");
    let long_key = "k".repeat(129);
    let r = api
        .send(
            "POST",
            "/v1/apps",
            &[
                ("content-type", "application/yaml"),
                ("idempotency-key", long_key.as_str()),
            ],
            yaml,
        )
        .await;
    error(&r, 400, "invalid_argument", Some("Idempotency-Key"));
    let r = api
        .post("/v1/apps", "application/yaml", vec![0xff, 0xfe, b'a'])
        .await;
    let m = error(&r, 400, "invalid_argument", Some("spec"));
    assert!(m.contains("not UTF-8"), "{m}");
    // Over the spec's limit, and over what the API takes at all.
    let big = format!("# {}\n{yaml}", "x".repeat(weft_spec::MAX_SPEC_BYTES));
    let r = api.post("/v1/apps", "application/yaml", big).await;
    let m = error(&r, 400, "invalid_argument", Some("spec"));
    assert!(m.contains("at most"), "{m}");
    let huge = vec![b'#'; weft_resource_manager::rest::MAX_BODY + 1];
    let r = api.post("/v1/apps", "application/yaml", huge).await;
    error(&r, 413, "invalid_argument", Some("spec"));
    let r = api.get("/v1/apps?state=runing").await;
    let m = error(&r, 400, "invalid_argument", Some("state"));
    assert!(m.contains("\"runing\" is not a state"), "{m}");
    let r = api.get("/v1/apps?page_size=50000").await;
    error(&r, 400, "invalid_argument", Some("page_size"));
    let r = api.get("/v1/apps?page_size=lots").await;
    let m = error(&r, 400, "invalid_argument", Some("page_size"));
    assert!(m.contains("invalid digit"), "{m}");
    let r = api
        .get(&format!("/v1/apps/{hello}/wait?timeout=forever"))
        .await;
    error(&r, 400, "invalid_argument", Some("timeout"));
    let r = api.get(&format!("/v1/apps/{hello}/wait?timeout=1h")).await;
    error(&r, 400, "invalid_argument", Some("timeout"));
    let r = api.get(&format!("/v1/apps/{hello}/logs?stream=both")).await;
    error(&r, 400, "invalid_argument", Some("stream"));
    let r = api.get(&format!("/v1/apps/{hello}/logs?task=run/7")).await;
    let m = error(&r, 404, "not_found", Some("task"));
    assert!(m.contains("run/0"), "{m}");
    let r = api.get("/v1/apps/app-999999").await;
    error(&r, 404, "not_found", Some("application_id"));
    let r = api.post("/v1/apps/app-999999/kill", "", "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api.post("/v1/nodes/nope/drain", "", "").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api.get("/v1/nope").await;
    error(&r, 404, "not_found", None);
    let after = api.get("/v1/apps?page_size=1000").await.json()["applications"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "bad input submitted something");
}

/// An HTTPS client of the cluster's CA, with `user`'s client certificate
/// if given.
fn https(addr: &str, ca_dir: &std::path::Path, user: Option<&str>) -> Http {
    use rustls::pki_types::pem::PemObject;
    let cfg = match user {
        None => trusting(&ca_dir.join("weft-ca.pem")),
        Some(u) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca_dir.join("weft-ca.pem"))
                .unwrap()
            {
                roots.add(c.unwrap()).unwrap();
            }
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(
                ca_dir.join(format!("client-{u}.pem")),
            )
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(
                ca_dir.join(format!("client-{u}-key.pem")),
            )
            .unwrap();
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap()
        }
    };
    Http::tls(addr, cfg)
}

/// Sends a write to `api` until it is answered other than 503 (no leader
/// yet, or its URL not recorded yet), bounded.
async fn write(api: &Http, path: &str, ctype: &str, body: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api.post(path, ctype, body.to_string()).await;
        if r.status != 503 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_users_see_only_theirs_and_followers_send_writes_to_the_leader() {
    if crate::secure::skip(
        "it secures its own cluster with its own CA and users (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = ca_dir(tmp.path());
    for i in 1..=3 {
        cert(&d, "rm", &format!("rm{i}"));
    }
    cert(&d, "client", "carol");
    let admin = format!("weft_{}", "a1".repeat(32));
    let admin_file = tmp.path().join("admin.token");
    std::fs::write(&admin_file, &admin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&admin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = format!(
        "[tls]\nca_file = \"{0}/weft-ca.pem\"\ncert_file = \"{0}/rm-rm{{id}}.pem\"\nkey_file = \"{0}/rm-rm{{id}}-key.pem\"\n\
         [acl]\nenabled = true\ninitial_admin_token_file = {1:?}\n\
         [http]\nlisten = \"{{http}}\"\n\
         [[queues]]\nname = \"root.team\"\nadmin_acl = [\"carol\"]\n\
         [[queues]]\nname = \"root.default\"\n",
        d.display(),
        admin_file.display().to_string(),
    );
    let mut cluster = Cluster::start_with(3, 1000, &extra);
    let https_addrs: Vec<String> = cluster.members.iter().map(|m| m.http.clone()).collect();
    let https_of = |i: usize, user: Option<&str>| https(&https_addrs[i], &d, user);
    port_answers(&cluster.members[0].http).await;

    // No token, a forged one: refused on every member, before anything.
    for i in 0..3 {
        port_answers(&cluster.members[i].http).await;
        let r = https_of(i, None).get("/v1/apps").await;
        let m = error(&r, 401, "unauthenticated", None);
        assert!(m.contains("no credentials"), "{m}");
        // A token a follower does not know may be one made an instant ago
        // through the leader: the follower sends the caller there, and the
        // leader's answer is final (as `curl -L` follows it).
        let forged = https_of(i, None).with_token(format!("weft_{}", "0".repeat(64)));
        let r = forged.send_following("GET", "/v1/apps", &[], "").await;
        let m = error(&r, 401, "unauthenticated", None);
        assert!(m.contains("token not recognised"), "{m}");
        let job = crate::cluster::job("x", "root.team");
        let r = forged
            .send_following(
                "POST",
                "/v1/apps",
                &[("content-type", "application/yaml")],
                job,
            )
            .await;
        error(&r, 401, "unauthenticated", None);
    }
    // The admin as its first call: bounded while the leader makes its token.
    let deadline = Instant::now() + Duration::from_secs(30);
    let cluster_view = loop {
        let r = https_of(0, None)
            .with_token(&admin)
            .get("/v1/cluster")
            .await;
        if r.status == 200 {
            break r.json();
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader_id = cluster_view["leader_id"].as_u64().unwrap();
    assert!(leader_id != 0, "{cluster_view}");
    let token = |user: &str| {
        let out = ok(&rmctl(&[
            "--rm",
            &cluster.addrs().join(","),
            "--tls-ca",
            d.join("weft-ca.pem").to_str().unwrap(),
            "--token",
            &admin,
            "-o",
            "json",
            "acl",
            "token",
            "create",
            "--user",
            user,
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["secret"].as_str().unwrap().to_string()
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let leader = cluster
        .members
        .iter()
        .position(|m| m.id == leader_id)
        .unwrap();
    let follower = (leader + 1) % 3;

    // alice submits to a follower with her token: it passes the call on to
    // the leader in her name (no redirect for her client to follow).
    let job = crate::cluster::job("mine", "root.team");
    let as_alice = https_of(follower, None).with_token(&alice);
    let r = write(&as_alice, "/v1/apps", "application/yaml", &job).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let mine = r.json()["application_id"].as_str().unwrap().to_string();
    let r = https_of(leader, None)
        .with_token(&alice)
        .get(&format!("/v1/apps/{mine}"))
        .await;
    assert_eq!(
        (r.status, r.json()["user"].as_str()),
        (200, Some("alice")),
        "{}",
        r.text()
    );

    // bob sees nothing of it, and may not kill it (the leader says so,
    // through the follower); carol administers its queue.
    let as_bob = https_of(follower, None).with_token(&bob);
    let r = as_bob.get(&format!("/v1/apps/{mine}")).await;
    let m = error(&r, 403, "permission_denied", None);
    assert!(m.contains("bob"), "{m}");
    let r = as_bob.post(&format!("/v1/apps/{mine}/kill"), "", "").await;
    let m = error(&r, 403, "permission_denied", None);
    assert!(m.contains("bob") && m.contains("kill"), "{m}");
    let r = as_bob
        .get(&format!("/v1/apps/{mine}/logs?task=run/0"))
        .await;
    error(&r, 403, "permission_denied", None);
    let r = as_bob.get("/v1/apps").await;
    assert_eq!(
        r.json()["applications"].as_array().unwrap().len(),
        0,
        "{}",
        r.text()
    );
    let r = as_bob.post("/v1/nodes/n1/drain", "", "").await;
    error(&r, 403, "permission_denied", None);
    // carol is known by her client certificate alone, which a member
    // cannot pass on: the follower sends her to the leader's URL.
    let as_carol = https_of(follower, Some("carol"));
    let v = as_carol.get("/v1/whoami").await.json();
    assert_eq!(
        (v["user"].as_str(), v["method"].as_str()),
        (Some("carol"), Some("certificate")),
        "{v}"
    );
    let r = as_carol.get(&format!("/v1/apps/{mine}")).await;
    assert_eq!(r.status, 307, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some(format!("https://{}/v1/apps/{mine}", cluster.members[leader].http).as_str())
    );
    let r = as_carol
        .send_following("GET", &format!("/v1/apps/{mine}"), &[], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"], "alice");

    // alice kills it through the follower.
    let r = as_alice
        .post(&format!("/v1/apps/{mine}/kill"), "", "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = as_alice
        .get(&format!("/v1/apps/{mine}/wait?timeout=30s"))
        .await
        .json();
    assert_eq!(v["state"], "killed", "{v}");

    // The leader dies: the follower passes writes to the new leader once
    // one is elected (503 until then, never an answer from the dead one).
    cluster.kill(leader);
    let survivor = follower;
    let as_alice = https_of(survivor, None).with_token(&alice);
    let r = write(&as_alice, "/v1/apps", "application/yaml", &job).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["application_id"].as_str().unwrap().to_string();
    let r = as_alice
        .send_following("GET", &format!("/v1/apps/{id}"), &[], "")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user"], "alice");
    let v = as_alice
        .send_following("GET", "/v1/cluster", &[], "")
        .await
        .json();
    let new_leader = v["leader_id"].as_u64().unwrap();
    assert_ne!(new_leader, leader_id, "{v}");
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == new_leader)
        .unwrap();
    let i = cluster
        .members
        .iter()
        .position(|m| m.id == new_leader)
        .unwrap();
    assert_eq!(
        m["http_url"],
        format!("https://{}", cluster.members[i].http),
        "{v}"
    );
}

/// `rmctl -o json why ID` until `want(reply)` holds (the scheduler catches
/// up with each submission), bounded.
async fn why_until(
    rm: &str,
    id: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = crate::rmctl::run(&["-o", "json", "why", id], rm);
        let text = crate::rmctl::stdout(&o);
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if want(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{id}: never as wanted: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reason(v: &serde_json::Value) -> &str {
    v["waiting"][0]["reason"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_names_what_keeps_each_job_waiting_and_the_task_a_failed_one_failed_on() {
    if crate::secure::skip(
        "a standalone cluster on loopback is plaintext and zero-config by design",
    ) {
        return;
    }
    let solo = Standalone::start_with_http();
    let http = solo.http.clone().unwrap();
    let api = Http::plain(&http);
    let rm = solo.addr.clone();
    port_answers(&http).await;
    let queues = solo.dir.path().join("queues.toml");
    std::fs::write(
        &queues,
        "[[queues]]\nname = \"root\"\n\
         [[queues]]\nname = \"root.small\"\nmaximum = { vcores = 1 }\n\
         [[queues]]\nname = \"root.capped\"\nuser_limit = { vcores = 0.5 }\n\
         [[queues]]\nname = \"root.big\"\n",
    )
    .unwrap();
    let o = crate::rmctl::run(&["queue", "set", "-f", queues.to_str().unwrap()], &rm);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let submit = |name: &str, queue: &str, n: u32, vcores: f64, command: &str| {
        let api = api.clone();
        let spec = format!(
            "name: {name}\nqueue: {queue}\nstages:\n  - name: run\n    instances: {n}\n    command: '{command}'\n    resources: {{ vcores: {vcores}, memory: 32MiB }}\n"
        );
        async move {
            let r = api.post("/v1/apps", "application/yaml", spec).await;
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["application_id"].as_str().unwrap().to_string()
        }
    };

    // A failed job: its first failing task and why it ended.
    let hog = submit("hog", "root.big", 1, 0.2, "exec tail /dev/zero").await;
    let v = wait_done(&api, &hog).await;
    assert_eq!(v["state"], "failed", "{v}");
    let v = why_until(&rm, &hog, |v| v["state"] == "FAILED").await;
    assert_eq!(v["failure"]["task"], "run/0", "{v}");
    // The agent killed it (over its quota).
    assert_eq!(v["failure"]["reason"], "killed", "{v}");
    assert_eq!(v["failure"]["node_id"], "solo", "{v}");
    let d = v["failure"]["diagnostic"].as_str().unwrap();
    assert!(d.contains("over its memory quota"), "{v}");
    assert!(
        v["summary"].as_str().unwrap().starts_with(
            "it failed: task run/0 killed on node solo: killed: over its memory quota"
        ),
        "{v}"
    );

    // Fill the node (4 vcores): 3 to one job, then each queue's limits.
    let big = submit("big", "root.big", 1, 3.0, "sleep 600").await;
    // Its task runs (placed, and so counted against the node).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = api.get(&format!("/v1/apps/{big}")).await.json();
        if v["stages"][0]["running"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "big never ran: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = why_until(&rm, &big, |v| v["state"] == "RUNNING").await;
    assert_eq!(v["waiting"], json!([]), "{v}");
    assert_eq!(
        v["summary"], "nothing of it waits: what it asked for is placed",
        "{v}"
    );
    let small = submit("small", "root.small", 2, 0.6, "sleep 600").await;
    let v = why_until(&rm, &small, |v| reason(v) == "queue_maximum").await;
    assert_eq!(v["waiting"][0]["what"], "stage run", "{v}");
    assert_eq!(v["waiting"][0]["tasks"], 1, "{v}");
    assert_eq!(
        v["waiting"][0]["detail"],
        "queue root.small is at its maximum: it uses 0.6 vcores of 1 vcores and this asks 0.6 vcores more",
        "{v}"
    );
    let capped = submit("capped", "root.capped", 2, 0.3, "sleep 600").await;
    let v = why_until(&rm, &capped, |v| reason(v) == "user_limit").await;
    let d = v["waiting"][0]["detail"].as_str().unwrap();
    assert!(
        d.starts_with("user anonymous is at queue root.capped's user limit: they use 0.3 vcores of 0.5 vcores"),
        "{v}"
    );
    // 0.1 vcores left: a 2-vcore task waits for room; two more behind it.
    let wide = submit("wide", "root.big", 1, 2.0, "sleep 600").await;
    let v = why_until(&rm, &wide, |v| reason(v) == "no_room").await;
    let d = v["waiting"][0]["detail"].as_str().unwrap();
    assert!(
        d.starts_with("no node has 2 vcores, 32.0 MiB free now (the most free on any node: 0.1"),
        "{v}"
    );
    assert_eq!(v["waiting"][0]["ahead"], 0, "{v}");
    let later = submit("later", "root.big", 1, 2.0, "sleep 600").await;
    let v = why_until(&rm, &later, |v| reason(v) == "no_room").await;
    assert_eq!(
        v["waiting"][0]["ahead"], 1,
        "the wide job is ahead of it: {v}"
    );
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .starts_with("stage run waits: no node has 2 vcores"),
        "{v}"
    );
    // The wide job waits long enough that the node is held for it
    // (starvation control): a tiny job that would fit now waits for it.
    let v = why_until(&rm, &wide, |v| {
        v["waiting"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("node solo held for it"))
    })
    .await;
    assert_eq!(reason(&v), "no_room", "{v}");
    let tiny = submit("tiny", "root.big", 1, 0.05, "sleep 600").await;
    let v = why_until(&rm, &tiny, |v| reason(v) == "held").await;
    assert_eq!(
        v["waiting"][0]["detail"],
        format!(
            "it fits only on node solo, held for {wide} run/0 (waited longer): nothing new is placed there until it starts"
        ),
        "{v}"
    );
    // As a person reads it, and over REST.
    let o = crate::rmctl::run(&["why", &wide], &rm);
    let text = crate::rmctl::stdout(&o);
    assert!(
        text.contains("WAITING") && text.contains("no_room"),
        "{text}"
    );
    let r = api.get(&format!("/v1/apps/{wide}/why")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["state"].as_str(), reason(&v)),
        (Some("running"), "no_room"),
        "{v}"
    );

    // The node drained: nothing can hold what waits any more.
    let o = crate::rmctl::run(&["node", "drain", "solo"], &rm);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = why_until(&rm, &wide, |v| reason(v) == "never_fits").await;
    assert!(
        v["waiting"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("no node is running"),
        "{v}"
    );
    let r = api.get("/v1/apps/app-999999/why").await;
    error(&r, 404, "not_found", Some("application_id"));
    for id in [&big, &small, &capped, &wide, &later, &tiny] {
        let r = api.post(&format!("/v1/apps/{id}/kill"), "", "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let v = why_until(&rm, &wide, |v| v["state"] == "KILLED").await;
    assert!(
        v["summary"].as_str().unwrap().starts_with("it was killed"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_tasks_logs_are_read_from_the_store_once_its_node_has_none() {
    if crate::secure::skip(
        "a standalone cluster on loopback is plaintext and zero-config by design",
    ) {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let solo = Standalone::start_full(
        &format!(
            "[logs]\naggregate_dir = {:?}\naggregate_max = \"1KiB\"\n",
            store.path().join("weft-logs").display().to_string()
        ),
        true,
        Some(format!("127.0.0.1:{port}")),
    );
    let http = solo.http.clone().unwrap();
    port_answers(&http).await;
    let api = Http::plain(&http);
    // 2000 bytes of stdout (more than the 1 KiB kept), a line of stderr.
    let spec = "name: chatty\nstages:\n  - name: run\n    command: 'printf \"%02000d\" 7; echo to-stderr >&2'\n    resources: { vcores: 0.2, memory: 32MiB }\n";
    let r = api.post("/v1/apps", "application/yaml", spec).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["application_id"].as_str().unwrap().to_string();
    assert_eq!(wait_done(&api, &id).await["state"], "succeeded");
    let tasks = api.get(&format!("/v1/apps/{id}/tasks")).await.json();
    let task = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "run/0")
        .unwrap_or_else(|| panic!("{tasks}"))
        .clone();
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["node_id"], "solo", "{task}");
    let container = task["container_id"].as_str().unwrap().to_string();
    // From the node while it has them: all 2000 bytes.
    let r = api.get(&format!("/v1/apps/{id}/logs?task=run/0")).await;
    assert_eq!(r.body.len(), 2000, "{}", r.text());
    // Copied when it ended: the last KiB, and where it starts.
    let kept = store.path().join("weft-logs").join(&container);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kept.join("stderr").exists() {
        assert!(
            Instant::now() < deadline,
            "never aggregated to {}",
            kept.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read(kept.join("stdout")).unwrap().len(), 1024);
    assert_eq!(
        std::fs::read_to_string(kept.join("stdout.start")).unwrap(),
        "976"
    );
    // The node's copy gone (its retention, a lost disk): read from the store.
    std::fs::remove_dir_all(solo.dir.path().join("agent").join("logs").join(&container)).unwrap();
    let r = api
        .get(&format!("/v1/apps/{id}/logs?task=run/0&stream=stderr"))
        .await;
    assert_eq!((r.status, r.text().as_str()), (200, "to-stderr\n"));
    let r = api.get(&format!("/v1/apps/{id}/logs?task=run/0")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body.len(), 1024, "the kept tail");
    assert!(r.text().ends_with("0007"), "{}", r.text());
    let r = api
        .get(&format!("/v1/apps/{id}/logs?task=run/0&offset=1990"))
        .await;
    assert_eq!(r.text(), "0000000007");
    // And through rmctl, as a user reads it.
    let o = crate::rmctl::run(&["app", "logs", &id, "run/0", "--stderr"], &solo.addr);
    assert_eq!(crate::rmctl::stdout(&o), "to-stderr\n");
}
