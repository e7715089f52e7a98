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

/// The Prometheus text (version 0.0.4) of `registry`.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
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
    use prometheus_client::encoding::EncodeMetric;
    let mut m = e.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in rows {
        prometheus_client::metrics::gauge::ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
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
