//! HTTP beside gRPC: a daemon's `/metrics` (and, later, its REST API) on a
//! port of its own, its connections taken as [`crate::net::incoming_http`]
//! takes them (TLS with the certificate of the moment where the process has
//! it, HTTP/1.1 and HTTP/2).

use std::future::Future;
use std::net::SocketAddr;

/// Serves `app` on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let listener = Incoming {
        local: listener.local_addr().ok(),
        conns: crate::net::incoming_http(listener),
    };
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await;
}

/// A router answering `GET /metrics` with what `render` gives at each
/// scrape, in the Prometheus text format (version 0.0.4).
pub fn metrics_router<F>(render: F) -> axum::Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    )
}

/// A listener's connections as [`crate::net::incoming_http`] makes them,
/// for axum.
struct Incoming {
    local: Option<SocketAddr>,
    conns: tokio_stream::wrappers::ReceiverStream<std::io::Result<crate::net::Conn>>,
}

impl axum::serve::Listener for Incoming {
    type Io = crate::net::Conn;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let from = tonic::transport::server::Connected::connect_info(&c).remote;
                    return (c, from);
                }
                Some(Err(_)) => continue,
                // The listener is gone: serve nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
