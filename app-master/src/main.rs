//! `app-master`: runs one attempt of a job spec against the RM group.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_app_master::runner::Runner;
use weft_common::telemetry::{self, LogFormat};
use weft_spec::JobSpec;

/// Weft application master: runs a job's stages on containers the resource
/// manager grants, and reports the job's end.
#[derive(Debug, Parser)]
#[command(name = "app-master", version)]
struct Args {
    /// Application id (given by SubmitApplication).
    #[arg(long, env = "WEFT_APP_ID")]
    app_id: String,
    #[arg(long, env = "WEFT_ATTEMPT", default_value_t = 1)]
    attempt: u32,
    /// Resource-manager members, comma-separated host:port.
    #[arg(long, env = "WEFT_RM", value_delimiter = ',')]
    rm: Vec<String>,
    /// The job spec (YAML or TOML by extension).
    #[arg(long, required_unless_present = "spec_env")]
    spec: Option<PathBuf>,
    /// Read the job spec from the file WEFT_JOB_SPEC_FILE names (relative to
    /// the working directory), or else from WEFT_JOB_SPEC (format in
    /// WEFT_JOB_SPEC_FORMAT), as the RM hands it to the masters it starts.
    #[arg(long)]
    spec_env: bool,
    /// This attempt's application token (hex), as the RM issued it.
    #[arg(
        long,
        env = "WEFT_APP_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    token: Option<String>,
    /// A file holding the token (relative to the working directory): how
    /// the RM hands it to the masters it starts, readable by the job's user
    /// alone (an environment is readable in /proc by the same user's other
    /// processes, and lingers in children).
    #[arg(long, env = "WEFT_APP_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// How long to keep retrying while no resource-manager leader answers
    /// (an outage of the whole group) before giving up this attempt; the
    /// job's tasks keep running meanwhile (e.g. 15m, 1h).
    #[arg(long, env = "WEFT_RM_RETRY_FOR", default_value = "15m", value_parser = humantime::parse_duration)]
    rm_retry_for: std::time::Duration,
    /// The cluster CA's certificate (PEM): with it, every connection is TLS
    /// and checks the servers' certificates (the agent hands it to the
    /// masters it starts when the cluster runs TLS).
    #[arg(long, env = "WEFT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let (text, format) = if args.spec_env {
        let format = std::env::var("WEFT_JOB_SPEC_FORMAT").unwrap_or_else(|_| "yaml".into());
        match std::env::var_os("WEFT_JOB_SPEC_FILE") {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(t) => (t, format),
                Err(e) => {
                    eprintln!(
                        "app-master: reading WEFT_JOB_SPEC_FILE {}: {e}",
                        std::path::Path::new(&path).display()
                    );
                    return ExitCode::from(2);
                }
            },
            None => (std::env::var("WEFT_JOB_SPEC").unwrap_or_default(), format),
        }
    } else {
        let path = args
            .spec
            .clone()
            .expect("clap requires --spec without --spec-env");
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                let f = if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                    "toml"
                } else {
                    "yaml"
                };
                (t, f.to_string())
            }
            Err(e) => {
                eprintln!("app-master: reading {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    };
    let spec = match JobSpec::parse(&text, &format) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("app-master: {e}");
            return ExitCode::from(2);
        }
    };
    let token_text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!(
                    "app-master: --token-file (WEFT_APP_TOKEN_FILE) {}: {e}",
                    f.display()
                );
                return ExitCode::from(2);
            }
        },
        (None, None) => String::new(),
    };
    let token = match hex::decode(token_text.trim()) {
        Ok(t) if !t.is_empty() => t,
        _ => {
            eprintln!("app-master: --token (WEFT_APP_TOKEN) or --token-file (WEFT_APP_TOKEN_FILE): give the application token, in hex");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = weft_common::tls::setup_client(args.tls_ca.as_deref(), None, None) {
        eprintln!("app-master: {e}");
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    // (Connections are made in the runtime, the local agent's too.)
    let _in_runtime = rt.enter();
    let rm = match weft_app_master::client::RmAmClient::new(args.rm, token) {
        Ok(rm) => rm
            .with_retry_for(args.rm_retry_for)
            .through(weft_app_master::client::LocalAgent::from_env()),
        Err(e) => {
            eprintln!("app-master: --rm (WEFT_RM): {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(Runner::new(args.app_id, args.attempt, spec, rm).run()) {
        Ok(f) if f.status == weft_proto::v1::FinalStatus::Succeeded => ExitCode::SUCCESS,
        Ok(f) => {
            eprintln!("app-master: {}", f.diagnostics);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("app-master: {}", e.message());
            ExitCode::FAILURE
        }
    }
}
