//! `resource-manager`: flags and config file in, `weft_resource_manager::run` out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_common::telemetry::{self, LogFormat};
use weft_resource_manager::RmConfig;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Serve plaintext on a non-loopback address (`insecure = true`):
    /// anyone who reaches the port is then everyone. Without it, such an
    /// address needs a [tls] section.
    #[arg(long)]
    insecure: bool,
    /// Serve the REST API (`/v1/...`, `/openapi.json`) and `/metrics` over
    /// HTTP on this address (`[http] listen`; HTTPS where the member has
    /// TLS).
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// One master process with no Raft peers (state persisted in sled; a
    /// restart loses nothing) that runs each job's application master inside
    /// itself. Workers are ordinary node agents; --local-agent embeds one, so
    /// one process is a working single-machine cluster.
    Standalone(StandaloneArgs),
    /// Audit a stopped member's data dir: replay its snapshot and every
    /// committed entry after it, checking the state's invariants (no node
    /// over-committed, per resource and GPU) after each entry. Exits 1 when
    /// one is broken, 2 when the dir cannot be read.
    Audit {
        /// The member's data dir.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct StandaloneArgs {
    /// Directory of the state (and of the local agent's work).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address rmctl, agents and masters reach it on.
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Run a node agent inside this process too.
    #[arg(long)]
    local_agent: bool,
    /// The local agent's config (TOML, as node-agent's); its work dir,
    /// listen address and RM address are set here unless given.
    #[arg(long, requires = "local_agent")]
    agent_config: Option<PathBuf>,
    /// Address the local agent listens on [default: the agent config's
    /// `listen`, else 127.0.0.1:0].
    #[arg(long, requires = "local_agent")]
    agent_listen: Option<SocketAddr>,
}

/// The config of a standalone master: this process is the whole group.
fn standalone_config(args: &Args, s: &StandaloneArgs) -> anyhow::Result<RmConfig> {
    let mut c = match &args.config {
        Some(p) => RmConfig::load(p)?,
        None => RmConfig::default(),
    };
    c.id = 1;
    c.listen = s.listen;
    c.data_dir = s.data_dir.join("rm");
    c.peers.clear();
    c.peers.insert("1".into(), s.listen.to_string());
    c.join = false;
    c.masters.launch = true;
    c.masters.in_process = true;
    if let Some(v) = args.http_listen {
        c.http.listen = Some(v);
    }
    if c.tls.is_some() {
        anyhow::bail!("tls: a standalone master serves on loopback and runs its agent in-process; TLS is for a cluster of separate members and agents (`resource-manager --config` and `node-agent --config`)");
    }
    c.validate()?;
    Ok(c)
}

fn agent_config(s: &StandaloneArgs) -> anyhow::Result<weft_node_agent::config::AgentConfig> {
    use weft_node_agent::config::AgentConfig;
    // What the file leaves out is this cluster's own: the work dir under the
    // data dir (not the agent's default /var/lib/weft/agent, which another
    // cluster on this machine may hold), a cgroup parent of its own, its
    // listen address and this RM.
    let (mut a, given) = match &s.agent_config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("--agent-config {}: {e}", p.display()))?;
            let a = AgentConfig::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("--agent-config {}: {e}", p.display()))?;
            let table: toml::Table = toml::from_str(&text)?;
            (a, table)
        }
        None => (AgentConfig::default(), toml::Table::new()),
    };
    if !given.contains_key("work_dir") {
        a.work_dir = s.data_dir.join("agent");
    }
    let cgroup_parent_given = given
        .get("containers")
        .and_then(|c| c.as_table())
        .is_some_and(|c| c.contains_key("cgroup_parent"));
    if !cgroup_parent_given {
        a.containers.cgroup_parent = format!("weft-standalone-{}", s.listen.port());
    }
    match s.agent_listen {
        Some(l) => a.listen = l,
        None if !given.contains_key("listen") => a.listen = ([127, 0, 0, 1], 0).into(),
        None => {}
    }
    if a.rm_addresses.is_empty() {
        a.rm_addresses = vec![s.listen.to_string()];
    }
    if a.tls.is_some() {
        anyhow::bail!("--agent-config: tls: the local agent of a standalone master serves on loopback without TLS; TLS is for a cluster of separate members and agents");
    }
    a.validate()?;
    Ok(a)
}

fn standalone(args: &Args, s: &StandaloneArgs) -> ExitCode {
    let (cfg, agent) = match standalone_config(args, s).and_then(|mut c| {
        let a = if s.local_agent {
            Some(agent_config(s)?)
        } else {
            None
        };
        // Its own agent's aggregated logs are this member's to read.
        if let Some(a) = &a {
            if c.logs.aggregate_dir.is_none() {
                c.logs.aggregate_dir = a.logs.aggregate_dir.clone();
            }
        }
        Ok((c, a))
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("resource-manager standalone: {e:#}");
            return ExitCode::from(2);
        }
    };
    let addr = cfg.listen;
    weft_common::daemon::serve_main("resource-manager standalone", addr, |listener| async move {
        let stop = tokio_util::sync::CancellationToken::new();
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                weft_common::daemon::shutdown_signal().await;
                stop.cancel();
            });
        }
        let rm = weft_resource_manager::run(cfg, listener, stop.clone().cancelled_owned());
        let Some(acfg) = agent else {
            return rm.await.map_err(|e| e.to_string());
        };
        let agent_listener = tokio::net::TcpListener::bind(acfg.listen)
            .await
            .map_err(|e| format!("local agent: listen {}: {e}", acfg.listen))?;
        let agent = weft_node_agent::run(acfg, agent_listener, stop.clone().cancelled_owned());
        let (r, a) = tokio::join!(rm, agent);
        r.map_err(|e| e.to_string())?;
        a.map_err(|e| format!("local agent: {e}"))
    })
}

fn config(args: &Args) -> anyhow::Result<RmConfig> {
    let mut c = match &args.config {
        Some(p) => RmConfig::load(p)?,
        None => RmConfig::default(),
    };
    if let Some(v) = args.id {
        c.id = v;
    }
    if let Some(v) = args.http_listen {
        c.http.listen = Some(v);
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
    if args.insecure {
        c.insecure = true;
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    // Started as the shim of a container of the embedded agent
    // (`standalone --local-agent`): be that, nothing else.
    weft_node_agent::shim::run_if_shim();
    let args = Args::parse();
    telemetry::init(args.log_format);
    // Fail points (tests of what a crash at a given point leaves behind):
    // armed only by the FAILPOINTS environment variable, said loudly.
    let _fail_points = std::env::var("FAILPOINTS").ok().map(|fp| {
        tracing::warn!(failpoints = %fp, "fail points armed from FAILPOINTS: for tests only");
        fail::FailScenario::setup()
    });
    match &args.mode {
        Some(Mode::Standalone(s)) => return standalone(&args, s),
        Some(Mode::Audit { data_dir }) => {
            return match weft_resource_manager::audit::audit(data_dir) {
                Ok(a) => {
                    println!("{}: {a}", data_dir.display());
                    if a.violation_count == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("resource-manager audit: {e}");
                    ExitCode::from(2)
                }
            }
        }
        None => {}
    }
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
    if let Err(e) =
        weft_common::tls::setup_daemon(cfg.tls.as_ref(), weft_common::tls::Role::Rm, cfg.listen)
    {
        eprintln!("resource-manager: {e}");
        return ExitCode::from(2);
    }
    let addr = cfg.listen;
    weft_common::daemon::serve_main("resource-manager", addr, |listener| {
        weft_resource_manager::run(cfg, listener, weft_common::daemon::shutdown_signal())
    })
}
