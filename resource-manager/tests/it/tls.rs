//! A cluster over mutual TLS, secured the way README says: certificates made
//! by the real `rmctl tls`, three real members and a real agent with them,
//! a job (its master and its task over TLS) submitted by `rmctl` with the
//! CA, and what the cluster must refuse.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use weft_common::tls::{Role, Tls, TlsFiles};
use weft_proto::v1 as pb;

use crate::cluster::Cluster;
use crate::nodes::AgentProcess;

pub(crate) fn rmctl(args: &[&str]) -> Output {
    rmctl_with(args, None)
}

/// `rmctl` with none of the caller's WEFT_* settings, and `WEFT_CONFIG` set
/// to `config` if given.
pub(crate) fn rmctl_with(args: &[&str], config: Option<&Path>) -> Output {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_resource-manager")).with_file_name("rmctl");
    let mut cmd = std::process::Command::new(path);
    cmd.args(args);
    for var in [
        "WEFT_RM",
        "WEFT_CONFIG",
        "WEFT_TLS_CA",
        "WEFT_TLS_CERT",
        "WEFT_TLS_KEY",
        "WEFT_TOKEN",
        "WEFT_TOKEN_FILE",
    ] {
        cmd.env_remove(var);
    }
    if let Some(c) = config {
        cmd.env("WEFT_CONFIG", c);
    }
    cmd.output().unwrap()
}

pub(crate) fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "rmctl failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `<tmp>/tls` with a cluster CA made by the real `rmctl tls ca create`.
pub(crate) fn ca_dir(tmp: &Path) -> std::path::PathBuf {
    let d = tmp.join("tls");
    std::fs::create_dir_all(&d).unwrap();
    ok(&rmctl(&[
        "tls",
        "ca",
        "create",
        "--dir",
        d.to_str().unwrap(),
    ]));
    d
}

/// TLS settings with the CA of `dir` alone (a client without a certificate).
pub(crate) fn ca_only(dir: &Path) -> Tls {
    Tls::load(
        &TlsFiles {
            ca_file: dir.join("weft-ca.pem"),
            cert_file: None,
            key_file: None,
        },
        "tls",
        None,
    )
    .unwrap()
}

pub(crate) fn cert(dir: &Path, role: &str, name: &str) {
    ok(&rmctl(&[
        "tls",
        "cert",
        "create",
        "--role",
        role,
        "--name",
        name,
        "--dir",
        dir.to_str().unwrap(),
    ]));
}

/// The TLS settings of the `role-name` certificate in `dir`, loaded in this
/// process without installing them (other tests here run plaintext).
pub(crate) fn settings(dir: &Path, role: &str, name: &str) -> Tls {
    Tls::load(
        &TlsFiles {
            ca_file: dir.join("weft-ca.pem"),
            cert_file: Some(dir.join(format!("{role}-{name}.pem"))),
            key_file: Some(dir.join(format!("{role}-{name}-key.pem"))),
        },
        "tls",
        None,
    )
    .unwrap()
}

pub(crate) async fn channel(addr: &str, tls: &Tls) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls.client_config(Role::Rm))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_runs_a_job_and_refuses_whom_it_does_not_trust() {
    if crate::secure::skip(
        "it secures its own cluster with its own CA (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("tls");
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    // Four commands secure a cluster: a CA, then a certificate per member,
    // node and user.
    let said = ok(&rmctl(&[
        "tls",
        "ca",
        "create",
        "--dir",
        d.to_str().unwrap(),
    ]));
    assert!(said.contains("weft-ca.pem"), "{said}");
    for i in 1..=3 {
        cert(&d, "rm", &format!("rm{i}"));
    }
    cert(&d, "agent", "node-a");
    cert(&d, "client", "alice");
    ok(&rmctl(&[
        "tls",
        "ca",
        "create",
        "--dir",
        other.to_str().unwrap(),
    ]));
    cert(&other, "client", "mallory");

    let ca = d.join("weft-ca.pem");
    let ca_s = ca.to_str().unwrap();
    let extra = format!(
        "[tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/rm-rm{{id}}.pem\"\nkey_file = \"{0}/rm-rm{{id}}-key.pem\"\n\
         [masters]\nlaunch = true\ncommand = {1:?}\n",
        d.display(),
        crate::apps::app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    let rm = cluster.addrs().join(",");
    let _agent = AgentProcess::start_with(
        "node-a",
        &cluster.addrs(),
        "127.0.0.1",
        "",
        &format!(
            "[tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/agent-node-a.pem\"\nkey_file = \"{0}/agent-node-a-key.pem\"\n",
            d.display()
        ),
    );

    // A user's script submits at once, with the CA: the job's master and
    // its task run over TLS (the agent hands the master the CA).
    let out = ok(&rmctl(&[
        "--rm",
        &rm,
        "--tls-ca",
        ca_s,
        "--timeout",
        "60",
        "submit",
        "--wait",
        "--name",
        "over-tls",
        "--vcores",
        "0.5",
        "--memory",
        "64MiB",
        "--",
        "sh",
        "-c",
        "echo task-over-tls",
    ]));
    assert!(out.contains("SUCCEEDED"), "{out}");
    // With alice's certificate as well.
    let status = ok(&rmctl(&[
        "--rm",
        &rm,
        "--tls-ca",
        ca_s,
        "--tls-cert",
        d.join("client-alice.pem").to_str().unwrap(),
        "--tls-key",
        d.join("client-alice-key.pem").to_str().unwrap(),
        "node",
        "list",
    ]));
    assert!(status.contains("node-a"), "{status}");
    // Or from rmctl.toml's [tls], as a user sets it once.
    let file = tmp.path().join("rmctl.toml");
    std::fs::write(
        &file,
        format!(
            "rm = [{}]\n[tls]\nca_file = {ca_s:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            cluster
                .addrs()
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            d.join("client-alice.pem").display().to_string(),
            d.join("client-alice-key.pem").display().to_string()
        ),
    )
    .unwrap();
    let from_file = rmctl_with(&["node", "list"], Some(&file));
    assert!(ok(&from_file).contains("node-a"));

    // Plaintext is refused.
    let plain = rmctl(&["--rm", &rm, "--timeout", "3", "cluster", "status"]);
    assert!(!plain.status.success(), "a plaintext client was served");
    let addr = &cluster.members[0].addr;
    // So is a client certificate of another CA (shown by a client that
    // trusts this cluster's CA).
    let pem = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let foreign = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem(ca.clone())))
        .identity(tonic::transport::Identity::from_pem(
            pem(other.join("client-mallory.pem")),
            pem(other.join("client-mallory-key.pem")),
        ))
        .domain_name("rm.weft");
    let refused = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(foreign)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        pb::client_service_client::ClientServiceClient::new(ch)
            .cluster_status(pb::ClusterStatusRequest {})
            .await
            .map_err(|e| e.into())
            .map(|_| ())
    };
    let r: Result<(), Box<dyn std::error::Error>> = refused.await;
    assert!(r.is_err(), "a certificate of another CA was served");

    // Raft messages only from members: alice's certificate is refused.
    let alice = settings(&d, "client", "alice");
    let mut raft = pb::raft_transport_client::RaftTransportClient::new(channel(addr, &alice).await);
    let e = raft
        .send(tokio_stream::iter(vec![pb::RaftEnvelope::default()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("raft message")
            && e.message().contains("client certificate of \"alice\""),
        "{e}"
    );

    // A node speaks only as itself: node-a's certificate cannot register
    // or heartbeat as node-b, and a user's cannot register at all.
    let node_a = settings(&d, "agent", "node-a");
    let mut tracker =
        pb::resource_tracker_client::ResourceTrackerClient::new(channel(addr, &node_a).await);
    let e = tracker
        .register_node(pb::RegisterNodeRequest {
            node_id: "node-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().starts_with("node_id: \"node-b\""), "{e}");
    let e = tracker
        .node_heartbeat(pb::NodeHeartbeatRequest {
            node_id: "node-b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let mut as_user =
        pb::resource_tracker_client::ResourceTrackerClient::new(channel(addr, &alice).await);
    let e = as_user
        .register_node(pb::RegisterNodeRequest {
            node_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("agent certificate"), "{e}");

    // An agent's containers: the RM (a member certificate) may list and
    // look at them; a user may not, nor without a certificate at all.
    let agent_addr = ok(&rmctl(&[
        "--rm", &rm, "--tls-ca", ca_s, "-o", "json", "node", "status", "node-a",
    ]));
    let agent_addr = serde_json::from_str::<serde_json::Value>(&agent_addr).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let agent_channel = |tls: &Tls| {
        tonic::transport::Endpoint::from_shared(format!("https://{agent_addr}"))
            .unwrap()
            .tls_config(tls.client_config(Role::Agent))
            .unwrap()
            .connect_lazy()
    };
    let rm1 = settings(&d, "rm", "rm1");
    let listed = pb::container_manager_client::ContainerManagerClient::new(agent_channel(&rm1))
        .list_containers(pb::ListContainersRequest {
            include_finished: true,
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(listed.len() >= 2, "the job's master and task: {listed:?}");
    let mut as_alice =
        pb::container_manager_client::ContainerManagerClient::new(agent_channel(&alice));
    let e = as_alice
        .list_containers(pb::ListContainersRequest {
            include_finished: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("client certificate of \"alice\""),
        "{e}"
    );
    let e = as_alice
        .get_container_status(pb::GetContainerStatusRequest {
            container_id: listed[0].container_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("token of the container's application"),
        "{e}"
    );

    // An agent told a node id other than its certificate's does not start.
    let agent_cfg = tmp.path().join("agent-z.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "node_id = \"node-z\"\nlisten = \"127.0.0.1:0\"\nwork_dir = {:?}\n[tls]\nca_file = {ca_s:?}\ncert_file = \"{1}/agent-node-a.pem\"\nkey_file = \"{1}/agent-node-a-key.pem\"\n",
            tmp.path().join("agent-z").display().to_string(),
            d.display()
        ),
    )
    .unwrap();
    let z = std::process::Command::new(crate::nodes::agent_binary())
        .args(["--config", agent_cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(z.status.code(), Some(2));
    let why = String::from_utf8_lossy(&z.stderr);
    assert!(
        why.contains("node_id: \"node-z\" is not the name in tls.cert_file (\"node-a\")"),
        "{why}"
    );

    // A member given a node's certificate does not start, and says why.
    let cfg = tmp.path().join("wrong.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\nca_file = {ca_s:?}\ncert_file = \"{0}/agent-node-a.pem\"\nkey_file = \"{0}/agent-node-a-key.pem\"\n",
            d.display()
        ),
    )
    .unwrap();
    let wrong = std::process::Command::new(env!("CARGO_BIN_EXE_resource-manager"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--data-dir", tmp.path().join("wrong").to_str().unwrap()])
        .args(["--peers", "1=127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2));
    let why = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        why.contains("tls.cert_file:") && why.contains("needs a rm certificate"),
        "{why}"
    );
}

/// The certificate a member presents to a new connection now (DER); None
/// while it does not answer (starting).
async fn served_cert(addr: &str, ca: &Path) -> Option<Vec<u8>> {
    use rustls::pki_types::ServerName;
    let cfg = trusting(ca);
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from("rm.weft").unwrap(), tcp)
        .await
        .unwrap();
    Some(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// A TLS client that trusts the CA in `ca` and shows no certificate.
pub(crate) fn trusting(ca: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

fn der_of(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

/// Waits (bounded) until the member serves `want`; false if it never did.
async fn serves(addr: &str, ca: &Path, want: &[u8], within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if served_cert(addr, ca).await.as_deref() == Some(want) {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A member's certificate replaced while it runs: taken on SIGHUP, and when
/// its files change; a replacement that does not load is refused and the
/// one in use stays; the member serves throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup_and_when_their_files_change() {
    if crate::secure::skip(
        "it secures its own cluster with its own CA (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = ca_dir(tmp.path());
    cert(&d, "rm", "rm1");
    let ca = d.join("weft-ca.pem");
    let (cert_file, key_file) = (d.join("rm-rm1.pem"), d.join("rm-rm1-key.pem"));
    // Replacements, made beside by the same CA.
    let next = |n: &str| {
        let dir = tmp.path().join(n);
        std::fs::create_dir_all(&dir).unwrap();
        ok(&rmctl(&[
            "tls",
            "cert",
            "create",
            "--role",
            "rm",
            "--name",
            "rm1",
            "--days",
            "30",
            "--ca",
            ca.to_str().unwrap(),
            "--ca-key",
            d.join("weft-ca-key.pem").to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ]));
        (dir.join("rm-rm1.pem"), dir.join("rm-rm1-key.pem"))
    };
    let extra = format!(
        "[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        ca.display().to_string(),
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    let cluster = Cluster::start_with(1, 1000, &extra);
    let addr = cluster.members[0].addr.clone();
    let pid = cluster.pid(0).unwrap().to_string();
    let first = der_of(&cert_file);
    assert!(serves(&addr, &ca, &first, Duration::from_secs(20)).await);

    // 1. SIGHUP. The new files are written in place with their old times
    // (same inode, size and mtime), so that only the signal can tell.
    let (c2, k2) = next("second");
    let second = der_of(&c2);
    assert_ne!(first, second);
    let keep_times = |path: &Path, from: &Path| {
        let times = std::fs::metadata(path).unwrap().modified().unwrap();
        let len = std::fs::metadata(path).unwrap().len();
        let new = std::fs::read(from).unwrap();
        assert_eq!(new.len() as u64, len, "same size, so only SIGHUP tells");
        std::fs::write(path, new).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(times)
            .unwrap();
    };
    keep_times(&cert_file, &c2);
    keep_times(&key_file, &k2);
    tokio::time::sleep(weft_common::tls::RELOAD_CHECK_EVERY + Duration::from_millis(1500)).await;
    assert_eq!(
        served_cert(&addr, &ca).await,
        Some(first),
        "reloaded without a signal"
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(
        serves(&addr, &ca, &second, Duration::from_secs(5)).await,
        "SIGHUP did not reload the certificate"
    );

    // 2. Replaced by rename, no signal: the change is seen.
    let (c3, k3) = next("third");
    let third = der_of(&c3);
    std::fs::rename(&k3, &key_file).unwrap();
    std::fs::rename(&c3, &cert_file).unwrap();
    assert!(
        serves(&addr, &ca, &third, Duration::from_secs(10)).await,
        "a changed file was not reloaded"
    );

    // 3. A replacement of another CA: refused, the third stays in use.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    ok(&rmctl(&[
        "tls",
        "ca",
        "create",
        "--dir",
        other.to_str().unwrap(),
    ]));
    cert(&other, "rm", "rm1");
    std::fs::copy(other.join("rm-rm1-key.pem"), &key_file).unwrap();
    std::fs::copy(other.join("rm-rm1.pem"), &cert_file).unwrap();
    let log = cluster.members[0].log.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("TLS certificates not reloaded")
    {
        assert!(tokio::time::Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("was not signed by the CA"), "{said}");
    assert_eq!(served_cert(&addr, &ca).await, Some(third));
    // And it serves calls all along.
    let status = ok(&rmctl(&[
        "--rm",
        &addr,
        "--tls-ca",
        ca.to_str().unwrap(),
        "cluster",
        "status",
    ]));
    assert!(status.contains("leader"), "{status}");
}

/// `/metrics` of a member with TLS: served over TLS with its certificate
/// (checked against the CA, as Prometheus' `tls_config` does) to a client
/// that offers HTTP/1.1 only, not in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_member_with_tls_are_served_over_tls_only() {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if crate::secure::skip(
        "it secures its own cluster with its own CA (it runs in the plaintext pass)",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = ca_dir(tmp.path());
    cert(&d, "rm", "rm1");
    let ca = d.join("weft-ca.pem");
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        "[tls]\nca_file = {:?}\ncert_file = \"{1}/rm-rm1.pem\"\nkey_file = \"{1}/rm-rm1-key.pem\"\n[http]\nlisten = \"{http}\"\n",
        ca.display().to_string(),
        d.display()
    );
    let _cluster = Cluster::start_with(1, 1000, &extra);
    // As a scraper that speaks HTTP/1.1 only (Python's requests,
    // `curl --http1.1`, Prometheus with HTTP/2 off) says in its ALPN.
    let mut cfg = trusting(&ca);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = std::sync::Arc::new(cfg);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let tcp = loop {
        if let Ok(t) = tokio::net::TcpStream::connect(http).await {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("rm.weft").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /metrics HTTP/1.0\r\nHost: rm.weft\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    let _ = tls.read_to_string(&mut raw).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "the HTTP port offers HTTP/1.1"
    );
    assert!(raw.starts_with("HTTP/1.0 200"), "{raw}");
    assert!(raw.contains("\nweft_raft_term "), "{raw}");
    // Plaintext: no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut plain = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut plain)).await;
    assert!(
        !String::from_utf8_lossy(&plain).contains("weft_raft_term"),
        "{}",
        String::from_utf8_lossy(&plain)
    );
}
