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

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;

use tonic::transport::{Endpoint, Server};

/// The address this process's own connections leave from (see
/// [`bind_source`]).
static SOURCE: OnceLock<IpAddr> = OnceLock::new();

/// Makes every connection this process opens from now on leave from `ip`
/// (the address it listens on), so that a host with several addresses, or
/// several daemons on one machine each on its own loopback address, is
/// seen by its peers at the address it serves on: what a packet filter
/// between two hosts matches. Ignored for an unspecified address
/// (`0.0.0.0`, `::`) and for destinations of the other kind (a loopback
/// source is not used towards another host, nor the other way round). The
/// first call wins.
pub fn bind_source(ip: IpAddr) {
    if !ip.is_unspecified() {
        let _ = SOURCE.set(ip);
    }
}

/// The source address for a connection to `addr`, if one was bound and
/// suits it.
fn source_for(addr: &str) -> Option<IpAddr> {
    let src = *SOURCE.get()?;
    let host = addr
        .split("://")
        .last()
        .unwrap_or(addr)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let dest_loopback = match host.parse::<IpAddr>() {
        Ok(ip) => {
            if ip.is_ipv4() != src.is_ipv4() {
                return None;
            }
            ip.is_loopback()
        }
        Err(_) => host == "localhost",
    };
    (dest_loopback == src.is_loopback()).then_some(src)
}

/// How often an open connection pings its peer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// How long an unanswered ping keeps a connection open.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1500);

/// `addr` as a URI (`host:port` gets `http://`, or `https://` in a
/// process with TLS installed).
pub fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if crate::tls::installed().is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An endpoint for the `to` server at `addr` (a member or an agent) with a
/// connect deadline, an optional request deadline, TCP_NODELAY, the
/// keepalives above and, in a process with TLS installed, TLS that checks
/// the server holds a `to` certificate of the cluster CA.
pub fn endpoint(
    addr: &str,
    to: crate::tls::Role,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
) -> Result<Endpoint, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(uri(addr))?;
    if let Some(tls) = crate::tls::installed() {
        // The handshake within the connect deadline too: a member that is
        // frozen (its kernel still accepts connections) must not hold a
        // client until the request's deadline.
        ep = ep.tls_config(tls.client_config(to).timeout(connect_timeout))?;
    }
    let ep = ep
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .local_address(source_for(addr));
    Ok(match request_timeout {
        Some(t) => ep.timeout(t),
        None => ep,
    })
}

/// The metadata key a node agent's relay (its Unix socket's services that
/// pass a master's calls on) sets on an answer of its own, not of what it
/// called: [`RELAY_UNREACHABLE`] when it could not pass the call on (no RM
/// leader within its deadline, the other agent unreachable, too many calls
/// at once), so the caller may call directly instead.
pub const RELAY_HEADER: &str = "weft-relay";
pub const RELAY_UNREACHABLE: &str = "unreachable";

/// One connection a server took: plaintext, or TLS this process accepted
/// with its certificate of the moment.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A local process over a Unix socket ([`incoming_unix`]): no
    /// certificate, the caller's uid checked when it was taken.
    Unix(tokio::net::UnixStream),
}

/// What a handler can learn of its connection (a request's extensions hold
/// a copy): the peer's address and, over TLS, the identity of the client
/// certificate it showed, read once when the connection is taken, not per
/// request. [`crate::tls::peer`] and [`remote_addr`] read it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub peer: Option<Arc<crate::tls::PeerIdentity>>,
    /// Over a Unix socket: the caller's uid.
    pub local_uid: Option<u32>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Plain(s) => ConnInfo {
                remote: s.peer_addr().ok(),
                peer: None,
                local_uid: None,
            },
            Conn::Unix(s) => ConnInfo {
                remote: None,
                peer: None,
                local_uid: s.peer_cred().ok().map(|c| c.uid()),
            },
            Conn::Tls(s) => {
                let (tcp, session) = s.get_ref();
                ConnInfo {
                    remote: tcp.peer_addr().ok(),
                    peer: session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| crate::tls::identity_of(c.as_ref()))
                        .map(Arc::new),
                    local_uid: None,
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's connections as a server takes them: TCP_NODELAY set on
/// each (with Nagle on, a reply written while the peer had not yet
/// acknowledged the last one waited for its delayed ACK, 40 ms on Linux:
/// every write's p99 in the raft benches), and, in a process with TLS
/// installed, the TLS handshake done with the certificate of the moment (a
/// reloaded one from the next connection on), each handshake in a task of
/// its own so that a slow or silent client holds up nobody. The listener
/// closes when the server stops taking connections.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    incoming_with_alpn(listener, None)
}

/// [`incoming`] for an HTTP server that browsers, curl and scrapers reach:
/// TLS offers HTTP/1.1 beside HTTP/2 (gRPC's ports offer HTTP/2 alone, and
/// a client that asks for HTTP/1.1 only would be refused there).
pub fn incoming_http(
    listener: tokio::net::TcpListener,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    incoming_with_alpn(listener, Some(&[b"h2", b"http/1.1"]))
}

fn incoming_with_alpn(
    listener: tokio::net::TcpListener,
    alpn: Option<&'static [&'static [u8]]>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, from) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: not the end of serving.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            match crate::tls::installed().and_then(|t| t.rustls_server()) {
                None => {
                    if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                        return;
                    }
                }
                Some(cfg) => {
                    let cfg = match alpn {
                        Some(protocols) => {
                            let mut c = (*cfg).clone();
                            c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
                            std::sync::Arc::new(c)
                        }
                        None => cfg,
                    };
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => {
                                let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%from, error = %e, "TLS handshake refused")
                            }
                            Err(_) => tracing::debug!(%from, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A Unix socket's connections as a server takes them: only those of a
/// caller whose uid `allowed` accepts (checked with the kernel's word,
/// `SO_PEERCRED`, when the connection is taken); the others are closed.
/// No TLS: the socket is the node's own (a master reaching its own node's
/// agent without a handshake), and what a call may do is decided by the
/// tokens it carries, as for any caller without a certificate.
pub fn incoming_unix(
    listener: tokio::net::UnixListener,
    allowed: Arc<dyn Fn(u32) -> bool + Send + Sync>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a local connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let uid = match s.peer_cred() {
                Ok(c) => c.uid(),
                Err(e) => {
                    tracing::debug!(error = %e, "a local connection without credentials refused");
                    continue;
                }
            };
            // (The check may read the file system: off the runtime.)
            let check = allowed.clone();
            if tokio::task::spawn_blocking(move || check(uid))
                .await
                .unwrap_or(false)
            {
                if tx.send(Ok(Conn::Unix(s))).await.is_err() {
                    return;
                }
            } else {
                tracing::debug!(
                    uid,
                    "a local connection from a uid that runs nothing here refused"
                );
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The address a request came from (servers fed by [`incoming`]).
pub fn remote_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|i| i.remote)
        .or_else(|| req.remote_addr())
}

/// A server builder that pings its clients the same way, so a stream to a
/// client that froze or vanished (a watch, a log follow) is let go. Serve it
/// from [`incoming`] (which does TLS where the process has it).
pub fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_served_from_a_listener_have_nodelay_set() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let Conn::Plain(served) = conns.next().await.unwrap().unwrap() else {
            panic!("no TLS is installed in this test");
        };
        assert!(served.nodelay().unwrap());
    }

    #[test]
    fn the_source_suits_the_destination() {
        assert_eq!(source_for("127.0.0.1:1"), None, "nothing bound yet");
        bind_source("127.0.0.11".parse().unwrap());
        bind_source("127.0.0.12".parse().unwrap());
        let lo: IpAddr = "127.0.0.11".parse().unwrap();
        assert_eq!(source_for("127.0.0.12:7000"), Some(lo));
        assert_eq!(source_for("http://127.0.0.12:7000"), Some(lo));
        assert_eq!(source_for("localhost:7000"), Some(lo));
        assert_eq!(source_for("10.1.2.3:7000"), None);
        assert_eq!(source_for("[::1]:7000"), None);
        assert_eq!(source_for("rm-1.example:7000"), None);
    }
}
