//! `rmctl`: the command line of Weft's resource manager.
//!
//! ```text
//! rmctl [--rm ADDR[,ADDR...]] [-o table|json] cluster status
//! rmctl cluster add-member ID ADDR | cluster remove-member ID
//! rmctl node list | node drain ID
//! rmctl app list | app status ID | app wait ID | app kill ID
//! rmctl app scale ID --replicas N [--stage S] | app endpoints ID | app update ID -f spec.yaml
//! rmctl queue list | queue set -f queues.toml
//! rmctl acl bootstrap | acl whoami
//! rmctl acl token create --user U [--admin] [--ttl 30d] | token list | token revoke ACCESSOR
//! rmctl submit -f job.yaml [--wait]
//! rmctl submit [--name N] [--instances N] [--vcores V] [--memory M] [--wait] -- CMD ARGS...
//! ```
//! Addresses come from `--rm`, else `WEFT_RM`, else 127.0.0.1:7100. Errors are
//! one line on stderr and a non-zero exit; `app wait` and `submit --wait` exit
//! 0 only when the application succeeded.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use weft_client::proto as pb;
use weft_client::RmClient;

#[derive(Debug, Parser)]
#[command(name = "rmctl", version, about = "Talk to a Weft resource manager")]
struct Cli {
    /// Resource-manager members, comma-separated host:port. Else WEFT_RM,
    /// else `rm = [...]` in $WEFT_CONFIG, ~/.config/weft/rmctl.toml or
    /// /etc/weft/rmctl.toml, else 127.0.0.1:7100.
    #[arg(long, env = "WEFT_RM", value_delimiter = ',', global = true)]
    rm: Option<Vec<String>>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    output: Output,
    /// Give up after this many seconds without a leader.
    #[arg(long, default_value_t = 15, global = true)]
    timeout: u64,
    /// The cluster CA's certificate (PEM): every connection is then TLS and
    /// checks the members' certificates.
    #[arg(long, env = "WEFT_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// This user's client certificate (PEM; `rmctl tls cert create --role client`).
    #[arg(long, env = "WEFT_TLS_CERT", global = true, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "WEFT_TLS_KEY", global = true, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// This user's token (`rmctl acl`). Else WEFT_TOKEN, else the file
    /// --token-file names, else `token_file` in rmctl.toml.
    #[arg(long, env = "WEFT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A file holding this user's token.
    #[arg(long, env = "WEFT_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum TlsCmd {
    /// The cluster CA: `weft-ca.pem` and `weft-ca-key.pem` (keep the key
    /// off the cluster's machines).
    Ca {
        #[command(subcommand)]
        cmd: TlsCaCmd,
    },
    /// A certificate signed by the CA.
    Cert {
        #[command(subcommand)]
        cmd: TlsCertCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TlsCaCmd {
    /// Makes the CA in --dir.
    Create {
        /// Where the files go.
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Valid for this many days.
        #[arg(long, default_value_t = 1825)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum TlsCertCmd {
    /// Makes ROLE-NAME.pem and ROLE-NAME-key.pem in --dir.
    Create {
        /// rm (a member), agent (a node) or client (a user).
        #[arg(long)]
        role: String,
        /// The member's, node's (its node id) or user's name.
        #[arg(long)]
        name: String,
        /// The CA's certificate (default: DIR/weft-ca.pem).
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        /// The CA's key (default: DIR/weft-ca-key.pem).
        #[arg(long)]
        ca_key: Option<std::path::PathBuf>,
        /// Where the files go (and the CA is looked for).
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// More DNS names the certificate holds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// Addresses the certificate holds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ip: Vec<std::net::IpAddr>,
        /// Valid for this many days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// `rmctl tls ...`: files only, no cluster.
fn tls_command(cmd: TlsCmd) -> anyhow::Result<String> {
    use weft_common::tls;
    Ok(match cmd {
        TlsCmd::Ca {
            cmd: TlsCaCmd::Create { dir, days },
        } => {
            let made = tls::create_ca(&dir, days).map_err(anyhow::Error::msg)?;
            format!(
                "wrote {} and {} (keep the key off the cluster's machines)",
                made.cert.display(),
                made.key.display()
            )
        }
        TlsCmd::Cert {
            cmd:
                TlsCertCmd::Create {
                    role,
                    name,
                    ca,
                    ca_key,
                    dir,
                    dns,
                    ip,
                    days,
                },
        } => {
            let role = tls::Role::parse(&role).map_err(|e| anyhow::anyhow!("--role: {e}"))?;
            let default = tls::ca_paths(&dir);
            let ca = tls::Made {
                cert: ca.unwrap_or(default.cert),
                key: ca_key.unwrap_or(default.key),
            };
            let made = tls::create_cert(
                &ca,
                &dir,
                &tls::CertRequest {
                    role,
                    name,
                    dns,
                    ips: ip,
                    days,
                },
            )
            .map_err(anyhow::Error::msg)?;
            format!("wrote {} and {}", made.cert.display(), made.key.display())
        }
    })
}

/// `rmctl.toml`: where the RM group is, and how to reach it over TLS.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    rm: Vec<String>,
    /// `ca_file` (and `cert_file`, `key_file` for a user certificate).
    tls: Option<weft_common::tls::TlsFiles>,
    /// A file holding this user's token (keep it readable by its owner only).
    token_file: Option<std::path::PathBuf>,
}

/// The first config file found ($WEFT_CONFIG, ~/.config/weft/rmctl.toml,
/// /etc/weft/rmctl.toml), if any.
fn file_config() -> anyhow::Result<FileConfig> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("WEFT_CONFIG") {
        candidates.push(std::path::PathBuf::from(p));
    }
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(std::path::Path::new(&home).join(".config/weft/rmctl.toml"));
    }
    candidates.push("/etc/weft/rmctl.toml".into());
    for p in candidates {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        return toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.message()));
    }
    Ok(FileConfig::default())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The RM group.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Nodes.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Queues.
    Queue {
        #[command(subcommand)]
        cmd: QueueCmd,
    },
    /// Applications.
    App {
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// Why an application waits (each waiting part: what keeps it from
    /// being placed now, and how many tasks of others are ahead of it in
    /// its queue) or why it failed (its first failing task).
    Why { id: String },
    /// Users' tokens (with `[acl] enabled = true` on the members).
    Acl {
        #[command(subcommand)]
        cmd: AclCmd,
    },
    /// Certificates for mutual TLS: a cluster CA, then one certificate per
    /// member, agent and user.
    Tls {
        #[command(subcommand)]
        cmd: TlsCmd,
    },
    /// Prints a completion script for a shell (e.g. `rmctl completions bash >
    /// /etc/bash_completion.d/rmctl`).
    Completions { shell: clap_complete::Shell },
    /// Submits a job spec (YAML or TOML, by extension), or one command run
    /// as a one-stage job (`-- CMD ARGS...`); prints the application id.
    Submit {
        #[arg(
            short,
            long,
            required_unless_present = "command",
            conflicts_with = "command"
        )]
        file: Option<std::path::PathBuf>,
        /// Submitting user (default: $USER).
        #[arg(long)]
        user: Option<String>,
        /// Wait for the end (see `app wait`).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        quick: Quick,
    },
}

#[derive(Debug, Subcommand)]
enum AclCmd {
    /// Makes the first admin token (works once per cluster); prints its secret.
    Bootstrap,
    /// Who the cluster takes this caller for.
    Whoami,
    /// Users' tokens (admins only).
    Token {
        #[command(subcommand)]
        cmd: AclTokenCmd,
    },
    /// Makes a new key for the tokens the cluster signs (container and
    /// application tokens; admins only). Agents get it before it signs; the
    /// key it replaces keeps verifying for --keep-previous, then is dropped.
    RotateSigningKey {
        /// How long the replaced key keeps verifying (10s to 30d; default
        /// 1h). Shorter cuts off the tokens it signed sooner: for a key
        /// that leaked.
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_previous: Option<std::time::Duration>,
    },
    /// The token signing keys: which signs, which are being replaced and
    /// when they are dropped (admins only).
    SigningKeys,
}

#[derive(Debug, Subcommand)]
enum AclTokenCmd {
    /// Makes a token for a user; prints its secret (shown this once).
    Create {
        #[arg(long)]
        user: String,
        /// May do anything: queues, members, drains, tokens, every application.
        #[arg(long)]
        admin: bool,
        /// Expires after this long (e.g. 30d, 12h); none: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    /// Revokes the token with this accessor (from `token list`).
    Revoke {
        accessor: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, indexes, node and capacity totals.
    Status,
    /// Adds a member to the RM group (start it with `resource-manager --join`).
    AddMember { id: u64, address: String },
    /// Removes a member from the RM group.
    RemoveMember { id: u64 },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    List,
    /// One node: capacity, use, GPUs, labels, last heartbeat.
    Status {
        id: String,
    },
    Drain {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    List,
    /// Replaces the queue tree with the `[[queues]]` tables of a TOML file.
    Set {
        #[arg(short, long)]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum AppCmd {
    /// Applications, oldest first; the filters combine.
    List {
        /// Only these states (repeat): submitted, accepted, running,
        /// succeeded, failed, killed.
        #[arg(long = "state", value_parser = parse_app_state)]
        states: Vec<pb::ApplicationState>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        /// Exact application name.
        #[arg(long)]
        name: Option<String>,
    },
    Status {
        id: String,
    },
    /// Waits for the application's end, showing its stages' progress; exits 0
    /// only if it succeeded (else prints why).
    Wait {
        id: String,
    },
    /// A task's output, from the node that ran it: TASK is stage/index
    /// (stage.role/index in a gang with roles) or a container id; none: the
    /// application master's.
    Logs {
        id: String,
        task: Option<String>,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing new output until the task ends.
        #[arg(short, long)]
        follow: bool,
    },
    Kill {
        id: String,
    },
    /// Sets how many replicas a service keeps running.
    Scale {
        id: String,
        #[arg(long)]
        replicas: u32,
        /// The stage of replicas (needed where the service has several).
        #[arg(long)]
        stage: Option<String>,
    },
    /// A service's healthy replicas: where to reach each (host and ports).
    Endpoints {
        id: String,
    },
    /// Replaces a running service's spec: its master rolls the change out
    /// one replica at a time (a new one healthy before an old one stops);
    /// `app status` shows how it goes.
    Update {
        id: String,
        /// The new spec (YAML, or TOML by its .toml extension).
        #[arg(short, long)]
        file: std::path::PathBuf,
    },
}

fn parse_app_state(s: &str) -> Result<pb::ApplicationState, String> {
    pb::ApplicationState::from_str_name(&format!("APPLICATION_STATE_{}", s.to_uppercase()))
        .filter(|st| *st != pb::ApplicationState::Unspecified)
        .ok_or_else(|| {
            format!("{s:?}: expected submitted, accepted, running, succeeded, failed or killed")
        })
}

/// Quotes one word for `sh -c`.
fn sh_quote(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// What `submit -- CMD ARGS...` runs: one stage of `instances` tasks.
#[derive(Debug, Clone, clap::Args)]
struct Quick {
    /// Quick form: the job's name.
    #[arg(long, default_value = "job")]
    name: String,
    /// Quick form: how many copies run ($WEFT_TASK_INDEX tells them apart).
    #[arg(long, default_value_t = 1)]
    instances: u32,
    /// Quick form: cores per task.
    #[arg(long, default_value_t = 1.0)]
    vcores: f64,
    /// Quick form: memory per task (e.g. 512MiB, 2GiB).
    #[arg(long, default_value = "512MiB")]
    memory: String,
    /// Quick form: the queue.
    #[arg(long, default_value = "root")]
    queue: String,
    /// Quick form: whole GPUs per task.
    #[arg(long, default_value_t = 0, conflicts_with = "gpu_share")]
    gpus: u32,
    /// Quick form: a share of one GPU per task (0.25 = a quarter of its
    /// compute), with --gpu-memory.
    #[arg(long, requires = "gpu_memory", value_parser = gpu_share)]
    gpu_share: Option<f64>,
    /// Quick form: the GPU-memory quota of a --gpu-share (e.g. 8GiB).
    #[arg(long, requires = "gpu_share")]
    gpu_memory: Option<String>,
    /// Quick form: the GPU model the task's GPUs must be (as the node
    /// reports it, e.g. "NVIDIA H100 80GB HBM3").
    #[arg(long)]
    gpu_model: Option<String>,
    /// Quick form: longest a task may run (e.g. 10m, 2h); killed after.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_runtime: Option<std::time::Duration>,
    /// Quick form: an environment variable of the tasks, K=V (repeat it).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Quick form: a node label the task's node must have, k=v (repeat it).
    #[arg(long = "label", value_name = "k=v")]
    labels: Vec<String>,
    /// Quick form: priority within the queue (0-1000, higher first).
    #[arg(long, default_value_t = 0)]
    priority: u32,
    /// The command and its arguments (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// A share of one GPU: above 0, below 1 (a whole one is `--gpus 1`).
fn gpu_share(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(f) if f > 0.0 && f < 1.0 => Ok(f),
        Ok(_) => Err("a share is above 0 and below 1 (whole GPUs: --gpus N)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `K=V` pairs of a repeated flag; an error names the flag.
fn pairs(
    flag: &str,
    items: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| anyhow::anyhow!("{flag}: {item:?} is not KEY=VALUE"))?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            anyhow::bail!("{flag}: {k} is given twice");
        }
    }
    Ok(out)
}

/// The one-stage job spec of the quick form, checked as the RM checks a
/// spec (an error names the flag's field), as YAML.
fn quick_spec(q: &Quick) -> anyhow::Result<String> {
    let size = |flag: &str, v: &str| -> anyhow::Result<bytesize::ByteSize> {
        v.parse()
            .map_err(|e| anyhow::anyhow!("{flag}: {v:?} is not a size (e.g. 512MiB, 8GiB): {e}"))
    };
    let cmd: Vec<String> = q.command.iter().map(|w| sh_quote(w)).collect();
    let spec = weft_spec::JobSpec {
        name: q.name.clone(),
        kind: Default::default(),
        queue: q.queue.clone(),
        priority: q.priority,
        max_attempts: 1,
        am: None,
        keep_containers: true,
        stages: vec![weft_spec::StageSpec {
            name: "run".into(),
            after: vec![],
            instances: Some(q.instances),
            replicas: None,
            restart: None,
            health: None,
            roles: None,
            command: cmd.join(" "),
            resources: Some(weft_spec::ResourcesSpec {
                vcores: q.vcores,
                memory: size("--memory", &q.memory)?,
                gpus: q.gpu_share.unwrap_or(q.gpus as f64),
                gpu_memory: q
                    .gpu_memory
                    .as_deref()
                    .map(|m| size("--gpu-memory", m))
                    .transpose()?,
                gpu_model: q.gpu_model.clone(),
                gpu_min_memory: None,
                node_labels: pairs("--label", &q.labels)?,
            }),
            framework: Default::default(),
            gang: false,
            max_retries: 0,
            max_runtime: q.max_runtime,
            env: pairs("--env", &q.env)?,
            placement: Default::default(),
            ports: vec![],
            preemption_grace: None,
            min_available: None,
        }],
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}", quick_error(&e)))?;
    Ok(spec.to_yaml())
}

/// A spec error of the quick form, naming the flag that set the field.
fn quick_error(e: &weft_spec::SpecError) -> String {
    // The field's last part a flag sets (`stages[0].env.K` is --env's).
    let flags = [
        ("gpu_memory", "--gpu-memory"),
        ("gpu_model", "--gpu-model"),
        ("gpus", "--gpus/--gpu-share"),
        ("vcores", "--vcores"),
        ("memory", "--memory"),
        ("node_labels", "--label"),
        ("env", "--env"),
        ("max_runtime", "--max-runtime"),
        ("instances", "--instances"),
        ("priority", "--priority"),
        ("queue", "--queue"),
        ("name", "--name"),
        ("command", "the command"),
    ];
    // A map's field ends in its key (`stages[0].env.memory`): the map
    // names the flag, whatever the key is.
    let parts: Vec<&str> = e.field.split('.').collect();
    let flag = if parts.contains(&"env") {
        Some("--env")
    } else if parts.contains(&"node_labels") {
        Some("--label")
    } else {
        parts
            .iter()
            .rev()
            .find_map(|part| flags.iter().find(|(f, _)| part.starts_with(f)))
            .map(|(_, flag)| *flag)
    };
    match flag {
        Some(flag) => format!("{flag}: {}", e.reason),
        None => e.to_string(),
    }
}

/// Like `wait_for`, with a live progress bar per stage (on a terminal).
async fn wait_with_bars(rm: &RmClient, id: &str) -> anyhow::Result<pb::ApplicationReport> {
    let multi = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
    let head = multi.add(indicatif::ProgressBar::new_spinner());
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    loop {
        let a = rm.get_application(id).await?;
        head.set_message(format!(
            "{id} {}",
            short_state(a.state().as_str_name(), "APPLICATION_STATE_")
        ));
        head.tick();
        for (i, s) in a.stages.iter().enumerate() {
            if bars.len() <= i {
                let b = multi.add(indicatif::ProgressBar::new(s.total as u64));
                b.set_style(style.clone());
                b.set_prefix(s.name.clone());
                bars.push(b);
            }
            bars[i].set_length(s.total as u64);
            bars[i].set_position(s.done as u64);
            bars[i].set_message(if s.running > 0 {
                format!("{} running", s.running)
            } else {
                String::new()
            });
        }
        if a.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            head.finish();
            for b in &bars {
                b.finish();
            }
            return Ok(a);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Polls `id` until it ends, printing each change of its stages' progress
/// (as lines, so logs and pipes read well). Returns the final report.
async fn wait_for(rm: &RmClient, id: &str, quiet: bool) -> anyhow::Result<pb::ApplicationReport> {
    use std::io::IsTerminal;
    if !quiet && std::io::stderr().is_terminal() {
        return wait_with_bars(rm, id).await;
    }
    let mut last = String::new();
    loop {
        let a = rm.get_application(id).await?;
        let state = short_state(a.state().as_str_name(), "APPLICATION_STATE_");
        let line = format!(
            "{id} {state}{}",
            a.stages
                .iter()
                .map(|s| format!("  {} {}/{}", s.name, s.done, s.total))
                .collect::<String>()
        );
        if !quiet && line != last {
            eprintln!("{line}");
            last = line;
        }
        if a.state() as i32 >= pb::ApplicationState::Succeeded as i32 {
            return Ok(a);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Aligned columns, headers first.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    // Columns two spaces apart, no borders, as `kubectl get` prints them.
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(headers.iter().copied())
        .add_rows(rows);
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn vcores(milli: u64) -> String {
    format!("{}", milli as f64 / 1000.0)
}

fn short_state(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_string()
}

fn app_json(a: &pb::ApplicationReport) -> serde_json::Value {
    json!({
        "id": a.application_id,
        "name": a.name,
        "queue": a.queue,
        "user": a.user,
        "state": short_state(a.state().as_str_name(), "APPLICATION_STATE_"),
        "progress": a.progress,
        "attempt": a.attempt,
        "am_container_id": a.am_container_id,
        "am_node_id": a.am_node_id,
        "stages": a.stages.iter().map(|s| json!({
            "name": s.name, "done": s.done, "total": s.total,
            "running": s.running, "failed": s.failed,
        })).collect::<Vec<_>>(),
        "diagnostics": a.diagnostics,
        "submitted_at_ms": a.submitted_at_ms,
        "finished_at_ms": a.finished_at_ms,
        "kind": a.kind,
        "spec_revision": a.spec_revision,
        "rollout": a.rollout,
        "preempted": a.preempted,
        "replicas": a.replicas,
        "endpoints": a.endpoints.iter().map(endpoint_json).collect::<Vec<_>>(),
    })
}

fn endpoint_json(e: &pb::Endpoint) -> serde_json::Value {
    json!({
        "stage": e.stage, "index": e.index, "container_id": e.container_id,
        "node_id": e.node_id, "host": e.host,
        "ports": e.ports.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// The last word on an application that ended: its report (JSON), or its
/// state and, unless it succeeded, why.
fn ended(a: &pb::ApplicationReport, json_out: bool) -> String {
    if json_out {
        return app_json(a).to_string();
    }
    let state = short_state(a.state().as_str_name(), "APPLICATION_STATE_");
    if a.state() == pb::ApplicationState::Succeeded {
        format!("{} {state}", a.application_id)
    } else {
        format!("{} {state}: {}", a.application_id, a.diagnostics)
    }
}

/// The output, and whether the command's outcome is a success (`app wait`
/// of an application that failed is not).
async fn run(cli: Cli) -> anyhow::Result<(String, bool)> {
    if let Cmd::Completions { shell } = cli.command {
        use clap::CommandFactory;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "rmctl", &mut out);
        return Ok((String::from_utf8_lossy(&out).trim_end().to_string(), true));
    }
    if let Cmd::Tls { cmd } = cli.command {
        return Ok((tls_command(cmd)?, true));
    }
    let file = file_config()?;
    // Flags and environment first, then the file's [tls].
    match (&cli.tls_ca, &file.tls) {
        (None, Some(t)) => weft_common::tls::setup_client(
            Some(&t.ca_file),
            t.cert_file.as_deref(),
            t.key_file.as_deref(),
        ),
        _ => weft_common::tls::setup_client(
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        ),
    }
    .map_err(anyhow::Error::msg)?;
    let addresses = match cli.rm.clone() {
        Some(a) => a,
        None if !file.rm.is_empty() => file.rm,
        None => vec!["127.0.0.1:7100".into()],
    };
    let mut rm =
        RmClient::new(addresses)?.with_deadline(std::time::Duration::from_secs(cli.timeout));
    let token = match (
        &cli.token,
        cli.token_file.as_ref().or(file.token_file.as_ref()),
    ) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                anyhow::bail!(
                    "token file {} may be read by others (mode {:o}): `chmod 600 {}`",
                    path.display(),
                    mode & 0o777,
                    path.display()
                );
            }
            Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            )
        }
        (None, None) => None,
    };
    // With credentials the cluster knows the user: a submission names one
    // only when --user says so.
    let has_credentials = token.is_some()
        || cli.tls_cert.is_some()
        || file.tls.as_ref().is_some_and(|t| t.cert_file.is_some());
    if let Some(t) = &token {
        rm = rm.with_token(t)?;
    }
    let json_out = matches!(cli.output, Output::Json);
    let mut ok = true;
    let out = match cli.command {
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
        } => {
            let s = rm.cluster_status().await?;
            let cap = s.capacity.unwrap_or_default();
            if json_out {
                json!({
                    "leader_id": s.leader_id,
                    "term": s.term,
                    "commit_index": s.commit_index,
                    "applied_index": s.applied_index,
                    "snapshot_index": s.snapshot_index,
                    "members": s.members.iter().map(|m| json!({"id": m.id, "address": m.address, "leader": m.is_leader, "learner": m.is_learner})).collect::<Vec<_>>(),
                    "nodes": s.nodes,
                    "capacity": {"vcores_milli": cap.vcores_milli, "memory_bytes": cap.memory_bytes, "gpus": cap.gpus},
                })
                .to_string()
            } else {
                let members = table(
                    &["MEMBER", "ADDRESS", "ROLE"],
                    s.members
                        .iter()
                        .map(|m| {
                            vec![
                                m.id.to_string(),
                                m.address.clone(),
                                if m.is_leader {
                                    "leader".into()
                                } else if m.is_learner {
                                    "learner (catching up)".into()
                                } else {
                                    "follower".into()
                                },
                            ]
                        })
                        .collect(),
                );
                format!(
                    "{members}\n\nleader {}  term {}  commit {}  applied {}\nnodes {}  vcores {}  memory {}  gpus {}",
                    s.leader_id,
                    s.term,
                    s.commit_index,
                    s.applied_index,
                    s.nodes,
                    vcores(cap.vcores_milli),
                    human_bytes(cap.memory_bytes),
                    cap.gpus
                )
            }
        }
        Cmd::Cluster {
            cmd: ClusterCmd::AddMember { id, address },
        } => {
            rm.add_member(id, &address).await?;
            format!("member {id} ({address}) added as a learner: it votes once it has caught up (`rmctl cluster status`)")
        }
        Cmd::Cluster {
            cmd: ClusterCmd::RemoveMember { id },
        } => {
            rm.remove_member(id).await?;
            format!("member {id} removed")
        }
        Cmd::Completions { .. } | Cmd::Tls { .. } => unreachable!("answered above"),
        Cmd::Acl { cmd } => acl_command(&rm, cmd, json_out).await?,
        Cmd::Node {
            cmd: NodeCmd::Status { id },
        } => {
            let nodes = rm.list_nodes().await?;
            let n = nodes
                .iter()
                .find(|n| n.node_id == id)
                .ok_or_else(|| anyhow::anyhow!("no such node {id}"))?;
            let c = n.capacity.clone().unwrap_or_default();
            let u = n.used.unwrap_or_default();
            if json_out {
                json!({
                    "id": n.node_id,
                    "address": n.address,
                    "state": short_state(n.state().as_str_name(), "NODE_STATE_"),
                    "capacity": {"vcores_milli": c.vcores_milli, "memory_bytes": c.memory_bytes, "gpus": c.gpus.len()},
                    "used": {"vcores_milli": u.vcores_milli, "memory_bytes": u.memory_bytes, "gpus": u.gpus, "gpu_share_milli": u.gpu_share_milli},
                    "gpus": c.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "model": g.model, "memory_bytes": g.memory_bytes})).collect::<Vec<_>>(),
                    "labels": n.labels,
                    "containers": n.containers,
                    "last_heartbeat_ms": n.last_heartbeat_ms,
                })
                .to_string()
            } else {
                let mut labels: Vec<String> =
                    n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let gpus = c
                    .gpus
                    .iter()
                    .map(|g| {
                        format!(
                            "\n  gpu {}  {}  {}  {}",
                            g.index,
                            g.model,
                            human_bytes(g.memory_bytes),
                            g.uuid
                        )
                    })
                    .collect::<String>();
                format!(
                    "{}  {}  {}\nvcores {} of {}  memory {} of {}  gpus {}{} of {}  containers {}\nlabels {}{gpus}",
                    n.node_id,
                    n.address,
                    short_state(n.state().as_str_name(), "NODE_STATE_"),
                    vcores(u.vcores_milli),
                    vcores(c.vcores_milli),
                    human_bytes(u.memory_bytes),
                    human_bytes(c.memory_bytes),
                    u.gpus,
                    if u.gpu_share_milli > 0 {
                        format!(" + {} in shares", vcores(u.gpu_share_milli.into()))
                    } else {
                        String::new()
                    },
                    c.gpus.len(),
                    n.containers,
                    if labels.is_empty() { "-".into() } else { labels.join(",") },
                )
            }
        }
        Cmd::Node { cmd: NodeCmd::List } => {
            let nodes = rm.list_nodes().await?;
            if json_out {
                serde_json::Value::Array(
                    nodes
                        .iter()
                        .map(|n| {
                            let c = n.capacity.clone().unwrap_or_default();
                            json!({
                                "id": n.node_id,
                                "address": n.address,
                                "state": short_state(n.state().as_str_name(), "NODE_STATE_"),
                                "vcores_milli": c.vcores_milli,
                                "memory_bytes": c.memory_bytes,
                                "gpus": c.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "model": g.model, "memory_bytes": g.memory_bytes})).collect::<Vec<_>>(),
                                "labels": n.labels,
                            })
                        })
                        .collect(),
                )
                .to_string()
            } else {
                table(
                    &["NODE", "ADDRESS", "STATE", "VCORES", "MEMORY", "GPUS"],
                    nodes
                        .iter()
                        .map(|n| {
                            let c = n.capacity.clone().unwrap_or_default();
                            vec![
                                n.node_id.clone(),
                                n.address.clone(),
                                short_state(n.state().as_str_name(), "NODE_STATE_"),
                                vcores(c.vcores_milli),
                                human_bytes(c.memory_bytes),
                                c.gpus.len().to_string(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::Node {
            cmd: NodeCmd::Drain { id },
        } => {
            rm.drain_node(&id).await?;
            format!("node {id} draining")
        }
        Cmd::Queue {
            cmd: QueueCmd::List,
        } => {
            let queues = rm.list_queues().await?;
            let r = |x: &Option<pb::Resources>| x.unwrap_or_default();
            if json_out {
                serde_json::Value::Array(
                    queues
                        .iter()
                        .map(|q| {
                            let (g, m) = (r(&q.guaranteed), r(&q.maximum));
                            json!({
                                "name": q.name,
                                "weight": q.weight,
                                "guaranteed": {"vcores_milli": g.vcores_milli, "memory_bytes": g.memory_bytes, "gpus": g.gpus},
                                "maximum": {"vcores_milli": m.vcores_milli, "memory_bytes": m.memory_bytes, "gpus": m.gpus},
                                "pending_applications": q.pending_applications,
                                "running_applications": q.running_applications,
                                "submit_acl": q.submit_acl,
                                "admin_acl": q.admin_acl,
                            })
                        })
                        .collect(),
                )
                .to_string()
            } else {
                let limit =
                    |v: u64, f: &dyn Fn(u64) -> String| if v == 0 { "-".to_string() } else { f(v) };
                table(
                    &[
                        "QUEUE",
                        "WEIGHT",
                        "GUARANTEED",
                        "MAXIMUM",
                        "PENDING",
                        "RUNNING",
                    ],
                    queues
                        .iter()
                        .map(|q| {
                            let (g, m) = (r(&q.guaranteed), r(&q.maximum));
                            let res = |x: &pb::Resources| {
                                format!(
                                    "{} vcores, {}, {} gpus",
                                    limit(x.vcores_milli, &|v| vcores(v)),
                                    limit(x.memory_bytes, &|v| human_bytes(v)),
                                    limit(x.gpus as u64, &|v| v.to_string())
                                )
                            };
                            vec![
                                q.name.clone(),
                                q.weight.to_string(),
                                res(&g),
                                res(&m),
                                q.pending_applications.to_string(),
                                q.running_applications.to_string(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::Queue {
            cmd: QueueCmd::Set { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            rm.set_queues(&text).await?;
            "queues updated".to_string()
        }
        Cmd::App {
            cmd:
                AppCmd::List {
                    states,
                    user,
                    queue,
                    name,
                },
        } => {
            let apps = rm
                .list_applications(pb::ListApplicationsRequest {
                    states: states.into_iter().map(|s| s as i32).collect(),
                    user: user.unwrap_or_default(),
                    queue: queue.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    ..Default::default()
                })
                .await?;
            if json_out {
                serde_json::Value::Array(apps.iter().map(app_json).collect()).to_string()
            } else {
                table(
                    &["APPLICATION", "NAME", "QUEUE", "USER", "STATE"],
                    apps.iter()
                        .map(|a| {
                            vec![
                                a.application_id.clone(),
                                a.name.clone(),
                                a.queue.clone(),
                                a.user.clone(),
                                short_state(a.state().as_str_name(), "APPLICATION_STATE_"),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::App {
            cmd: AppCmd::Status { id },
        } => {
            let a = rm.get_application(&id).await?;
            if json_out {
                app_json(&a).to_string()
            } else {
                let stages = if a.stages.is_empty() {
                    String::new()
                } else {
                    let rows = a
                        .stages
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                format!("{}/{}", s.done, s.total),
                                s.running.to_string(),
                                s.failed.to_string(),
                            ]
                        })
                        .collect();
                    format!(
                        "\n\n{}",
                        table(&["STAGE", "DONE", "RUNNING", "FAILURES"], rows)
                    )
                };
                format!(
                    "{}  {}  queue {}  user {}  {}  attempt {}{}{}{}{}{}",
                    a.application_id,
                    a.name,
                    a.queue,
                    a.user,
                    short_state(a.state().as_str_name(), "APPLICATION_STATE_"),
                    a.attempt,
                    if a.preempted == 0 {
                        String::new()
                    } else {
                        format!("  preempted {} (requeued, no retry used)", a.preempted)
                    },
                    if a.am_node_id.is_empty() {
                        String::new()
                    } else {
                        format!("  master on {}", a.am_node_id)
                    },
                    stages,
                    if a.diagnostics.is_empty() {
                        String::new()
                    } else {
                        format!("\n{}", a.diagnostics)
                    },
                    if a.rollout.is_empty() {
                        String::new()
                    } else {
                        format!("\nrollout: {}", a.rollout)
                    }
                )
            }
        }
        Cmd::App {
            cmd: AppCmd::Kill { id },
        } => {
            rm.kill_application(&id).await?;
            format!("application {id} killed")
        }
        Cmd::App {
            cmd:
                AppCmd::Scale {
                    id,
                    replicas,
                    stage,
                },
        } => {
            let r = rm
                .scale_application(&id, stage.as_deref().unwrap_or(""), replicas)
                .await?;
            if json_out {
                json!({"id": id, "stage": r.stage, "replicas": r.replicas, "previous": r.previous})
                    .to_string()
            } else {
                format!(
                    "application {id}: stage {} scaled from {} to {} replicas",
                    r.stage, r.previous, r.replicas
                )
            }
        }
        Cmd::App {
            cmd: AppCmd::Update { id, file },
        } => {
            let spec = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            let format = match file.extension().and_then(|e| e.to_str()) {
                Some("toml") => "toml",
                _ => "yaml",
            };
            let revision = rm.update_application(&id, &spec, format).await?;
            if json_out {
                json!({"id": id, "spec_revision": revision}).to_string()
            } else {
                format!("application {id}: spec revision {revision}, rolling out one replica at a time (rmctl app status {id})")
            }
        }
        Cmd::App {
            cmd: AppCmd::Endpoints { id },
        } => {
            let eps = rm.endpoints(&id).await?;
            if json_out {
                serde_json::Value::from(eps.iter().map(endpoint_json).collect::<Vec<_>>())
                    .to_string()
            } else {
                table(
                    &["STAGE", "REPLICA", "NODE", "ADDRESS", "PORTS", "CONTAINER"],
                    eps.iter()
                        .map(|e| {
                            let ports: std::collections::BTreeMap<_, _> = e.ports.iter().collect();
                            vec![
                                e.stage.clone(),
                                e.index.to_string(),
                                e.node_id.clone(),
                                ports
                                    .values()
                                    .next()
                                    .map(|p| format!("{}:{p}", e.host))
                                    .unwrap_or_else(|| e.host.clone()),
                                ports
                                    .iter()
                                    .map(|(n, p)| format!("{n}={p}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                e.container_id.clone(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        Cmd::App {
            cmd:
                AppCmd::Logs {
                    id,
                    task,
                    stderr,
                    follow,
                },
        } => {
            use std::io::Write;
            // Following a task that has no container yet: wait for it.
            let started = std::time::Instant::now();
            let mut stream = loop {
                match rm
                    .task_logs(&id, task.as_deref().unwrap_or(""), stderr, 0, follow)
                    .await
                {
                    Ok(s) => break s,
                    Err(weft_client::Error::Rpc(s))
                        if follow
                            && s.code() == tonic::Code::NotFound
                            && s.message().starts_with("task:")
                            && started.elapsed().as_secs() < cli.timeout =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(weft_client::Error::Rpc)? {
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
            return Ok((String::new(), true));
        }
        Cmd::Why { id } => {
            let x = rm.explain_application(&id).await?;
            if json_out {
                serde_json::json!({
                    "application_id": x.application_id,
                    "state": short_state(x.state().as_str_name(), "APPLICATION_STATE_"),
                    "summary": x.summary,
                    "waiting": x.waiting.iter().map(|w| serde_json::json!({
                        "what": w.what,
                        "tasks": w.tasks,
                        "reason": w.reason,
                        "detail": w.detail,
                        "ahead": w.ahead,
                    })).collect::<Vec<_>>(),
                    "failure": x.failure.as_ref().map(|f| serde_json::json!({
                        "task": f.task,
                        "container_id": f.container_id,
                        "node_id": f.node_id,
                        "reason": f.reason,
                        "diagnostic": f.diagnostic,
                        "exit_status": f.exit_status,
                    })),
                })
                .to_string()
            } else if x.waiting.is_empty() {
                format!("{}  {}", x.application_id, x.summary)
            } else {
                let rows = x
                    .waiting
                    .iter()
                    .map(|w| {
                        vec![
                            w.what.clone(),
                            w.tasks.to_string(),
                            w.ahead.to_string(),
                            w.reason.clone(),
                            w.detail.clone(),
                        ]
                    })
                    .collect();
                format!(
                    "{}  {}\n\n{}",
                    x.application_id,
                    short_state(x.state().as_str_name(), "APPLICATION_STATE_"),
                    table(&["WAITING", "TASKS", "AHEAD", "REASON", "WHY"], rows)
                )
            }
        }
        Cmd::App {
            cmd: AppCmd::Wait { id },
        } => {
            let a = wait_for(&rm, &id, json_out).await?;
            ok = a.state() == pb::ApplicationState::Succeeded;
            ended(&a, json_out)
        }
        Cmd::Submit {
            file,
            user,
            wait,
            quick,
        } => {
            let (spec, format) = match &file {
                Some(file) => {
                    let spec = std::fs::read_to_string(file)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                    let format = match file.extension().and_then(|e| e.to_str()) {
                        Some("toml") => "toml",
                        _ => "yaml",
                    };
                    (spec, format)
                }
                None => (quick_spec(&quick)?, "yaml"),
            };
            let user = match user {
                Some(u) => u,
                None if has_credentials => String::new(),
                None => std::env::var("USER").unwrap_or_else(|_| "anonymous".into()),
            };
            let id = rm.submit(&spec, format, &user).await?;
            if wait {
                if !json_out {
                    eprintln!("submitted {id}");
                }
                let a = wait_for(&rm, &id, json_out).await?;
                ok = a.state() == pb::ApplicationState::Succeeded;
                ended(&a, json_out)
            } else if json_out {
                json!({ "id": id }).to_string()
            } else {
                id
            }
        }
    };
    Ok((out, ok))
}

fn acl_token_json(t: &pb::AclToken) -> serde_json::Value {
    json!({
        "accessor": t.accessor,
        "user": t.user,
        "admin": t.admin,
        "description": t.description,
        "created_at_ms": t.created_at_ms,
        "expires_at_ms": t.expires_at_ms,
    })
}

/// A token's expiry as a table shows it.
fn expiry(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let when = humantime::format_rfc3339_seconds(t).to_string();
    if t <= std::time::SystemTime::now() {
        format!("{when} (expired)")
    } else {
        when
    }
}

/// `rmctl acl ...`.
async fn acl_command(rm: &RmClient, cmd: AclCmd, json_out: bool) -> anyhow::Result<String> {
    let made = |s: pb::AclTokenSecret| {
        let t = s.token.unwrap_or_default();
        if json_out {
            let mut v = acl_token_json(&t);
            v["secret"] = json!(s.secret);
            v.to_string()
        } else {
            format!(
                "accessor {}
user     {}{}
expires  {}
secret   {}
(the secret is shown this once: give it to its user, e.g. as WEFT_TOKEN)",
                t.accessor,
                t.user,
                if t.admin { " (admin)" } else { "" },
                expiry(t.expires_at_ms),
                s.secret
            )
        }
    };
    Ok(match cmd {
        AclCmd::Bootstrap => made(rm.acl_bootstrap().await?),
        AclCmd::Whoami => {
            let w = rm.who_am_i().await?;
            if json_out {
                json!({"user": w.user, "admin": w.admin, "method": w.method, "accessor": w.accessor, "acl_enabled": w.acl_enabled}).to_string()
            } else if !w.acl_enabled {
                format!("{} (ACLs are off: everyone may do anything)", w.user)
            } else {
                format!(
                    "{}{} by {}{}",
                    w.user,
                    if w.admin { " (admin)" } else { "" },
                    w.method,
                    if w.accessor.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", w.accessor)
                    }
                )
            }
        }
        AclCmd::Token {
            cmd:
                AclTokenCmd::Create {
                    user,
                    admin,
                    ttl,
                    description,
                },
        } => made(rm.create_acl_token(&user, admin, ttl, &description).await?),
        AclCmd::Token {
            cmd: AclTokenCmd::List,
        } => {
            let tokens = rm.list_acl_tokens().await?;
            if json_out {
                serde_json::Value::Array(tokens.iter().map(acl_token_json).collect()).to_string()
            } else {
                table(
                    &["ACCESSOR", "USER", "ADMIN", "EXPIRES", "DESCRIPTION"],
                    tokens
                        .iter()
                        .map(|t| {
                            vec![
                                t.accessor.clone(),
                                t.user.clone(),
                                if t.admin { "yes".into() } else { "no".into() },
                                expiry(t.expires_at_ms),
                                t.description.clone(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        AclCmd::Token {
            cmd: AclTokenCmd::Revoke { accessor },
        } => {
            rm.revoke_acl_token(&accessor).await?;
            format!("token {accessor} revoked")
        }
        AclCmd::RotateSigningKey { keep_previous } => {
            signing_keys(rm.rotate_signing_key(keep_previous).await?, json_out)
        }
        AclCmd::SigningKeys => signing_keys(rm.list_signing_keys().await?, json_out),
    })
}

/// `rmctl acl signing-keys` (and what a rotation answers).
fn signing_keys(r: pb::SigningKeysResponse, json_out: bool) -> String {
    if json_out {
        return json!({
            "group": r.group,
            "keys": r.keys.iter().map(|k| json!({
                "id": k.id,
                "public_key": k.public_key,
                "signing": k.signing,
                "created_at_ms": k.created_at_ms,
                "signs_from_ms": k.signs_from_ms,
                "replaced_at_ms": k.replaced_at_ms,
                "dropped_at_ms": k.dropped_at_ms,
            })).collect::<Vec<_>>(),
        })
        .to_string();
    }
    let at = |ms: u64| {
        if ms == 0 {
            "-".to_string()
        } else {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        }
    };
    let now = weft_proto::token::now_ms();
    let rows = r
        .keys
        .iter()
        .map(|k| {
            let state = if k.signing {
                "signing"
            } else if k.signs_from_ms > now {
                "next (handed to agents)"
            } else {
                "replaced (verifies)"
            };
            vec![
                k.id.to_string(),
                state.to_string(),
                at(k.signs_from_ms),
                at(k.dropped_at_ms),
                k.public_key.clone(),
            ]
        })
        .collect();
    format!(
        "{}\ngroup {}",
        table(
            &["ID", "STATE", "SIGNS FROM", "DROPPED AT", "PUBLIC KEY"],
            rows
        ),
        r.group
    )
}

/// Whether an error is stdout's reader having gone away (`rmctl ... | head`).
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints the command's output; a reader that stopped reading (`| head`,
/// `| grep -q`) ends the output quietly, as it does for other Unix tools.
fn print_out(out: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("rmctl: writing the output: {e}");
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok((out, true)) => {
            if !out.is_empty() {
                print_out(&out);
            }
            ExitCode::SUCCESS
        }
        Ok((out, false)) => {
            print_out(&out);
            ExitCode::FAILURE
        }
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rmctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(command: &[&str]) -> Quick {
        Quick {
            name: "job".into(),
            queue: "root".into(),
            instances: 1,
            vcores: 1.0,
            memory: "512MiB".into(),
            gpus: 0,
            gpu_share: None,
            gpu_memory: None,
            gpu_model: None,
            max_runtime: None,
            env: vec![],
            labels: vec![],
            priority: 0,
            command: command.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn tables_are_columns_two_spaces_apart_without_trailing_blanks() {
        let t = table(
            &["ID", "STATE", "WHY"],
            vec![
                vec!["app-000001".into(), "RUNNING".into(), "".into()],
                vec!["a".into(), "FAILED".into(), "over its memory quota".into()],
            ],
        );
        assert_eq!(
            t,
            "ID          STATE    WHY\n\
             app-000001  RUNNING\n\
             a           FAILED   over its memory quota"
        );
    }

    #[test]
    fn the_quick_form_is_a_spec_the_rm_reads_back_with_every_flag() {
        let plain =
            weft_spec::JobSpec::parse(&quick_spec(&quick(&["true"])).unwrap(), "yaml").unwrap();
        let stage = &plain.stages[0];
        assert_eq!((stage.instances, stage.command.as_str()), (Some(1), "true"));
        let r = stage.resources.as_ref().unwrap();
        assert_eq!((r.vcores, r.memory.as_u64(), r.gpus), (1.0, 512 << 20, 0.0));

        let mut q = quick(&["sh", "-c", "echo \"$GREETING\" it's"]);
        q.gpus = 2;
        q.gpu_model = Some("NVIDIA H100 80GB HBM3".into());
        q.max_runtime = Some(std::time::Duration::from_secs(600));
        q.env = vec![
            "GREETING=hello world".into(),
            "EMPTY=".into(),
            "EQ=a=b".into(),
        ];
        q.labels = vec!["zone=b".into()];
        q.priority = 7;
        q.instances = 3;
        let s = weft_spec::JobSpec::parse(&quick_spec(&q).unwrap(), "yaml").unwrap();
        let st = &s.stages[0];
        assert_eq!(s.priority, 7);
        assert_eq!(st.instances, Some(3));
        assert_eq!(st.command, "sh -c 'echo \"$GREETING\" it'\\''s'");
        assert_eq!(st.max_runtime, Some(std::time::Duration::from_secs(600)));
        assert_eq!(st.env["GREETING"], "hello world");
        assert_eq!(st.env["EMPTY"], "");
        assert_eq!(st.env["EQ"], "a=b");
        let r = st.resources.as_ref().unwrap();
        assert_eq!(r.gpus, 2.0);
        assert_eq!(r.gpu_model.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(r.node_labels["zone"], "b");

        let mut q = quick(&["python3", "serve.py"]);
        q.gpu_share = Some(0.25);
        q.gpu_memory = Some("8GiB".into());
        let s = weft_spec::JobSpec::parse(&quick_spec(&q).unwrap(), "yaml").unwrap();
        let r = s.stages[0].resources.as_ref().unwrap();
        assert_eq!(
            (r.gpus, r.gpu_memory.map(|m| m.as_u64())),
            (0.25, Some(8 << 30))
        );
    }

    #[test]
    fn a_bad_quick_form_flag_is_named_before_anything_is_sent() {
        let err = |f: &dyn Fn(&mut Quick)| {
            let mut q = quick(&["true"]);
            f(&mut q);
            quick_spec(&q).unwrap_err().to_string()
        };
        assert_eq!(
            err(&|q| q.env = vec!["FOO".into()]),
            "--env: \"FOO\" is not KEY=VALUE"
        );
        assert_eq!(
            err(&|q| q.env = vec!["=x".into()]),
            "--env: \"=x\" is not KEY=VALUE"
        );
        assert_eq!(
            err(&|q| q.labels = vec!["a=1".into(), "a=2".into()]),
            "--label: a is given twice"
        );
        assert!(err(&|q| q.memory = "lots".into()).starts_with("--memory: \"lots\" is not a size"));
        let e = err(&|q| {
            q.gpu_share = Some(1.5);
            q.gpu_memory = Some("1GiB".into());
        });
        assert!(e.starts_with("--gpus/--gpu-share: "), "{e}");
        let e = err(&|q| q.vcores = 0.0);
        assert!(e.starts_with("--vcores: "), "{e}");
        let e = err(&|q| q.priority = 5000);
        assert!(e.starts_with("--priority: "), "{e}");
        let e = err(&|q| q.env = vec![format!("BIG={}", "x".repeat(40 << 10))]);
        assert!(e.starts_with("--env: "), "{e}");
        // A key named like another flag's field still names its own flag.
        let e = err(&|q| q.env = vec![format!("memory={}", "x".repeat(40 << 10))]);
        assert!(e.starts_with("--env: "), "{e}");
        assert!(gpu_share("0.5").is_ok());
        for bad in ["0", "1", "1.5", "-0.1", "x"] {
            assert!(gpu_share(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_deployment_example_rmctl_toml_names_the_group_and_its_tls() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deploy/rmctl.toml");
        let c: FileConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.rm.len(), 3);
        let tls = c.tls.unwrap();
        assert!(tls.ca_file.ends_with("weft-ca.pem"));
        assert!(tls.cert_file.is_some() && tls.key_file.is_some());
        assert!(c.token_file.unwrap().ends_with("token"));
        let e = toml::from_str::<FileConfig>("rm = []\n[tls]\nca = \"x\"\n").unwrap_err();
        assert!(e.message().contains("unknown field `ca`"), "{e}");
    }
}
