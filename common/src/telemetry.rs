//! Logging setup shared by the agent's binary and tests: `tracing` with an
//! env filter (`RUST_LOG`, default `info`), human-readable or JSON lines.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the global subscriber, `info` unless `RUST_LOG` says otherwise.
/// Safe to call twice (the second does nothing).
pub fn init(format: LogFormat) {
    init_with_default(format, "info")
}

/// Like [`init`], with another default filter.
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
