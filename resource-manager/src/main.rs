//! `resource-manager`: flags and config file in, `weft_resource_manager::run` out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_node_agent::telemetry::{self, LogFormat};
use weft_resource_manager::RmConfig;

/// Weft resource manager: one member of the Raft group that holds the
/// cluster's state. Flags override the config file.
#[derive(Debug, Parser)]
#[command(name = "resource-manager", version)]
struct Args {
    /// TOML config file.
    #[arg(short, long, env = "WEFT_RM_CONFIG")]
    config: Option<PathBuf>,
    /// This member's raft id.
    #[arg(long)]
    id: Option<u64>,
    /// Address all services listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the raft log and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Initial members, comma-separated ID=HOST:PORT (e.g. 1=a:7100,2=b:7100,3=c:7100).
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// Join an existing group (after `rmctl cluster add-member ID ADDR`)
    /// instead of bootstrapping a new one.
    #[arg(long)]
    join: bool,
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn config(args: &Args) -> anyhow::Result<RmConfig> {
    let mut c = match &args.config {
        Some(p) => RmConfig::load(p)?,
        None => RmConfig::default(),
    };
    if let Some(v) = args.id {
        c.id = v;
    }
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(list) = &args.peers {
        c.peers.clear();
        for p in list {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--peers: {p:?} is not ID=HOST:PORT"))?;
            c.peers.insert(id.to_string(), addr.to_string());
        }
    }
    if args.join {
        c.join = true;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resource-manager: {e:#}");
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
    let addr = cfg.listen;
    weft_node_agent::daemon::serve_main("resource-manager", addr, |listener| {
        weft_resource_manager::run(cfg, listener, weft_node_agent::daemon::shutdown_signal())
    })
}
