//! Standalone mode: one `resource-manager standalone --local-agent` process
//! is a whole cluster (state in sled, masters in-process, an embedded node
//! agent). Restarted mid-job, it still knows the job, and a new master
//! attempt (not counted against max_attempts) finishes it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_client::proto as pb;
use weft_common::http::scrape::{dashboard_metrics, scrape, served, value};

pub(crate) struct Standalone {
    child: Option<Child>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: String,
    parent: String,
    /// Where it serves its REST API and `/metrics` (`--http-listen`), if
    /// it does.
    pub(crate) http: Option<String>,
}

impl Standalone {
    fn start() -> Standalone {
        Self::start_with("")
    }

    /// With `agent_extra` appended to the embedded agent's config.
    fn start_with(agent_extra: &str) -> Standalone {
        Self::start_config(agent_extra, true)
    }

    /// `own_dirs`: the agent config names its work dir and cgroup parent;
    /// otherwise the standalone master picks them.
    fn start_config(agent_extra: &str, own_dirs: bool) -> Standalone {
        Self::start_full(agent_extra, own_dirs, None)
    }

    /// `http`: where it serves `/metrics`, if it does.
    pub(crate) fn start_full(
        agent_extra: &str,
        own_dirs: bool,
        http: Option<String>,
    ) -> Standalone {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let parent = if own_dirs {
            format!("weft-rm-it-{}-standalone-{port}", std::process::id())
        } else {
            format!("weft-standalone-{port}")
        };
        let mut s = Standalone {
            child: None,
            dir,
            addr: format!("127.0.0.1:{port}"),
            parent,
            http,
        };
        // Top-level keys first: a key after a [table] belongs to that table.
        let (work_dir, parent) = if own_dirs {
            (
                format!(
                    "work_dir = {:?}\n",
                    s.dir.path().join("agent").display().to_string()
                ),
                format!("[containers]\ncgroup_parent = {:?}\n", s.parent),
            )
        } else {
            Default::default()
        };
        std::fs::write(
            s.dir.path().join("agent.toml"),
            format!(
                "node_id = \"solo\"\n{work_dir}[resources]\nvcores = 4.0\nmemory = \"4GiB\"\n\
                 {parent}{gpu}{agent_extra}",
                // No GPU unless the test gives its own.
                gpu = if agent_extra.contains("[gpu]") {
                    ""
                } else {
                    "[gpu]\nprobe = \"none\"\n"
                }
            ),
        )
        .unwrap();
        s.spawn();
        s
    }

    /// With `/metrics` served on a port of its own.
    pub(crate) fn start_with_http() -> Standalone {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_full("", true, Some(format!("127.0.0.1:{port}")))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("standalone.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_resource-manager"))
            .args(["standalone", "--data-dir"])
            .arg(self.dir.path())
            .args(["--listen", &self.addr, "--local-agent", "--agent-config"])
            .arg(self.dir.path().join("agent.toml"))
            .args(
                self.http
                    .iter()
                    .flat_map(|h| ["--http-listen".to_string(), h.clone()]),
            )
            .env("RUST_LOG", "info,raft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGTERM, and wait for the process to end.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    pub(crate) fn client(&self) -> weft_client::RmClient {
        weft_client::RmClient::new([self.addr.clone()])
            .unwrap()
            .with_deadline(Duration::from_secs(30))
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.stop();
        crate::nodes::force_clean(&self.parent);
    }
}

async fn wait_end(client: &weft_client::RmClient, app: &str) -> pb::ApplicationReport {
    wait_end_logged(client, app, None).await
}

/// [`wait_end`], with the cluster's log in the failure message.
async fn wait_end_logged(
    client: &weft_client::RmClient,
    app: &str,
    log: Option<&std::path::Path>,
) -> pb::ApplicationReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.get_application(app).await.unwrap();
        if r.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{app} still {:?}: {r:?}\n{}",
            r.state(),
            log.and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_runs_jobs_in_one_process_and_a_restart_loses_none() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let mut solo = Standalone::start();
    let client = solo.client();
    crate::cluster::wait_nodes(&client, 1).await;

    // A pipeline with a gang runs to its end; quotas hold as on a cluster.
    let pipeline = "name: demo\nstages:\n  - name: prep\n    instances: 3\n    command: 'test -n \"$WEFT_APP_ID\"'\n    resources: { vcores: 0.2, memory: 64MiB }\n  - name: train\n    after: [prep]\n    gang: true\n    framework: pytorch\n    roles:\n      worker: { instances: 2, resources: { vcores: 0.2, memory: 64MiB } }\n    command: 'test \"$WORLD_SIZE\" = 2'\n";
    let app = client.submit(pipeline, "yaml", "solo").await.unwrap();
    let r = wait_end(&client, &app).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.stages.iter().map(|s| s.done).sum::<u32>(), 5);
    let hog = "name: hog\nstages:\n  - name: load\n    instances: 1\n    command: 'exec tail /dev/zero'\n    resources: { vcores: 0.2, memory: 32MiB }\n";
    let app = client.submit(hog, "yaml", "solo").await.unwrap();
    let r = wait_end(&client, &app).await;
    assert_eq!(r.state(), pb::ApplicationState::Failed);
    assert!(
        r.diagnostics.contains("over its memory quota"),
        "{}",
        r.diagnostics
    );

    // rmctl against it: the quick form waits and exits 0 on success, 1 with
    // the reason on failure; status in JSON; kill.
    let addr = solo.addr.clone();
    let rmctl = |args: Vec<String>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::rmctl::run(&args, &addr)
        })
    };
    let words = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    let ok = rmctl(words(
        "submit --wait --name quick --instances 2 --vcores 0.2 --memory 64MiB -- test -n $WEFT_CONTAINER_ID",
    ))
    .await
    .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let id = crate::rmctl::stdout(&ok)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(crate::rmctl::stdout(&ok).ends_with("SUCCEEDED\n"), "{ok:?}");
    let mut bad = words("submit --wait --vcores 0.2 --memory 64MiB -- sh -c");
    bad.push("exit 3".into());
    let bad = rmctl(bad).await.unwrap();
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(
        crate::rmctl::stdout(&bad).contains("FAILED: stage run task 0: exited with code 3"),
        "{bad:?}"
    );
    let status = rmctl(words(&format!("app status {id} -o json")))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["state"], "SUCCEEDED");
    assert_eq!(v["stages"][0]["done"], 2);
    // Logs of a task, followed from before it starts until it ends, and
    // stderr; an unknown task is named.
    let mut ticker = words("submit --vcores 0.2 --memory 64MiB -- sh -c");
    ticker.push("for i in 1 2 3; do echo tick $i; sleep 0.3; done; echo oops >&2".into());
    let tid = rmctl(ticker).await.unwrap();
    let tid = crate::rmctl::stdout(&tid).trim().to_string();
    let followed = rmctl(words(&format!("app logs {tid} run/0 --follow")))
        .await
        .unwrap();
    assert!(followed.status.success(), "{followed:?}");
    assert_eq!(crate::rmctl::stdout(&followed), "tick 1\ntick 2\ntick 3\n");
    let err = rmctl(words(&format!("app logs {tid} run/0 --stderr")))
        .await
        .unwrap();
    assert_eq!(crate::rmctl::stdout(&err), "oops\n");
    let unknown = rmctl(words(&format!("app logs {tid} train/7")))
        .await
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("has no task or container \"train/7\""),
        "{unknown:?}"
    );
    let sleeper = rmctl(words("submit --vcores 0.2 --memory 64MiB -- sleep 100"))
        .await
        .unwrap();
    let sid = crate::rmctl::stdout(&sleeper).trim().to_string();
    let killed = rmctl(words(&format!("app kill {sid}"))).await.unwrap();
    assert!(killed.status.success(), "{killed:?}");
    let waited = rmctl(words(&format!("app wait {sid}"))).await.unwrap();
    assert_eq!(waited.status.code(), Some(1));
    assert!(
        crate::rmctl::stdout(&waited).contains("KILLED"),
        "{waited:?}"
    );

    // Restarted mid-job: the job is still there and a new attempt finishes it.
    let long = "name: long\nstages:\n  - name: work\n    instances: 2\n    command: 'sleep 3'\n    resources: { vcores: 0.2, memory: 64MiB }\n  - name: after\n    after: [work]\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.2, memory: 64MiB }\n";
    let app = client.submit(long, "yaml", "solo").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get_application(&app).await.unwrap();
        if r.stages.first().is_some_and(|s| s.running == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "tasks never ran: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    solo.stop();
    solo.spawn();
    let client = solo.client();
    let r = wait_end(&client, &app).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 2, "a second in-process master finished it");
    // And the earlier jobs are remembered.
    assert_eq!(
        client
            .list_applications(Default::default())
            .await
            .unwrap()
            .len(),
        7
    );
}

/// A script's first job on a brand-new cluster: `rmctl submit --wait` the
/// moment `rmctl cluster status` first answers, on five fresh clusters. The
/// node is offered work only once its agent can start it, so every job
/// succeeds, first try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_job_submitted_the_moment_a_fresh_cluster_answers_succeeds() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    for round in 0..5 {
        let solo = Standalone::start();
        let addr = solo.addr.clone();
        let out = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let st = crate::rmctl::run(&["--timeout", "1", "cluster", "status"], &addr);
                if st.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster never answered: {st:?}"
                );
            }
            crate::rmctl::run(
                &[
                    "submit", "--wait", "--vcores", "0.2", "--memory", "64MiB", "--", "true",
                ],
                &addr,
            )
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "fresh cluster {round}: {out:?}\n{}",
            std::fs::read_to_string(solo.dir.path().join("standalone.log")).unwrap_or_default()
        );
        assert!(
            crate::rmctl::stdout(&out).ends_with("SUCCEEDED\n"),
            "{out:?}"
        );
        let r = solo
            .client()
            .list_applications(Default::default())
            .await
            .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].attempt, 1, "no master attempt was used up: {r:?}");
    }
}

/// A full cluster, a pending job killed, then capacity freed: the job
/// behind it is placed in the very next round, and no allocation is ever
/// refused (the killed job's asks left the leader's table with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_pending_job_does_not_stall_the_jobs_behind_it() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let solo = Standalone::start();
    let client = solo.client();
    crate::cluster::wait_nodes(&client, 1).await;
    let job = |name: &str, cmd: &str| {
        format!(
            "name: {name}\nstages:\n  - name: run\n    instances: 1\n    command: '{cmd}'\n    resources: {{ vcores: 4, memory: 1GiB }}\n"
        )
    };
    let solo_ref = &solo;
    let wait = move |app: String, what: &'static str, done: fn(&pb::ApplicationReport) -> bool| {
        let client = solo_ref.client();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let r = client.get_application(&app).await.unwrap();
                if done(&r) {
                    return r;
                }
                assert!(Instant::now() < deadline, "{app} never {what}: {r:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The node's 4 vcores all go to the first job.
    let full = client
        .submit(&job("full", "sleep 600"), "yaml", "solo")
        .await
        .unwrap();
    wait(full.clone(), "ran", |r| {
        r.stages.first().is_some_and(|s| s.running == 1)
    })
    .await;
    // The second waits for room (its master has asked), and is killed.
    let pending = client
        .submit(&job("pending", "true"), "yaml", "solo")
        .await
        .unwrap();
    wait(pending.clone(), "asked", |r| {
        r.state() == pb::ApplicationState::Running && !r.stages.is_empty()
    })
    .await;
    client.kill_application(&pending).await.unwrap();
    let next = client
        .submit(&job("next", "true"), "yaml", "solo")
        .await
        .unwrap();
    wait(next.clone(), "asked", |r| {
        r.state() == pb::ApplicationState::Running && !r.stages.is_empty()
    })
    .await;
    let before = client.cluster_status().await.unwrap().scheduler.unwrap();
    // Room again: the next job runs, placed by the first round after.
    client.kill_application(&full).await.unwrap();
    let r = wait(next.clone(), "ended", |r| {
        r.state() as i32 >= pb::ApplicationState::Succeeded as i32
    })
    .await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    let after = client.cluster_status().await.unwrap().scheduler.unwrap();
    let log =
        || std::fs::read_to_string(solo.dir.path().join("standalone.log")).unwrap_or_default();
    assert_eq!(
        after.rounds,
        before.rounds + 1,
        "one round placed it: {before:?} -> {after:?}\n{}",
        log()
    );
    assert_eq!(after.placed, before.placed + 1, "{after:?}");
    assert_eq!(
        (after.refused_at_verify, after.refused_at_apply),
        (0, 0),
        "{after:?}"
    );
    let killed = client.get_application(&pending).await.unwrap();
    assert_eq!(killed.state(), pb::ApplicationState::Killed);
}

/// Ports are scheduled: a 50-member gang on one node, each member with its
/// gang port and a named one, while the test holds a port of the node's
/// range open. Every member binds both of its ports at once: 100 distinct
/// ports, none the held one, all in the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_on_one_node_gets_distinct_free_ports() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    // A range below the kernel's ephemeral ports (as the agent's default
    // 20000-32000 is), starting at the port the test holds.
    let (held, first) = (0..200u16)
        .map(|k| 20000 + (std::process::id() as u16 % 50 + k) * 50)
        .find_map(|p| {
            std::net::TcpListener::bind(("127.0.0.1", p))
                .ok()
                .map(|l| (l, p))
        })
        .expect("a free port to hold");
    let last = first + 150;
    let solo = Standalone::start_with(&format!("[ports]\nfirst = {first}\nlast = {last}\n"));
    let client = solo.client();
    crate::cluster::wait_nodes(&client, 1).await;
    let out = solo.dir.path().join("ports");
    std::fs::create_dir_all(&out).unwrap();
    // Each member binds its two ports (all members are up together), then
    // records them.
    let script = format!(
        "import os, socket, time\n\
         ps = [int(os.environ['WEFT_PORT']), int(os.environ['WEFT_PORT_HTTP'])]\n\
         ss = [socket.socket() for _ in ps]\n\
         [s.bind(('0.0.0.0', p)) for s, p in zip(ss, ps)]\n\
         [s.listen() for s in ss]\n\
         assert os.environ['MASTER_PORT'] != '0'\n\
         open('{}/' + os.environ['WEFT_TASK_INDEX'], 'w').write(' '.join(map(str, ps)))\n\
         time.sleep(1)\n",
        out.display()
    );
    std::fs::write(solo.dir.path().join("bind.py"), script).unwrap();
    let spec = format!(
        "name: ports\nstages:\n  - name: train\n    gang: true\n    instances: 50\n    ports: [http]\n    command: 'python3 {}'\n    resources: {{ vcores: 0.05, memory: 32MiB }}\n",
        solo.dir.path().join("bind.py").display()
    );
    let app = client.submit(&spec, "yaml", "solo").await.unwrap();
    let r = wait_end_logged(&client, &app, Some(&solo.dir.path().join("standalone.log"))).await;
    assert_eq!(
        r.state(),
        pb::ApplicationState::Succeeded,
        "{r:?}\n{}",
        std::fs::read_to_string(solo.dir.path().join("standalone.log")).unwrap_or_default()
    );
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..50 {
        let line = std::fs::read_to_string(out.join(i.to_string())).unwrap();
        for p in line.split(' ') {
            let p: u16 = p.parse().unwrap();
            assert!((first..=last).contains(&p), "{p} outside {first}-{last}");
            assert_ne!(p, first, "the held port was handed out");
            assert!(ports.insert(p), "port {p} handed out twice");
        }
    }
    assert_eq!(ports.len(), 100);
    drop(held);
}

/// The quickstart's ML pipeline (examples/pipeline, python3 standard library
/// only) on a standalone cluster: generate, preprocess in 4 shards, train a
/// 2-rank gang exchanging gradients over TCP, evaluate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_ml_pipeline_trains_a_model_on_a_standalone_cluster() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let solo = Standalone::start();
    let client = solo.client();
    crate::cluster::wait_nodes(&client, 1).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pipeline = root.join("examples/pipeline");
    let data = solo.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let spec = std::fs::read_to_string(pipeline.join("pipeline.yaml"))
        .unwrap()
        .replace("@PIPELINE@", pipeline.to_str().unwrap())
        .replace("@DATA@", data.to_str().unwrap());
    let app = client.submit(&spec, "yaml", "solo").await.unwrap();
    let r = wait_end(&client, &app).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    let accuracy: f64 = std::fs::read_to_string(data.join("accuracy.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(accuracy > 0.9, "accuracy {accuracy}");

    // The client library example.
    let example = std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager"))
        .with_file_name("examples")
        .join("client");
    assert!(
        example.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (README's test command does)",
        example.display()
    );
    let addr = solo.addr.clone();
    let out =
        tokio::task::spawn_blocking(move || Command::new(example).arg(addr).output().unwrap())
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Succeeded greet 2/2"), "{stdout}");
    assert!(
        stdout.contains("greet/1: hello from task 1 of app-"),
        "{stdout}"
    );

    // The submit-job scripts of examples/, with the real rmctl.
    let rmctl =
        std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("rmctl");
    let script = |args: Vec<String>| {
        let (rmctl, addr, root) = (rmctl.clone(), solo.addr.clone(), root.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("bash")
                .args(&args)
                .current_dir(root)
                .env("RMCTL", rmctl)
                .env("WEFT_RM", addr)
                .output()
                .unwrap()
        })
    };
    let array = script(vec![
        "examples/submit-array.sh".into(),
        "3".into(),
        "echo shard $WEFT_TASK_INDEX".into(),
    ])
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&array.stdout);
    assert!(array.status.success(), "{array:?}");
    for i in 0..3 {
        assert!(out.contains(&format!("--- task {i}\nshard {i}\n")), "{out}");
    }
    let sweep = script(vec![
        "examples/submit-sweep.sh".into(),
        "0.1".into(),
        "0.5".into(),
        "1.0".into(),
    ])
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&sweep.stdout);
    assert!(sweep.status.success(), "{sweep:?}");
    assert!(out.contains("best learning rate: 0.5 (loss 0)"), "{out}");

    // The pipeline's model served by examples/serving: two replicas of a
    // service, queried through the endpoints rmctl lists; they score the
    // test set as the pipeline's evaluation did.
    let served = script(vec![
        "examples/serve-model.sh".into(),
        data.display().to_string(),
    ])
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&served.stdout);
    assert!(served.status.success(), "{served:?}");
    assert!(
        out.contains(&format!(
            "served accuracy: {accuracy:.3} on 2000 test points"
        )),
        "{out}"
    );
    for replica in 0..2 {
        assert!(
            out.contains(&format!("replica {replica}: 1000 answers")),
            "{out}"
        );
    }
}

/// An agent config that names neither a work dir nor a cgroup parent (one
/// that only picks the GPU probe, say) gets the cluster's own: two
/// standalone clusters side by side on one machine each run their first
/// job. Both once took the agent's defaults (/var/lib/weft/agent and the
/// cgroup parent `weft`): every fresh cluster numbers its containers from
/// the same first id, so the second cluster's first container was refused
/// as already existing on the node and its job FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_clusters_with_a_minimal_agent_config_do_not_share_an_agent_dir() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let a = Standalone::start_config("", false);
    let b = Standalone::start_config("", false);
    let job = "name: first\nstages:\n  - name: run\n    instances: 1\n    command: 'sleep 1'\n    resources: { vcores: 0.2, memory: 64MiB }\n";
    // Each submitted at once (the client waits for a leader, not for the
    // node), both clusters running at the same time.
    let (ca, cb) = (a.client(), b.client());
    let (ra, rb) = tokio::join!(
        async {
            let app = ca.submit(job, "yaml", "a").await.unwrap();
            wait_end_logged(&ca, &app, Some(&a.dir.path().join("standalone.log"))).await
        },
        async {
            let app = cb.submit(job, "yaml", "b").await.unwrap();
            wait_end_logged(&cb, &app, Some(&b.dir.path().join("standalone.log"))).await
        }
    );
    for (r, s) in [(ra, &a), (rb, &b)] {
        assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
        assert!(
            s.dir.path().join("agent/state").is_dir(),
            "the agent's state is under the data dir"
        );
    }
}

/// The quick form as a user's script uses it, the instant the cluster
/// answers: environment variables reach the tasks, `--max-runtime` kills
/// one that runs past it (saying so), a `--label` no node has is refused,
/// and a bad flag is named before anything is submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_form_sets_env_max_runtime_and_labels_and_names_a_bad_flag() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let solo = Standalone::start();
    let addr = solo.addr.clone();
    let run = move |args: &[&str]| crate::rmctl::run(args, &addr);
    let small = ["--vcores", "0.2", "--memory", "64MiB"];
    let r = run.clone();
    let (env_job, slow_job, labelled) = tokio::task::spawn_blocking(move || {
        let q = |extra: &[&str], cmd: &[&str]| {
            let mut a = vec!["--timeout", "60", "submit"];
            a.extend_from_slice(&small);
            a.extend_from_slice(extra);
            a.push("--");
            a.extend_from_slice(cmd);
            r(&a)
        };
        let env_job = q(
            &[
                "--wait",
                "--env",
                "GREETING=hello world",
                "--env",
                "WHO=weft",
                "--instances",
                "2",
            ],
            &["sh", "-c", "echo \"$GREETING from $WHO\""],
        );
        let slow_job = q(&["--wait", "--max-runtime", "1s"], &["sleep", "30"]);
        let labelled = q(&["--label", "accelerator=tpu-v9"], &["true"]);
        (env_job, slow_job, labelled)
    })
    .await
    .unwrap();
    assert!(env_job.status.success(), "{env_job:?}");
    let id = crate::rmctl::stdout(&env_job);
    let id = id.split_whitespace().next().unwrap().to_string();
    for task in ["run/0", "run/1"] {
        let (r, i, t) = (run.clone(), id.clone(), task.to_string());
        let logs = tokio::task::spawn_blocking(move || r(&["app", "logs", &i, &t]))
            .await
            .unwrap();
        assert_eq!(
            crate::rmctl::stdout(&logs),
            "hello world from weft\n",
            "{logs:?}"
        );
    }
    assert!(!slow_job.status.success(), "{slow_job:?}");
    let out = crate::rmctl::stdout(&slow_job);
    assert!(
        out.contains("FAILED") && out.contains("ran past its max_runtime of 1s"),
        "{out}"
    );
    // No node has the label: refused at submission, naming it.
    assert!(!labelled.status.success(), "{labelled:?}");
    assert_eq!(
        String::from_utf8_lossy(&labelled.stderr).trim(),
        "rmctl: stages[0].resources.node_labels: no node has accelerator=tpu-v9"
    );

    // Bad flags: named, and nothing submitted.
    let before = solo
        .client()
        .list_applications(Default::default())
        .await
        .unwrap()
        .len();
    let r = run.clone();
    let (bad_env, share_alone) = tokio::task::spawn_blocking(move || {
        (
            r(&["submit", "--env", "NOVALUE", "--", "true"]),
            r(&["submit", "--gpu-share", "0.25", "--", "true"]),
        )
    })
    .await
    .unwrap();
    assert!(!bad_env.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad_env.stderr).trim(),
        "rmctl: --env: \"NOVALUE\" is not KEY=VALUE"
    );
    assert!(!share_alone.status.success());
    assert!(
        String::from_utf8_lossy(&share_alone.stderr).contains("--gpu-memory"),
        "{share_alone:?}"
    );
    let after = solo
        .client()
        .list_applications(Default::default())
        .await
        .unwrap()
        .len();
    assert_eq!(before, after);
}

/// The example Grafana dashboard.
fn dashboard() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/deploy/grafana-dashboard.json")
}

/// `/metrics` scraped the moment its port answers, and again while a job
/// runs and after it ended: the queue's figures, the scheduler's and
/// raft's counters and histograms move with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_and_move_when_a_job_runs() {
    if crate::secure::skip("a standalone cluster on loopback is plaintext and zero-config by design; this run secures multi-member clusters") {
        return;
    }
    let solo = Standalone::start_with_http();
    let http = solo.http.clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&http).await.is_err() {
        assert!(Instant::now() < deadline, "/metrics never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = scrape(&http).await;
    assert!(
        first.docs.contains_key("weft_raft_term"),
        "{:?}",
        first.docs.keys()
    );
    assert_eq!(
        value(&first, "weft_submissions_total", &[("outcome", "ok")]),
        None
    );

    let c = solo.client();
    let id = c
        .submit(
            "name: m\nstages:\n  - name: run\n    instances: 2\n    command: sleep 3\n    resources: { vcores: 0.5, memory: 64MiB }\n",
            "yaml",
            "dana",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let s = scrape(&http).await;
        if value(&s, "weft_queue_containers", &[("queue", "root")]) == Some(2.0) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the job's containers never showed: {:?}",
            s.samples
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let q = [("queue", "root")];
    assert_eq!(
        value(
            &during,
            "weft_queue_applications",
            &[("queue", "root"), ("state", "running")]
        ),
        Some(1.0)
    );
    assert_eq!(value(&during, "weft_queue_allocated_vcores", &q), Some(1.0));
    assert_eq!(
        value(&during, "weft_queue_allocated_memory_bytes", &q),
        Some(128.0 * 1024.0 * 1024.0)
    );
    assert_eq!(value(&during, "weft_raft_leader", &[]), Some(1.0));
    assert_eq!(
        value(&during, "weft_nodes", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(
        value(&during, "weft_cluster_capacity_vcores", &[]),
        Some(4.0)
    );
    assert_eq!(
        value(&during, "weft_submissions_total", &[("outcome", "ok")]),
        Some(1.0)
    );

    let report = wait_end(&c, &id).await;
    assert_eq!(
        report.state(),
        pb::ApplicationState::Succeeded,
        "{report:?}"
    );
    assert!(c.kill_application("app-999999").await.is_err());
    let after = scrape(&http).await;
    assert_eq!(value(&after, "weft_queue_containers", &q), Some(0.0));
    assert_eq!(value(&after, "weft_queue_allocated_vcores", &q), Some(0.0));
    assert_eq!(
        value(
            &after,
            "weft_queue_applications",
            &[("queue", "root"), ("state", "running")]
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&after, "weft_kills_total", &[("outcome", "not_found")]),
        Some(1.0)
    );
    assert!(value(&after, "weft_scheduler_placements_total", &[]).unwrap() >= 2.0);
    assert!(value(&after, "weft_scheduler_rounds_total", &[]).unwrap() >= 1.0);
    assert!(value(&after, "weft_scheduler_round_seconds_count", &[]).unwrap() >= 1.0);
    let proposals = value(&after, "weft_raft_proposal_seconds_count", &[]).unwrap();
    let before = value(&first, "weft_raft_proposal_seconds_count", &[]).unwrap_or(0.0);
    assert!(proposals > before, "{before} -> {proposals}");
    assert!(
        value(&after, "weft_raft_applied_index", &[]).unwrap()
            > value(&first, "weft_raft_applied_index", &[]).unwrap()
    );
    // Every RM figure the example dashboard queries is served.
    let served = served(&[&after]);
    for m in dashboard_metrics(&dashboard()) {
        if !m.starts_with("weft_agent_") {
            assert!(
                served.contains(m.as_str()),
                "the dashboard queries {m}, not served: {served:?}"
            );
        }
    }
    assert_eq!(
        value(&after, "weft_raft_leader_changes_seen_total", &[]),
        Some(1.0)
    );
}
