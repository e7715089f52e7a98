//! A service replica's health check, as its stage's `health` says: an HTTP
//! GET on a named port (2xx or 3xx is healthy), a TCP connect, or a command
//! run here with the replica's address in its environment (exit 0 is
//! healthy). Each check is bounded by the spec's `timeout`.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use weft_spec::HealthSpec;

/// Where a replica is reached: its node's host and its named ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub ports: BTreeMap<String, u32>,
}

/// Runs one check of `spec` against `target`: Ok when healthy, else why not.
pub async fn check(spec: &HealthSpec, target: &Target) -> Result<(), String> {
    match tokio::time::timeout(spec.timeout, run(spec, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(spec.timeout)
        )),
    }
}

fn addr(target: &Target, port: &str) -> Result<String, String> {
    let p = target
        .ports
        .get(port)
        .ok_or_else(|| format!("the replica has no port {port:?}"))?;
    // An IPv6 host goes in brackets.
    Ok(if target.host.contains(':') {
        format!("[{}]:{p}", target.host)
    } else {
        format!("{}:{p}", target.host)
    })
}

async fn run(spec: &HealthSpec, target: &Target) -> Result<(), String> {
    if let Some(h) = &spec.http {
        let a = addr(target, &h.port)?;
        let stream = tokio::net::TcpStream::connect(&a)
            .await
            .map_err(|e| format!("GET http://{a}{}: {e}", h.path))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("GET http://{a}{}: {e}", h.path))?;
        let conn = tokio::spawn(conn);
        let req = hyper::Request::get(h.path.as_str())
            .header(hyper::header::HOST, &a)
            .header(hyper::header::USER_AGENT, "weft-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("GET {}: {e}", h.path))?;
        let resp = send.send_request(req).await;
        conn.abort();
        let resp = resp.map_err(|e| format!("GET http://{a}{}: {e}", h.path))?;
        let status = resp.status();
        return if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET http://{a}{}: {status}", h.path))
        };
    }
    if let Some(t) = &spec.tcp {
        let a = addr(target, &t.port)?;
        return tokio::net::TcpStream::connect(&a)
            .await
            .map(drop)
            .map_err(|e| format!("connect {a}: {e}"));
    }
    if let Some(c) = &spec.command {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", c])
            .env("WEFT_REPLICA_HOST", &target.host)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (name, port) in &target.ports {
            cmd.env(
                format!("WEFT_REPLICA_PORT_{}", name.to_uppercase()),
                port.to_string(),
            );
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| format!("health command: {e}"))?;
        return if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            let tail = &err[err.len().saturating_sub(200)..];
            Err(format!(
                "health command: {}{}{tail}",
                out.status,
                if tail.is_empty() { "" } else { ": " }
            ))
        };
    }
    Ok(())
}

/// How long a replica waits before its `restarts`th restart: `backoff`
/// doubled each time, at most `max`.
pub fn backoff(base: Duration, max: Duration, restarts: u32) -> Duration {
    base.saturating_mul(1u32 << restarts.min(20)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A HealthSpec from JSON (the spec crate's serde model, its defaults).
    fn spec(json: &str) -> HealthSpec {
        serde_json::from_str(json).unwrap()
    }

    async fn server(status: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let status = if req.starts_with("GET /healthz ") {
                    status
                } else {
                    "404 Not Found"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (port, h)
    }

    fn target(port: u16) -> Target {
        Target {
            host: "127.0.0.1".into(),
            ports: [("http".to_string(), port as u32)].into_iter().collect(),
        }
    }

    #[tokio::test]
    async fn http_tcp_and_command_checks_tell_healthy_from_not() {
        let (ok_port, a) = server("200 OK").await;
        let (bad_port, b) = server("503 Service Unavailable").await;
        let http = spec(r#"{"http": {"port": "http", "path": "/healthz"}}"#);
        assert_eq!(check(&http, &target(ok_port)).await, Ok(()));
        let e = check(&http, &target(bad_port)).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let wrong_path = spec(r#"{"http": {"port": "http", "path": "/nope"}}"#);
        let e = check(&wrong_path, &target(ok_port)).await.unwrap_err();
        assert!(e.contains("404"), "{e}");
        let tcp = spec(r#"{"tcp": {"port": "http"}}"#);
        assert_eq!(check(&tcp, &target(ok_port)).await, Ok(()));
        a.abort();
        b.abort();
        let _ = a.await;
        // Nothing listens there any more.
        let e = check(&tcp, &target(ok_port)).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
        let e = check(&http, &target(ok_port)).await.unwrap_err();
        assert!(e.contains("GET http://127.0.0.1"), "{e}");
        let cmd = spec(
            r#"{"command": "test \"$WEFT_REPLICA_PORT_HTTP\" = 4242 && test \"$WEFT_REPLICA_HOST\" = 127.0.0.1"}"#,
        );
        assert_eq!(check(&cmd, &target(4242)).await, Ok(()));
        let e = check(&cmd, &target(4243)).await.unwrap_err();
        assert!(e.contains("exit status: 1"), "{e}");
        let slow = spec(r#"{"command": "sleep 5", "timeout": "200ms"}"#);
        let t = std::time::Instant::now();
        let e = check(&slow, &target(1)).await.unwrap_err();
        assert!(e.contains("no answer within 200ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn backoff_doubles_up_to_its_most() {
        let (b, m) = (Duration::from_millis(500), Duration::from_secs(3));
        let got: Vec<u128> = (0..6).map(|r| backoff(b, m, r).as_millis()).collect();
        assert_eq!(got, [500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(backoff(b, m, u32::MAX), m);
    }
}
