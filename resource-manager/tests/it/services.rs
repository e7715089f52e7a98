//! A service (`kind: service`) on a 3-member RM group and three real node
//! agents, its master launched by the RM: three replicas of a python3 HTTP
//! server with an HTTP health check, kept at three healthy replicas through
//! a replica's process killed, a replica made unhealthy and a node's agent
//! killed; scaled up and down; its endpoints, as the RM lists them, name
//! only replicas that answer, each where it says.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weft_client::proto as pb;
use weft_client::RmClient;

use crate::apps::{launching_cluster_with, wait_state};

const NODES: [&str; 3] = ["svc-a", "svc-b", "svc-c"];

/// The replica: answers `/` with its index, container and `$VERSION`,
/// `/healthz` with 200 unless `$SICK` is set or `DIR/sick-CONTAINER`
/// exists; notes its pid in `DIR/pids`.
const SERVER: &str = r#"
import http.server, os, sys
d = sys.argv[1]
cid, idx = os.environ["WEFT_CONTAINER_ID"], os.environ["WEFT_TASK_INDEX"]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200
        if self.path == "/healthz" and (os.environ.get("SICK") or os.path.exists(os.path.join(d, "sick-" + cid))):
            code = 503
        body = ("replica %s %s %s\n" % (idx, cid, os.environ.get("VERSION", "v1"))).encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["WEFT_PORT_HTTP"])), H)
with open(os.path.join(d, "pids"), "a") as f:
    f.write("%s %d\n" % (cid, os.getpid()))
s.serve_forever()
"#;

fn spec(dir: &std::path::Path) -> String {
    versioned(dir, "v1", "", "20s")
}

/// The service at `version`, `sick` or not, with checks' `grace`.
fn versioned(dir: &std::path::Path, version: &str, sick: &str, grace: &str) -> String {
    format!(
        "name: web\nkind: service\nstages:\n  - name: serve\n    replicas: 3\n    ports: [http]\n    env: {{ VERSION: '{version}', SICK: '{sick}' }}\n    command: 'exec python3 {server} {dir}'\n    resources: {{ vcores: 0.2, memory: 64MiB }}\n    health: {{ http: {{ port: http, path: /healthz }}, interval: 500ms, timeout: 400ms, failures: 2, grace: {grace} }}\n    restart: {{ backoff: 200ms, max_backoff: 2s, limit: 20, window: 10m }}\n",
        server = dir.join("server.py").display(),
        dir = dir.display(),
    )
}

/// One GET of `path` on `addr`: the status and body, or None where
/// nothing answers.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), go)
        .await
        .ok()
        .flatten()
}

fn addr_of(e: &pb::Endpoint) -> String {
    format!("{}:{}", e.host, e.ports["http"])
}

/// What every listing holds: replicas of the stage, on the cluster's
/// nodes, each listed once.
async fn check_listing(eps: &[pb::Endpoint]) {
    for e in eps {
        assert_eq!(e.stage, "serve");
        assert!(e.ports.contains_key("http"), "{e:?}");
        assert!(NODES.contains(&e.node_id.as_str()), "{e:?}");
    }
    let indices: BTreeSet<u32> = eps.iter().map(|e| e.index).collect();
    assert_eq!(indices.len(), eps.len(), "a replica listed twice: {eps:?}");
}

/// Waits (bounded) until the service lists `n` healthy replicas all of
/// which `ok` accepts and which answer as themselves; returns them and how
/// long it took.
async fn wait_endpoints(
    client: &RmClient,
    app: &str,
    n: usize,
    within: Duration,
    ok: impl Fn(&pb::Endpoint) -> bool,
) -> (Vec<pb::Endpoint>, Duration) {
    let t = Instant::now();
    loop {
        let eps = client.endpoints(app).await.unwrap();
        check_listing(&eps).await;
        if eps.len() == n && eps.iter().all(&ok) {
            let mut answered = true;
            for e in &eps {
                match get(&addr_of(e), "/").await {
                    Some((200, body)) => assert!(
                        body.starts_with(&format!("replica {} {} ", e.index, e.container_id)),
                        "{e:?} answered as another: {body}"
                    ),
                    _ => answered = false,
                }
            }
            if answered {
                return (eps, t.elapsed());
            }
        }
        assert!(
            t.elapsed() < within,
            "{app}: not {n} healthy replicas within {within:?}: {eps:?} ({:?})",
            client
                .get_application(app)
                .await
                .map(|r| (r.state(), r.diagnostics, r.stages))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pid_of(dir: &std::path::Path, container: &str) -> i32 {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let (c, p) = l.split_once(' ')?;
            (c == container).then(|| p.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no pid noted for {container}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_keeps_its_replicas_healthy_through_faults_and_scales() {
    let (cluster, mut agents) = launching_cluster_with(&NODES, "node_expiry = \"6s\"\n").await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.py"), SERVER).unwrap();
    let app = client
        .submit(&spec(dir.path()), "yaml", "mia")
        .await
        .unwrap();
    let all = |_: &pb::Endpoint| true;
    let (eps, took) = wait_endpoints(&client, &app, 3, Duration::from_secs(60), all).await;
    println!("3 healthy replicas {took:?} after submit");
    let r = client.get_application(&app).await.unwrap();
    assert_eq!(
        (r.kind.as_str(), r.state()),
        ("service", pb::ApplicationState::Running)
    );
    // Spread by default: one replica on each node (the node holding the
    // master has less room, and gets one all the same).
    let nodes: BTreeSet<&str> = eps.iter().map(|e| e.node_id.as_str()).collect();
    assert_eq!(nodes.len(), 3, "{eps:?}");

    // 1. A replica's process killed: replaced.
    let victim = eps[0].clone();
    let pid = pid_of(dir.path(), &victim.container_id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let (eps, took) = wait_endpoints(&client, &app, 3, Duration::from_secs(30), |e| {
        e.container_id != victim.container_id
    })
    .await;
    println!(
        "killed replica {}: 3 healthy again in {took:?}",
        victim.index
    );
    assert!(eps.iter().any(|e| e.index == victim.index), "{eps:?}");
    let _ = t;

    // 2. A replica made unhealthy (its /healthz answers 503): it leaves the
    // endpoints within its checks' bound and is replaced.
    let sick = eps
        .iter()
        .find(|e| e.index != victim.index)
        .unwrap()
        .clone();
    std::fs::write(dir.path().join(format!("sick-{}", sick.container_id)), "").unwrap();
    let t = Instant::now();
    loop {
        let eps = client.endpoints(&app).await.unwrap();
        if !eps.iter().any(|e| e.container_id == sick.container_id) {
            break;
        }
        // 2 failed checks 500 ms apart, a call of its master, a round.
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the unhealthy replica was still listed after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = t.elapsed();
    let (eps, took) = wait_endpoints(&client, &app, 3, Duration::from_secs(30), |e| {
        e.container_id != sick.container_id
    })
    .await;
    println!(
        "unhealthy replica {}: unlisted after {left:?}, 3 healthy again in {:?}",
        sick.index,
        t.elapsed()
    );
    let _ = took;
    // Its process was stopped.
    let sick_pid = pid_of(dir.path(), &sick.container_id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !weft_node_agent::procfs::is_zombie(sick_pid)
        && std::path::Path::new(&format!("/proc/{sick_pid}")).exists()
    {
        assert!(
            Instant::now() < deadline,
            "the unhealthy replica kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. A node's agent killed: its replica is replaced on the others once
    // the node is declared lost (node_expiry 6 s).
    let lost = eps
        .iter()
        .find(|e| e.node_id != r.am_node_id)
        .unwrap()
        .clone();
    let k = NODES.iter().position(|n| *n == lost.node_id).unwrap();
    agents[k].kill9();
    let t = Instant::now();
    let (eps, took) = wait_endpoints(&client, &app, 3, Duration::from_secs(45), |e| {
        e.node_id != lost.node_id
    })
    .await;
    println!(
        "agent of {} killed: 3 healthy replicas on the other nodes in {took:?}",
        lost.node_id
    );
    let _ = t;
    assert!(eps.iter().all(|e| e.node_id != lost.node_id));
    agents[k].restart();

    // 4. Scaled up, then down: the highest-numbered replicas go.
    let s = client.scale_application(&app, "", 4).await.unwrap();
    assert_eq!((s.stage.as_str(), s.previous, s.replicas), ("serve", 3, 4));
    let (eps, took) = wait_endpoints(&client, &app, 4, Duration::from_secs(30), all).await;
    println!("scaled to 4 in {took:?}");
    let rm = cluster.addrs().join(",");
    let out = crate::tls::ok(&crate::rmctl::run(
        &["app", "scale", &app, "--replicas", "2"],
        &rm,
    ));
    assert!(out.contains("scaled from 4 to 2"), "{out}");
    let (kept, took) = wait_endpoints(&client, &app, 2, Duration::from_secs(30), all).await;
    println!("scaled to 2 in {took:?}");
    let indices: Vec<u32> = kept.iter().map(|e| e.index).collect();
    assert_eq!(indices, [0, 1]);
    for e in eps.iter().filter(|e| e.index >= 2) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(&addr_of(e), "/").await.is_some() {
            assert!(
                Instant::now() < deadline,
                "{e:?} still answers after scaling down"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let listed = crate::tls::ok(&crate::rmctl::run(
        &["-o", "json", "app", "endpoints", &app],
        &rm,
    ));
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v[0]["ports"]["http"], kept[0].ports["http"], "{v}");

    // Bad scales name their field.
    let e = client.scale_application(&app, "nope", 1).await.unwrap_err();
    assert!(e.to_string().contains("stage"), "{e}");
    let e = client
        .scale_application(&app, "", 100_001)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("replicas"), "{e}");

    // 5. Killed: it ends KILLED and no replica runs.
    client.kill_application(&app).await.unwrap();
    let r = wait_state(&client, &app, Duration::from_secs(30)).await;
    assert_eq!(r.state(), pb::ApplicationState::Killed, "{r:?}");
    for e in &kept {
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(&addr_of(e), "/").await.is_some() {
            assert!(
                Instant::now() < deadline,
                "{e:?} still answers after the kill"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A replica that keeps crashing: restarted with its backoff until its
/// stage's restart limit, then the service fails saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_service_fails_at_its_restart_limit() {
    let (cluster, _agents) = launching_cluster_with(&NODES[..1], "").await;
    let client = cluster.client();
    let app = client
        .submit(
            "name: crash\nkind: service\nstages:\n  - name: serve\n    replicas: 1\n    command: 'exit 3'\n    resources: { vcores: 0.2, memory: 32MiB }\n    restart: { backoff: 100ms, max_backoff: 400ms, limit: 3, window: 1m }\n",
            "yaml",
            "mia",
        )
        .await
        .unwrap();
    let r = wait_state(&client, &app, Duration::from_secs(60)).await;
    assert_eq!(r.state(), pb::ApplicationState::Failed, "{r:?}");
    assert!(
        r.diagnostics
            .contains("4 restarts within 1m: more than restart.limit, 3"),
        "{}",
        r.diagnostics
    );
    assert_eq!(r.stages[0].failed, 4, "{:?}", r.stages);
}

/// A rolling update: each replica replaced by one of the new version only
/// once that one is healthy (never fewer than 3 listed), and a broken
/// version's rollout stops at its first replica with the old ones serving;
/// updates that would change more than the replicas are refused, naming
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_replaces_replicas_one_at_a_time_and_a_broken_one_stops() {
    let (cluster, _agents) = launching_cluster_with(&NODES, "").await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.py"), SERVER).unwrap();
    let app = client
        .submit(&spec(dir.path()), "yaml", "mia")
        .await
        .unwrap();
    let all = |_: &pb::Endpoint| true;
    let (v1, _) = wait_endpoints(&client, &app, 3, Duration::from_secs(60), all).await;
    let version_of = |e: pb::Endpoint| async move {
        get(&addr_of(&e), "/")
            .await
            .map(|(_, b)| b.trim().rsplit(' ').next().unwrap_or("").to_string())
    };

    // v2: rolled out replica by replica.
    let rev = client
        .update_application(&app, &versioned(dir.path(), "v2", "", "20s"), "yaml")
        .await
        .unwrap();
    assert_eq!(rev, 1);
    let t = Instant::now();
    let mut fewest = usize::MAX;
    loop {
        let r = client.get_application(&app).await.unwrap();
        check_listing(&r.endpoints).await;
        fewest = fewest.min(r.endpoints.len());
        if r.rollout == "revision 1 rolled out" {
            break;
        }
        if r.rollout.contains("stopped") {
            // Say why: the new replica's output.
            let mut logs = String::new();
            for task in ["serve/0~r1", "serve/1~r1", "serve/2~r1"] {
                if let Ok(mut st) = client.task_logs(&app, task, true, 0, false).await {
                    while let Ok(Some(c)) = st.message().await {
                        logs.push_str(&String::from_utf8_lossy(&c.data));
                    }
                }
            }
            panic!(
                "the rollout of a good version stopped: {}\n{logs}",
                r.rollout
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not rolled out: {:?} {:?}",
            r.rollout,
            r.endpoints
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("rolled out 3 replicas in {:?}", t.elapsed());
    assert!(
        fewest >= 3,
        "only {fewest} replicas listed during the rollout"
    );
    let (v2, _) = wait_endpoints(&client, &app, 3, Duration::from_secs(10), |e| {
        !v1.iter().any(|o| o.container_id == e.container_id)
    })
    .await;
    for e in &v2 {
        assert_eq!(version_of(e.clone()).await.as_deref(), Some("v2"), "{e:?}");
    }
    let r = client.get_application(&app).await.unwrap();
    assert_eq!(r.spec_revision, 1);

    // v3 never turns healthy: its first replica fails its checks once its
    // grace is over, and the rollout stops there.
    client
        .update_application(&app, &versioned(dir.path(), "v3", "1", "2s"), "yaml")
        .await
        .unwrap();
    let t = Instant::now();
    let stopped = loop {
        let r = client.get_application(&app).await.unwrap();
        if r.rollout.starts_with("revision 2 stopped") {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the rollout of a broken version did not stop: {:?}",
            r.rollout
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "broken version stopped after {:?}: {}",
        t.elapsed(),
        stopped.rollout
    );
    assert!(stopped.rollout.contains("unhealthy"), "{}", stopped.rollout);
    assert_eq!(stopped.state(), pb::ApplicationState::Running);
    // The v2 replicas serve on, and no more v3 ones are tried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (still, _) = wait_endpoints(&client, &app, 3, Duration::from_secs(10), all).await;
    for e in &still {
        assert!(
            v2.iter().any(|o| o.container_id == e.container_id),
            "{e:?} is not one of the v2 replicas"
        );
        assert_eq!(version_of(e.clone()).await.as_deref(), Some("v2"));
    }

    // Scaled up after the stopped rollout: the new replica runs the
    // version that serves (v2), not the broken one.
    client.scale_application(&app, "", 4).await.unwrap();
    let (four, _) = wait_endpoints(&client, &app, 4, Duration::from_secs(30), all).await;
    for e in &four {
        assert_eq!(version_of(e.clone()).await.as_deref(), Some("v2"), "{e:?}");
    }

    // Updates that change more than what a replica runs, or nothing.
    let base = versioned(dir.path(), "v4", "", "20s");
    for (spec, field) in [
        (
            base.replace("name: web\n", "name: web\nqueue: root.other\n"),
            "queue",
        ),
        (base.replace("name: web\n", "name: web2\n"), "name"),
        (
            base.replace("name: web\n", "name: web\npriority: 5\n"),
            "priority",
        ),
        (base.replace("- name: serve", "- name: api"), "stages"),
        (
            base.replace("replicas: 3", "replicas: 0"),
            "stages[0].replicas",
        ),
        (
            versioned(dir.path(), "v3", "1", "2s"),
            "nothing to roll out",
        ),
    ] {
        let e = client
            .update_application(&app, &spec, "yaml")
            .await
            .unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    let batch = client
        .submit("name: b\nstages:\n  - name: a\n    command: 'sleep 30'\n    resources: { vcores: 0.1, memory: 32MiB }\n", "yaml", "mia")
        .await
        .unwrap();
    let e = client
        .update_application(&batch, &base, "yaml")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a service"), "{e}");
    client.kill_application(&batch).await.unwrap();
    client.kill_application(&app).await.unwrap();
    let r = wait_state(&client, &app, Duration::from_secs(30)).await;
    assert_eq!(r.state(), pb::ApplicationState::Killed);
}
