//! The member's metrics in the Prometheus text format, `GET /metrics` on
//! `[http] listen` (HTTPS with the member's certificate where it has TLS).
//!
//! Two kinds: what the code counts and times as it runs ([`RmMetrics`]:
//! scheduling rounds, raft proposals, leader changes, submissions and kills
//! by outcome), and what is read from the member's replicated state at each
//! scrape ([`StateCollector`]: raft's term and indexes, nodes by state, per
//! queue its applications, containers, use and guarantee, the cluster's
//! capacity). Every member serves its own: followers report the state they
//! applied, and `weft_raft_leader` says which one leads.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::fsm::{AppState, NodeState};
use crate::leader::scheduling::Scheduling;

/// An outcome label: `ok` or the gRPC code's name.
pub type Outcome = Vec<(&'static str, &'static str)>;

/// Labels whose values are made at the scrape (queue names).
type Labels = Vec<(&'static str, String)>;

/// What the member's code paths count and time.
#[derive(Debug)]
pub struct RmMetrics {
    /// Scheduling rounds that placed something: from taking the input to
    /// the plan.
    pub round_seconds: Histogram,
    /// Proposals: from handing one to raft to its outcome applied here.
    pub proposal_seconds: Histogram,
    /// Proposals that ended without an outcome (not the leader any more,
    /// a timeout, the member stopping).
    pub proposal_failures: Counter,
    /// New leaders this member saw elected (etcd's leader_changes_seen).
    pub leader_changes: Counter,
    pub submissions: Family<Outcome, Counter>,
    pub kills: Family<Outcome, Counter>,
    /// Containers this member preempted as leader, by the victim's queue
    /// and why (`reclaim` or `priority`).
    pub preemptions: Family<Labels, Counter>,
}

impl Default for RmMetrics {
    fn default() -> Self {
        // 50 us .. 6.6 s (a proposal times out at 5 s).
        let buckets = || exponential_buckets(0.000_05, 2.0, 18);
        RmMetrics {
            round_seconds: Histogram::new(buckets()),
            proposal_seconds: Histogram::new(buckets()),
            proposal_failures: Counter::default(),
            leader_changes: Counter::default(),
            submissions: Family::default(),
            kills: Family::default(),
            preemptions: Family::default(),
        }
    }
}

impl RmMetrics {
    /// Counts one submission or kill by how it ended.
    pub fn outcome<T>(family: &Family<Outcome, Counter>, r: &Result<T, tonic::Status>) {
        let code = match r {
            Ok(_) => "ok",
            Err(s) => code_name(s.code()),
        };
        family.get_or_create(&vec![("outcome", code)]).inc();
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Reads the member's state at each scrape.
#[derive(Debug)]
pub struct StateCollector {
    scheduling: Scheduling,
}

impl std::fmt::Debug for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scheduling")
    }
}

use weft_common::http::gauge;

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl prometheus_client::collector::Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let raft = &self.scheduling.raft;
        let s = raft.status();
        let one = |v: u64| vec![(Outcome::new(), v)];
        gauge(
            &mut e,
            "weft_raft_term",
            "The raft term this member is in.",
            one(s.term),
        )?;
        gauge(
            &mut e,
            "weft_raft_commit_index",
            "The highest log index this member knows committed.",
            one(s.commit),
        )?;
        gauge(
            &mut e,
            "weft_raft_applied_index",
            "The highest log index this member applied to its state.",
            one(s.applied),
        )?;
        gauge(
            &mut e,
            "weft_raft_leader",
            "1 when this member leads.",
            one(s.is_leader as u64),
        )?;
        gauge(
            &mut e,
            "weft_raft_members",
            "Members of the group (voters and learners) as this member knows them.",
            one(s.members.len() as u64),
        )?;
        let st = self.scheduling.stats();
        counter(
            &mut e,
            "weft_scheduler_rounds",
            "Scheduling rounds that placed something (this member's leaderships).",
            st.rounds,
        )?;
        counter(
            &mut e,
            "weft_scheduler_placements",
            "Containers granted by this member's scheduling rounds.",
            st.placed,
        )?;
        counter(
            &mut e,
            "weft_scheduler_refused_at_verify",
            "Planned allocations dropped by the check against the latest state before proposing.",
            st.refused_at_verify,
        )?;

        let state = raft.state();
        let states = [
            (NodeState::Running, "running"),
            (NodeState::Unhealthy, "unhealthy"),
            (NodeState::Lost, "lost"),
            (NodeState::Draining, "draining"),
            (NodeState::Decommissioned, "decommissioned"),
        ];
        let nodes = states.iter().map(|(k, name)| {
            let n = state.nodes.values().filter(|n| n.state == *k).count() as u64;
            (vec![("state", *name)], n)
        });
        gauge(
            &mut e,
            "weft_nodes",
            "Nodes by state.",
            nodes.collect::<Vec<_>>(),
        )?;
        let live = || {
            state
                .nodes
                .values()
                .filter(|n| matches!(n.state, NodeState::Running | NodeState::Draining))
        };
        let cap = (
            live().map(|n| n.vcores_milli).sum::<u64>() as f64 / 1000.0,
            live().map(|n| n.memory_bytes).sum::<u64>(),
            live().map(|n| n.gpus.len() as u64).sum::<u64>(),
        );
        gauge(
            &mut e,
            "weft_cluster_capacity_vcores",
            "Cores of the running and draining nodes.",
            vec![(Outcome::new(), cap.0)],
        )?;
        gauge(
            &mut e,
            "weft_cluster_capacity_memory_bytes",
            "Memory of the running and draining nodes.",
            one(cap.1),
        )?;
        gauge(
            &mut e,
            "weft_cluster_capacity_gpus",
            "GPUs of the running and draining nodes.",
            one(cap.2),
        )?;

        // Per queue: the configured ones (root alone when none is), and
        // any an application names.
        let mut queues: std::collections::BTreeMap<String, [u64; 6]> = Default::default();
        let specs = if state.queues.is_empty() {
            crate::config::queue_specs(&[])
        } else {
            state.queues.values().cloned().collect()
        };
        for q in &specs {
            queues.insert(q.name.clone(), [0; 6]);
        }
        // Counted at the queue and every queue above it (a parent's
        // figures hold its children's, as its maximum does).
        let mut add = |q: &str, i: usize, v: u64| {
            let mut name = q;
            loop {
                queues.entry(name.to_string()).or_default()[i] += v;
                match name.rsplit_once('.') {
                    Some((parent, _)) => name = parent,
                    None => break,
                }
            }
        };
        for a in state.apps.values() {
            match a.state {
                AppState::Submitted | AppState::Accepted => add(&a.queue, 0, 1),
                AppState::Running => add(&a.queue, 1, 1),
                _ => {}
            }
        }
        for (q, users) in &state.queue_usage {
            for u in users.values() {
                add(q, 2, u.containers as u64);
                add(q, 3, u.vcores_milli);
                add(q, 4, u.memory_bytes);
                add(q, 5, u.gpu_milli);
            }
        }
        let rows = |i: usize| -> Vec<(Labels, u64)> {
            queues
                .iter()
                .map(|(q, r)| (vec![("queue", q.clone())], r[i]))
                .collect()
        };
        let mut put =
            |name: &str, help: &str, rows: Vec<(Labels, f64)>| gauge(&mut e, name, help, rows);
        let f = |v: Vec<(Labels, u64)>, scale: f64| {
            v.into_iter()
                .map(|(l, x)| (l, x as f64 / scale))
                .collect::<Vec<_>>()
        };
        let pending: Vec<_> = rows(0)
            .into_iter()
            .map(|(mut l, v)| {
                l.push(("state", "pending".into()));
                (l, v as f64)
            })
            .chain(rows(1).into_iter().map(|(mut l, v)| {
                l.push(("state", "running".into()));
                (l, v as f64)
            }))
            .collect();
        put(
            "weft_queue_applications",
            "Applications of the queue and the queues under it not yet ended, by state (pending: submitted or accepted).",
            pending,
        )?;
        put(
            "weft_queue_containers",
            "Containers of the queue and the queues under it that have not ended.",
            f(rows(2), 1.0),
        )?;
        put(
            "weft_queue_allocated_vcores",
            "Cores held by the containers of the queue and the queues under it.",
            f(rows(3), 1000.0),
        )?;
        put(
            "weft_queue_allocated_memory_bytes",
            "Memory held by the containers of the queue and the queues under it.",
            f(rows(4), 1.0),
        )?;
        put(
            "weft_queue_allocated_gpus",
            "GPUs held by the containers of the queue and the queues under it (a share counts its fraction).",
            f(rows(5), 1000.0),
        )?;
        let guaranteed = |g: fn(&crate::fsm::QueueSpec) -> f64| -> Vec<(Labels, f64)> {
            specs
                .iter()
                .map(|q| (vec![("queue", q.name.clone())], g(q)))
                .collect()
        };
        put(
            "weft_queue_guaranteed_vcores",
            "Cores guaranteed to the queue (a parent's guarantee holds its children's).",
            guaranteed(|q| q.guaranteed_vcores_milli as f64 / 1000.0),
        )?;
        put(
            "weft_queue_guaranteed_memory_bytes",
            "Memory guaranteed to the queue.",
            guaranteed(|q| q.guaranteed_memory_bytes as f64),
        )?;
        put(
            "weft_queue_guaranteed_gpus",
            "GPUs guaranteed to the queue.",
            guaranteed(|q| q.guaranteed_gpus as f64),
        )?;
        Ok(())
    }
}

/// The registry a member serves: its counters and histograms, and the
/// state read at each scrape.
pub fn registry(scheduling: Scheduling) -> Registry {
    let m = scheduling.raft.metrics();
    let mut r = Registry::default();
    r.register(
        "weft_scheduler_round_seconds",
        "Time a scheduling round that placed something took to plan (input taken, placements found).",
        m.round_seconds.clone(),
    );
    r.register(
        "weft_raft_proposal_seconds",
        "Time from handing a write to raft to its outcome applied on this member.",
        m.proposal_seconds.clone(),
    );
    r.register(
        "weft_raft_proposal_failures",
        "Writes handed to raft on this member that ended without an outcome (leadership lost, timeout, stopping).",
        m.proposal_failures.clone(),
    );
    r.register(
        "weft_raft_leader_changes_seen",
        "New leaders this member saw elected.",
        m.leader_changes.clone(),
    );
    r.register(
        "weft_submissions",
        "SubmitApplication calls answered by this member, by outcome.",
        m.submissions.clone(),
    );
    r.register(
        "weft_kills",
        "KillApplication calls answered by this member, by outcome.",
        m.kills.clone(),
    );
    r.register(
        "weft_preemptions",
        "Containers preempted by this member as leader, by the victim's queue and reason (reclaim: for a queue under its guarantee; priority: for a higher priority of its queue).",
        m.preemptions.clone(),
    );
    r.register_collector(Box::new(StateCollector { scheduling }));
    r
}

/// Serves `GET /metrics` on `listener` (TLS where the process has it, as
/// its gRPC port) until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    rest: axum::Router,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = rest.merge(weft_common::http::metrics_router(registry));
    weft_common::http::serve(listener, app, async move { stop.cancelled().await }).await;
}
