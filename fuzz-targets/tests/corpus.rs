//! Every fuzz target over its checked-in inputs: the seeds its runs start
//! from (`fuzz/seeds/<target>/`) and every input a run ever found a fault
//! with (`fuzz/regressions/<target>/`, kept once fixed). A target panics on
//! a fault, so this test fails on any input that regressed.

use std::path::Path;

#[test]
fn every_target_passes_its_seeds_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, target) in weft_fuzz_targets::TARGETS {
        let mut seeds = 0;
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let path = e.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let ok = std::panic::catch_unwind(|| target(&data));
                assert!(ok.is_ok(), "{name}: {} fails", path.display());
                if kind == "seeds" {
                    seeds += 1;
                }
            }
        }
        assert!(seeds > 0, "{name}: no seeds under fuzz/seeds/{name}");
    }
}

/// Writes the seeds under `fuzz/seeds/` from real values: the example job
/// specs (YAML, and TOML through the spec's own model), command streams a
/// group would replicate, the snapshot of the state they build, and each
/// kind of request encoded as on the wire.
#[test]
#[ignore = "writes the seed files; run by hand after a format change"]
fn write_seeds() {
    use prost::Message;
    use std::collections::BTreeMap;
    use weft_proto::v1 as pb;
    use weft_resource_manager::fsm::*;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let specs: Vec<String> = [
        "jobs/gpu.yaml",
        "jobs/over-quota.yaml",
        "pipeline/pipeline.yaml",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(examples.join(p)).unwrap())
    .collect();
    for (i, text) in specs.iter().enumerate() {
        let spec = weft_spec::JobSpec::parse(text, "yaml").unwrap();
        write(
            "spec",
            &format!("yaml-{i}"),
            &[&[0u8][..], text.as_bytes()].concat(),
        );
        let toml = toml::to_string(&spec).unwrap();
        weft_spec::JobSpec::parse(&toml, "toml").unwrap();
        write(
            "spec",
            &format!("toml-{i}"),
            &[&[1u8][..], toml.as_bytes()].concat(),
        );
    }

    let env = |request: u64, command: Command| Envelope {
        version: COMMAND_VERSION,
        origin: 1,
        request,
        command,
    };
    let alloc = |id: &str, node: &str| Allocation {
        container_id: id.into(),
        app_id: "app-000001".into(),
        node_id: node.into(),
        vcores_milli: 1000,
        memory_bytes: 1 << 28,
        gpus: vec![0],
        gpu_share: None,
        ask_id: "train".into(),
        gang: Some("train#0".into()),
        ports: vec![7000],
        priority: 5,
        preemption_grace_ms: 20_000,
        min_available: 0,
    };
    let stream = vec![
        Command::SetQueues {
            queues: vec![QueueSpec {
                name: "root".into(),
                guaranteed_vcores_milli: 0,
                guaranteed_memory_bytes: 0,
                guaranteed_gpus: 0,
                max_vcores_milli: u64::MAX,
                max_memory_bytes: u64::MAX,
                max_gpus: u32::MAX,
                weight: 1,
                submit_acl: vec!["*".into()],
                user_limit_vcores_milli: 0,
                user_limit_memory_bytes: 0,
                user_limit_gpus: 0,
                admin_acl: vec!["ann".into()],
                priority_preemption: true,
                max_preemption_grace_ms: 60_000,
            }],
        },
        Command::AclBootstrap {
            token: AclToken {
                accessor: "0123456789abcdef".into(),
                secret_sha256: "0123456789abcdef".repeat(4),
                user: "admin".into(),
                admin: true,
                description: "bootstrap".into(),
                created_at_ms: 1,
                expires_at_ms: 0,
            },
        },
        Command::AclTokenRevoke {
            accessor: "0123456789abcdef".into(),
        },
        Command::RegisterNode {
            node_id: "n1".into(),
            address: "10.0.0.1:7200".into(),
            vcores_milli: 8000,
            memory_bytes: 16 << 30,
            gpus: vec![Gpu {
                index: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_bytes: 80 << 30,
            }],
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            running: vec![],
            ended: vec![],
            ready: true,
            ports: PortRange {
                first: 7000,
                last: 7999,
            },
            at_ms: 1,
        },
        Command::SubmitApplication {
            request_id: "r1".into(),
            name: "pipeline".into(),
            queue: "root".into(),
            user: "ann".into(),
            spec: specs[2].clone(),
            spec_format: "yaml".into(),
            unmanaged: false,
            accepted: false,
            service: false,
            priority: 3,
            at_ms: 2,
        },
        Command::ApplicationAccepted {
            app_id: "app-000001".into(),
            at_ms: 3,
        },
        Command::ContainersAllocated {
            allocations: vec![alloc("c1", "n1")],
            at_ms: 4,
        },
        Command::AttemptStarted {
            app_id: "app-000001".into(),
            attempt: 1,
            am_container: Some("c1".into()),
            keep_containers: false,
            previous_lost: false,
            at_ms: 5,
        },
        Command::ContainersLaunched {
            container_ids: vec!["c1".into()],
            at_ms: 6,
        },
        Command::PreemptContainers {
            preemptions: vec![Preemption {
                container_id: "c1".into(),
                grace_ms: 20_000,
                diagnostic: "preempted to reclaim capacity".into(),
            }],
            at_ms: 7,
        },
        Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "c1".into(),
                state: ContainerEnd::Killed,
                exit_status: -111,
                diagnostic: "killed by its node".into(),
            }],
            still_running: false,
            at_ms: 7,
        },
        Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Lost,
            at_ms: 8,
        },
        Command::KillApplication {
            app_id: "app-000001".into(),
            at_ms: 9,
        },
        Command::PruneApplications {
            finished_before_ms: 10,
            keep: 0,
        },
    ];
    let lines = |cmds: &[Command]| -> Vec<u8> {
        cmds.iter()
            .enumerate()
            .map(|(i, c)| env(i as u64, c.clone()).encode())
            .collect::<Vec<_>>()
            .join(&b'\n')
    };
    write("commands", "lifecycle", &lines(&stream));
    write("commands", "register", &lines(&stream[..2]));
    write(
        "commands",
        "submit-kill",
        &lines(&[stream[0].clone(), stream[2].clone(), stream[9].clone()]),
    );
    let mut state = ClusterState::default();
    for c in &stream[..7] {
        state.apply(c);
    }
    write("snapshot", "running", &state.to_snapshot());
    write("snapshot", "empty", &ClusterState::default().to_snapshot());

    let reg = pb::RegisterNodeRequest {
        node_id: "n1".into(),
        hostname: "n1".into(),
        container_manager_address: "10.0.0.1:7200".into(),
        capacity: Some(pb::NodeCapacity {
            vcores_milli: 8000,
            memory_bytes: 16 << 30,
            gpus: vec![pb::GpuDevice {
                index: 0,
                uuid: "GPU-0".into(),
                model: "H100".into(),
                memory_bytes: 80 << 30,
            }],
        }),
        labels: [("zone".to_string(), "a".to_string())].into(),
        port_range_first: 7000,
        port_range_last: 7999,
        ..Default::default()
    };
    write(
        "requests",
        "register",
        &[&[0u8][..], &reg.encode_to_vec()].concat(),
    );
    let allocate = pb::AllocateRequest {
        asks: vec![pb::ResourceAsk {
            ask_id: "train".into(),
            count: 4,
            resources: Some(pb::Resources {
                vcores_milli: 1000,
                memory_bytes: 1 << 30,
                gpus: 1,
                ..Default::default()
            }),
            node_labels: "zone=a".into(),
            gang_id: "train#0".into(),
            ports: 1,
            ..Default::default()
        }],
        releases: vec!["c9".into()],
        ..Default::default()
    };
    write(
        "requests",
        "allocate",
        &[&[1u8][..], &allocate.encode_to_vec()].concat(),
    );
    let start = pb::StartContainerRequest {
        container_id: "c1".into(),
        command: "sh".into(),
        args: vec!["-c".into(), "echo hi".into()],
        env: [("A".to_string(), "1".to_string())].into(),
        resources: Some(pb::ContainerResources {
            vcores_milli: 500,
            memory_bytes: 64 << 20,
            gpu_indices: vec![0],
            ..Default::default()
        }),
        token: vec![1, 2, 3],
        files: [("weft-job-spec".to_string(), b"name: x\n".to_vec())].into(),
        checkpoint_key: "train/0".into(),
    };
    write(
        "requests",
        "start",
        &[&[2u8][..], &start.encode_to_vec()].concat(),
    );
    let submit = pb::SubmitApplicationRequest {
        spec: specs[0].clone(),
        spec_format: "yaml".into(),
        user: "ann".into(),
        request_id: "r1".into(),
        unmanaged_master: false,
    };
    write(
        "requests",
        "submit",
        &[&[3u8][..], &submit.encode_to_vec()].concat(),
    );
}
