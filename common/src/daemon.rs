//! What every Weft daemon's `main` shares: shutdown on SIGTERM or ctrl-c, the
//! runtime, binding the listener, and one-line errors with an exit code.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Binds `addr` and runs `serve(listener, shutdown)` on a two-worker runtime
/// until it returns; errors are printed as `name: error`.
pub fn serve_main<F, Fut, E>(name: &str, addr: SocketAddr, serve: F) -> ExitCode
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listen {addr}: {e}"))?;
        crate::net::bind_source(addr.ip());
        serve(listener).await.map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
