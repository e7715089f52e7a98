//! How every Weft process opens a gRPC connection and serves one: one place
//! for the deadlines and keepalives that keep a frozen peer (SIGSTOP, a
//! stalled VM: its kernel still accepts connections, nothing answers) from
//! holding anybody.
//!
//! A connection pings its peer every [`KEEPALIVE_INTERVAL`] (HTTP/2 PING,
//! also while idle) and is closed when a ping goes unanswered for
//! [`KEEPALIVE_TIMEOUT`]; a call in flight on it then fails as UNAVAILABLE
//! and the caller moves on. This bounds a frozen peer's hold on a call to
//! about two seconds however long the call itself may take (a long poll, a
//! log follow, a watch), which a request deadline alone cannot do.

use std::time::Duration;

use tonic::transport::{Endpoint, Server};

/// How often an open connection pings its peer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// How long an unanswered ping keeps a connection open.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1500);

/// `addr` as a URI (`host:port` gets `http://`).
pub fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// An endpoint for `addr` with a connect deadline, an optional request
/// deadline, TCP_NODELAY and the keepalives above.
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
) -> Result<Endpoint, tonic::transport::Error> {
    let ep = Endpoint::from_shared(uri(addr))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(match request_timeout {
        Some(t) => ep.timeout(t),
        None => ep,
    })
}

/// A server builder that pings its clients the same way, so a stream to a
/// client that froze or vanished (a watch, a log follow) is let go.
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}
