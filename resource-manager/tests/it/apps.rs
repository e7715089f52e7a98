//! Jobs run end to end by the real `app-master` binary against a 3-member RM
//! group and two real node agents (the test starts the master process, as the
//! RM will once it launches masters in containers).

use std::process::Command;
use std::time::Duration;

use weft_client::proto as pb;

use crate::cluster::Cluster;
use crate::nodes::AgentProcess;

pub(crate) fn app_master() -> std::path::PathBuf {
    let p =
        std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("app-master");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// A 3-member group that launches the real `app-master` for every job, with
/// an agent per name, all registered.
async fn launching_cluster(names: &[&str]) -> (Cluster, Vec<AgentProcess>) {
    launching_cluster_with(names, "").await
}

/// [`launching_cluster`] with `top` (top-level TOML) in each member's config.
pub(crate) async fn launching_cluster_with(
    names: &[&str],
    top: &str,
) -> (Cluster, Vec<AgentProcess>) {
    launching_cluster_of(names, top, false).await
}

/// `own_address`: the members on a loopback address of their own
/// ([`Cluster::start_on_own_address`]).
async fn launching_cluster_of(
    names: &[&str],
    top: &str,
    own_address: bool,
) -> (Cluster, Vec<AgentProcess>) {
    let extra = format!(
        "{top}[masters]\nlaunch = true\ncommand = {:?}\n",
        app_master().display().to_string()
    );
    let cluster = if own_address {
        Cluster::start_on_own_address(3, 1000, &extra)
    } else {
        Cluster::start_with(3, 1000, &extra)
    };
    cluster.leader().await;
    let agents = names
        .iter()
        .map(|n| AgentProcess::start(n, &cluster.addrs()))
        .collect();
    crate::cluster::wait_nodes(&cluster.client(), names.len()).await;
    (cluster, agents)
}

const PIPELINE: &str = r#"
name: pipeline
stages:
  - name: preprocess
    instances: 4
    command: 'test -n "$WEFT_APP_ID" && echo "shard $WEFT_TASK_INDEX of stage $WEFT_STAGE"'
    resources: { vcores: 0.5, memory: 64MiB }
  - name: train
    after: [preprocess]
    framework: tensorflow
    gang: true
    roles:
      ps: { instances: 1, resources: { vcores: 0.5, memory: 64MiB } }
      worker: { instances: 2, resources: { vcores: 0.5, memory: 64MiB } }
    command: >-
      case "$TF_CONFIG" in *"\"type\":\"$WEFT_ROLE\""*) ;; *) echo "wrong task type: $TF_CONFIG"; exit 3;; esac;
      case "$TF_CONFIG" in *'"worker":["'*'","'*'"]'*) ;; *) echo "need two workers: $TF_CONFIG"; exit 4;; esac;
      case "$TF_CONFIG" in *'"ps":["'*) ;; *) echo "no ps: $TF_CONFIG"; exit 5;; esac
  - name: evaluate
    after: [train]
    instances: 1
    command: 'true'
    resources: { vcores: 0.5, memory: 64MiB }
"#;

const HOG: &str = r#"
name: hog
stages:
  - name: load
    instances: 1
    max_retries: 3
    command: 'exec tail /dev/zero'
    resources: { vcores: 0.5, memory: 32MiB }
"#;

async fn run_job(cluster: &Cluster, spec: &str) -> (String, std::process::Output) {
    let client = cluster.client();
    let submitted = client.submit_with(spec, "yaml", "mia", true).await.unwrap();
    let app = submitted.application_id;
    let token = hex::encode(submitted.application_token);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, spec).unwrap();
    let rm = cluster.addrs().join(",");
    let (a, f) = (app.clone(), file.clone());
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            Command::new(app_master())
                .args(["--app-id", &a, "--rm", &rm, "--spec", f.to_str().unwrap()])
                .envs(crate::secure::master_env())
                .env("RUST_LOG", "warn")
                .env("WEFT_APP_TOKEN", &token)
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("the job ends within 2 minutes")
    .unwrap();
    (app, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_with_a_tensorflow_gang_succeeds_and_a_memory_hog_fails_with_its_reason() {
    let cluster = Cluster::start(3, 1000);
    cluster.leader().await;
    let _a = AgentProcess::start("node-a", &cluster.addrs());
    let _b = AgentProcess::start("node-b", &cluster.addrs());
    let client = cluster.client();
    crate::cluster::wait_nodes(&client, 2).await;

    let (app, out) = run_job(&cluster, PIPELINE).await;
    assert!(
        out.status.success(),
        "app-master: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = client.get_application(&app).await.unwrap();
    assert_eq!(
        report.state(),
        pb::ApplicationState::Succeeded,
        "{report:?}"
    );

    let (app, out) = run_job(&cluster, HOG).await;
    assert!(!out.status.success());
    let report = client.get_application(&app).await.unwrap();
    assert_eq!(report.state(), pb::ApplicationState::Failed);
    assert!(
        report.diagnostics.contains("over its memory quota"),
        "{}",
        report.diagnostics
    );
    assert!(
        report.diagnostics.contains("not retried unchanged"),
        "{}",
        report.diagnostics
    );
    assert_eq!(
        client
            .cluster_status()
            .await
            .unwrap()
            .used
            .unwrap()
            .vcores_milli,
        0,
        "nothing left running"
    );

    // The custom application master of examples/ runs its own job.
    let example = std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager"))
        .with_file_name("examples")
        .join("custom-am");
    assert!(
        example.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (README's test command does)",
        example.display()
    );
    let rm = cluster.addrs().join(",");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(example)
            .args(["--rm", &rm, "--tasks", "3"])
            .envs(crate::secure::master_env())
            .envs(crate::secure::get().map(|s| ("WEFT_TOKEN", s.secret.clone())))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        assert!(stdout.contains(&format!("task {i} succeeded")), "{stdout}");
    }
    assert!(
        stdout.contains(": Succeeded: every task succeeded"),
        "{stdout}"
    );
}

async fn running_containers(client: &weft_client::RmClient) -> usize {
    let mut n = 0;
    for node in client.list_nodes().await.unwrap() {
        let mut cm = weft_proto::v1::container_manager_client::ContainerManagerClient::new(
            crate::secure::channel(&node.address, weft_common::tls::Role::Agent).await,
        );
        n += cm
            .list_containers(pb::ListContainersRequest {
                include_finished: false,
            })
            .await
            .unwrap()
            .into_inner()
            .containers
            .len();
    }
    n
}

pub(crate) async fn wait_state(
    client: &weft_client::RmClient,
    app: &str,
    within: Duration,
) -> pb::ApplicationReport {
    let deadline = std::time::Instant::now() + within;
    loop {
        let r = client.get_application(app).await.unwrap();
        if r.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{app} still {:?}",
            r.state()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rm_starts_masters_and_a_killed_job_leaves_nothing_running() {
    let (cluster, agents) = launching_cluster(&NODES).await;
    let client = cluster.client();

    // Submitted, nothing else: the RM starts the master, which runs the job
    // (preprocess x4 -> a 3-task TensorFlow gang checking its own TF_CONFIG
    // -> evaluate).
    let app = client.submit(PIPELINE, "yaml", "mia").await.unwrap();
    let done = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 1, "one master attempt ran it");
    assert!(!done.am_node_id.is_empty(), "{done:?}");
    let stages: Vec<(String, u32, u32)> = done
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.done, s.total))
        .collect();
    assert_eq!(
        stages,
        vec![
            ("preprocess".to_string(), 4, 4),
            ("train".to_string(), 3, 3),
            ("evaluate".to_string(), 1, 1)
        ]
    );
    assert_eq!(done.progress, 1.0);

    // rmctl on the 3-member group: wait (exit status), a task's logs, drain.
    let rm = cluster.addrs().join(",");
    let rmctl = |args: Vec<String>| {
        let rm = rm.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::rmctl::run(&args, &rm)
        })
    };
    let mut quick: Vec<String> = "submit --wait --instances 3 --vcores 0.5 --memory 64MiB -- sh -c"
        .split(' ')
        .map(str::to_string)
        .collect();
    quick.push("echo out $WEFT_TASK_INDEX; test $WEFT_TASK_INDEX != 2".into());
    let failed = rmctl(quick).await.unwrap();
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let text = crate::rmctl::stdout(&failed);
    assert!(
        text.contains("FAILED: stage run task 2: exited with code 1"),
        "{text}"
    );
    let id = text.split(' ').next().unwrap().to_string();
    let logs = rmctl(vec![
        "app".into(),
        "logs".into(),
        id.clone(),
        "run/1".into(),
    ])
    .await
    .unwrap();
    assert_eq!(crate::rmctl::stdout(&logs), "out 1\n");
    let master = rmctl(vec!["app".into(), "logs".into(), id, "--stderr".into()])
        .await
        .unwrap();
    assert!(master.status.success(), "{master:?}");
    let drained = rmctl(vec!["node".into(), "drain".into(), "node-c".into()])
        .await
        .unwrap();
    assert!(drained.status.success(), "{drained:?}");
    let node = rmctl(vec![
        "node".into(),
        "status".into(),
        "node-c".into(),
        "-o".into(),
        "json".into(),
    ])
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&node.stdout).unwrap();
    assert_eq!(v["state"], "DRAINING", "{v}");

    // A long job killed mid-run: its master and tasks are stopped everywhere.
    let long = "name: long\nstages:\n  - name: sleep\n    instances: 2\n    command: 'exec sleep 1000'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    let app = client.submit(long, "yaml", "mia").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while running_containers(&client).await < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "master and two tasks never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed = rmctl(vec!["app".into(), "kill".into(), app.clone()])
        .await
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
    assert_eq!(
        crate::rmctl::stdout(&killed),
        format!("application {app} killed\n")
    );
    assert_eq!(
        client.get_application(&app).await.unwrap().state(),
        pb::ApplicationState::Killed
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = running_containers(&client).await;
        if n == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} containers still run after the kill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And no process of them is left on any node.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<i32> = agents
            .iter()
            .flat_map(|a| a.container_processes())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "processes left after the kill: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Running containers per node id.
async fn running_by_node(client: &weft_client::RmClient) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for node in client.list_nodes().await.unwrap() {
        if node.state() != pb::NodeState::Running {
            continue;
        }
        let Ok(ch) = crate::secure::try_channel(&node.address, weft_common::tls::Role::Agent).await
        else {
            continue;
        };
        let mut cm = weft_proto::v1::container_manager_client::ContainerManagerClient::new(ch);
        if let Ok(r) = cm
            .list_containers(pb::ListContainersRequest {
                include_finished: false,
            })
            .await
        {
            out.push((node.node_id.clone(), r.into_inner().containers.len()));
        }
    }
    out
}

const STEADY: &str = "name: steady\nmax_attempts: 3\nstages:\n  - name: work\n    instances: 4\n    command: 'sleep 3'\n    resources: { vcores: 0.5, memory: 64MiB }\n  - name: after\n    after: [work]\n    instances: 2\n    command: 'sleep 1'\n    resources: { vcores: 0.5, memory: 64MiB }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_finish_through_a_leader_kill_and_a_node_kill() {
    let names = NODES;
    let (mut cluster, mut agents) = launching_cluster(&names).await;
    let client = cluster.client();
    let busy = |min: usize| {
        let client = &client;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let by = running_by_node(client).await;
                if by.iter().map(|x| x.1).sum::<usize>() >= min {
                    return by;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the job never got {min} containers running"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // The leader dies while the job runs.
    let app = client.submit(STEADY, "yaml", "ops").await.unwrap();
    busy(3).await;
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let client = cluster.client();
    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");

    // The busiest node dies while the job runs: its work runs again elsewhere.
    let app = client.submit(STEADY, "yaml", "ops").await.unwrap();
    let by = busy(3).await;
    let (victim, _) = by.iter().max_by_key(|x| x.1).unwrap().clone();
    let i = names.iter().position(|n| *n == victim).unwrap();
    agents[i].kill9();
    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    // The node comes back (and cleans what its killed agent left).
    drop(agents.remove(i)); // clears what the killed agent left
    agents.insert(i, AgentProcess::start(&victim, &cluster.addrs()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !client
        .list_nodes()
        .await
        .unwrap()
        .iter()
        .any(|n| n.node_id == victim && n.state() == pb::NodeState::Running)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{victim} did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node running a job's master dies: the master's attempt does not count
/// against `max_attempts` (1 here), a second attempt starts elsewhere, adopts
/// the tasks still running on the other nodes (each task records its starts
/// in a shared file) and finishes the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_masters_node_dies_and_a_second_attempt_adopts_the_running_tasks() {
    let names = NODES;
    let (cluster, mut agents) = launching_cluster(&names).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let spec = format!(
        "name: adopt\nmax_attempts: 1\nstages:\n  - name: work\n    instances: 4\n    placement: spread\n    command: 'echo $WEFT_TASK_INDEX >> {p}; sleep 6'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n  - name: report\n    after: [work]\n    instances: 1\n    command: 'echo done >> {p}'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n",
        p = starts.display()
    );
    let app = client.submit(&spec, "yaml", "mia").await.unwrap();
    // All four tasks run; find the master's node and what else runs there.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (victim, on_victim) = loop {
        let r = client.get_application(&app).await.unwrap();
        let started = std::fs::read_to_string(&starts).unwrap_or_default();
        if started.lines().count() >= 4 && !r.am_node_id.is_empty() {
            let by = running_by_node(&client).await;
            let n = by
                .iter()
                .find(|(node, _)| *node == r.am_node_id)
                .map_or(0, |x| x.1);
            break (r.am_node_id.clone(), n - 1); // less the master itself
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks never all ran: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(on_victim < 4, "spread placement put tasks on other nodes");
    let i = names.iter().position(|n| *n == victim).unwrap();
    agents[i].kill9();

    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 2, "a second master attempt finished it");
    assert_ne!(r.am_node_id, victim);
    let started = std::fs::read_to_string(&starts).unwrap();
    let work: Vec<&str> = started.lines().filter(|l| *l != "done").collect();
    for t in ["0", "1", "2", "3"] {
        assert!(work.contains(&t), "task {t} never ran: {work:?}");
    }
    // Tasks on the surviving nodes were adopted, not started again; only
    // the dead node's ran twice.
    assert_eq!(
        work.len(),
        4 + on_victim,
        "starts {work:?} with {on_victim} task(s) on the dead node"
    );
    assert_eq!(started.lines().filter(|l| *l == "done").count(), 1);
}

/// A master that runs but never calls the RM is ended after `[masters]
/// expiry` and replaced; when attempts run out the job fails saying why, and
/// the silent masters' processes are stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_master_expires_and_the_job_fails_when_attempts_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent-master");
    std::fs::write(&silent, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    let mut perms = std::fs::metadata(&silent).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&silent, perms).unwrap();
    let extra = format!(
        "[masters]\nlaunch = true\nexpiry = \"1s\"\ncommand = {:?}\n",
        silent.display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    cluster.leader().await;
    let agent = AgentProcess::start("node-a", &cluster.addrs());
    let client = cluster.client();
    crate::cluster::wait_nodes(&client, 1).await;
    let spec = "name: silent\nmax_attempts: 2\nstages:\n  - name: s\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    let app = client.submit(spec, "yaml", "mia").await.unwrap();
    let r = wait_state(&client, &app, Duration::from_secs(60)).await;
    assert_eq!(r.state(), pb::ApplicationState::Failed, "{r:?}");
    assert_eq!(r.attempt, 2, "{r:?}");
    assert!(
        r.diagnostics
            .contains("failed 2 time(s); last: the application master made no call for 1s"),
        "{}",
        r.diagnostics
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !agent.container_processes().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent masters still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A master the RM ends while its Allocate call waits (here: its
/// container's process killed) is refused in that call and every later
/// one and handed nothing, and its asks are not placed for it: the next
/// attempt asks and gets the container. (Found by the fault harness: a
/// replaced master started tasks the new attempt started again, two runs
/// of one task at once. It was found with a master ended for silence while
/// its call waited past the `expiry`; a call now waits at most a third of
/// the `expiry` (4 s here), so a master waiting as long as it may is never
/// taken for a silent one, and the end comes from the master's death.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_masters_waiting_allocate_gets_no_container() {
    use weft_proto::v1::application_master_service_client::ApplicationMasterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("env-master");
    std::fs::write(
        &master,
        format!(
            "#!/bin/sh\n{{ env; echo \"TOKEN_FROM_FILE=$(cat \"$WEFT_APP_TOKEN_FILE\")\"; }} > {0}/attempt.tmp && mv {0}/attempt.tmp {0}/attempt-$WEFT_ATTEMPT.env\nexec sleep 1000\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&master).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&master, perms).unwrap();
    let extra = format!(
        "[masters]\nlaunch = true\nexpiry = \"4s\"\ncommand = {:?}\n",
        master.display().to_string()
    );
    let cluster = Cluster::start_with(1, 1000, &extra);
    let leader = cluster.leader().await;
    let _a = AgentProcess::start("node-a", &cluster.addrs());
    let client = cluster.client();
    crate::cluster::wait_nodes(&client, 1).await;
    let spec = "name: replaced\nmax_attempts: 3\nstages:\n  - name: s\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    let app = client.submit(spec, "yaml", "mia").await.unwrap();
    let envs = dir.path().to_path_buf();
    let token_of = |attempt: u32| {
        let path = envs.join(format!("attempt-{attempt}.env"));
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(env) = std::fs::read_to_string(&path) {
                    // The token comes in a file, not the environment.
                    assert!(
                        !env.lines().any(|l| l.starts_with("WEFT_APP_TOKEN=")),
                        "{env}"
                    );
                    let hex_token = env
                        .lines()
                        .find_map(|l| l.strip_prefix("TOKEN_FROM_FILE="))
                        .expect("the master's token")
                        .to_string();
                    return hex::decode(hex_token).unwrap();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "master attempt {attempt} never started"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut am = ApplicationMasterServiceClient::new(
        crate::secure::channel(&cluster.members[leader].addr, weft_common::tls::Role::Rm).await,
    );
    let token1 = token_of(1).await;
    am.register_application_master(pb::RegisterApplicationMasterRequest {
        application_id: app.clone(),
        attempt: 1,
        application_token: token1.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A whole node's worth: no room on node-a beside a master.
    let big = pb::ResourceAsk {
        ask_id: "s/0".into(),
        count: 1,
        resources: Some(pb::Resources {
            vcores_milli: 8000,
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let waiting = {
        let mut am = am.clone();
        let (app, big) = (app.clone(), big.clone());
        tokio::spawn(async move {
            // Call again (each call waits up to a third of the expiry)
            // until refused. No call may bring a container.
            let mut handed = Vec::new();
            loop {
                match am
                    .allocate(pb::AllocateRequest {
                        application_id: app.clone(),
                        attempt: 1,
                        application_token: token1.clone(),
                        asks: vec![big.clone()],
                        wait_ms: 10_000,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => handed.extend(r.into_inner().allocations),
                    Err(e) => return (handed, e),
                }
            }
        })
    };
    // Attempt 1's master process dies while its calls wait: the attempt
    // ends and is replaced. Then a node with room comes, and its ask is
    // placed while a call of attempt 1 may still wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids = _a.container_processes();
    assert!(!pids.is_empty(), "attempt 1's master runs on node-a");
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let token2 = token_of(2).await;
    let _b = AgentProcess::start("node-b", &cluster.addrs());
    let (handed, e) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("attempt 1's calls end")
        .unwrap();
    assert!(
        handed.is_empty(),
        "a replaced attempt was handed {handed:?}"
    );
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("attempt: 1 of")
            && (e.message().contains("has ended: its master's container")
                || e.message().contains("replaced by attempt 2")),
        "{e:?}"
    );
    // The container is attempt 2's: nothing was lost.
    am.register_application_master(pb::RegisterApplicationMasterRequest {
        application_id: app.clone(),
        attempt: 2,
        application_token: token2.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let got = loop {
        let r = am
            .allocate(pb::AllocateRequest {
                application_id: app.clone(),
                attempt: 2,
                application_token: token2.clone(),
                asks: vec![big.clone()],
                wait_ms: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if !r.allocations.is_empty() {
            break r.allocations;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "attempt 2 got no container"
        );
    };
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].ask_id.as_str(), got[0].node_id.as_str()),
        ("s/0", "node-b")
    );
    client.kill_application(&app).await.unwrap();
}

/// The whole RM group is down for three minutes (every member killed, then
/// restarted from its data dir) while a multi-stage job runs with one master
/// attempt allowed: the master keeps retrying (`rm_retry_for`, 15 minutes by
/// default) and its tasks keep running; the tasks that ended meanwhile are
/// reported once a leader is back, the next stage runs, and the job succeeds
/// with its first master, no task started twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_rides_out_a_three_minute_outage_of_the_whole_rm_group() {
    // On their own address: in three minutes another test's daemon could
    // take a dead member's port on 127.0.0.1, and the master, reaching it,
    // would be refused (a token of another group) and give up.
    let (mut cluster, agents) = launching_cluster_of(&NODES, "", true).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let spec = format!(
        "name: outage\nmax_attempts: 1\nstages:\n  - name: work\n    instances: 3\n    command: 'echo work/$WEFT_TASK_INDEX >> {p}; sleep 15'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n  - name: report\n    after: [work]\n    instances: 1\n    command: 'echo report/$WEFT_TASK_INDEX >> {p}'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n",
        p = starts.display()
    );
    let app = client.submit(&spec, "yaml", "mia").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&starts)
        .unwrap_or_default()
        .lines()
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the work stage never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = |agents: &[AgentProcess]| {
        agents
            .iter()
            .map(|a| a.container_processes().len())
            .sum::<usize>()
    };
    assert!(live(&agents) >= 4, "the master and three tasks run");
    for i in 0..cluster.members.len() {
        cluster.kill(i);
    }
    let outage = std::time::Instant::now();
    // Past the 15 s tasks and past what a master used to wait (60 s): the
    // tasks have ended, the master still runs.
    tokio::time::sleep(Duration::from_secs(90)).await;
    let during = live(&agents);
    assert!(
        during >= 1,
        "the master was alive 90 s into the outage ({during} container processes)"
    );
    assert_eq!(
        std::fs::read_to_string(&starts).unwrap().lines().count(),
        3,
        "nothing started while no RM answered"
    );
    tokio::time::sleep(Duration::from_secs(180).saturating_sub(outage.elapsed())).await;
    for i in 0..cluster.members.len() {
        cluster.spawn(i);
    }
    eprintln!("RM group back after {:?}", outage.elapsed());
    let client = cluster.client().with_deadline(Duration::from_secs(60));
    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 1, "the first master finished the job");
    let mut started: Vec<String> = std::fs::read_to_string(&starts)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    started.sort();
    assert_eq!(
        started,
        ["report/0", "work/0", "work/1", "work/2"],
        "each task started once"
    );
}

/// Every agent is killed (kill -9) while a job's master and tasks run on
/// them, and started again at once: the new agents take the containers over
/// (the same processes keep running), report their ends, and the job
/// succeeds with its first master, no task started twice. Node expiry is
/// 10 s, which a restart stays well inside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_killed_and_restarted_keep_the_jobs_tasks_running() {
    let (cluster, mut agents) =
        launching_cluster_with(&NODES[..2], "node_expiry = \"10s\"\n").await;
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    let spec = format!(
        "name: restart\nmax_attempts: 1\nstages:\n  - name: work\n    instances: 2\n    max_retries: 0\n    command: 'echo work/$WEFT_TASK_INDEX $$ >> {p}; sleep 6'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n  - name: report\n    after: [work]\n    instances: 1\n    command: 'echo report/$WEFT_TASK_INDEX $$ >> {p}'\n    resources: {{ vcores: 0.5, memory: 64MiB }}\n",
        p = starts.display()
    );
    let app = client.submit(&spec, "yaml", "mia").await.unwrap();
    let read_starts = || -> Vec<(String, i32)> {
        std::fs::read_to_string(&starts)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (task, pid) = l.split_once(' ').unwrap();
                (task.to_string(), pid.parse().unwrap())
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read_starts().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the work stage never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive = |pid: i32| !weft_node_agent::procfs::is_zombie(pid);
    let work = read_starts();
    // An operator drains one node before the restarts: the drain holds.
    client.drain_node(NODES[1]).await.unwrap();
    for a in agents.iter_mut() {
        a.kill9();
    }
    for a in agents.iter_mut() {
        a.restart();
    }
    // Give the new agents a moment to take over, then the tasks still run
    // as the same processes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (task, pid) in &work {
        assert!(alive(*pid), "{task} (pid {pid}) kept running");
    }
    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 1, "the first master finished the job");
    let mut started: Vec<String> = read_starts().into_iter().map(|(t, _)| t).collect();
    started.sort();
    assert_eq!(
        started,
        ["report/0", "work/0", "work/1"],
        "each task started once"
    );
    let drained = client
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node_id == NODES[1])
        .unwrap();
    assert_eq!(
        drained.state(),
        pb::NodeState::Draining,
        "the drain outlived the agent's restart"
    );
}

/// A node whose agent the leader cannot reach, not yet declared lost, gets
/// no more masters once a start there failed: the job's master starts on
/// the next node that comes, and the failed start was its only lost
/// attempt. (Found by the fault harness: a master placed six times in a row
/// on a node cut off from the leader, each failed start a lost attempt,
/// until the job FAILED.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_is_not_placed_again_on_a_node_the_leader_cannot_reach() {
    let (cluster, mut agents) =
        launching_cluster_with(&["node-a"], "node_expiry = \"30s\"\n").await;
    // Its node stays RUNNING for 30 s: nothing answers at its address.
    agents[0].kill9();
    let client = cluster.client();
    let spec = "name: held\nmax_attempts: 1\nstages:\n  - name: s\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    let app = client.submit(spec, "yaml", "mia").await.unwrap();
    // The first start fails at once (refused); another node joins a moment
    // later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _b = AgentProcess::start("node-b", &cluster.addrs());
    let done = wait_state(&client, &app, Duration::from_secs(60)).await;
    assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
    assert_eq!(done.am_node_id, "node-b", "{done:?}");
    // One failed start on node-a, then node-b (or, on a loaded machine
    // whose first round came after node-b joined, node-b at once); without
    // the hold-out, node-a was offered attempt after attempt (5 here).
    assert!(
        done.attempt <= 2,
        "at most one failed start on node-a, then node-b: {done:?}"
    );
    drop(agents);
}

/// The leader's wall clock steps an hour back while jobs wait (NTP, an
/// operator's `date -s`): the job that waited first still starts first (the
/// order is the group's, not the leader's clock), and its master and tasks
/// start under container tokens the agent accepts (it checks their expiry
/// against the leader's clock, as measured in every heartbeat answer).
/// Before: the token of every container started meanwhile "expired 50
/// minutes ago" and each job FAILED; and a job submitted after the step was
/// ordered an hour ahead of every job already waiting.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_start_in_submission_order_and_run_while_the_leaders_clock_steps_an_hour_back() {
    let Some(lib) = crate::cluster::libfaketime() else {
        eprintln!("skipped: needs libfaketime to step the leader's clock (.ci/run installs it)");
        return;
    };
    // One member (the leader), one node with room for one master at a time
    // (5 of its 8 vcores each; a task 0.5).
    let mut cluster = Cluster::prepare(
        1,
        1000,
        &format!(
            "[masters]\nlaunch = true\ncommand = {:?}\nvcores = 5.0\n",
            app_master().display().to_string()
        ),
    );
    let clock = cluster.members[0].dir.with_extension("clock");
    cluster.env = crate::cluster::stepped_clock_env(lib, &clock);
    cluster.spawn(0);
    let client = cluster.client();
    let _agent = AgentProcess::start("node-a", &cluster.addrs());
    let job = |name: &str, work: &str| {
        format!("name: {name}\nmax_attempts: 1\nstages:\n  - name: s\n    instances: 1\n    command: '{work}'\n    resources: {{ vcores: 0.5, memory: 32MiB }}\n")
    };
    let first = client
        .submit(&job("first", "sleep 3"), "yaml", "clock")
        .await
        .unwrap();
    // Waits for the node, behind `first` once that has it.
    let second = client
        .submit(&job("second", "true"), "yaml", "clock")
        .await
        .unwrap();
    let state = |r: &pb::ApplicationReport| r.state();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state(&client.get_application(&first).await.unwrap()) != pb::ApplicationState::Running {
        assert!(std::time::Instant::now() < deadline, "first never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader's clock steps an hour back (read again within a second).
    std::fs::write(&clock, "-1h\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let third = client
        .submit(&job("third", "true"), "yaml", "clock")
        .await
        .unwrap();
    // `first` ends; `second` waited longer and starts before `third`.
    let mut started = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while started.len() < 2 {
        for id in [&second, &third] {
            let r = client.get_application(id).await.unwrap();
            if !started.contains(id)
                && !matches!(
                    r.state(),
                    pb::ApplicationState::Submitted | pb::ApplicationState::Accepted
                )
            {
                started.push(id.clone());
            }
        }
        assert!(std::time::Instant::now() < deadline, "started: {started:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        started,
        vec![second.clone(), third.clone()],
        "the job that waited first starts first"
    );
    for id in [&first, &second, &third] {
        let done = wait_state(&client, id, Duration::from_secs(60)).await;
        assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
        assert_eq!(done.attempt, 1, "{done:?}");
    }
    std::fs::write(&clock, "+0\n").unwrap();
}

/// A job spec too large for a process environment (one variable holds at
/// most 128 KiB; a spec may have 1 MiB) reaches its master as a file in the
/// master's working directory: the job runs. Before, the master's exec
/// failed (E2BIG) and every attempt with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_too_large_for_the_environment_reaches_its_master_as_a_file() {
    let (cluster, agents) = launching_cluster(&["node-a"]).await;
    let client = cluster.client();
    let filler = "# ".to_string() + &"x".repeat(299_000) + "\n";
    let spec = format!(
        "name: big-spec\nmax_attempts: 1\n{filler}stages:\n  - name: s\n    instances: 2\n    command: 'true'\n    resources: {{ vcores: 0.5, memory: 32MiB }}\n"
    );
    assert!(spec.len() > 256 << 10);
    let app = client.submit(&spec, "yaml", "mia").await.unwrap();
    let done = wait_state(&client, &app, Duration::from_secs(60)).await;
    assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 1, "{done:?}");
    drop(agents);
}

/// A leader records a job's master attempt and dies before it asks the
/// node to start the master (a kill -9 at that point, made exact by a fail
/// point that skips the start once in each member): the next leader asks
/// the node itself. Before: nobody started it, the master "made no call
/// for 1m", and the job (`max_attempts: 1`) FAILED a minute later (the
/// fault harness met it after a leader kill).
#[tokio::test(flavor = "multi_thread")]
async fn a_master_whose_start_its_leader_never_sent_is_started_by_the_next_leader() {
    let mut cluster = Cluster::prepare(
        3,
        1000,
        &format!(
            "[masters]\nlaunch = true\ncommand = {:?}\n",
            app_master().display().to_string()
        ),
    );
    cluster.env = vec![(
        "FAILPOINTS".into(),
        "master-attempt-recorded=1*return".into(),
    )];
    for i in 0..3 {
        cluster.spawn(i);
    }
    let client = cluster.client();
    let _agent = AgentProcess::start("node-a", &cluster.addrs());
    let id = client
        .submit(
            "name: lost-start\nmax_attempts: 1\nstages:\n  - name: s\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.5, memory: 32MiB }\n",
            "yaml",
            "ann",
        )
        .await
        .unwrap();
    // The moment its attempt is recorded, its leader dies.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get_application(&id).await.unwrap();
        if r.attempt >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no attempt: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let r = loop {
        let r = client.get_application(&id).await.unwrap();
        if matches!(
            r.state(),
            pb::ApplicationState::Succeeded
                | pb::ApplicationState::Failed
                | pb::ApplicationState::Killed
        ) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not finished within 40 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 1, "{r:?}");
}

/// Tasks run as their users, end to end: the RM signs the application's
/// user into every container token, and an agent with `run_as_user` runs
/// the job's master and its tasks as that user; a user the node does not
/// have fails the job, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_as_the_user_who_submitted_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (the agent sets the tasks' uids)");
        return;
    }
    let extra = format!(
        "[masters]\nlaunch = true\ncommand = {:?}\n",
        app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    let _agent = AgentProcess::start_with(
        "n-users",
        &cluster.addrs(),
        "127.0.0.1",
        "",
        "[containers]\nrun_as_user = true\n",
    );
    let client = cluster.client();
    let spec = "name: whoami\nstages:\n  - name: run\n    instances: 1\n    command: 'echo \"$(id -u) $USER\"'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    // Submitted at once, as a user's script does.
    let id = client.submit(spec, "yaml", "nobody").await.unwrap();
    let r = client.wait_application(&id).await.unwrap();
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    let mut logs = client
        .task_logs(&id, "run/0", false, 0, false)
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = logs.message().await.unwrap() {
        out.extend(chunk.data);
    }
    assert_eq!(String::from_utf8_lossy(&out).trim(), "65534 nobody");

    let id = client
        .submit(spec, "yaml", "no-such-user-weft")
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), client.wait_application(&id))
        .await
        .expect("the job of a missing user ends")
        .unwrap();
    assert_eq!(r.state(), pb::ApplicationState::Failed, "{r:?}");
    assert!(
        r.diagnostics
            .contains("user no-such-user-weft does not exist on node n-users"),
        "{}",
        r.diagnostics
    );
}

/// The token signing key rotates while a job runs: agents get the new key
/// before it signs, the job's master has its application token renewed
/// under it, the old key is dropped after its overlap, and after that (and
/// a leader kill) the running job finishes in its first attempt and a new
/// job runs under the new key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_rotates_under_a_running_job_and_the_old_one_is_dropped() {
    let (mut cluster, _agents) = launching_cluster(&NODES[..2]).await;
    let client = cluster.client();
    let rm = cluster.addrs().join(",");
    // Its master calls the RM all through, and asks for the second stage
    // well after the old key is gone.
    const LONG: &str = "name: long\nstages:\n  - name: first\n    instances: 2\n    command: 'sleep 20'\n    resources: { vcores: 0.5, memory: 64MiB }\n  - name: second\n    after: [first]\n    instances: 2\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n";
    let app = client.submit(LONG, "yaml", "ops").await.unwrap();
    let keys = |out: &std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Out of range: refused, naming the field.
    let bad = crate::rmctl::run(&["acl", "rotate-signing-key", "--keep-previous", "5s"], &rm);
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.contains("keep_previous_seconds"), "{why}");
    // Rotated at once, while the master starts.
    let rotated = keys(&crate::rmctl::run(
        &[
            "-o",
            "json",
            "acl",
            "rotate-signing-key",
            "--keep-previous",
            "10s",
        ],
        &rm,
    ));
    let ks = rotated["keys"].as_array().unwrap().clone();
    assert_eq!(ks.len(), 2, "{rotated}");
    assert_eq!(
        (ks[0]["id"].as_u64(), ks[1]["id"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        ks[0]["signing"], true,
        "the new key does not sign yet: {rotated}"
    );
    assert!(ks[0]["dropped_at_ms"].as_u64().unwrap() > ks[1]["signs_from_ms"].as_u64().unwrap());
    let group = rotated["group"].as_str().unwrap().to_string();
    assert_eq!(ks[0]["public_key"].as_str().unwrap(), group);
    // Another rotation before the new key signs is refused.
    let again = crate::rmctl::run(&["acl", "rotate-signing-key"], &rm);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("signs only from"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // The old key is dropped once its overlap is over.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = keys(&crate::rmctl::run(
            &["-o", "json", "acl", "signing-keys"],
            &rm,
        ));
        let ids: Vec<u64> = now["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_u64().unwrap())
            .collect();
        if ids == [1] {
            assert_eq!(now["keys"][0]["signing"], true);
            assert_eq!(
                now["group"].as_str().unwrap(),
                group,
                "the group keeps its name"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "key 0 is still held: {now}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A new leader signs with the new key, and the agents check it.
    let leader = cluster.leader().await;
    cluster.kill(leader);
    let client = cluster.client();
    let after = client
        .submit(
            "name: after\nstages:\n  - name: run\n    instances: 2\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n",
            "yaml",
            "ops",
        )
        .await
        .unwrap();
    let r = wait_state(&client, &after, Duration::from_secs(60)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    // The running job's master kept speaking for it with its renewed
    // token: it finished in its first attempt.
    let r = wait_state(&client, &app, Duration::from_secs(90)).await;
    assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
    assert_eq!(r.attempt, 1, "the first master saw the job through: {r:?}");
}

/// The sockets (inodes) `pid` holds open.
fn socket_inodes(pid: i32) -> std::collections::BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The inodes of the sockets in `/proc/<pid>/net/<table>` (tcp, tcp6, unix).
fn table_inodes(pid: i32, table: &str) -> std::collections::BTreeSet<u64> {
    let column = if table == "unix" { 6 } else { 9 };
    std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(column)?.parse().ok())
        .collect()
}

/// GET `/metrics` over HTTP/1.0 from an agent at `addr`: over TLS (the
/// cluster's CA) in the secured run.
async fn scrape_agent(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(t) => break t,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ask = b"GET /metrics HTTP/1.0\r\nHost: agent.weft\r\n\r\n";
    let mut out = String::new();
    match crate::secure::get() {
        Some(s) => {
            let mut cfg = crate::tls::trusting(&s.ca_file());
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
                .connect(
                    rustls::pki_types::ServerName::try_from("agent.weft").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            tls.write_all(ask).await.unwrap();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out)).await;
        }
        None => {
            let mut tcp = tcp;
            tcp.write_all(ask).await.unwrap();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut out)).await;
        }
    }
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

/// A master makes no connection of its own: its calls to the RM leader and
/// its starts on the other node go through its own node's agent, over the
/// agent's Unix socket and the connections the agent keeps (with TLS on, no
/// handshake per job). Watched in the kernel's tables: the running master
/// holds Unix sockets and no TCP one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_reach_the_rm_and_other_nodes_through_their_own_nodes_agent() {
    let extra = format!(
        "[masters]\nlaunch = true\ncommand = {:?}\n",
        app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    // The agents' /metrics (HTTPS in the secured run).
    let http: Vec<String> = NODES[..2]
        .iter()
        .map(|_| format!("127.0.0.1:{}", crate::cluster::free_port()))
        .collect();
    let agents: Vec<AgentProcess> = NODES[..2]
        .iter()
        .zip(&http)
        .map(|(n, h)| {
            AgentProcess::start_with(
                n,
                &cluster.addrs(),
                "127.0.0.1",
                "gpu = \"h100\"",
                &format!("[http]\nlisten = \"{h}\"\n"),
            )
        })
        .collect();
    let client = cluster.client();
    crate::cluster::wait_nodes(&client, 2).await;

    // Four tasks of 3 cores on two nodes of 8: two land beside the master,
    // two on the other node.
    let spec = "name: relayed\nstages:\n  - name: run\n    instances: 4\n    command: 'sleep 2'\n    resources: { vcores: 3, memory: 64MiB }\n";
    let app = client.submit(spec, "yaml", "mia").await.unwrap();
    let mut master: Option<i32> = None;
    let (mut tcp_seen, mut unix_seen) = (Vec::new(), 0usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let r = client.get_application(&app).await.unwrap();
        if matches!(
            r.state(),
            pb::ApplicationState::Succeeded
                | pb::ApplicationState::Failed
                | pb::ApplicationState::Killed
        ) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never ended: {r:?}"
        );
        if master.is_none() {
            master = agents
                .iter()
                .flat_map(|a| a.container_processes())
                .find(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "app-master")
                });
        }
        if let Some(pid) = master {
            let held = socket_inodes(pid);
            let tcp: std::collections::BTreeSet<u64> =
                &table_inodes(pid, "tcp") | &table_inodes(pid, "tcp6");
            tcp_seen.extend(held.intersection(&tcp).copied());
            unix_seen = unix_seen.max(held.intersection(&table_inodes(pid, "unix")).count());
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
    assert!(master.is_some(), "the master process was never seen");
    assert!(
        tcp_seen.is_empty(),
        "the master held TCP sockets: {tcp_seen:?}"
    );
    assert!(unix_seen >= 1, "the master held no Unix socket");
    let on: Vec<(String, usize)> = running_or_done_by_node(&client, &app).await;
    assert_eq!(on.len(), 2, "the tasks ran on both nodes: {on:?}");

    // What the agents passed on, by their metrics: one registration and one
    // finish, allocations, and the other node's two starts (the finish is
    // counted once the RM answered it: read until it shows).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let mut counts = std::collections::BTreeMap::new();
        for h in &http {
            for line in scrape_agent(h).await.lines() {
                if let Some(rest) = line.strip_prefix("weft_agent_relayed_calls_total{") {
                    let (labels, n) = rest.split_once("} ").unwrap();
                    *counts.entry(labels.to_string()).or_insert(0.0) += n.parse::<f64>().unwrap();
                }
            }
        }
        if counts.contains_key("call=\"finish\",outcome=\"ok\"")
            || std::time::Instant::now() > deadline
        {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let get = |l: &str| counts.get(l).copied().unwrap_or(0.0);
    assert_eq!(get("call=\"register\",outcome=\"ok\""), 1.0, "{counts:?}");
    assert_eq!(get("call=\"finish\",outcome=\"ok\""), 1.0, "{counts:?}");
    assert!(get("call=\"allocate\",outcome=\"ok\"") >= 1.0, "{counts:?}");
    assert_eq!(get("call=\"start\",outcome=\"ok\""), 2.0, "{counts:?}");
}

/// The nodes `app`'s tasks ran on, with how many each.
async fn running_or_done_by_node(
    client: &weft_client::RmClient,
    app: &str,
) -> Vec<(String, usize)> {
    let tasks = client.list_tasks(app).await.unwrap();
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tasks.tasks {
        if t.task != "master" && !t.node_id.is_empty() {
            *by.entry(t.node_id).or_insert(0) += 1;
        }
    }
    by.into_iter().collect()
}
