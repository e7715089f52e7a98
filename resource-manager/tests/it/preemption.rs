//! Preemption on a 3-member RM group with two real node agents (8 cores
//! each) and RM-launched masters: queue a fills the cluster, queue b (each
//! guaranteed half) submits; b's tasks start once a's victims are stopped,
//! a's victims got SIGTERM with a notice file first, wrote a checkpoint,
//! were requeued without using a retry and resumed from it on whichever
//! node they landed on (the agents share a checkpoint directory), and every
//! job finishes. Then: a gang goes whole, a queue that lets priorities
//! preempt does so only below the waiting priority, and an ask that could
//! not fit within its queue's guarantee preempts nothing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weft_client::proto as pb;

use crate::apps::{app_master, wait_state};
use crate::cluster::Cluster;
use crate::nodes::AgentProcess;

const NODES: [&str; 2] = ["pre-a", "pre-b"];

/// a's task: counts `STEPS` steps of 0.2 s from its checkpoint (if any);
/// on SIGTERM notes whether its notice file says it is preempted, writes
/// its step as its checkpoint and exits. Each line of `DIR/log`:
/// `event label index container step time notice`.
const TASK: &str = r#"
import os, signal, sys, time
d, steps, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
idx, cid = os.environ["WEFT_TASK_INDEX"], os.environ["WEFT_CONTAINER_ID"]
ck = os.path.join(os.environ["WEFT_CHECKPOINT_DIR"], "step")
assert os.path.realpath(os.path.join(os.environ["WEFT_WORK_DIR"], "checkpoint")) == os.path.realpath(os.environ["WEFT_CHECKPOINT_DIR"])
step = int(open(ck).read()) if os.path.exists(ck) else 0
def note(event, notice="-"):
    with open(os.path.join(d, "log"), "a") as f:
        f.write("%s %s %s %s %d %.3f %s\n" % (event, label, idx, cid, step, time.time(), notice))
def term(*_):
    text = open(os.environ["WEFT_NOTICE_FILE"]).read()
    with open(ck + ".tmp", "w") as f:
        f.write(str(step))
    os.rename(ck + ".tmp", ck)
    note("term", "preempted" if "WEFT_PREEMPTED=1" in text.splitlines() else "no-notice")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
note("start")
while step < steps:
    time.sleep(0.2)
    step += 1
note("done")
"#;

/// One event of the tasks' log.
#[derive(Debug, Clone)]
struct Event {
    what: String,
    label: String,
    index: u32,
    container: String,
    step: u32,
    at: f64,
    notice: String,
}

fn events(dir: &std::path::Path) -> Vec<Event> {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(Event {
                what: f.first()?.to_string(),
                label: f.get(1)?.to_string(),
                index: f.get(2)?.parse().ok()?,
                container: f.get(3)?.to_string(),
                step: f.get(4)?.parse().ok()?,
                at: f.get(5)?.parse().ok()?,
                notice: f.get(6)?.to_string(),
            })
        })
        .collect()
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A 3-member group (queues root.a and root.b, each guaranteed 8 of the 16
/// cores, `a_extra` added to root.a's table; preemption on, no minimum
/// runtime) and two agents sharing a checkpoint directory; `task.py` in
/// the returned directory.
async fn start(a_extra: &str) -> (tempfile::TempDir, Cluster, Vec<AgentProcess>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("task.py"), TASK).unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let extra = format!(
        "[[queues]]\nname = \"root\"\n\
         [[queues]]\nname = \"root.a\"\nguaranteed = {{ vcores = 8.0 }}\n{a_extra}\
         [[queues]]\nname = \"root.b\"\nguaranteed = {{ vcores = 8.0 }}\n\
         [preemption]\nenabled = true\nmin_runtime = \"0s\"\nmax_per_hour = 3\n\
         [masters]\nlaunch = true\ncommand = {:?}\n",
        app_master().display().to_string()
    );
    let cluster = Cluster::start_with(3, 1000, &extra);
    cluster.leader().await;
    let agents: Vec<AgentProcess> = NODES
        .iter()
        .map(|n| {
            AgentProcess::start_with(
                n,
                &cluster.addrs(),
                "127.0.0.1",
                "gpu = \"h100\"",
                &format!("[containers]\ncheckpoint_dir = {checkpoints:?}\n"),
            )
        })
        .collect();
    crate::cluster::wait_nodes(&cluster.client(), NODES.len()).await;
    (dir, cluster, agents)
}

/// Waits (bounded) until `n` tasks labelled `label` have started.
async fn wait_started(dir: &std::path::Path, label: &str, n: usize) {
    let t = Instant::now();
    loop {
        let started = events(dir)
            .iter()
            .filter(|e| e.what == "start" && e.label == label)
            .count();
        if started >= n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{label}: {started} of {n} tasks started: {:#?}",
            events(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_under_its_guarantee_takes_capacity_back_and_the_victims_resume_from_their_checkpoints(
) {
    let (dir, cluster, agents) = start("").await;
    let checkpoints = dir.path().join("checkpoints");
    let client = cluster.client();

    // a: 7 tasks of 2 cores (14 of the 16, with its master's half core),
    // 60 steps (12 s) each, 3 s to checkpoint when preempted.
    let a_spec = format!(
        "name: filler\nqueue: root.a\nstages:\n  - name: work\n    instances: 7\n    preemption_grace: 3s\n    command: 'exec python3 {task} {dir} 60 a'\n    resources: {{ vcores: 2, memory: 64MiB }}\n",
        task = dir.path().join("task.py").display(),
        dir = dir.path().display(),
    );
    let a = client.submit(&a_spec, "yaml", "ann").await.unwrap();
    // Submitted the instant a is running all seven.
    wait_started(dir.path(), "a", 7).await;
    // b: 2 tasks of 2 cores; its master fits in the room left, its tasks
    // only by preempting two of a's.
    let b_dir = dir.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let b_spec = format!(
        "name: urgent\nqueue: root.b\nstages:\n  - name: run\n    instances: 2\n    command: 'date +%s.%N > {b}/start-$WEFT_TASK_INDEX; sleep 1'\n    resources: {{ vcores: 2, memory: 64MiB }}\n",
        b = b_dir.display()
    );
    let submitted = now_s();
    let b = client.submit(&b_spec, "yaml", "bob").await.unwrap();
    let b_done = wait_state(&client, &b, Duration::from_secs(60)).await;
    assert_eq!(
        b_done.state(),
        pb::ApplicationState::Succeeded,
        "{b_done:?}"
    );
    let b_started: Vec<f64> = (0..2)
        .map(|i| {
            std::fs::read_to_string(b_dir.join(format!("start-{i}")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();

    let a_done = wait_state(&client, &a, Duration::from_secs(120)).await;
    let log = events(dir.path());
    assert_eq!(
        a_done.state(),
        pb::ApplicationState::Succeeded,
        "{a_done:?}\n{log:#?}"
    );
    // Exactly two victims, each told by its notice file before SIGTERM's
    // handler ran, each at a checkpoint it wrote.
    // (One line per container: a handler run twice would write two.)
    let mut terms: Vec<&Event> = log.iter().filter(|e| e.what == "term").collect();
    terms.sort_by(|a, b| a.container.cmp(&b.container));
    terms.dedup_by(|a, b| a.container == b.container);
    assert_eq!(terms.len(), 2, "{log:#?}");
    assert_eq!(a_done.preempted, 2, "{a_done:?}");
    for v in &terms {
        assert_eq!(v.notice, "preempted", "{v:?}");
        assert!(v.step > 0 && v.step < 60, "{v:?}");
        // Its task ran again (a new container) from the step it saved,
        // and finished.
        let resumed = log
            .iter()
            .find(|e| e.what == "start" && e.index == v.index && e.container != v.container)
            .unwrap_or_else(|| panic!("task {} was not rerun: {log:#?}", v.index));
        assert_eq!(resumed.step, v.step, "resumed from its checkpoint");
        assert!(resumed.at > v.at);
        assert!(
            log.iter().any(|e| e.what == "done"
                && e.index == v.index
                && e.container == resumed.container),
            "{log:#?}"
        );
        // b ran before the victim came back.
        assert!(
            b_started.iter().all(|&s| s < resumed.at + 1.0),
            "{b_started:?} {resumed:?}"
        );
    }
    // Every task finished once; the preempted ones used no retry.
    let mut done: Vec<u32> = log
        .iter()
        .filter(|e| e.what == "done")
        .map(|e| e.index)
        .collect();
    done.sort();
    assert_eq!(done, (0..7).collect::<Vec<u32>>(), "{log:#?}");
    assert_eq!(a_done.stages[0].failed, 0, "{a_done:?}");
    // b's tasks started within the grace (3 s) and a few rounds of the
    // victims' SIGTERM.
    let first_term = terms.iter().map(|e| e.at).fold(f64::MAX, f64::min);
    let last_start = b_started.iter().copied().fold(0.0, f64::max);
    println!(
        "b submitted -> victims' SIGTERM {:.2} s -> b's tasks both running {:.2} s after it ({:.2} s after submit)",
        first_term - submitted,
        last_start - first_term,
        last_start - submitted
    );
    assert!(first_term > submitted, "nothing preempted before b asked");
    assert!(
        last_start - first_term < 3.0 + 3.0,
        "{first_term} {b_started:?}"
    );
    // The victims' checkpoints are where the agents keep them: one
    // directory per task under the application's.
    for v in &terms {
        let saved = checkpoints
            .join(&a)
            .join(format!("work+{}", v.index))
            .join("step");
        assert_eq!(
            std::fs::read_to_string(&saved).unwrap(),
            v.step.to_string(),
            "{}",
            saved.display()
        );
    }
    drop(agents);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_goes_whole_only_lower_priorities_go_and_an_ask_that_cannot_fit_takes_nothing() {
    // root.a lets a higher priority preempt a lower one of it.
    let (dir, cluster, agents) = start("priority_preemption = true\n").await;
    let client = cluster.client();
    let task = |label: &str, steps: u32| {
        format!(
            "exec python3 {} {} {steps} {label}",
            dir.path().join("task.py").display(),
            dir.path().display()
        )
    };
    // root.a full: a priority-1 gang of two 4-core tasks, then (once it
    // runs) a priority-9 job of two 2-core tasks: 13 of 16 cores with
    // their masters, all running (a task of the priority-9 job that did not
    // fit would preempt the gang at once, as it should).
    let gang = client
        .submit(
            &format!(
                "name: low-gang\nqueue: root.a\npriority: 1\nstages:\n  - name: train\n    instances: 2\n    gang: true\n    preemption_grace: 3s\n    command: '{}'\n    resources: {{ vcores: 4, memory: 64MiB }}\n",
                task("gang", 100)
            ),
            "yaml",
            "ann",
        )
        .await
        .unwrap();
    wait_started(dir.path(), "gang", 2).await;
    let high = client
        .submit(
            &format!(
                "name: high\nqueue: root.a\npriority: 9\nstages:\n  - name: work\n    instances: 2\n    command: '{}'\n    resources: {{ vcores: 2, memory: 64MiB }}\n",
                task("high", 100)
            ),
            "yaml",
            "ann",
        )
        .await
        .unwrap();
    wait_started(dir.path(), "high", 2).await;

    // root.b asks for a gang of five 2-core tasks: 10 cores, more than its
    // guarantee of 8; preempting would not make it fit within it: nothing
    // goes while it waits, and it is killed waiting.
    let big = client
        .submit(
            "name: too-big\nqueue: root.b\nstages:\n  - name: t\n    instances: 5\n    gang: true\n    command: 'true'\n    resources: { vcores: 2, memory: 64MiB }\n",
            "yaml",
            "bob",
        )
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let r = client.get_application(&big).await.unwrap();
        if r.state() == pb::ApplicationState::Running && !r.am_node_id.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its master asks within a second of starting; three more rounds' worth.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let terms = |label: &str| {
        let mut v: Vec<Event> = events(dir.path())
            .into_iter()
            .filter(|e| e.what == "term" && e.label == label)
            .collect();
        v.sort_by(|a, b| a.container.cmp(&b.container));
        v.dedup_by(|a, b| a.container == b.container);
        v
    };
    assert!(
        terms("gang").is_empty() && terms("high").is_empty(),
        "preempted for an ask that could not fit: {:#?}",
        events(dir.path())
    );
    client.kill_application(&big).await.unwrap();
    assert_eq!(
        wait_state(&client, &big, Duration::from_secs(30))
            .await
            .state(),
        pb::ApplicationState::Killed
    );

    // A priority-5 job in root.a (3 cores free, 4 asked): only the
    // priority-1 gang is below it, and it goes whole (one 4-core member
    // would have made room).
    let b_dir = dir.path().join("p5");
    std::fs::create_dir(&b_dir).unwrap();
    let urgent = client
        .submit(
            &format!(
                "name: urgent\nqueue: root.a\npriority: 5\nstages:\n  - name: run\n    instances: 1\n    command: 'touch {}/ran; sleep 1'\n    resources: {{ vcores: 4, memory: 64MiB }}\n",
                b_dir.display()
            ),
            "yaml",
            "ann",
        )
        .await
        .unwrap();
    let done = wait_state(&client, &urgent, Duration::from_secs(60)).await;
    assert_eq!(done.state(), pb::ApplicationState::Succeeded, "{done:?}");
    assert!(b_dir.join("ran").exists());
    let gone = terms("gang");
    assert_eq!(gone.len(), 2, "the gang whole: {:#?}", events(dir.path()));
    assert!(gone.iter().all(|e| e.notice == "preempted"), "{gone:#?}");
    assert!(terms("high").is_empty(), "{:#?}", events(dir.path()));

    // The gang reruns as a gang from its members' checkpoints; every job
    // ends well, with no retry used.
    for (app, preempted) in [(&gang, 2), (&high, 0)] {
        let r = wait_state(&client, app, Duration::from_secs(90)).await;
        assert_eq!(r.state(), pb::ApplicationState::Succeeded, "{r:?}");
        assert_eq!(r.preempted, preempted, "{r:?}");
        assert_eq!(r.stages[0].failed, 0, "{r:?}");
    }
    let log = events(dir.path());
    for v in &gone {
        let resumed = log
            .iter()
            .find(|e| {
                e.what == "start"
                    && e.label == "gang"
                    && e.index == v.index
                    && e.container != v.container
            })
            .unwrap_or_else(|| panic!("gang member {} not rerun: {log:#?}", v.index));
        assert_eq!(resumed.step, v.step, "{log:#?}");
    }
    drop(agents);
    drop(cluster);
}
