//! Apply, snapshot and invariant tests of the state machine.

use std::collections::BTreeMap;

use super::*;

pub(crate) fn submit(req: &str, at: u64) -> Command {
    Command::SubmitApplication {
        request_id: req.into(),
        name: "n".into(),
        queue: "root".into(),
        user: "u".into(),
        spec: "s".into(),
        spec_format: "yaml".into(),
        unmanaged: false,
        accepted: false,
        service: false,
        priority: 0,
        at_ms: at,
    }
}

#[test]
fn submissions_get_sequential_ids_and_retries_are_idempotent() {
    let mut s = ClusterState::default();
    assert_eq!(
        s.apply(&submit("r1", 10)),
        Outcome::Submitted {
            app_id: "app-000001".into()
        }
    );
    assert_eq!(
        s.apply(&submit("r2", 11)),
        Outcome::Submitted {
            app_id: "app-000002".into()
        }
    );
    assert_eq!(
        s.apply(&submit("r1", 12)),
        Outcome::Submitted {
            app_id: "app-000001".into()
        }
    );
    assert_eq!(s.apps.len(), 2);
    assert_eq!(
        s.apply(&submit("", 13)),
        Outcome::Submitted {
            app_id: "app-000003".into()
        }
    );
}

#[test]
fn apply_is_deterministic_and_snapshots_round_trip() {
    let cmds = [
        submit("a", 1),
        Command::RegisterNode {
            node_id: "n1".into(),
            address: "h:1".into(),
            vcores_milli: 4000,
            memory_bytes: 1 << 30,
            gpus: vec![],
            labels: BTreeMap::new(),
            running: vec![],
            ended: vec![],
            ready: false,
            ports: PortRange::default(),
            at_ms: 2,
        },
        Command::NodeReady {
            node_id: "n1".into(),
            at_ms: 2,
        },
        Command::KillApplication {
            app_id: "app-000001".into(),
            at_ms: 3,
        },
        Command::SetNodeState {
            node_id: "n1".into(),
            state: NodeState::Draining,
            at_ms: 4,
        },
        Command::KillApplication {
            app_id: "app-999999".into(),
            at_ms: 5,
        },
    ];
    let (mut a, mut b) = (ClusterState::default(), ClusterState::default());
    let ra: Vec<Outcome> = cmds.iter().map(|c| a.apply(c)).collect();
    let rb: Vec<Outcome> = cmds.iter().map(|c| b.apply(c)).collect();
    assert_eq!(a, b);
    assert_eq!(ra, rb);
    assert_eq!(
        ra[5],
        Outcome::Rejected("application_id: no application app-999999".into())
    );
    assert_eq!(a.apps["app-000001"].state, AppState::Killed);
    assert_eq!(a.nodes["n1"].state, NodeState::Draining);
    assert!(a.nodes["n1"].ready);
    assert_eq!(ClusterState::from_snapshot(&a.to_snapshot()).unwrap(), a);
}

/// The raft thread hands a snapshot `stored_part()` and goes on applying:
/// what the snapshot writes is the state as it was when it was taken (the
/// shared maps copy on change), and reads back as that whole state.
#[test]
fn a_stored_part_taken_before_more_applies_snapshots_the_state_as_it_was() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 4000, 1 << 30, 0));
    for i in 0..300 {
        s.apply(&submit(&format!("r{i}"), i));
    }
    let then = s.clone();
    let part = s.stored_part();
    assert_eq!(part.to_snapshot(), then.to_snapshot());
    for i in 0..300 {
        s.apply(&Command::KillApplication {
            app_id: format!("app-{:06}", i + 1),
            at_ms: 1000 + i,
        });
    }
    s.apply(&submit("later", 2000));
    assert_ne!(s.to_snapshot(), then.to_snapshot());
    assert_eq!(part.to_snapshot(), then.to_snapshot());
    assert_eq!(
        ClusterState::from_snapshot(&part.to_snapshot()).unwrap(),
        then
    );
    assert!(part.apps.values().all(|a| a.state != AppState::Killed));
}

pub(crate) fn node(id: &str, vcores: u64, mem: u64, gpus: u32) -> Command {
    Command::RegisterNode {
        node_id: id.into(),
        address: format!("{id}:7200"),
        vcores_milli: vcores,
        memory_bytes: mem,
        gpus: (0..gpus)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{id}-{i}"),
                model: "H100".into(),
                memory_bytes: 80 << 30,
            })
            .collect(),
        labels: BTreeMap::new(),
        running: vec![],
        ended: vec![],
        ready: true,
        ports: PortRange {
            first: 20000,
            last: 20009,
        },
        at_ms: 0,
    }
}

pub(crate) fn alloc(
    id: &str,
    app: &str,
    node: &str,
    vcores: u64,
    mem: u64,
    gpus: &[u32],
) -> Allocation {
    Allocation {
        container_id: id.into(),
        app_id: app.into(),
        node_id: node.into(),
        vcores_milli: vcores,
        memory_bytes: mem,
        gpus: gpus.to_vec(),
        gpu_share: None,
        ask_id: String::new(),
        gang: None,
        ports: vec![],
        priority: 0,
        preemption_grace_ms: 0,
        min_available: 0,
    }
}

fn share(id: &str, device: u32, milli: u32, mem: u64) -> Allocation {
    Allocation {
        gpu_share: Some(GpuShare {
            device,
            milli,
            memory_bytes: mem,
        }),
        ..alloc(id, "app-000001", "n1", 100, 1 << 20, &[])
    }
}

#[test]
fn gpu_shares_add_up_per_device() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 4000, 8 << 30, 2)); // two 80 GiB GPUs
    s.apply(&submit("r", 1));
    assert_eq!(
        allocate(
            &mut s,
            vec![share("s1", 0, 500, 40 << 30), share("s2", 0, 250, 20 << 30)]
        ),
        Outcome::Done
    );
    assert_eq!(s.node_use("n1").gpu_milli(), 750);
    // Over the device's thousandths, or its memory: refused.
    assert!(matches!(
        allocate(&mut s, vec![share("s3", 0, 500, 1 << 30)]),
        Outcome::PartlyApplied { .. }
    ));
    assert!(matches!(
        allocate(&mut s, vec![share("s4", 0, 100, 30 << 30)]),
        Outcome::PartlyApplied { .. }
    ));
    // A shared device cannot be given whole; a whole one cannot be shared.
    assert!(matches!(
        allocate(
            &mut s,
            vec![alloc("w1", "app-000001", "n1", 100, 1 << 20, &[0])]
        ),
        Outcome::PartlyApplied { .. }
    ));
    assert_eq!(
        allocate(
            &mut s,
            vec![alloc("w2", "app-000001", "n1", 100, 1 << 20, &[1])]
        ),
        Outcome::Done
    );
    assert!(matches!(
        allocate(&mut s, vec![share("s5", 1, 100, 1 << 20)]),
        Outcome::PartlyApplied { .. }
    ));
    assert_eq!(
        allocate(&mut s, vec![share("s6", 0, 250, 20 << 30)]),
        Outcome::Done
    );
    s.check_invariants().unwrap();
}

fn allocate(s: &mut ClusterState, a: Vec<Allocation>) -> Outcome {
    s.apply(&Command::ContainersAllocated {
        allocations: a,
        at_ms: 1,
    })
}

#[test]
fn allocations_are_verified_against_current_state() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 4000, 8 << 30, 2));
    s.apply(&submit("r", 1));
    assert_eq!(
        allocate(
            &mut s,
            vec![alloc("c1", "app-000001", "n1", 2000, 4 << 30, &[0])]
        ),
        Outcome::Done
    );
    // Over-commit within one round: what no longer fits is refused, the
    // rest is granted.
    let r = allocate(
        &mut s,
        vec![
            alloc("c2", "app-000001", "n1", 1000, 1 << 30, &[]),
            alloc("c3", "app-000001", "n1", 2000, 1 << 30, &[]),
        ],
    );
    assert_eq!(
        r,
        Outcome::PartlyApplied {
            refused: vec![Refusal {
                container_id: "c3".into(),
                reason: "node_id: n1 would be over-committed".into()
            }]
        }
    );
    assert!(s.containers.contains_key("c2") && !s.containers.contains_key("c3"));
    let refused = |o: Outcome| match o {
        Outcome::PartlyApplied { refused } if refused.len() == 1 => refused[0].reason.clone(),
        o => panic!("not one refusal: {o:?}"),
    };
    assert_eq!(
        refused(allocate(
            &mut s,
            vec![alloc("c4", "app-000001", "n1", 100, 1 << 20, &[0])]
        )),
        "gpus: GPU 0 of node n1 is already given"
    );
    assert_eq!(
        refused(allocate(
            &mut s,
            vec![alloc("c1", "app-000001", "n1", 1, 1, &[])]
        )),
        "container_id: c1 was already granted"
    );
    assert_eq!(
        refused(allocate(
            &mut s,
            vec![alloc("c5", "app-000009", "n1", 1, 1, &[])]
        )),
        "app_id: no application app-000009"
    );
    s.apply(&Command::ContainersCompleted {
        completions: vec![Completion {
            container_id: "c2".into(),
            state: ContainerEnd::Succeeded,
            exit_status: 0,
            diagnostic: String::new(),
        }],
        still_running: false,
        at_ms: 2,
    });
    // Completion frees the resources; the id stays taken.
    s.apply(&Command::ContainersCompleted {
        completions: vec![Completion {
            container_id: "c1".into(),
            state: ContainerEnd::Succeeded,
            exit_status: 0,
            diagnostic: String::new(),
        }],
        still_running: false,
        at_ms: 2,
    });
    assert_eq!(s.node_use("n1"), NodeUse::default());
    assert_eq!(
        allocate(
            &mut s,
            vec![alloc("c6", "app-000001", "n1", 4000, 8 << 30, &[0, 1])]
        ),
        Outcome::Done
    );
    assert_eq!(
        refused(allocate(
            &mut s,
            vec![alloc("c1", "app-000001", "n1", 1, 1, &[])]
        )),
        "container_id: c1 was already granted"
    );
    // A lost node's containers end as NodeLost and free the node.
    s.apply(&Command::SetNodeState {
        node_id: "n1".into(),
        state: NodeState::Lost,
        at_ms: 3,
    });
    assert_eq!(
        s.containers["c6"].end.as_ref().unwrap().state,
        ContainerEnd::NodeLost
    );
    assert_eq!(
        refused(allocate(
            &mut s,
            vec![alloc("c7", "app-000001", "n1", 1, 1, &[])]
        )),
        "node_id: n1 is Lost, not running"
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_managed_submission_is_accepted_in_its_own_entry_and_old_entries_still_read() {
    let mut s = ClusterState::default();
    let mut managed = submit("r", 1);
    if let Command::SubmitApplication { accepted, .. } = &mut managed {
        *accepted = true;
    }
    s.apply(&managed);
    assert_eq!(s.apps["app-000001"].state, AppState::Accepted);
    // An entry written before submissions carried `accepted`: submitted,
    // then accepted by an entry of its own.
    let old = r#"{"version":1,"origin":1,"request":7,"command":{"type":"submit_application","request_id":"","name":"n","queue":"root","user":"u","spec":"s","spec_format":"yaml","unmanaged":false,"at_ms":3}}"#;
    let env = Envelope::decode(old.as_bytes()).unwrap();
    s.apply(&env.command);
    assert_eq!(s.apps["app-000002"].state, AppState::Submitted);
    assert_eq!(
        s.apply(&Command::ApplicationAccepted {
            app_id: "app-000002".into(),
            at_ms: 4
        }),
        Outcome::Done
    );
    assert_eq!(s.apps["app-000002"].state, AppState::Accepted);
    // Accepting an already accepted one again changes nothing.
    assert!(matches!(
        s.apply(&Command::ApplicationAccepted {
            app_id: "app-000001".into(),
            at_ms: 5
        }),
        Outcome::Rejected(_)
    ));
    s.check_invariants().unwrap();
}

#[test]
fn application_life_cycle() {
    let mut s = ClusterState::default();
    s.apply(&submit("r", 1));
    let id = "app-000001".to_string();
    assert_eq!(
        s.apply(&Command::ApplicationAccepted {
            app_id: id.clone(),
            at_ms: 2
        }),
        Outcome::Done
    );
    let start = |attempt| Command::AttemptStarted {
        app_id: id.clone(),
        attempt,
        am_container: Some(format!("am-{attempt}")),
        keep_containers: false,
        previous_lost: false,
        at_ms: 3,
    };
    assert_eq!(s.apply(&start(1)), Outcome::Done);
    assert_eq!(s.apps[id.as_str()].state, AppState::Running);
    assert!(
        matches!(s.apply(&start(1)), Outcome::Rejected(_)),
        "attempts only move forward"
    );
    assert_eq!(s.apply(&start(2)), Outcome::Done);
    assert_eq!(s.apps[id.as_str()].am_container.as_deref(), Some("am-2"));
    let finish = |state| Command::ApplicationFinished {
        app_id: id.clone(),
        state,
        diagnostics: "task t3 over its memory quota".into(),
        stages: vec![],
        at_ms: 9,
    };
    assert!(matches!(
        s.apply(&finish(AppState::Running)),
        Outcome::Rejected(_)
    ));
    assert_eq!(s.apply(&finish(AppState::Failed)), Outcome::Done);
    assert_eq!(s.apps[id.as_str()].state, AppState::Failed);
    assert_eq!(s.apps[id.as_str()].finished_at_ms, 9);
    // Final is final.
    s.apply(&finish(AppState::Succeeded));
    assert_eq!(s.apps[id.as_str()].state, AppState::Failed);
    assert!(matches!(s.apply(&start(3)), Outcome::Rejected(_)));
}

#[test]
fn a_new_attempt_keeps_or_ends_the_previous_attempts_tasks() {
    for keep in [true, false] {
        let mut s = ClusterState::default();
        s.apply(&node("n1", 8000, 8 << 30, 0));
        s.apply(&submit("r", 1));
        let id = "app-000001";
        let mut am = alloc("am-1", id, "n1", 500, 1 << 20, &[]);
        am.ask_id = MASTER_ASK.into();
        let mut task = alloc("t-1", id, "n1", 500, 1 << 20, &[]);
        task.ask_id = "work/0".into();
        let mut idle = alloc("t-2", id, "n1", 500, 1 << 20, &[]);
        idle.ask_id = "work/1".into();
        assert_eq!(allocate(&mut s, vec![am, task, idle]), Outcome::Done);
        s.apply(&Command::ContainersLaunched {
            container_ids: vec!["am-1".into(), "t-1".into()],
            at_ms: 2,
        });
        let start = |attempt: u32, am: &str| Command::AttemptStarted {
            app_id: id.into(),
            attempt,
            am_container: Some(am.into()),
            keep_containers: keep,
            previous_lost: false,
            at_ms: 3,
        };
        assert_eq!(s.apply(&start(1, "am-1")), Outcome::Done);
        // Attempt 1's master dies; attempt 2 starts in a new container.
        s.apply(&Command::ContainersCompleted {
            completions: vec![Completion {
                container_id: "am-1".into(),
                state: ContainerEnd::Failed,
                exit_status: 1,
                diagnostic: "crashed".into(),
            }],
            still_running: false,
            at_ms: 4,
        });
        let mut am2 = alloc("am-2", id, "n1", 500, 1 << 20, &[]);
        am2.ask_id = MASTER_ASK.into();
        assert_eq!(allocate(&mut s, vec![am2]), Outcome::Done);
        assert_eq!(s.apply(&start(2, "am-2")), Outcome::Done);
        assert_eq!(
            s.containers["t-1"].phase != ContainerPhase::Completed,
            keep,
            "keep_containers={keep}"
        );
        assert_eq!(
            s.containers["t-2"].phase,
            ContainerPhase::Completed,
            "never known to run: ended"
        );
        assert_eq!(s.containers["am-2"].phase, ContainerPhase::Allocated);
        s.check_invariants().unwrap();
    }
}

#[test]
fn a_container_the_rm_ended_holds_its_node_until_the_agent_stops_it() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 1000, 1 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let a = |c: &str| alloc(c, id, "n1", 500, 1 << 20, &[]);
    assert_eq!(allocate(&mut s, vec![a("run"), a("idle")]), Outcome::Done);
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["run".into()],
        at_ms: 2,
    });
    let release = |c: &str| Command::ContainersCompleted {
        completions: vec![Completion {
            container_id: c.into(),
            state: ContainerEnd::Killed,
            exit_status: -105,
            diagnostic: "released".into(),
        }],
        still_running: true,
        at_ms: 3,
    };
    // Released: both hold their shares until the agent reports them
    // stopped (or reports not having the one never known to run: it may
    // have been starting).
    s.apply(&release("idle"));
    s.apply(&release("run"));
    assert_eq!(s.node_use("n1").vcores_milli, 1000);
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["idle".into()],
    });
    assert_eq!(s.node_use("n1").vcores_milli, 500);
    // Room for one more, not two: the second is refused, the first granted.
    assert!(matches!(
        allocate(&mut s, vec![a("x"), a("y")]),
        Outcome::PartlyApplied { refused } if refused.len() == 1 && refused[0].container_id == "y"
    ));
    s.apply(&release("x"));
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["run".into(), "x".into()],
    });
    assert_eq!(s.node_use("n1").vcores_milli, 0);
    // Ended with its application while running: held until the node is
    // lost (or the agent reports it stopped).
    assert_eq!(allocate(&mut s, vec![a("z")]), Outcome::Done);
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["z".into()],
        at_ms: 4,
    });
    s.apply(&Command::KillApplication {
        app_id: id.into(),
        at_ms: 5,
    });
    assert!(s.containers["z"].holding);
    assert_eq!(s.node_use("n1").vcores_milli, 500);
    s.apply(&Command::SetNodeState {
        node_id: "n1".into(),
        state: NodeState::Lost,
        at_ms: 6,
    });
    assert_eq!(s.node_use("n1").vcores_milli, 0);
    s.check_invariants().unwrap();
}

#[test]
fn a_preempted_container_ends_at_once_holds_its_node_until_stopped_and_is_counted() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 1000, 1 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let a = |c: &str| alloc(c, id, "n1", 500, 1 << 20, &[]);
    assert_eq!(
        allocate(&mut s, vec![a("run"), a("starting")]),
        Outcome::Done
    );
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["run".into()],
        at_ms: 2,
    });
    let preempt = |c: &str, at_ms: u64| Command::PreemptContainers {
        preemptions: vec![Preemption {
            container_id: c.into(),
            grace_ms: 3000,
            diagnostic: "preempted to reclaim capacity".into(),
        }],
        at_ms,
    };
    // Only a running one: one still starting (or unknown) is refused.
    assert!(matches!(
        s.apply(&preempt("starting", 3)),
        Outcome::PartlyApplied { refused } if refused[0].reason == "not running"
    ));
    assert!(matches!(
        s.apply(&preempt("nobody", 3)),
        Outcome::PartlyApplied { .. }
    ));
    assert_eq!(s.apply(&preempt("run", 3)), Outcome::Done);
    let c = &s.containers["run"];
    assert_eq!(c.phase, ContainerPhase::Completed);
    assert!(c.holding, "its node's room stays held through its grace");
    let end = c.end.as_ref().unwrap();
    assert_eq!(end.exit_status, weft_proto::exit_codes::PREEMPTED);
    assert_eq!(end.diagnostic, "preempted to reclaim capacity");
    assert_eq!(
        c.preempted,
        Some(PreemptedStop {
            grace_ms: 3000,
            at_ms: 3
        })
    );
    assert_eq!(s.node_use("n1").vcores_milli, 1000);
    assert_eq!(s.apps[id].preempted, 1);
    assert_eq!(s.apps[id].preempted_recently[""], vec![3]);
    // Twice is once: it no longer runs.
    assert!(matches!(
        s.apply(&preempt("run", 4)),
        Outcome::PartlyApplied { .. }
    ));
    assert_eq!(s.apps[id].preempted, 1);
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["run".into()],
    });
    assert_eq!(s.node_use("n1").vcores_milli, 500);
    // The hour's count forgets what is older than an hour.
    assert_eq!(allocate(&mut s, vec![a("later")]), Outcome::Done);
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["later".into()],
        at_ms: 5,
    });
    assert_eq!(
        s.apply(&preempt("later", 3 + PREEMPTION_WINDOW_MS + 1)),
        Outcome::Done
    );
    assert_eq!(
        s.apps[id].preempted_recently[""],
        vec![3 + PREEMPTION_WINDOW_MS + 1]
    );
    assert_eq!(s.apps[id].preempted, 2);
    s.check_invariants().unwrap();
}

#[test]
fn a_node_registering_again_reports_how_its_containers_ended_while_away() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 4000, 1 << 30, 0));
    s.apply(&node("n2", 4000, 1 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let a = |c: &str, n: &str| alloc(c, id, n, 500, 1 << 20, &[]);
    assert_eq!(
        allocate(
            &mut s,
            vec![
                a("ok", "n1"),
                a("bad", "n1"),
                a("run", "n1"),
                a("gone", "n1"),
                a("other", "n2")
            ]
        ),
        Outcome::Done
    );
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["ok".into(), "run".into(), "gone".into()],
        at_ms: 2,
    });
    let end = |c: &str, state, exit_status| Completion {
        container_id: c.into(),
        state,
        exit_status,
        diagnostic: format!("{c} ended"),
    };
    let mut again = node("n1", 4000, 1 << 30, 0);
    if let Command::RegisterNode {
        running,
        ended,
        at_ms,
        ..
    } = &mut again
    {
        *running = vec!["run".into()];
        // "ok" succeeded, "bad" failed while the agent could not report;
        // "other" is n2's: n1 cannot say how it ended.
        *ended = vec![
            end("ok", ContainerEnd::Succeeded, 0),
            end("bad", ContainerEnd::Failed, 3),
            end("other", ContainerEnd::Succeeded, 0),
        ];
        *at_ms = 9;
    }
    assert_eq!(s.apply(&again), Outcome::Done);
    let ended = |c: &str| {
        s.containers[c]
            .end
            .clone()
            .map(|e| (e.state, e.exit_status))
    };
    assert_eq!(ended("ok"), Some((ContainerEnd::Succeeded, 0)));
    assert_eq!(ended("bad"), Some((ContainerEnd::Failed, 3)));
    assert_eq!(ended("run"), None, "still running");
    // Neither running nor reported: lost while the agent was away.
    assert_eq!(ended("gone"), Some((ContainerEnd::Lost, -109)));
    assert_eq!(
        ended("other"),
        None,
        "another node's container is untouched"
    );
    assert_eq!(s.node_use("n1").vcores_milli, 500);
    s.check_invariants().unwrap();
}

#[test]
fn containers_of_long_finished_applications_are_pruned() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 8000, 8 << 30, 0));
    s.apply(&submit("a", 1));
    s.apply(&submit("b", 1));
    let (a, b) = ("app-000001", "app-000002");
    let c = |id: &str, app: &str| alloc(id, app, "n1", 500, 1 << 20, &[]);
    assert_eq!(
        allocate(&mut s, vec![c("a1", a), c("a2", a), c("b1", b)]),
        Outcome::Done
    );
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["a2".into()],
        at_ms: 2,
    });
    // a ends at 5 while a2 still runs (it holds its node until stopped).
    s.apply(&Command::ApplicationFinished {
        app_id: a.into(),
        state: AppState::Succeeded,
        diagnostics: String::new(),
        stages: vec![],
        at_ms: 5,
    });
    let prune = |before| Command::PruneContainers {
        finished_before_ms: before,
    };
    s.apply(&prune(5));
    assert_eq!(s.containers.len(), 3, "not finished before 5");
    // a1 was never reported running: it holds too, until its agent is
    // heard not to have it.
    s.apply(&prune(10));
    assert_eq!(s.containers.len(), 3, "both of a's still hold the node");
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["a1".into()],
    });
    s.apply(&prune(10));
    assert!(!s.containers.contains_key("a1"));
    assert!(s.containers.contains_key("a2"), "still holding its node");
    assert!(s.containers.contains_key("b1"), "b has not finished");
    s.check_invariants().unwrap();
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["a2".into()],
    });
    s.apply(&prune(10));
    assert_eq!(s.containers.keys().collect::<Vec<_>>(), vec!["b1"]);
    assert!(!s.app_containers.contains_key(a));
    s.check_invariants().unwrap();
    // The state read back from a snapshot is the same.
    assert_eq!(ClusterState::from_snapshot(&s.to_snapshot()).unwrap(), s);
}

#[test]
fn a_master_lost_with_its_node_is_a_free_attempt() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 8000, 8 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let mut am = alloc("am-1", id, "n1", 500, 1 << 20, &[]);
    am.ask_id = MASTER_ASK.into();
    assert_eq!(allocate(&mut s, vec![am]), Outcome::Done);
    s.apply(&Command::AttemptStarted {
        app_id: id.into(),
        attempt: 1,
        am_container: Some("am-1".into()),
        keep_containers: true,
        previous_lost: false,
        at_ms: 3,
    });
    assert_eq!(s.apps[id].free_attempts, 0);
    s.apply(&Command::SetNodeState {
        node_id: "n1".into(),
        state: NodeState::Lost,
        at_ms: 5,
    });
    assert_eq!(s.apps[id].free_attempts, 1);
    assert_eq!(
        s.containers["am-1"].end.as_ref().unwrap().state,
        ContainerEnd::NodeLost
    );
}

/// Found by the fault harness: the master's container ended (its node was
/// lost) between its allocation and the record of the attempt; the attempt
/// is still free.
#[test]
fn a_master_container_ended_before_its_attempt_is_recorded_is_a_free_attempt() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 8000, 8 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let mut am = alloc("am-1", id, "n1", 500, 1 << 20, &[]);
    am.ask_id = MASTER_ASK.into();
    assert_eq!(allocate(&mut s, vec![am]), Outcome::Done);
    s.apply(&Command::SetNodeState {
        node_id: "n1".into(),
        state: NodeState::Lost,
        at_ms: 4,
    });
    assert_eq!(
        s.containers["am-1"].end.as_ref().unwrap().state,
        ContainerEnd::NodeLost
    );
    assert_eq!(s.apps[id].free_attempts, 0);
    s.apply(&Command::AttemptStarted {
        app_id: id.into(),
        attempt: 1,
        am_container: Some("am-1".into()),
        keep_containers: true,
        previous_lost: false,
        at_ms: 5,
    });
    assert_eq!(s.apps[id].free_attempts, 1, "not the master's fault");
    s.check_invariants().unwrap();
}

/// Found by the fault harness: an agent registers again (it does on every
/// leader change) while a task's container is being started on it. The
/// registration ends the started containers it does not list, and leaves
/// the ones not known to have started: ending those too had the task rerun
/// while the first start went on, twice at once.
#[test]
fn a_registration_ends_only_started_containers_it_does_not_list() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 8000, 8 << 30, 0));
    s.apply(&submit("r", 1));
    let id = "app-000001";
    let started = alloc("started", id, "n1", 500, 1 << 20, &[]);
    let starting = alloc("starting", id, "n1", 500, 1 << 20, &[]);
    assert_eq!(allocate(&mut s, vec![started, starting]), Outcome::Done);
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["started".into()],
        at_ms: 3,
    });
    s.apply(&node("n1", 8000, 8 << 30, 0));
    assert_eq!(
        s.containers["started"].end.as_ref().map(|e| e.state),
        Some(ContainerEnd::Lost)
    );
    assert_eq!(s.containers["starting"].phase, ContainerPhase::Allocated);
    assert!(s.containers["starting"].end.is_none());
    s.check_invariants().unwrap();
}

#[test]
fn progress_is_kept_for_the_live_attempt_and_the_token_key_is_set_once() {
    let mut s = ClusterState::default();
    s.apply(&submit("r", 1));
    let id = "app-000001";
    s.apply(&Command::AttemptStarted {
        app_id: id.into(),
        attempt: 2,
        am_container: None,
        keep_containers: true,
        previous_lost: false,
        at_ms: 3,
    });
    let stages = vec![StageProgress {
        name: "prep".into(),
        done: 3,
        total: 4,
        running: 1,
        failed: 0,
    }];
    let report = |attempt| Command::ReportProgress {
        app_id: id.into(),
        attempt,
        stages: stages.clone(),
    };
    assert!(matches!(s.apply(&report(1)), Outcome::Rejected(_)));
    assert!(s.apps[id].stages.is_empty());
    assert_eq!(s.apply(&report(2)), Outcome::Done);
    assert_eq!(s.apps[id].stages, stages);

    let (a, b) = ("aa".repeat(32), "bb".repeat(32));
    assert!(matches!(
        s.apply(&Command::SetTokenKey {
            seed_hex: "aa".into(),
        }),
        Outcome::Rejected(_)
    ));
    s.apply(&Command::SetTokenKey {
        seed_hex: a.clone(),
    });
    s.apply(&Command::SetTokenKey { seed_hex: b });
    assert_eq!(s.token_keys.len(), 1);
    assert_eq!(s.token_keys[0].seed_hex, a, "the first key wins");
}

#[test]
fn token_keys_rotate_sign_from_their_time_and_are_dropped_after_their_overlap() {
    let mut s = ClusterState::default();
    let seed = |c: &str| c.repeat(32);
    let rotate = |seed_hex: String, request: &str, at_ms: u64| Command::RotateTokenKey {
        seed_hex,
        request_id: request.into(),
        at_ms,
        signs_from_ms: at_ms + 10,
        keep_previous_ms: 100,
    };
    assert!(
        matches!(
            s.apply(&rotate(seed("11"), "r1", 1_000)),
            Outcome::Rejected(_)
        ),
        "no key to rotate yet"
    );
    s.apply(&Command::SetTokenKey {
        seed_hex: seed("00"),
    });
    let group = s.token_group.clone();
    assert_eq!(group.len(), 64);
    assert_eq!(s.apply(&rotate(seed("11"), "r1", 1_000)), Outcome::Done);
    // A retry of the same rotation changes nothing.
    assert_eq!(s.apply(&rotate(seed("22"), "r1", 1_001)), Outcome::Done);
    assert_eq!(s.token_keys.len(), 2);
    // The new key is handed out before it signs.
    assert_eq!(s.signing_key(1_005).unwrap().id, 0);
    assert_eq!(s.signing_key(1_010).unwrap().id, 1);
    assert_eq!(s.token_keys[0].drop_at_ms, 1_110);
    assert_eq!(s.token_keys[1].drop_at_ms, 0);
    // Another rotation while key 1 does not sign yet is refused.
    assert!(matches!(
        s.apply(&rotate(seed("22"), "r2", 1_005)),
        Outcome::Rejected(_)
    ));
    // A bad seed is refused.
    assert!(matches!(
        s.apply(&rotate("zz".into(), "r2", 1_020)),
        Outcome::Rejected(_)
    ));
    // Drops only what is due, never the newest.
    s.apply(&Command::DropTokenKeys { before_ms: 1_100 });
    assert_eq!(s.token_keys.len(), 2);
    s.apply(&Command::DropTokenKeys { before_ms: 1_110 });
    assert_eq!(
        s.token_keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![1]
    );
    s.apply(&Command::DropTokenKeys {
        before_ms: u64::MAX,
    });
    assert_eq!(s.token_keys.len(), 1);
    // The group keeps its identity.
    assert_eq!(s.token_group, group);
    // At most MAX_TOKEN_KEYS at once.
    for i in 0..MAX_TOKEN_KEYS as u64 {
        let r = s.apply(&rotate(seed("33"), &format!("m{i}"), 2_000 + 20 * i));
        assert_eq!(
            r == Outcome::Done,
            (i as usize) < MAX_TOKEN_KEYS - 1,
            "rotation {i}: {r:?}"
        );
    }
    // Through a snapshot, and from a state stored before keys rotated.
    let again = ClusterState::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(again.token_keys, s.token_keys);
    let mut old: serde_json::Value =
        serde_json::from_slice(&ClusterState::default().to_snapshot()).unwrap();
    old["token_key"] = serde_json::Value::String(seed("00"));
    let old = ClusterState::from_snapshot(&serde_json::to_vec(&old).unwrap()).unwrap();
    assert_eq!(old.token_keys.len(), 1);
    assert_eq!(old.token_group, group);
    assert!(!String::from_utf8(old.to_snapshot())
        .unwrap()
        .contains("\"token_key\""));
}

#[test]
fn queue_configuration_is_validated() {
    let q = QueueSpec::named;
    let mut s = ClusterState::default();
    assert_eq!(
        s.apply(&Command::SetQueues {
            queues: vec![q("root"), q("root.a")]
        }),
        Outcome::Done
    );
    assert_eq!(s.queues.len(), 2);
    assert!(matches!(
        s.apply(&Command::SetQueues {
            queues: vec![q("other")]
        }),
        Outcome::Rejected(_)
    ));
    assert!(matches!(
        s.apply(&Command::SetQueues {
            queues: vec![q("root.a"), q("root.a")]
        }),
        Outcome::Rejected(_)
    ));
    assert_eq!(s.queues.len(), 2, "a refused change changes nothing");
}

/// Random command streams (a small deterministic generator): after every
/// command the invariants hold, whatever was accepted or refused.
#[test]
fn invariants_hold_under_random_command_streams() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _run in 0..50 {
        let mut s = ClusterState::default();
        let mut accepted = 0;
        for step in 0..300 {
            let cmd = match rnd(12) {
                0 => node(
                    &format!("n{}", rnd(4)),
                    1000 * (1 + rnd(8)),
                    (1 + rnd(16)) << 30,
                    rnd(4) as u32,
                ),
                1 => submit(&format!("r{}", rnd(50)), step),
                2 => Command::SetNodeState {
                    node_id: format!("n{}", rnd(4)),
                    state: if rnd(2) == 0 {
                        NodeState::Lost
                    } else {
                        NodeState::Running
                    },
                    at_ms: step,
                },
                3 => Command::ContainersCompleted {
                    completions: vec![Completion {
                        container_id: format!("c{}", rnd(200)),
                        state: ContainerEnd::Succeeded,
                        exit_status: 0,
                        diagnostic: String::new(),
                    }],
                    still_running: false,
                    at_ms: step,
                },
                // The RM ends one that may run: it holds its node.
                4 => Command::ContainersCompleted {
                    completions: vec![Completion {
                        container_id: format!("c{}", rnd(200)),
                        state: ContainerEnd::Killed,
                        exit_status: -105,
                        diagnostic: String::new(),
                    }],
                    still_running: true,
                    at_ms: step,
                },
                5 => Command::ContainersLaunched {
                    container_ids: vec![format!("c{}", rnd(200))],
                    at_ms: step,
                },
                6 if rnd(2) == 0 => Command::PreemptContainers {
                    preemptions: vec![Preemption {
                        container_id: format!("c{}", rnd(200)),
                        grace_ms: rnd(5000),
                        diagnostic: String::new(),
                    }],
                    at_ms: step,
                },
                6 => Command::ContainersStopped {
                    container_ids: vec![format!("c{}", rnd(200))],
                },
                7 => Command::KillApplication {
                    app_id: format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                    at_ms: step,
                },
                8 => Command::AttemptStarted {
                    app_id: format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                    attempt: 1 + rnd(3) as u32,
                    am_container: None,
                    keep_containers: rnd(2) == 0,
                    previous_lost: false,
                    at_ms: step,
                },
                9 if rnd(2) == 0 => Command::PruneContainers {
                    finished_before_ms: step,
                },
                9 => Command::PruneApplications {
                    finished_before_ms: step,
                    keep: rnd(4),
                },
                _ => Command::ContainersAllocated {
                    allocations: (0..1 + rnd(3))
                        .map(|_| {
                            let gpus: Vec<u32> = if rnd(3) == 0 {
                                vec![rnd(4) as u32]
                            } else {
                                vec![]
                            };
                            alloc(
                                &format!("c{}", rnd(200)),
                                &format!("app-{:06}", 1 + rnd(s.app_seq.max(1))),
                                &format!("n{}", rnd(4)),
                                500 * (1 + rnd(4)),
                                (1 + rnd(4)) << 30,
                                &gpus,
                            )
                        })
                        .collect(),
                    at_ms: step,
                },
            };
            let before = s.containers.len();
            s.apply(&cmd);
            if matches!(cmd, Command::ContainersAllocated { .. }) && s.containers.len() > before {
                accepted += 1;
            }
            s.check_invariants()
                .unwrap_or_else(|e| panic!("after {cmd:?}: {e}"));
        }
        assert!(
            accepted > 0,
            "the generator exercises successful allocations"
        );
    }
}

#[test]
fn envelope_round_trip_and_version_check() {
    let e = Envelope {
        version: COMMAND_VERSION,
        origin: 2,
        request: 7,
        command: submit("x", 1),
    };
    assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
    let mut v2 = e.clone();
    v2.version = 99;
    assert!(Envelope::decode(&v2.encode())
        .unwrap_err()
        .contains("version 99"));
}

/// A drain is the operator's: the node stays DRAINING when its agent
/// registers again (an agent restart) and when it comes back after being
/// declared lost; a node never drained comes back RUNNING.
#[test]
fn a_drain_survives_re_registration_and_loss() {
    let mut st = ClusterState::default();
    for id in ["n1", "n2"] {
        assert_eq!(st.apply(&node(id, 4000, 8 << 30, 0)), Outcome::Done);
    }
    let set = |id: &str, state, at_ms| Command::SetNodeState {
        node_id: id.into(),
        state,
        at_ms,
    };
    assert_eq!(st.apply(&set("n1", NodeState::Draining, 3)), Outcome::Done);
    assert_eq!(st.apply(&node("n1", 4000, 8 << 30, 0)), Outcome::Done);
    assert_eq!(st.nodes["n1"].state, NodeState::Draining);
    for id in ["n1", "n2"] {
        assert_eq!(st.apply(&set(id, NodeState::Lost, 4)), Outcome::Done);
        assert_eq!(st.apply(&node(id, 4000, 8 << 30, 0)), Outcome::Done);
    }
    assert_eq!(st.nodes["n1"].state, NodeState::Draining);
    assert_eq!(st.nodes["n2"].state, NodeState::Running);
    let back = ClusterState::from_snapshot(&st.to_snapshot()).unwrap();
    assert_eq!(back, st);
    assert!(back.nodes["n1"].drain && !back.nodes["n2"].drain);
}

/// Finished applications are dropped by age and beyond the newest `keep`,
/// with their ended containers and request ids; running ones, and finished
/// ones whose containers still hold a node, stay; ids are never reused.
#[test]
fn finished_applications_are_pruned_by_age_and_count() {
    let mut s = ClusterState::default();
    s.apply(&node("n1", 8000, 8 << 30, 0));
    for (i, req) in ["r1", "r2", "r3", "r4", "r5"].iter().enumerate() {
        s.apply(&submit(req, i as u64));
    }
    let id = |n: u64| format!("app-{n:06}");
    // app 4 holds a container on n1 (launched, never stopped).
    assert_eq!(
        allocate(&mut s, vec![alloc("c4", &id(4), "n1", 500, 1 << 20, &[])]),
        Outcome::Done
    );
    s.apply(&Command::ContainersLaunched {
        container_ids: vec!["c4".into()],
        at_ms: 5,
    });
    // 1..4 finish at 10, 20, 30, 40; 5 runs.
    for n in 1..=4u64 {
        s.apply(&Command::ApplicationFinished {
            app_id: id(n),
            state: AppState::Succeeded,
            diagnostics: String::new(),
            stages: vec![],
            at_ms: n * 10,
        });
    }
    let prune = |before, keep| Command::PruneApplications {
        finished_before_ms: before,
        keep,
    };
    // By age: 1 finished before 15.
    s.apply(&prune(15, 100));
    let left = |s: &ClusterState| s.apps.keys().map(|k| k.to_string()).collect::<Vec<_>>();
    assert_eq!(left(&s), [id(2), id(3), id(4), id(5)]);
    assert!(!s.submissions.contains_key("r1"));
    // By count: keep the newest finished one; 2 and 3 go, 4 holds a node.
    s.apply(&prune(0, 1));
    assert_eq!(left(&s), [id(4), id(5)]);
    assert_eq!(
        s.submissions.keys().cloned().collect::<Vec<_>>(),
        ["r4", "r5"]
    );
    s.check_invariants().unwrap();
    // Once it lets go of its node, 4 goes too; 5 never (it runs).
    s.apply(&Command::ContainersStopped {
        container_ids: vec!["c4".into()],
    });
    s.apply(&prune(1000, 0));
    assert_eq!(left(&s), [id(5)]);
    assert!(s.containers.is_empty() && s.app_containers.is_empty());
    // A retry of a pruned submission is a new application; no id returns.
    assert_eq!(
        s.apply(&submit("r1", 50)),
        Outcome::Submitted { app_id: id(6) }
    );
    s.check_invariants().unwrap();
    assert_eq!(ClusterState::from_snapshot(&s.to_snapshot()).unwrap(), s);
}

#[test]
fn acl_tokens_bootstrap_once_and_are_made_and_revoked() {
    let token = |accessor: &str, user: &str| AclToken {
        accessor: accessor.into(),
        secret_sha256: format!("{accessor}{}", "0".repeat(48)),
        user: user.into(),
        admin: false,
        description: String::new(),
        created_at_ms: 1,
        expires_at_ms: 0,
    };
    let mut s = ClusterState::default();
    let boot = Command::AclBootstrap {
        token: token("aaaaaaaaaaaaaaaa", "admin"),
    };
    assert_eq!(s.apply(&boot), Outcome::Done);
    assert!(s.acl_bootstrapped);
    // Once only, even after its token is gone.
    assert_eq!(
        s.apply(&Command::AclTokenRevoke {
            accessor: "aaaaaaaaaaaaaaaa".into()
        }),
        Outcome::Done
    );
    assert!(matches!(s.apply(&boot), Outcome::Rejected(m) if m.contains("bootstrapped already")));
    assert!(s.acl_tokens.is_empty());
    let alice = Command::AclTokenCreate {
        token: token("bbbbbbbbbbbbbbbb", "alice"),
    };
    assert_eq!(s.apply(&alice), Outcome::Done);
    assert!(matches!(s.apply(&alice), Outcome::Rejected(m) if m.contains("exists already")));
    assert!(matches!(
        s.apply(&Command::AclTokenRevoke { accessor: "cccc".into() }),
        Outcome::Rejected(m) if m == "accessor: no token cccc"
    ));
    // Expired ones go when pruned; those that never expire stay.
    let mut short = token("dddddddddddddddd", "bob");
    short.expires_at_ms = 500;
    s.apply(&Command::AclTokenCreate { token: short });
    assert_eq!(s.acl_tokens.len(), 2);
    s.apply(&Command::AclTokensPrune {
        expired_before_ms: 400,
    });
    assert_eq!(s.acl_tokens.len(), 2, "not expired before 400");
    s.apply(&Command::AclTokensPrune {
        expired_before_ms: 600,
    });
    assert_eq!(
        s.acl_tokens.keys().collect::<Vec<_>>(),
        vec!["bbbbbbbbbbbbbbbb"]
    );
    // Kept through a snapshot.
    let back = ClusterState::from_snapshot(&s.stored_part().to_snapshot()).unwrap();
    assert_eq!(back.acl_tokens, s.acl_tokens);
    assert!(back.acl_bootstrapped);
}

#[test]
fn a_request_id_names_only_its_own_users_submission() {
    let mut s = ClusterState::default();
    assert_eq!(
        s.apply(&submit("r1", 10)),
        Outcome::Submitted {
            app_id: "app-000001".into()
        }
    );
    // The same id from another user: refused, nothing made, nothing named.
    let mut other = submit("r1", 11);
    if let Command::SubmitApplication { user, .. } = &mut other {
        *user = "mallory".into();
    }
    assert!(matches!(
        s.apply(&other),
        Outcome::Rejected(m) if m.starts_with("request_id: \"r1\" is another submission's")
    ));
    assert_eq!(s.apps.len(), 1);
    // Its own user's retry still gets the application.
    assert_eq!(
        s.apply(&submit("r1", 12)),
        Outcome::Submitted {
            app_id: "app-000001".into()
        }
    );
}
