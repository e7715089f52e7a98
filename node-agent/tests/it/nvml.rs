//! The NVML path on a real NVIDIA GPU. Runs only with `WEFT_TEST_NVML=1`, on
//! a machine with the driver and a python3 that has PyTorch; elsewhere it says
//! it was skipped.

use std::time::Duration;

use weft_node_agent::config::GpuProbeChoice;
use weft_node_agent::gpu::{GpuProbe, NvmlProbe};
use weft_proto::exit_codes;
use weft_proto::v1 as pb;
use weft_proto::v1::container_exit::Reason;

use crate::harness::*;

const GIB: u64 = 1 << 30;

#[tokio::test]
async fn nvml_discovery_visibility_and_gpu_memory_quota() {
    if std::env::var("WEFT_TEST_NVML").is_err() {
        eprintln!("skipped: set WEFT_TEST_NVML=1 on a machine with an NVIDIA GPU and PyTorch");
        return;
    }
    let probe = NvmlProbe::new().expect("NVML starts on a GPU machine");
    let devices = probe.devices();
    assert!(!devices.is_empty(), "NVML found no GPU");
    for d in &devices {
        eprintln!(
            "nvml: GPU {} (minor {}) {} {} {} bytes",
            d.index, d.minor, d.uuid, d.model, d.memory_bytes
        );
        assert!(d.uuid.starts_with("GPU-"), "{d:?}");
        assert!(d.memory_bytes > GIB, "{d:?}");
    }
    let mut agent = TestAgent::start("nvml", |c| {
        c.gpu.probe = GpuProbeChoice::Nvml;
        c.resources.memory = Some(bytesize::ByteSize::gib(32));
        c.resources.vcores = Some(8.0);
    })
    .await;

    // Which driver the agent runs, and whether it can deny device files.
    let probe_parent = unique_parent("nvml-probe");
    let driver = weft_node_agent::driver::select(agent.config.containers.driver, &probe_parent)
        .expect("a driver");
    let isolation = driver.describe();
    driver.cleanup();
    let filtered = driver.kind() != weft_node_agent::driver::DriverKind::Procfs
        && !isolation.contains("not filtered");
    eprintln!("driver {}: {isolation}", driver.kind());

    // Without a GPU, CUDA sees none, and the kernel denies the GPUs' device files.
    let none = concat!(
        "import os, sys, torch\n",
        "print(torch.cuda.device_count(), flush=True)\n",
        "for m in sys.argv[1:]:\n",
        "    try:\n",
        "        os.close(os.open('/dev/nvidia' + m, os.O_RDWR))\n",
        "        print('opened', m, flush=True)\n",
        "    except OSError as e:\n",
        "        print('denied' if e.errno in (1, 13) else 'error', m, e.strerror, flush=True)\n",
    );
    let mut r = spec("nogpu", "", 8 * GIB);
    r.command = "python3".into();
    r.args = vec!["-c".into(), none.into()];
    r.args.extend(devices.iter().map(|d| d.minor.to_string()));
    start(&mut agent.client, r).await;
    let s = wait_end(&mut agent.client, "nogpu", Duration::from_secs(120)).await;
    let out = read_log(&mut agent.client, "nogpu", pb::LogStream::Stdout, 0, false).await;
    let err = read_log(&mut agent.client, "nogpu", pb::LogStream::Stderr, 0, false).await;
    eprintln!("nogpu: {out:?}");
    assert_eq!(s.state(), pb::ContainerState::Succeeded, "{s:?} {err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("0"),
        "a container without GPUs sees none"
    );
    for (d, line) in devices.iter().zip(lines) {
        if filtered {
            assert!(
                line.starts_with(&format!("denied {}", d.minor)),
                "/dev/nvidia{} of a GPU not given: {line}",
                d.minor
            );
        } else {
            eprintln!("device files not filtered by this driver: {line}");
        }
    }

    // With GPU 0 and a 1 GiB quota, allocating 3 GiB gets it killed.
    let hog = "import os, time, torch\n\
print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count(), flush=True)\n\
x = torch.empty(3 << 30, dtype=torch.uint8, device='cuda'); x.fill_(1); torch.cuda.synchronize()\n\
print('allocated', flush=True)\n\
time.sleep(120)\n";
    let mut r = spec("gpuhog", "", 8 * GIB);
    r.command = "python3".into();
    r.args = vec!["-c".into(), hog.into()];
    r.resources.as_mut().unwrap().gpu_indices = vec![0];
    r.resources.as_mut().unwrap().gpu_memory_bytes = GIB;
    start(&mut agent.client, r).await;
    let s = wait_end(&mut agent.client, "gpuhog", Duration::from_secs(180)).await;
    let out = read_log(&mut agent.client, "gpuhog", pb::LogStream::Stdout, 0, false).await;
    let err = read_log(&mut agent.client, "gpuhog", pb::LogStream::Stderr, 0, false).await;
    eprintln!(
        "gpuhog stdout: {out:?}\nstderr tail: {:?}",
        err.chars()
            .rev()
            .take(400)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
    let exit = s.exit.unwrap();
    eprintln!("gpuhog: {}", exit.diagnostic);
    let Some(Reason::OverGpuMemoryQuota(g)) = exit.reason else {
        panic!("expected OverGpuMemoryQuota, got {exit:?}");
    };
    assert_eq!(g.limit_bytes, GIB);
    assert!(
        g.used_bytes >= 3 * GIB,
        "NVML reported {} bytes",
        g.used_bytes
    );
    assert_eq!(exit.exit_status, exit_codes::OVER_GPU_MEMORY_QUOTA);
    let first = out.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!("{} 1", devices[0].uuid),
        "the container sees exactly its GPU, by UUID"
    );
    agent.shutdown().await;
}
