//! A day of synthetic ML work on 1,000 simulated nodes (10% GPU nodes),
//! replayed in simulated time through the real scheduler: pipelines
//! (preprocess -> train gang -> evaluate), distributed-training gangs,
//! fractional-GPU notebooks and CPU batch jobs, in three queues with
//! different guarantees. Prints utilisation, each queue's share against its
//! guarantee while queues compete, and wait-time percentiles; asserts that
//! every job finishes and nothing was over-given. The day is replayed
//! twice: without preemption, then with it (the leader's planner after
//! every round; victims checkpoint and are requeued with the work they had
//! left), and each queue's time to its guarantee is compared: from a round
//! where it is under its guarantee with an ask waiting that would keep it
//! within it, to the first round where it no longer is.
//!
//! `cargo test --release -p weft-resource-manager --test simulation -- --nocapture`

use std::collections::{HashMap, VecDeque};

use weft_resource_manager::scheduler::preempt::{self, Running, Settings};
use weft_resource_manager::scheduler::workload::{self, Rng};
use weft_resource_manager::scheduler::{
    schedule_with, Ask, Assignment, Cluster, GpuAsk, Placement, Res, Reservations,
};

const GIB: u64 = 1 << 30;
const MIN: u64 = 60;
const DAY: u64 = 24 * 60 * MIN;
/// A scheduling round every simulated minute.
const ROUND: u64 = MIN;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Pipeline,
    Training,
    Notebook,
    Batch,
}

/// One stage of a job: `tasks` asks like `shape`, each running `duration`.
struct Stage {
    shape: Ask,
    tasks: usize,
    gang: bool,
    duration: u64,
}

struct Job {
    kind: Kind,
    stages: VecDeque<Stage>,
    /// Tasks of the current stage still running or pending.
    left: usize,
}

fn stage(
    queue: usize,
    cores: u64,
    mem_gib: u64,
    gpu: GpuAsk,
    tasks: usize,
    gang: bool,
    minutes: u64,
) -> Stage {
    let mut shape = Ask::new(0, queue, cores * 1000, mem_gib * GIB);
    shape.gpu = gpu;
    Stage {
        shape,
        tasks,
        gang,
        duration: minutes * MIN,
    }
}

fn make_job(kind: Kind, queue: usize, rng: &mut Rng) -> Job {
    let mut stages = VecDeque::new();
    match kind {
        Kind::Pipeline => {
            stages.push_back(stage(
                queue,
                2,
                8,
                GpuAsk::None,
                8,
                false,
                10 + rng.below(20),
            ));
            stages.push_back(stage(
                queue,
                8,
                64,
                GpuAsk::Whole(1),
                4,
                true,
                30 + rng.below(60),
            ));
            stages.push_back(stage(queue, 2, 8, GpuAsk::None, 1, false, 5));
        }
        Kind::Training => {
            let n = [2usize, 4, 8][rng.below(3) as usize];
            stages.push_back(stage(
                queue,
                12,
                96,
                GpuAsk::Whole(8),
                n,
                true,
                60 + rng.below(120),
            ));
        }
        Kind::Notebook => stages.push_back(stage(
            queue,
            4,
            16,
            GpuAsk::Share {
                milli: 250,
                memory: 10 * GIB,
            },
            1,
            false,
            60 + rng.below(120),
        )),
        Kind::Batch => stages.push_back(stage(
            queue,
            1 + rng.below(8),
            4 + rng.below(28),
            GpuAsk::None,
            1 + rng.below(32) as usize,
            false,
            5 + rng.below(55),
        )),
    }
    Job {
        kind,
        stages,
        left: 0,
    }
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A container runs this long before it may be preempted.
const MIN_RUNTIME: u64 = 10 * MIN;

/// What a replay measured.
struct Outcome {
    gpu_util: f64,
    /// Per queue: its times to its guarantee (s).
    to_guarantee: Vec<Vec<u64>>,
    preempted: usize,
}

#[test]
fn a_day_of_ml_work_on_1000_nodes() {
    let before = replay(false);
    let after = replay(true);
    println!(
        "time to guarantee (a queue under its guarantee with an ask that fits in it -> no longer):"
    );
    for q in 1..=3 {
        let (mut b, mut a) = (
            before.to_guarantee[q].clone(),
            after.to_guarantee[q].clone(),
        );
        println!(
            "  root.q{}: without preemption n={} p50 {} min, p99 {} min; with it n={} p50 {} min, p99 {} min",
            q - 1,
            b.len(),
            pct(&mut b, 0.5) / MIN,
            pct(&mut b, 0.99) / MIN,
            a.len(),
            pct(&mut a, 0.5) / MIN,
            pct(&mut a, 0.99) / MIN,
        );
    }
    println!(
        "GPU utilisation over the first day: {:.1}% without preemption, {:.1}% with it ({} containers preempted)",
        before.gpu_util, after.gpu_util, after.preempted
    );
    assert_eq!(before.preempted, 0);
    assert!(after.preempted > 0, "the workload made queues reclaim");
    let worst = |o: &Outcome| {
        (1..=3)
            .map(|q| pct(&mut o.to_guarantee[q].clone(), 0.99))
            .max()
            .unwrap_or(0)
    };
    assert!(
        worst(&after) < worst(&before),
        "preemption shortens the worst queue's p99 time to its guarantee ({} vs {} s)",
        worst(&after),
        worst(&before)
    );
}

fn replay(preemption: bool) -> Outcome {
    println!(
        "--- {} preemption",
        if preemption { "with" } else { "without" }
    );
    let mut rng = Rng::new(7);
    let mut cluster = Cluster::new(workload::cluster(1000, 0.10, &mut rng));
    let capacity = cluster.capacity();
    // research 50%, prod 30%, adhoc 20% guaranteed.
    let mut queues = workload::queues(capacity, &[5, 3, 2]);
    let guarantee: Vec<f64> = (1..=3)
        .map(|q| queues.confs[q].guaranteed.dominant_share(capacity))
        .collect();

    // Arrivals: each queue submits more than its guarantee at the day's peak.
    let mut arrivals: Vec<(u64, Kind, usize)> = Vec::new();
    for q in 1..=3usize {
        let rate = [0.0, 1.6, 1.0, 0.8][q]; // jobs per minute at peak
        let mut t = 0;
        while t < DAY * 3 / 4 {
            let peak = if (8 * 60 * MIN..20 * 60 * MIN).contains(&t) {
                1.0
            } else {
                0.4
            };
            if rng.chance(rate * peak / 2.0) {
                let kind = match rng.below(10) {
                    0..=1 => Kind::Pipeline,
                    2 => Kind::Training,
                    3..=4 => Kind::Notebook,
                    _ => Kind::Batch,
                };
                arrivals.push((t, kind, q));
            }
            t += 30;
        }
    }
    arrivals.sort_by_key(|a| a.0);
    let mut arrivals: VecDeque<_> = arrivals.into();

    let mut jobs: Vec<Job> = Vec::new();
    // ask, submitted at, job, work left (s; None: the stage's, not yet run)
    let mut pending: Vec<(Ask, u64, usize, Option<u64>)> = Vec::new();
    // ends at, ask, where, job, started at
    let mut running: Vec<(u64, Ask, Assignment, usize, u64)> = Vec::new();
    // Preempted last round: they stop (checkpointed) before this one.
    let mut stopping: Vec<usize> = Vec::new();
    let mut preempted = 0usize;
    let mut starving_since: [Option<u64>; 4] = [None; 4];
    let mut to_guarantee: Vec<Vec<u64>> = vec![Vec::new(); 4];
    let mut waits: HashMap<Kind, Vec<u64>> = HashMap::new();
    let mut next_id = 0u64;
    let mut gang_seq = 0u64;
    let (mut util_sum, mut util_n) = (Res::ZERO, 0u64);
    let mut share_sum = [0.0f64; 4];
    let mut contended_rounds = 0u64;
    let mut finished = 0usize;
    let mut placements = 0usize;
    let mut reservations = Reservations::default();

    let mut now = 0u64;
    while now < 3 * DAY && (now < DAY || !pending.is_empty() || !running.is_empty()) {
        // Preempted ones stop: requeued with the work they had left (they
        // checkpointed in their grace).
        stopping.sort_unstable();
        for i in stopping.drain(..).rev() {
            let (end, ask, asg, job, _) = running.swap_remove(i);
            cluster.give_back(asg.node, &ask, &asg.gpus);
            queues.refund(ask.queue, &ask.user, ask.res());
            pending.push((ask, now, job, Some(end.saturating_sub(now).max(1))));
        }
        // Ends.
        let mut i = 0;
        while i < running.len() {
            if running[i].0 <= now {
                let (_, ask, asg, job, _) = running.swap_remove(i);
                cluster.give_back(asg.node, &ask, &asg.gpus);
                queues.refund(ask.queue, &ask.user, ask.res());
                let j = &mut jobs[job];
                j.left -= 1;
                if j.left == 0 {
                    j.stages.pop_front();
                    if j.stages.is_empty() {
                        finished += 1;
                    } else {
                        j.left = usize::MAX; // submit the next stage below
                    }
                }
            } else {
                i += 1;
            }
        }
        // Arrivals.
        while arrivals.front().is_some_and(|a| a.0 <= now) {
            let (_, kind, q) = arrivals.pop_front().unwrap();
            let mut j = make_job(kind, q, &mut rng);
            j.left = usize::MAX;
            jobs.push(j);
        }
        // Stages ready to submit.
        for (ji, j) in jobs.iter_mut().enumerate() {
            if j.left != usize::MAX {
                continue;
            }
            let s = j
                .stages
                .front()
                .expect("a job with a pending stage has one");
            gang_seq += 1;
            for k in 0..s.tasks {
                let mut a = s.shape.clone();
                a.id = next_id;
                a.seq = next_id;
                next_id += 1;
                if s.gang {
                    a.gang = Some(gang_seq);
                    if k == 0 {
                        a.placement = Placement::Spread;
                    }
                }
                pending.push((a, now, ji, None));
            }
            j.left = s.tasks;
        }
        // A round.
        let asks: Vec<Ask> = pending.iter().map(|p| p.0.clone()).collect();
        let (out, _) = schedule_with(&mut cluster, &mut queues, &asks, &mut reservations);
        placements += out.len();
        let placed: HashMap<u64, Assignment> = out.into_iter().map(|a| (a.ask, a)).collect();
        pending.retain(|(a, at, job, left)| match placed.get(&a.id) {
            Some(asg) => {
                let j = &jobs[*job];
                let duration = match left {
                    Some(d) => *d,
                    None => {
                        waits.entry(j.kind).or_default().push(now - at);
                        j.stages.front().unwrap().duration
                    }
                };
                running.push((now + duration, a.clone(), asg.clone(), *job, now));
                false
            }
            None => true,
        });
        // Preemption: the planner over what the round left waiting.
        if preemption {
            let candidates: Vec<Running> = running
                .iter()
                .map(|(_, a, asg, _, started)| Running {
                    node: asg.node,
                    queue: a.queue,
                    user: a.user.clone(),
                    priority: a.priority,
                    started_ms: started * 1000,
                    res: a.res(),
                    grants: asg.gpus.clone(),
                    ports: a.ports,
                    gang: a.gang,
                    group: 0,
                    protected: now - started < MIN_RUNTIME,
                })
                .collect();
            let waiting: Vec<Ask> = pending
                .iter()
                .map(|p| p.0.clone())
                .filter(|a| queues.within_guarantee(a.queue, a.res(), capacity))
                .collect();
            let victims = preempt::plan(
                &cluster,
                &queues,
                &waiting,
                &candidates,
                &[],
                &Settings::default(),
            );
            preempted += victims.len();
            stopping.extend(victims.iter().map(|v| v.running));
        }
        // Time to guarantee.
        for (q, since) in starving_since.iter_mut().enumerate().skip(1) {
            let starving = pending
                .iter()
                .any(|p| p.0.queue == q && queues.within_guarantee(q, p.0.res(), capacity));
            match (starving, *since) {
                (true, None) => *since = Some(now),
                (false, Some(t)) => {
                    to_guarantee[q].push(now - t);
                    *since = None;
                }
                _ => {}
            }
        }
        // Measurements.
        let used = cluster.used();
        assert!(
            used.fits_in(capacity),
            "over-given: {used:?} of {capacity:?}"
        );
        if now < DAY {
            util_sum = util_sum.plus(used);
            util_n += 1;
        }
        let wanting: Vec<bool> = (0..4)
            .map(|q| pending.iter().any(|p| p.0.queue == q))
            .collect();
        if (1..=3).filter(|&q| wanting[q]).count() >= 2 && used.dominant_share(capacity) > 0.85 {
            contended_rounds += 1;
            for (q, sum) in share_sum.iter_mut().enumerate().skip(1) {
                *sum += queues.usage[q].dominant_share(capacity);
            }
        }
        now += ROUND;
    }

    let util = |u: u64, c: u64| {
        if c == 0 {
            0.0
        } else {
            u as f64 / util_n as f64 / c as f64 * 100.0
        }
    };
    println!(
        "simulated {} h: {} jobs, {} finished, {placements} containers placed",
        now / 3600,
        jobs.len(),
        finished
    );
    println!(
        "utilisation over the first day: vcores {:.1}%, memory {:.1}%, GPUs {:.1}%",
        util(util_sum.vcores, capacity.vcores),
        util(util_sum.memory, capacity.memory),
        util(util_sum.gpu_milli, capacity.gpu_milli)
    );
    println!("rounds with queues competing on a >85% full cluster: {contended_rounds}");
    for q in 1..=3 {
        let share = if contended_rounds > 0 {
            share_sum[q] / contended_rounds as f64
        } else {
            0.0
        };
        println!(
            "  {}: mean dominant share {:.1}% (guarantee {:.1}%)",
            queues.confs[q].name,
            share * 100.0,
            guarantee[q - 1] * 100.0
        );
    }
    for kind in [Kind::Pipeline, Kind::Training, Kind::Notebook, Kind::Batch] {
        let w = waits.entry(kind).or_default();
        let n = w.len();
        println!(
            "  wait {kind:?}: n={n} p50 {} min, p90 {} min, p99 {} min",
            pct(w, 0.5) / MIN,
            pct(w, 0.9) / MIN,
            pct(w, 0.99) / MIN
        );
    }
    assert_eq!(finished, jobs.len(), "every job finished");
    assert!(pending.is_empty() && running.is_empty());
    assert_eq!(cluster.used(), Res::ZERO, "everything given back");
    assert!(contended_rounds > 0, "the workload made queues compete");
    Outcome {
        gpu_util: util(util_sum.gpu_milli, capacity.gpu_milli),
        to_guarantee,
        preempted,
    }
}
