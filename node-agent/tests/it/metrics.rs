//! The agent's `/metrics`, scraped over a socket and parsed as Prometheus
//! does: a running container's use and limits under its labels, a memory
//! hog's kill counted by reason, start latencies, the driver.

use std::time::Duration;

use weft_node_agent::config::DriverChoice;
use weft_proto::v1 as pb;

use weft_common::http::scrape::{dashboard_metrics, scrape, served, value};

use crate::harness::*;

#[tokio::test]
async fn metrics_show_containers_use_and_kills_by_reason() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let usage = tempfile::tempdir().unwrap();
    let usage_dir = usage.path().to_path_buf();
    let mut agent = TestAgent::start("metrics", |c| {
        c.http.listen = Some(http);
        // One fake GPU whose per-process use the task writes (as NVML
        // would report it).
        c.gpu.fake.usage_dir = Some(usage_dir.clone());
        fake_gpus(c, "GPU-metrics-", 1);
    })
    .await;
    // Scraped the moment the port answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(http).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = scrape(http).await;
    assert_eq!(
        value(&first, "weft_agent_containers", &[("state", "running")]),
        Some(0.0)
    );
    assert!(value(&first, "weft_agent_capacity_vcores", &[]).unwrap() > 0.0);
    let driver = first
        .samples
        .iter()
        .find(|s| s.metric == "weft_agent_info")
        .and_then(|s| s.labels.get("driver").map(str::to_string))
        .unwrap();
    assert!(driver.starts_with("cgroup-v"), "{driver}");

    // A task that holds 32 MiB, with the labels a master gives it.
    let mut req = spec(
        "holder",
        "exec python3 -c 'import time; b = b\"x\" * (32 << 20); time.sleep(60)'",
        128 * MIB,
    );
    req.env.insert("WEFT_STAGE".into(), "train".into());
    req.env.insert("WEFT_TASK_INDEX".into(), "3".into());
    start(&mut agent.client, req).await;
    let labels = [("container", "holder"), ("stage", "train"), ("task", "3")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let during = loop {
        let s = scrape(http).await;
        if value(&s, "weft_agent_container_memory_bytes", &labels).unwrap_or(0.0)
            >= 32.0 * MIB as f64
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "its use never showed: {:?}",
            s.samples
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        value(&during, "weft_agent_containers", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(
        value(&during, "weft_agent_container_memory_limit_bytes", &labels),
        Some(128.0 * MIB as f64)
    );
    assert!(value(&during, "weft_agent_container_vcores", &labels).is_some());
    assert!(
        value(&during, "weft_agent_container_cpu_seconds_total", &labels).is_some(),
        "{:?}",
        during.samples
    );
    // A busy task's CPU time grows; a task on the GPU shows its GPU memory.
    // Half a core: its quota's group counts its time (cgroup v1's cpuacct,
    // v2's cpu.stat).
    let mut busy = spec("busy", "exec python3 -c 'while True: pass'", 64 * MIB);
    busy.resources.as_mut().unwrap().vcores_milli = 500;
    start(&mut agent.client, busy).await;
    let mut gpu = spec(
        "gpu",
        &format!(
            "echo 'GPU-metrics-0 1500000000' > {}/$$; exec sleep 60",
            usage_dir.display()
        ),
        32 * MIB,
    );
    gpu.resources.as_mut().unwrap().gpu_indices = vec![0];
    start(&mut agent.client, gpu).await;
    let busy = [("container", "busy")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let busy_scrape = loop {
        let s = scrape(http).await;
        let cpu = value(&s, "weft_agent_container_cpu_seconds_total", &busy).unwrap_or(0.0);
        let gpu_mem = value(
            &s,
            "weft_agent_container_gpu_memory_bytes",
            &[("container", "gpu")],
        );
        if cpu >= 0.3 && gpu_mem == Some(1.5e9) {
            // Only containers given a GPU have the figure.
            assert_eq!(
                value(&s, "weft_agent_container_gpu_memory_bytes", &busy),
                None
            );
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cpu {cpu} s, GPU memory {gpu_mem:?}: {:?}",
            s.samples
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop(&mut agent.client, "busy", 300).await;
    stop(&mut agent.client, "gpu", 300).await;
    assert!(value(&during, "weft_agent_container_start_seconds_count", &[]).unwrap() >= 1.0);

    // A memory hog: killed, and counted by its reason.
    start(
        &mut agent.client,
        spec("hog", "exec tail /dev/zero", 48 * MIB),
    )
    .await;
    let s = wait_end(&mut agent.client, "hog", Duration::from_secs(30)).await;
    assert_eq!(s.state(), pb::ContainerState::Killed, "{s:?}");
    stop(&mut agent.client, "holder", 300).await;
    let after = scrape(http).await;
    assert_eq!(
        value(
            &after,
            "weft_agent_container_ends_total",
            &[("reason", "over_memory_quota")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &after,
            "weft_agent_container_ends_total",
            &[("reason", "user_requested")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&after, "weft_agent_containers", &[("state", "running")]),
        Some(0.0)
    );
    assert_eq!(
        value(&after, "weft_agent_containers", &[("state", "killed")]),
        Some(4.0)
    );
    assert_eq!(
        value(&after, "weft_agent_container_memory_bytes", &labels),
        None
    );
    // Every agent figure the example dashboard queries is served.
    let served = served(&[&during, &busy_scrape, &after]);
    let dashboard = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/deploy/grafana-dashboard.json");
    for m in dashboard_metrics(&dashboard)
        .into_iter()
        .filter(|m| m.starts_with("weft_agent_"))
    {
        assert!(
            served.contains(m.as_str()),
            "the dashboard queries {m}, not served: {served:?}"
        );
    }
    agent.shutdown().await;
}
