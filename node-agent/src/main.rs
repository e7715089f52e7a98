//! `node-agent`: flags and config file in, `weft_node_agent::run` out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_common::telemetry::{self, LogFormat};
use weft_node_agent::config::{AgentConfig, DriverChoice, GpuProbeChoice};

/// Weft node agent: runs containers in cgroups on this machine and reports to
/// the resource manager. Flags override the config file.
#[derive(Debug, Parser)]
#[command(name = "node-agent", version)]
struct Args {
    /// TOML config file.
    #[arg(short, long, env = "WEFT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Address the ContainerManager service listens on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address others use to reach this agent.
    #[arg(long)]
    advertise_address: Option<String>,
    /// Resource-manager members, comma-separated host:port.
    #[arg(long, value_delimiter = ',')]
    rm: Option<Vec<String>>,
    /// Node id (default: the hostname).
    #[arg(long)]
    node_id: Option<String>,
    /// Root of work directories and logs.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Isolation driver.
    #[arg(long, value_parser = parse_driver)]
    driver: Option<DriverChoice>,
    /// cgroup name under which this agent's containers live.
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// GPU probe: nvml, none or fake.
    #[arg(long, value_parser = parse_gpu)]
    gpu_probe: Option<GpuProbeChoice>,
    /// Log format.
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Serve plaintext on a non-loopback address (`insecure = true`):
    /// anyone who reaches the port is then everyone. Without it, such an
    /// address needs a [tls] section.
    #[arg(long)]
    insecure: bool,
    /// Serve `/metrics` (Prometheus text) over HTTP on this address
    /// (`[http] listen`; HTTPS where the agent has TLS).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

fn parse_driver(s: &str) -> Result<DriverChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected auto, cgroup-v2, cgroup-v1 or procfs"))
}

fn parse_gpu(s: &str) -> Result<GpuProbeChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected nvml, none or fake"))
}

fn config(args: &Args) -> anyhow::Result<AgentConfig> {
    let mut c = match &args.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = args.http_listen {
        c.http.listen = Some(v);
    }
    if let Some(v) = &args.advertise_address {
        c.advertise_address = Some(v.clone());
    }
    if let Some(v) = &args.rm {
        c.rm_addresses = v.clone();
    }
    if let Some(v) = &args.node_id {
        c.node_id = Some(v.clone());
    }
    if let Some(v) = &args.work_dir {
        c.work_dir = v.clone();
    }
    if let Some(v) = args.driver {
        c.containers.driver = v;
    }
    if let Some(v) = &args.cgroup_parent {
        c.containers.cgroup_parent = v.clone();
    }
    if let Some(v) = args.gpu_probe {
        c.gpu.probe = v;
    }
    if args.insecure {
        c.insecure = true;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    // Started as a container's shim: be that, nothing else.
    weft_node_agent::shim::run_if_shim();
    weft_node_agent::memory::single_arena();
    let args = Args::parse();
    telemetry::init(args.log_format);
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("node-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!(
            "{}",
            toml::to_string_pretty(&cfg).expect("config serialises")
        );
        return ExitCode::SUCCESS;
    }
    if let Err(e) =
        weft_common::tls::setup_daemon(cfg.tls.as_ref(), weft_common::tls::Role::Agent, cfg.listen)
    {
        eprintln!("node-agent: {e}");
        return ExitCode::from(2);
    }
    // With TLS on, the RM takes this node's registration only under the
    // name its certificate holds: a different node_id would be refused at
    // every registration; say so now.
    let cert_name =
        weft_common::tls::installed().and_then(|t| t.own.as_ref().map(|o| o.name.clone()));
    if let (Some(name), Some(id)) = (cert_name, &cfg.node_id) {
        if &name != id {
            eprintln!(
                "node-agent: node_id: {id:?} is not the name in tls.cert_file ({name:?}); the resource manager takes a node only under its certificate's name: leave node_id out, or make a certificate for {id:?} (`rmctl tls cert create --role agent --name {id}`)"
            );
            return ExitCode::from(2);
        }
    }
    let addr = cfg.listen;
    weft_common::daemon::serve_main("node-agent", addr, |listener| {
        weft_node_agent::run(cfg, listener, weft_common::daemon::shutdown_signal())
    })
}
