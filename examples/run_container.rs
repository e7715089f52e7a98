//! Runs one command as a Weft container on this machine and follows it to its
//! end: a node agent starts in-process on a loopback port, the command is
//! started through the agent's gRPC ContainerManager with a memory and CPU
//! quota, its output is streamed back, and the exit reason is printed.
//!
//! ```text
//! cargo run --example run-container -p weft-examples -- sh -c 'echo hello'
//! cargo run --example run-container -p weft-examples -- --memory-mib 32 tail /dev/zero
//! ```
//!
//! As root the container runs in its own cgroup; otherwise the agent falls back
//! to its procfs monitor.

use std::time::Duration;

use anyhow::{bail, Context};
use weft_node_agent::config::{AgentConfig, GpuProbeChoice};
use weft_proto::v1 as pb;
use weft_proto::v1::container_manager_client::ContainerManagerClient;

struct Args {
    memory_mib: u64,
    vcores: f64,
    max_runtime_s: u64,
    command: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        memory_mib: 256,
        vcores: 1.0,
        max_runtime_s: 0,
        command: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--memory-mib" => {
                a.memory_mib = it.next().context("--memory-mib needs a value")?.parse()?
            }
            "--vcores" => a.vcores = it.next().context("--vcores needs a value")?.parse()?,
            "--max-runtime-s" => {
                a.max_runtime_s = it
                    .next()
                    .context("--max-runtime-s needs a value")?
                    .parse()?
            }
            "--" => {
                a.command.extend(it.by_ref());
            }
            _ => {
                a.command.push(arg);
                a.command.extend(it.by_ref());
            }
        }
    }
    if a.command.is_empty() {
        a.command = vec![
            "sh".into(),
            "-c".into(),
            "echo \"hello from container $WEFT_CONTAINER_ID in $(pwd)\"; echo 'and from its stderr' >&2".into(),
        ];
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    // The embedded agent starts each container through this program again,
    // as its shim.
    weft_node_agent::shim::run_if_shim();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    weft_common::telemetry::init_with_default(weft_common::telemetry::LogFormat::Human, "warn");
    let args = parse_args()?;
    let work = tempfile::tempdir()?;
    let mut config = AgentConfig {
        listen: "127.0.0.1:0".parse()?,
        work_dir: work.path().to_path_buf(),
        node_id: Some("example".into()),
        ..Default::default()
    };
    config.containers.cgroup_parent = format!("weft-example-{}", std::process::id());
    config.gpu.probe = GpuProbeChoice::Nvml;
    // The agent starts only containers with a signed token; here this
    // program stands in for the resource manager and holds the key.
    let signer = weft_proto::token::TokenSigner::generate();
    config.security.token_public_key = Some(hex::encode(signer.public_key()));
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(weft_node_agent::run(config, listener, async {
        let _ = stop_rx.await;
    }));

    let mut client = loop {
        match ContainerManagerClient::connect(format!("http://{addr}")).await {
            Ok(c) => break c,
            Err(_) if !agent.is_finished() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => bail!("the agent did not start: {e}"),
        }
    };
    let mut req = pb::StartContainerRequest {
        container_id: "example-1".into(),
        command: args.command[0].clone(),
        args: args.command[1..].to_vec(),
        env: Default::default(),
        resources: Some(pb::ContainerResources {
            vcores_milli: (args.vcores * 1000.0) as u64,
            memory_bytes: args.memory_mib << 20,
            max_runtime_ms: args.max_runtime_s * 1000,
            ..Default::default()
        }),
        token: vec![],
        files: Default::default(),
        checkpoint_key: String::new(),
    };
    let r = req.resources.clone().unwrap_or_default();
    let now = weft_proto::token::now_ms();
    req.token = signer.sign_container(&pb::ContainerTokenBody {
        container_id: req.container_id.clone(),
        node_id: "example".into(),
        vcores_milli: r.vcores_milli,
        memory_bytes: r.memory_bytes,
        issued_at_ms: now,
        expires_at_ms: now + 60_000,
        ..Default::default()
    });
    let result = async {
        let started = client
            .start_container(req)
            .await?
            .into_inner()
            .status
            .unwrap_or_default();
        println!(
            "started container {} (pid {})",
            started.container_id, started.pid
        );
        let mut out = client
            .read_logs(pb::ReadLogsRequest {
                container_id: "example-1".into(),
                stream: pb::LogStream::Stdout as i32,
                offset: 0,
                follow: true,
            })
            .await?
            .into_inner();
        while let Some(chunk) = out.message().await? {
            print!("{}", String::from_utf8_lossy(&chunk.data));
        }
        let status = client
            .get_container_status(pb::GetContainerStatusRequest {
                container_id: "example-1".into(),
            })
            .await?
            .into_inner();
        let mut err = client
            .read_logs(pb::ReadLogsRequest {
                container_id: "example-1".into(),
                stream: pb::LogStream::Stderr as i32,
                offset: 0,
                follow: false,
            })
            .await?
            .into_inner();
        while let Some(chunk) = err.message().await? {
            eprint!("{}", String::from_utf8_lossy(&chunk.data));
        }
        let exit = status.exit.clone().unwrap_or_default();
        println!(
            "container {} ended: {:?}, exit status {}: {}",
            status.container_id,
            status.state(),
            exit.exit_status,
            exit.diagnostic
        );
        anyhow::Ok(exit.exit_status)
    }
    .await;
    let _ = stop_tx.send(());
    agent.await??;
    let code = result?;
    std::process::exit(if code == 0 { 0 } else { 1 });
}
