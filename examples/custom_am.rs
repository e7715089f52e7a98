//! A minimal custom application master, written with the `weft-app-master`
//! library instead of the built-in job-spec runner.
//!
//! It submits a job whose master it runs itself (an *unmanaged* master: the
//! submission answer carries the application token), asks the RM for
//! `--tasks` small containers, starts `echo` in each on its node with the
//! container token that came with the allocation, waits for their ends, and
//! finishes the application SUCCEEDED (or FAILED with the first failure).
//!
//! ```text
//! cargo run -p weft-examples --example custom-am -- --rm 127.0.0.1:7100 --tasks 3
//! ```
//!
//! Needs a running cluster (a resource manager and at least one node agent).
//! On a secured cluster it takes the CA from `WEFT_TLS_CA` (and a client
//! certificate from `WEFT_TLS_CERT`/`WEFT_TLS_KEY`, or a user's token from
//! `WEFT_TOKEN`), as rmctl does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use weft_app_master::client::{NodeClients, RmAmClient};
use weft_proto::v1 as pb;

struct Args {
    rm: Vec<String>,
    tasks: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut rm = std::env::var("WEFT_RM").unwrap_or_else(|_| "127.0.0.1:7100".into());
    let mut tasks = 3;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rm" => rm = it.next().context("--rm needs host:port[,host:port...]")?,
            "--tasks" => tasks = it.next().context("--tasks needs a number")?.parse()?,
            other => bail!("unknown argument {other:?} (use --rm ADDRS --tasks N)"),
        }
    }
    Ok(Args {
        rm: rm.split(',').map(str::to_string).collect(),
        tasks,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    // 0. A secured cluster: its CA, and who we are.
    let var = |k: &str| std::env::var_os(k).map(std::path::PathBuf::from);
    weft_common::tls::setup_client(
        var("WEFT_TLS_CA").as_deref(),
        var("WEFT_TLS_CERT").as_deref(),
        var("WEFT_TLS_KEY").as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    // 1. Submit. The spec only names the job: this master decides the rest.
    let mut client = weft_client::RmClient::new(args.rm.clone())?;
    if let Ok(token) = std::env::var("WEFT_TOKEN") {
        client = client.with_token(&token)?;
    }
    let spec = "name: custom-am\nstages:\n  - name: echo\n    instances: 1\n    command: 'true'\n    resources: { vcores: 0.1, memory: 32MiB }\n";
    let submitted = client.submit_with(spec, "yaml", "example", true).await?;
    let app = submitted.application_id;
    println!("submitted {app}");

    // 2. Register as attempt 1 with the token the submission returned.
    let mut rm = RmAmClient::new(args.rm.clone(), submitted.application_token)?;
    rm.register(&app, 1).await?;

    // 3. Ask until every container is granted, starting each as it comes.
    let nodes = NodeClients::default();
    let ask = pb::ResourceAsk {
        ask_id: "echo".into(),
        count: args.tasks,
        resources: Some(pb::Resources {
            vcores_milli: 100,
            memory_bytes: 32 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut running: HashMap<String, u32> = HashMap::new();
    let mut outcome: Result<(), String> = Ok(());
    let mut granted = 0;
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended < args.tasks && outcome.is_ok() {
        if Instant::now() > deadline {
            outcome = Err("timed out".into());
            break;
        }
        let resp = rm
            .allocate(pb::AllocateRequest {
                application_id: app.clone(),
                attempt: 1,
                asks: vec![pb::ResourceAsk {
                    count: args.tasks - granted,
                    ..ask.clone()
                }],
                progress: ended as f32 / args.tasks as f32,
                wait_ms: 2000,
                ..Default::default()
            })
            .await?;
        for a in resp.allocations {
            let index = granted;
            granted += 1;
            let r = a.resources.unwrap_or_default();
            let req = pb::StartContainerRequest {
                container_id: a.container_id.clone(),
                command: "sh".into(),
                args: vec![
                    "-c".into(),
                    format!("echo task {index} on $(hostname) in $WEFT_WORK_DIR"),
                ],
                env: HashMap::new(),
                resources: Some(pb::ContainerResources {
                    vcores_milli: r.vcores_milli,
                    memory_bytes: r.memory_bytes,
                    ..Default::default()
                }),
                // The RM signed it for this container on this node.
                token: a.container_token.clone(),
                files: Default::default(),
                // Its checkpoint directory, kept across its reruns.
                checkpoint_key: format!("task/{index}"),
            };
            nodes.get(&a.node_address)?.start_container(req).await?;
            println!(
                "started task {index} as {} on {}",
                a.container_id, a.node_id
            );
            running.insert(a.container_id, index);
        }
        for c in resp.completed {
            let Some(index) = running.remove(&c.container_id) else {
                continue;
            };
            ended += 1;
            if c.state() != pb::ContainerState::Succeeded {
                let state = c.state();
                let why = c.exit.map(|e| e.diagnostic).unwrap_or_default();
                outcome = Err(format!("task {index} ended {state:?}: {why}"));
            } else {
                println!("task {index} succeeded");
            }
        }
    }

    // 4. Finish: the RM records the final status (and ends what still runs).
    let (status, diagnostics) = match &outcome {
        Ok(()) => (
            pb::FinalStatus::Succeeded,
            "every task succeeded".to_string(),
        ),
        Err(e) => (pb::FinalStatus::Failed, e.clone()),
    };
    rm.finish(&app, 1, status, &diagnostics, vec![]).await?;
    let report = client.get_application(&app).await?;
    println!("{app}: {:?}: {}", report.state(), report.diagnostics);
    outcome.map_err(|e| anyhow::anyhow!(e))
}
