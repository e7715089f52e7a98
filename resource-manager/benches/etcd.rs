//! The consensus path beside etcd's, in one run on one machine: a 3-member
//! etcd group (Debian's `etcd-server`, defaults, data on the same disk) and
//! two 3-member RM groups of release processes, all on loopback; the same
//! loop of acknowledged writes at 1, 8 and 64 concurrent clients against
//! each (etcd: a `Put` of a 160-byte value over its gRPC API; Weft: a job
//! submission, whose spec is about as long), the groups taking turns for
//! several rounds. One RM group launches no masters (`masters.launch =
//! false`: the write path alone); the other is as deployed, so that every
//! submission is a job whose master waits for a node (there are none): the
//! leader's scheduling work over a growing backlog shares the machine with
//! the write path. Prints writes/s and per-write p50/p99 per round, then
//! min/median/max over the rounds and the ratios.
//!
//! `cargo bench -p weft-resource-manager --bench etcd` (needs `etcd`:
//! `apt-get install etcd-server`); `cargo test` runs a short version, or
//! says it is skipped when etcd is not installed.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use weft_client::RmClient;

mod support;

const SPEC: &str = "name: bench\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: { vcores: 1, memory: 64MiB }\n";

/// etcd's `PutRequest` (etcdserverpb, rpc.proto): the fields used here.
#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's `PutResponse`: its fields are not read.
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

async fn etcd_put(ch: Channel, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put");
    grpc.unary::<_, PutResponse, _>(
        tonic::Request::new(PutRequest { key, value }),
        path,
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(|_| ())
}

struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn etcd_installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(6);
    let clients: Vec<String> = ports[..3]
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let peers: Vec<String> = ports[3..]
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let cluster = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{i}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    let children = (0..3)
        .map(|i| {
            Command::new("etcd")
                .args([
                    "--name",
                    &format!("e{i}"),
                    "--data-dir",
                    dir.path().join(format!("e{i}")).to_str().unwrap(),
                    "--listen-client-urls",
                    &clients[i],
                    "--advertise-client-urls",
                    &clients[i],
                    "--listen-peer-urls",
                    &peers[i],
                    "--initial-advertise-peer-urls",
                    &peers[i],
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                    "--log-level",
                    "error",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting etcd")
        })
        .collect();
    Etcd {
        children,
        clients,
        _dir: dir,
    }
}

/// One round of job submissions to a Weft group.
async fn submissions(client: &Arc<RmClient>, concurrency: usize, total: usize) -> support::Row {
    let cl = client.clone();
    support::round(concurrency, total, move |_, _| {
        let cl = cl.clone();
        async move {
            cl.submit(SPEC, "yaml", "bench").await.expect("weft submit");
        }
    })
    .await
}

fn spread(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "{:.1} / {:.1} / {:.1}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !etcd_installed() {
        println!("skipped: etcd is not installed (apt-get install etcd-server)");
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let (total, rounds) = if full { (3000, 3) } else { (64, 1) };
    let etcd = start_etcd();
    let channels: Vec<Channel> = etcd
        .clients
        .iter()
        .map(|a| Channel::from_shared(a.clone()).unwrap().connect_lazy())
        .collect();
    // The write goes to the leader's client port; find it by trying.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader_ch = loop {
        let mut found = None;
        for ch in &channels {
            if etcd_put(ch.clone(), b"warm".to_vec(), b"up".to_vec())
                .await
                .is_ok()
            {
                found = Some(ch.clone());
                break;
            }
        }
        if let Some(ch) = found {
            break ch;
        }
        assert!(Instant::now() < deadline, "etcd group never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bare = support::start_group("[masters]\nlaunch = false\n");
    let bare_client = Arc::new(RmClient::new(bare.addrs.clone()).unwrap());
    bare_client.submit(SPEC, "yaml", "bench").await.unwrap();
    let group = support::start_group("");
    let client = Arc::new(RmClient::new(group.addrs.clone()).unwrap());
    client.submit(SPEC, "yaml", "bench").await.unwrap();
    println!(
        "3-member groups on loopback, this machine's disk; {total} acknowledged writes per row, {rounds} round(s), the groups taking turns"
    );
    let value = vec![b'v'; SPEC.len()];
    // (clients, etcd's rounds, bare weft's, weft's with masters waiting)
    type Rows = (
        usize,
        Vec<support::Row>,
        Vec<support::Row>,
        Vec<support::Row>,
    );
    let mut table: Vec<Rows> = Vec::new();
    for concurrency in [1usize, 8, 64] {
        let (mut e, mut b, mut w) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (ch, v) = (leader_ch.clone(), value.clone());
            let er = support::round(concurrency, total, move |c, i| {
                let (ch, v) = (ch.clone(), v.clone());
                async move {
                    etcd_put(ch, format!("bench/{r}/{c}/{i}").into_bytes(), v)
                        .await
                        .expect("etcd put");
                }
            })
            .await;
            let br = submissions(&bare_client, concurrency, total).await;
            let wr = submissions(&client, concurrency, total).await;
            let show =
                |x: support::Row| format!("{:>6.0}/s p50 {:>5.2} ms p99 {:>6.2} ms", x.0, x.1, x.2);
            println!(
                "  round {} {concurrency:>3} clients: etcd {} | weft, no masters {} | weft, masters waiting {}",
                r + 1,
                show(er),
                show(br),
                show(wr)
            );
            e.push(er);
            b.push(br);
            w.push(wr);
        }
        table.push((concurrency, e, b, w));
    }
    println!("\n(min / median / max over rounds)\n");
    println!("| clients | etcd writes/s | weft writes/s, no masters | weft/etcd | weft writes/s, masters waiting | weft/etcd | etcd p50 ms | weft p50 ms, no masters | weft p50 ms, masters waiting |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (c, e, b, w) in &table {
        let med = |v: &[support::Row], f: fn(&support::Row) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(|a, b| a.partial_cmp(b).unwrap());
            x[x.len() / 2]
        };
        let rate = |v: &[support::Row]| spread(&mut v.iter().map(|x| x.0).collect::<Vec<_>>());
        let p50 = |v: &[support::Row]| spread(&mut v.iter().map(|x| x.1).collect::<Vec<_>>());
        println!(
            "| {c} | {} | {} | {:.2}x | {} | {:.2}x | {} | {} | {} |",
            rate(e),
            rate(b),
            med(b, |x| x.0) / med(e, |x| x.0),
            rate(w),
            med(w, |x| x.0) / med(e, |x| x.0),
            p50(e),
            p50(b),
            p50(w),
        );
    }
    drop(group);
    drop(bare);
    drop(etcd);
}
