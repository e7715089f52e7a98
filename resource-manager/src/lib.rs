//! Weft's resource manager: the cluster's truth, replicated with Raft.
//!
//! Layout (a member, from the outside in):
//! - [`service`]: one file per gRPC service: [`service::client`]
//!   (ClientService, users), [`service::tracker`] (ResourceTracker, node
//!   agents), [`service::am`] (ApplicationMasterService, masters); writes
//!   are answered once committed, followers send callers to the leader;
//! - [`leader`]: the leader supervisor, which starts every leader-only task
//!   on election and stops them together on step-down (role from a watch):
//!   [`leader::scheduling`] (the scheduling loop, plan verification and
//!   commit; its masters and round) and
//!   [`leader::liveness`] (node expiry, pruning, queue seeding);
//! - [`view`]: the replicated state as the scheduler's input, kept across
//!   rounds and patched where nodes changed;
//! - [`scheduler`]: the pure scheduler (cluster view + asks in, placements out);
//! - [`tokens`]: container and application tokens, signed outside every lock;
//! - [`fsm`]: the replicated state machine (commands, deterministic apply,
//!   plan verification, invariants, snapshots, the node change log);
//! - [`raft_node`]: the thread that owns the `RawNode` and runs the ready loop;
//! - [`transport`]: raft messages between members: the [`transport::Network`]
//!   seam, over gRPC in production and in memory (with partitions) in tests;
//! - [`storage`]: raft log, hard state, conf state and snapshots in sled;
//! - [`config`]: the TOML config.
//!
//! [`run`] assembles a member and returns once it has stopped.

pub mod audit;
pub mod config;
pub mod error;
pub mod fsm;
pub mod leader;
pub mod metrics;
pub mod raft_node;
pub mod rest;
pub mod scheduler;
pub mod service;
pub mod slog_bridge;
pub mod storage;
pub mod tokens;
pub mod transport;
pub mod view;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::info;
use weft_proto::v1 as pb;

pub use config::RmConfig;
pub use error::{Error, Result};

/// How long open connections (peers' raft streams, clients) may hold up a shutdown.
pub const SERVER_DRAIN: Duration = Duration::from_secs(2);

/// Runs one member on `listener` until `shutdown` resolves.
pub async fn run(
    config: RmConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    weft_common::tls::spawn_reloader(weft_common::tls::RELOAD_CHECK_EVERY);
    let peers = config.peer_map()?;
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Config(format!("data_dir {}: {e}", dir.display())))?;
    let storage = tokio::task::spawn_blocking(move || storage::SledStorage::open(&dir))
        .await
        .expect("opening storage panicked")?;
    let transport = transport::Transport::start(config.id, &tokio::runtime::Handle::current());
    let settings = raft_node::RaftSettings {
        id: config.id,
        peers: peers.clone(),
        tick: config.raft.tick,
        election_ticks: config.raft.election_ticks,
        heartbeat_ticks: config.raft.heartbeat_ticks,
        snapshot_every: config.raft.snapshot_every,
        join: config.join,
    };
    let (raft, thread) = raft_node::start(settings, storage, Box::new(transport))?;
    info!(id = config.id, listen = %config.listen, peers = ?peers, "resource manager member started");

    let svc = service::RmService::new(
        raft.clone(),
        config.heartbeat_interval,
        config.node_expiry,
        config::queue_specs(&config.queues),
        config.masters.launch.then(|| config.masters.clone()),
    )
    .with_deposed_leader_grace(config.raft.tick * 2 * config.raft.election_ticks as u32)
    .with_container_retention(config.container_retention)
    .with_app_retention(config.finished_app_retention, config.max_finished_apps)
    .with_acl({
        let mut acl = config.acl.clone();
        acl.read_initial_admin_token()?;
        acl.load_oidc()?;
        acl
    })
    .with_log_store(config.logs.aggregate_dir.clone())
    .with_preemption(config.preemption.clone())
    .with_audit_log(match &config.audit_log {
        Some(path) => service::audit_log::AuditLog::open(path, config.id)
            .map_err(|e| Error::Config(format!("audit_log {}: {e}", path.display())))?,
        None => service::audit_log::AuditLog::default(),
    });
    // The REST API and /metrics, bound before the leader's work starts so
    // that its URL is known when it leads.
    let http = match config.http.listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("http.listen: {addr}: {e}")))?;
            let bound = l
                .local_addr()
                .map_err(|e| Error::Config(format!("http.listen: {addr}: {e}")))?;
            let url = config.http.url(
                bound,
                peers.get(&config.id).map(String::as_str).unwrap_or(""),
                weft_common::tls::installed().is_some(),
            );
            info!(listen = %bound, %url, "serving the REST API and /metrics over HTTP");
            Some((l, url))
        }
        None => None,
    };
    let svc = match &http {
        Some((_, url)) => svc.with_http_url(url.clone()),
        None => svc,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let http = http.map(|(l, _)| {
        let registry = std::sync::Arc::new(metrics::registry(svc.scheduling.clone()));
        tokio::spawn(metrics::serve(
            l,
            registry,
            rest::router(svc.clone()),
            cancel.clone(),
        ))
    });
    // Leader-only work starts and stops with this member's leaderships.
    let leader = tokio::spawn(leader::supervise(svc.clone(), cancel.clone()));
    let am = service::am::AmService::new(svc.scheduling.clone());

    let incoming = weft_common::net::incoming(listener);
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        weft_common::net::server()
            .add_service(pb::client_service_server::ClientServiceServer::new(
                svc.clone(),
            ))
            .add_service(pb::resource_tracker_server::ResourceTrackerServer::new(svc))
            .add_service(
                pb::application_master_service_server::ApplicationMasterServiceServer::new(am),
            )
            .add_service(
                pb::raft_transport_server::RaftTransportServer::new(transport::RaftService::new(
                    raft.clone(),
                ))
                .max_decoding_message_size(transport::MAX_MESSAGE),
            )
            .serve_with_incoming_shutdown(incoming, async {
                let _ = serving_stopped.await;
            }),
    );
    let served = tokio::select! {
        _ = shutdown => {
            let _ = stop_serving.send(());
            // Peers keep their raft streams open: do not wait on them for long.
            match tokio::time::timeout(SERVER_DRAIN, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
        r = &mut server => r,
    };
    cancel.cancel();
    let _ = leader.await;
    if let Some(http) = http {
        let _ = tokio::time::timeout(SERVER_DRAIN, http).await;
    }
    // The raft thread ends when the last handle is gone.
    drop(raft);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || thread.join()),
    )
    .await;
    info!(id = config.id, "resource manager member stopped");
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Unavailable(format!("gRPC server: {e}"))),
        Err(e) => Err(Error::Unavailable(format!("gRPC server task: {e}"))),
    }
}
