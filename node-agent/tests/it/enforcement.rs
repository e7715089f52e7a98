//! Quotas: memory (kernel OOM and procfs monitor), CPU, wall time, pids, GPU memory.

use std::time::{Duration, Instant};

use weft_node_agent::config::DriverChoice;
use weft_proto::exit_codes;
use weft_proto::v1 as pb;
use weft_proto::v1::container_exit::Reason;

use crate::harness::*;

/// `tail` keeps the last lines of /dev/zero, which has no newline: it grows
/// without bound.
const HOG: &str = "exec tail /dev/zero";

async fn memory_hog_is_killed(driver: DriverChoice) {
    let mut agent = TestAgent::start("mem", |c| c.containers.driver = driver).await;
    let limit = 48 * MIB;
    start(&mut agent.client, spec("hog", HOG, limit)).await;
    let s = wait_end(&mut agent.client, "hog", Duration::from_secs(30)).await;
    assert_eq!(s.state(), pb::ContainerState::Killed, "{s:?}");
    let exit = s.exit.clone().unwrap();
    let Some(Reason::OverMemoryQuota(m)) = exit.reason else {
        panic!("expected OverMemoryQuota, got {exit:?}");
    };
    assert_eq!(m.limit_bytes, limit);
    assert!(
        m.peak_bytes >= limit,
        "peak {} below limit {limit}",
        m.peak_bytes
    );
    assert_eq!(exit.exit_status, exit_codes::OVER_MEMORY_QUOTA);
    assert!(
        exit.diagnostic.contains("over its memory quota"),
        "{}",
        exit.diagnostic
    );
    let top = exit
        .top_processes
        .first()
        .unwrap_or_else(|| panic!("no process listed: {exit:?}"));
    assert!(top.command_line.contains("tail /dev/zero"), "{top:?}");
    assert!(
        top.rss_bytes > limit / 2,
        "the hog's RSS was measured: {top:?}"
    );
    eprintln!("{driver:?}: {}", exit.diagnostic);
    agent.shutdown().await;
}

#[tokio::test]
async fn memory_hog_killed_by_cgroup() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    memory_hog_is_killed(DriverChoice::Auto).await;
}

#[tokio::test]
async fn memory_hog_killed_by_procfs_monitor() {
    memory_hog_is_killed(DriverChoice::Procfs).await;
}

fn cpu_seconds(pid: i32) -> f64 {
    let s = weft_node_agent::procfs::stat(pid).expect("process alive");
    s.cpu_ticks as f64 / weft_node_agent::procfs::clock_ticks_per_second() as f64
}

#[tokio::test]
async fn busy_loop_limited_to_half_a_core() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    let mut agent = TestAgent::start("cpu", |_| {}).await;
    let mut req = spec("spin", "while :; do :; done", 32 * MIB);
    req.resources.as_mut().unwrap().vcores_milli = 500;
    let st = start(&mut agent.client, req).await;
    let pid = st.pid as i32;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    eprintln!("busy loop with 0.5 vcore used {used:.2} of a core");
    // Unlimited it would use a whole core; other tests share the machine, so
    // only the upper bound is tight.
    assert!(used < 0.65, "used {used:.2} of a core, limit 0.5");
    assert!(used > 0.2, "used only {used:.2} of a core");
    stop(&mut agent.client, "spin", 100).await;
    agent.shutdown().await;
}

#[tokio::test]
async fn wall_time_exceeded() {
    let mut agent = TestAgent::start("wall", |_| {}).await;
    let mut req = spec("slow", "sleep 30", 16 * MIB);
    req.resources.as_mut().unwrap().max_runtime_ms = 700;
    let t0 = Instant::now();
    start(&mut agent.client, req).await;
    let s = wait_end(&mut agent.client, "slow", Duration::from_secs(10)).await;
    let took = t0.elapsed();
    let exit = s.exit.unwrap();
    assert!(
        matches!(exit.reason, Some(Reason::WallTimeExceeded(ref w)) if w.limit_ms == 700),
        "{exit:?}"
    );
    assert_eq!(exit.exit_status, exit_codes::WALL_TIME_EXCEEDED);
    assert!(took >= Duration::from_millis(700), "killed early: {took:?}");
    assert!(
        exit.diagnostic.contains("max_runtime"),
        "{}",
        exit.diagnostic
    );
    agent.shutdown().await;
}

#[tokio::test]
async fn pids_limit_holds() {
    if !driver_or_skip(DriverChoice::Auto) {
        return;
    }
    let mut agent = TestAgent::start("pids", |_| {}).await;
    let mut req = spec(
        "forky",
        // The inner shell dies at its first failed fork; the outer one goes on.
        "sh -c 'for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 30 & done'; echo spawned; exec sleep 30",
        32 * MIB,
    );
    req.resources.as_mut().unwrap().pids_limit = 4;
    start(&mut agent.client, req).await;
    let parent = agent.parent().to_string();
    // Let the loop try all its forks.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let n = marked_pids(&parent).len();
    let err = read_log(&mut agent.client, "forky", pb::LogStream::Stderr, 0, false).await;
    eprintln!("processes in the container: {n}; stderr: {err:?}");
    assert!(n <= 4, "{n} processes despite a pids limit of 4");
    assert!(n >= 3, "the container should still run its sleeps: {n}");
    assert!(
        err.to_lowercase().contains("fork") || err.contains("Resource temporarily unavailable"),
        "fork failures were reported: {err:?}"
    );
    stop(&mut agent.client, "forky", 100).await;
    agent.shutdown().await;
}

#[tokio::test]
async fn gpu_memory_quota_through_fake_probe() {
    let usage = tempfile::tempdir().unwrap();
    let usage_dir = usage.path().to_path_buf();
    let mut agent = TestAgent::start("gpu", |c| {
        c.gpu.fake.usage_dir = Some(usage_dir.clone());
        fake_gpus(c, "GPU-fake-", 2);
    })
    .await;
    // The task "allocates" 3 GB on its GPU, as NVML would then report.
    let script = format!(
        "echo \"visible=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER nv=$NVIDIA_VISIBLE_DEVICES\"; \
         sleep 0.3; echo 'GPU-fake-1 3000000000' > {}/$$; exec sleep 30",
        usage_dir.display()
    );
    let mut req = spec("cuda", &script, 32 * MIB);
    req.resources.as_mut().unwrap().gpu_indices = vec![1];
    req.resources.as_mut().unwrap().gpu_memory_bytes = 2 << 30;
    // A request may not widen its own visibility.
    req.env.insert(
        "CUDA_VISIBLE_DEVICES".into(),
        "GPU-fake-0,GPU-fake-1".into(),
    );
    let st = start(&mut agent.client, req).await;
    assert_eq!(st.gpu_uuids, vec!["GPU-fake-1".to_string()]);
    let s = wait_end(&mut agent.client, "cuda", Duration::from_secs(10)).await;
    let exit = s.exit.unwrap();
    let Some(Reason::OverGpuMemoryQuota(g)) = exit.reason else {
        panic!("expected OverGpuMemoryQuota, got {exit:?}");
    };
    assert_eq!(g.limit_bytes, 2 << 30);
    assert_eq!(g.used_bytes, 3_000_000_000);
    assert_eq!(exit.exit_status, exit_codes::OVER_GPU_MEMORY_QUOTA);
    let out = read_log(&mut agent.client, "cuda", pb::LogStream::Stdout, 0, false).await;
    assert_eq!(
        out.trim(),
        "visible=GPU-fake-1 order=PCI_BUS_ID nv=GPU-fake-1"
    );
    agent.shutdown().await;
}
