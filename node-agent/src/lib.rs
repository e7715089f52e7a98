//! Weft's node agent: one per machine. It discovers what the machine offers,
//! runs containers (process trees in their own cgroup, session, work directory
//! and log files), enforces their quotas, and reports to the resource manager.
//!
//! Layout:
//! - [`config`]: the TOML config, defaults and validation;
//! - [`capacity`], [`gpu`]: what the node offers (sysinfo; NVML or a fake GPU probe);
//! - [`driver`]: isolation drivers (cgroup v2, cgroup v1, procfs) behind one trait;
//! - [`manager`]: admission, launch and supervision of containers;
//! - [`model`], [`validate`]: container records, exit reasons, request checks;
//! - [`logs`]: reading and following logs, retention;
//! - [`service`]: the ContainerManager gRPC service;
//! - [`tracker`]: registration and heartbeats to the resource manager;
//! - [`procfs`]: process-tree reading shared by all of the above;
//! - [`memory`]: the agent's own heap (one arena, free pages given back);
//!
//! [`run`] assembles them and returns only after every container has been
//! stopped and its group removed.

pub mod capacity;
pub mod config;
pub mod driver;
pub mod error;
pub mod fence;
pub mod gpu;
pub mod logs;
pub mod manager;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod ports;
pub mod procfs;
pub mod recovery;
pub mod relay;
pub mod service;
pub mod shim;
pub mod tokens;
pub mod tracker;
pub mod users;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::AgentConfig;
pub use error::{Error, Result};
pub use manager::Manager;

/// How long open client connections may hold up the end of a shutdown.
pub const SERVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Picks the GPU probe the config asks for. NVML that cannot start means no
/// GPUs, said once in the log; it is not an error.
pub fn gpu_probe(cfg: &config::GpuConfig) -> Arc<dyn gpu::GpuProbe> {
    match cfg.probe {
        config::GpuProbeChoice::None => Arc::new(gpu::NoGpus),
        config::GpuProbeChoice::Fake => Arc::new(gpu::FakeGpuProbe::new(&cfg.fake)),
        config::GpuProbeChoice::Nvml => match gpu::NvmlProbe::new() {
            Ok(p) => Arc::new(p),
            Err(e) => {
                info!(reason = %e, "no NVIDIA GPUs: running without GPUs");
                Arc::new(gpu::NoGpus)
            }
        },
    }
}

/// Runs the agent on `listener` until `shutdown` resolves, then stops every
/// container, removes their groups and returns.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    if config.containers.run_as_user && !users::can_switch() {
        return Err(Error::Config(
            "containers.run_as_user: needs the agent to run as root (it sets each task's uid and gid)".into(),
        ));
    }
    weft_common::tls::spawn_reloader(weft_common::tls::RELOAD_CHECK_EVERY);
    let cfg = config.clone();
    let (driver, gpu, host) = manager::blocking(move || {
        let driver = driver::select(cfg.containers.driver, &cfg.containers.cgroup_parent);
        let gpu = gpu_probe(&cfg.gpu);
        let host = capacity::HostFacts::discover();
        (driver, gpu, host)
    })
    .await;
    let driver = driver?;
    let capacity = capacity::compute(host?, &config.resources);
    let hostname = sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into());
    // With TLS on, a node is who its certificate names (the RM takes a
    // registration only under that name); else the hostname.
    let node_id = config
        .node_id
        .clone()
        .or_else(|| Some(weft_common::tls::installed()?.own.as_ref()?.name.clone()))
        .unwrap_or_else(|| hostname.clone());
    let configured_key = match &config.security.token_public_key {
        Some(k) => Some(
            weft_proto::token::TokenVerifier::from_hex(k)
                .map_err(|e| Error::Config(format!("security.token_public_key: {e}")))?,
        ),
        None => None,
    };
    let tokens = Arc::new(tokens::Tokens::new(node_id.clone(), configured_key));
    let mgr = Manager::new(manager::ManagerParts {
        tokens,
        containers: config.containers.clone(),
        logs: config.logs.clone(),
        driver: driver.clone(),
        gpu: gpu.clone(),
        capacity,
        work_dir: config.work_dir.clone(),
    })?;
    let recovered = mgr.recover().await;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading listener address", &config.work_dir, e))?;
    let address = config.advertise_address.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            format!("{hostname}:{}", local.port())
        } else {
            local.to_string()
        }
    });
    info!(
        node_id = %node_id,
        %address,
        driver = %driver.kind(),
        isolation = %driver.describe(),
        vcores_milli = capacity.vcores_milli,
        memory_bytes = capacity.memory_bytes,
        gpu_probe = gpu.name(),
        gpus = mgr.gpus().len(),
        recovered_running = recovered.running.len(),
        recovered_ended = recovered.ended.len(),
        recovered_lost = recovered.lost.len(),
        "node agent started"
    );

    let cancel = CancellationToken::new();
    let mut background = Vec::new();
    if !config.rm_addresses.is_empty() {
        let node = tracker::NodeIdentity {
            node_id,
            hostname,
            address,
            labels: config.labels.clone(),
        };
        let tcfg = tracker::TrackerConfig {
            rm_addresses: config.rm_addresses.clone(),
            interval: config.heartbeat.interval,
            max_backoff: config.heartbeat.max_backoff,
            ports: config.ports.clone(),
        };
        background.push(tokio::spawn(tracker::run(
            mgr.clone(),
            node,
            tcfg,
            cancel.child_token(),
        )));
    }
    let sweep_mgr = mgr.clone();
    background.push(every(
        config.logs.sweep_interval,
        cancel.child_token(),
        move || {
            let mgr = sweep_mgr.clone();
            async move {
                logs::sweep(&mgr).await;
                logs::sweep_checkpoints(&mgr).await;
            }
        },
    ));
    background.push(every(memory::TRIM_EVERY, cancel.child_token(), || {
        manager::blocking(memory::trim)
    }));

    if let Some(addr) = config.http.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("http.listen: {addr}: {e}")))?;
        info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics over HTTP");
        let app = weft_common::http::metrics_router(Arc::new(metrics::registry(mgr.clone())));
        let stop = cancel.child_token();
        background.push(tokio::spawn(weft_common::http::serve(l, app, async move {
            stop.cancelled().await
        })));
    }
    let svc = weft_proto::v1::container_manager_server::ContainerManagerServer::new(
        service::ContainerService::new(mgr.clone()),
    );
    let incoming = weft_common::net::incoming(listener);
    // The same API on a Unix socket in the work dir, for the node's own
    // containers (a master starting its tasks here without a handshake);
    // only the agent's user and the users of its running containers are
    // taken.
    let local = serve_locally(&mgr, &config.work_dir.join(AGENT_SOCKET));
    let incoming = match local {
        Some(local) => {
            use tokio_stream::StreamExt;
            Box::pin(incoming.merge(local))
                as std::pin::Pin<
                    Box<
                        dyn tokio_stream::Stream<Item = std::io::Result<weft_common::net::Conn>>
                            + Send,
                    >,
                >
        }
        None => Box::pin(incoming),
    };
    // Masters' calls to the RM and their starts on other nodes passed on,
    // for the node's own containers over the socket (told to them in
    // `WEFT_AGENT_RELAY`).
    let (am_relay, start_relay) = match (&config.rm_addresses[..], mgr.agent_socket()) {
        ([], _) | (_, None) => (None, None),
        (addrs, Some(_)) => match relay::AmRelay::new(addrs.to_vec(), mgr.clone()) {
            Ok(r) => {
                let peers = Arc::new(relay::Peers::default());
                let sweep = peers.clone();
                background.push(every(
                    Duration::from_secs(60),
                    cancel.child_token(),
                    move || {
                        sweep.sweep();
                        std::future::ready(())
                    },
                ));
                mgr.set_relay();
                (
                    Some(weft_proto::v1::application_master_service_server::ApplicationMasterServiceServer::new(r)),
                    Some(weft_proto::v1::agent_relay_server::AgentRelayServer::new(
                        relay::StartRelay::new(mgr.clone(), peers),
                    )),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "masters here call the resource manager themselves");
                (None, None)
            }
        },
    };
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        weft_common::net::server()
            .add_service(svc)
            .add_optional_service(am_relay)
            .add_optional_service(start_relay)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = serving_stopped.await;
            }),
    );
    // The server keeps answering while containers stop (status calls, log
    // followers that end with their container); new starts are refused.
    let served_early = tokio::select! {
        _ = shutdown => None,
        r = &mut server => Some(r),
    };
    info!("node agent stopping: stopping containers");
    cancel.cancel();
    for t in background {
        let _ = t.await;
    }
    mgr.shutdown().await;
    let _ = stop_serving.send(());
    let served = match served_early {
        Some(r) => r,
        // Clients that keep their connections open must not hold the agent up.
        None => match tokio::time::timeout(SERVER_DRAIN, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    info!("node agent stopped");
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Error::FailedPrecondition(format!("gRPC server: {e}"))),
        Err(e) => return Err(Error::FailedPrecondition(format!("gRPC server task: {e}"))),
    }
    Ok(())
}

/// Runs `work` every `period` until `cancel` fires.
fn every<F, Fut>(
    period: Duration,
    cancel: CancellationToken,
    mut work: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => work().await,
                _ = cancel.cancelled() => return,
            }
        }
    })
}

/// The agent's Unix socket, in its work dir.
pub const AGENT_SOCKET: &str = "agent.sock";

/// Binds the agent's Unix socket at `path` (any left by an earlier agent
/// replaced), open to every local user (the connections are checked by
/// uid as they are taken); None where it cannot be had (a path too long
/// for a socket's address, say): masters then reach the agent over TCP.
fn serve_locally(
    mgr: &Manager,
    path: &std::path::Path,
) -> Option<tokio_stream::wrappers::ReceiverStream<std::io::Result<weft_common::net::Conn>>> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no local socket: masters reach this agent over TCP");
            return None;
        }
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)) {
        tracing::warn!(path = %path.display(), error = %e, "no local socket: masters reach this agent over TCP");
        return None;
    }
    mgr.set_agent_socket(path.to_path_buf());
    let m = mgr.clone();
    Some(weft_common::net::incoming_unix(
        listener,
        std::sync::Arc::new(move |uid| m.runs_uid(uid)),
    ))
}
