//! HTTP beside gRPC: a daemon's `/metrics` (and, later, its REST API) on a
//! port of its own, its connections taken as [`crate::net::incoming_http`]
//! takes them (TLS with the certificate of the moment where the process has
//! it, HTTP/1.1 and HTTP/2).

use std::future::Future;
use std::net::SocketAddr;

/// Serves `app` on `listener` until `stop` resolves. Handlers find their
/// connection's [`crate::net::ConnInfo`] (remote address, client
/// certificate) as `axum::extract::ConnectInfo<ConnInfo>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let listener = Incoming {
        local: listener.local_addr().ok(),
        conns: crate::net::incoming_http(listener),
    };
    let app = app.into_make_service_with_connect_info::<crate::net::ConnInfo>();
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await;
}

/// The Prometheus text (version 0.0.4) of `registry`.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
}

/// Encodes one family of `kind` for a collector: `rows` of labels and
/// metrics.
fn family<L, M>(
    e: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    kind: prometheus_client::metrics::MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: prometheus_client::encoding::EncodeMetric,
{
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in rows {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one gauge family for a collector: `rows` of labels and values.
pub fn gauge<L, V>(
    e: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    use prometheus_client::metrics::gauge::ConstGauge;
    let rows = rows.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(
        e,
        name,
        help,
        prometheus_client::metrics::MetricType::Gauge,
        rows,
    )
}

/// Encodes one counter family for a collector (a total read at the
/// scrape): `rows` of labels and values.
pub fn counter<L>(
    e: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
{
    use prometheus_client::metrics::counter::ConstCounter;
    let rows = rows.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(
        e,
        name,
        help,
        prometheus_client::metrics::MetricType::Counter,
        rows,
    )
}

/// A router answering `GET /metrics` with `registry` as it is at each
/// scrape, in the Prometheus text format (version 0.0.4).
pub fn metrics_router(
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(&registry),
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
    type Addr = crate::net::ConnInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let info = tonic::transport::server::Connected::connect_info(&c);
                    return (c, info);
                }
                Some(Err(_)) => continue,
                // The listener is gone: serve nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(crate::net::ConnInfo {
            remote: self.local,
            peer: None,
            local_uid: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>>
    for crate::net::ConnInfo
{
    fn connect_info(s: axum::serve::IncomingStream<'_, Incoming>) -> Self {
        s.remote_addr().clone()
    }
}

/// For tests: scrape a daemon's `/metrics` as Prometheus does.
#[cfg(feature = "test-support")]
pub mod scrape {
    use std::collections::BTreeSet;

    /// `GET /metrics` over a plain socket (HTTP/1.0), parsed.
    pub async fn scrape(addr: impl tokio::net::ToSocketAddrs) -> prometheus_parse::Scrape {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: weft\r\n\r\n")
            .await
            .unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    /// The value of `name` with every one of `labels`, if scraped.
    pub fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        s.samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            })
    }

    /// A sample's family name: without a histogram's `_bucket`, `_sum`, `_count`.
    pub fn base_name(m: &str) -> &str {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| m.strip_suffix(s))
            .unwrap_or(m)
    }

    /// The families scraped, by base name.
    pub fn served<'a>(scrapes: &[&'a prometheus_parse::Scrape]) -> BTreeSet<&'a str> {
        scrapes
            .iter()
            .flat_map(|s| s.samples.iter())
            .map(|x| base_name(&x.metric))
            .collect()
    }

    /// The metric names a Grafana dashboard (JSON) queries, by base name.
    pub fn dashboard_metrics(path: &std::path::Path) -> BTreeSet<String> {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut out = BTreeSet::new();
        for p in v["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let mut rest = t["expr"].as_str().unwrap();
                while let Some(i) = rest.find("weft_") {
                    let tail = &rest[i..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                        .unwrap_or(tail.len());
                    out.insert(base_name(&tail[..end]).to_string());
                    rest = &tail[end..];
                }
            }
        }
        out
    }
}

/// For tests: HTTP requests as curl makes them, one connection each, over a
/// real socket (HTTPS where given a client config).
#[cfg(feature = "test-support")]
pub mod call {
    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::BodyExt;

    /// Where to send requests, how, and as whom.
    #[derive(Clone)]
    pub struct Http {
        /// host:port
        pub addr: String,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<String>,
    }

    /// A whole answer.
    #[derive(Debug)]
    pub struct Reply {
        pub status: u16,
        pub headers: hyper::HeaderMap,
        pub body: Vec<u8>,
    }

    impl Reply {
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
        }

        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }
    }

    impl Http {
        pub fn plain(addr: impl Into<String>) -> Http {
            Http {
                addr: addr.into(),
                tls: None,
                token: None,
            }
        }

        /// HTTPS, the server's name checked as `rm.weft` (a member's).
        pub fn tls(addr: impl Into<String>, config: rustls::ClientConfig) -> Http {
            let mut config = config;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Http {
                addr: addr.into(),
                tls: Some(Arc::new(config)),
                token: None,
            }
        }

        /// With `Authorization: Bearer token` on every request.
        pub fn with_token(mut self, token: impl Into<String>) -> Http {
            self.token = Some(token.into());
            self
        }

        pub fn without_token(mut self) -> Http {
            self.token = None;
            self
        }

        /// The same caller at `url`'s host (`http[s]://host:port/path...`),
        /// and the path it names.
        pub fn at(&self, url: &str) -> (Http, String) {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"))
                .unwrap_or_else(|| panic!("not a URL: {url}"));
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let mut h = self.clone();
            h.addr = host.to_string();
            (h, path.to_string())
        }

        /// Sends a request and returns the answer's head, its body still
        /// coming (a follow).
        pub async fn open(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: Vec<u8>,
        ) -> hyper::Response<hyper::body::Incoming> {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr));
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.addr);
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                .unwrap();
            match &self.tls {
                None => {
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    send.send_request(req).await.unwrap()
                }
                Some(cfg) => {
                    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(
                            rustls::pki_types::ServerName::try_from("rm.weft").unwrap(),
                            tcp,
                        )
                        .await
                        .unwrap();
                    let (mut send, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    send.send_request(req).await.unwrap()
                }
            }
        }

        /// Sends a request and reads the whole answer (within 60 s).
        pub async fn send(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: impl Into<Vec<u8>>,
        ) -> Reply {
            let body = body.into();
            tokio::time::timeout(Duration::from_secs(60), async {
                let r = self.open(method, path, headers, body).await;
                let (parts, body) = r.into_parts();
                Reply {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: body.collect().await.unwrap().to_bytes().to_vec(),
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no whole answer in 60 s"))
        }

        /// [`Http::send`], following redirects (at most 3) as `curl -L`
        /// does: the same method, headers and body to the `Location`. A
        /// 503 (no leader known yet) is tried again, up to 30 s.
        pub async fn send_following(
            &self,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
            body: impl Into<Vec<u8>>,
        ) -> Reply {
            let body = body.into();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let (mut at, mut path) = (self.clone(), path.to_string());
            let mut hops = 0;
            loop {
                let r = at.send(method, &path, headers, body.clone()).await;
                match r.status {
                    307 | 308 if hops < 3 => {
                        hops += 1;
                        let l = r.header("location").expect("a redirect names its Location");
                        (at, path) = self.at(l);
                    }
                    503 if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => return r,
                }
            }
        }

        pub async fn get(&self, path: &str) -> Reply {
            self.send("GET", path, &[], Vec::new()).await
        }

        pub async fn post(
            &self,
            path: &str,
            content_type: &str,
            body: impl Into<Vec<u8>>,
        ) -> Reply {
            self.send("POST", path, &[("content-type", content_type)], body)
                .await
        }
    }
}
