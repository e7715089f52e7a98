//! The client library: submit a job, follow it to its end, read a task's
//! output.
//!
//! ```text
//! cargo run -p weft-examples --example client -- 127.0.0.1:7100
//! ```
//!
//! Needs a running cluster, e.g. `resource-manager standalone --data-dir
//! /tmp/weft --local-agent`.

use weft_client::proto as pb;
use weft_client::RmClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addresses: Vec<String> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7100".into())
        .split(',')
        .map(str::to_string)
        .collect();
    // Any subset of the RM members: the client finds the leader.
    let rm = RmClient::new(addresses)?;

    let status = rm.cluster_status().await?;
    println!(
        "cluster: leader {} of {} member(s), {} node(s)",
        status.leader_id,
        status.members.len(),
        status.nodes
    );

    let spec = r#"
name: hello
stages:
  - name: greet
    instances: 2
    command: 'echo "hello from task $WEFT_TASK_INDEX of $WEFT_APP_ID"'
    resources: { vcores: 0.1, memory: 32MiB }
"#;
    let id = rm.submit(spec, "yaml", "example").await?;
    println!("submitted {id}");

    // The report at every change, until the end.
    let mut watch = rm.watch_application(&id).await?;
    while let Some(r) = watch.message().await? {
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| format!("{} {}/{}", s.name, s.done, s.total))
            .collect();
        println!("{id}: {:?} {}", r.state(), stages.join(", "));
        if r.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            break;
        }
    }
    let report = rm.wait_application(&id).await?;
    if report.state() != pb::ApplicationState::Succeeded {
        anyhow::bail!("{id} {:?}: {}", report.state(), report.diagnostics);
    }

    // Each task's output, read from the node that ran it.
    for task in ["greet/0", "greet/1"] {
        let mut logs = rm.task_logs(&id, task, false, 0, false).await?;
        while let Some(chunk) = logs.message().await? {
            print!("{task}: {}", String::from_utf8_lossy(&chunk.data));
        }
    }
    Ok(())
}
