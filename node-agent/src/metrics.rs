//! The agent's metrics in the Prometheus text format, `GET /metrics` on
//! `[http] listen` (HTTPS with its certificate where it has TLS).
//!
//! Counted as they happen ([`AgentMetrics`]): containers ended, by reason
//! (kills by each quota among them), how long starts took, and the calls
//! passed on for the node's own containers. Read from
//! the agent's records at each scrape ([`AgentCollector`]): containers by
//! state, what each running one uses against its limits (labels:
//! container, application, stage, task), the node's capacity and its
//! cgroup driver.

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::manager::Manager;
use crate::model::{ExitReason, Phase};

type Labels = Vec<(&'static str, String)>;

/// What the agent counts and times.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Containers that ended, by reason.
    pub ends: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// From a StartContainer call to the container running (or refused).
    pub start_seconds: Histogram,
    /// Calls passed on for the node's own containers (`crate::relay`), by
    /// call and outcome.
    pub relayed: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl AgentMetrics {
    /// Counts a call passed on: `call` (register, allocate, finish, start),
    /// answered or not.
    pub fn count_relayed<T>(&self, call: &'static str, r: &Result<T, tonic::Status>) {
        let outcome = if r.is_ok() { "ok" } else { "error" };
        self.relayed
            .get_or_create(&vec![("call", call), ("outcome", outcome)])
            .inc();
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            ends: Family::default(),
            // 1 ms .. 16 s.
            start_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            relayed: Family::default(),
        }
    }
}

impl AgentMetrics {
    pub fn ended(&self, reason: &ExitReason) {
        self.ends
            .get_or_create(&vec![("reason", reason_name(reason))])
            .inc();
    }
}

/// A reason's label.
pub fn reason_name(r: &ExitReason) -> &'static str {
    match r {
        ExitReason::Succeeded => "succeeded",
        ExitReason::Failed { .. } => "failed",
        ExitReason::OverMemoryQuota { .. } => "over_memory_quota",
        ExitReason::OverGpuMemoryQuota { .. } => "over_gpu_memory_quota",
        ExitReason::WallTimeExceeded { .. } => "wall_time_exceeded",
        ExitReason::UserRequested => "user_requested",
        ExitReason::AgentShutdown => "agent_shutdown",
        ExitReason::Lost => "lost",
        ExitReason::Fenced { .. } => "fenced",
        ExitReason::Preempted { .. } => "preempted",
    }
}

/// Reads the agent's records at each scrape.
pub struct AgentCollector {
    mgr: Manager,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

/// One gauge family of rows labelled as [`Labels`].
fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, V)>,
) -> Result<(), std::fmt::Error> {
    weft_common::http::gauge(e, name, help, rows)
}

impl prometheus_client::collector::Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let records = self.mgr.list(true);
        let mut by_state: std::collections::BTreeMap<String, u64> = [
            "starting",
            "running",
            "stopping",
            "succeeded",
            "failed",
            "killed",
            "lost",
        ]
        .into_iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        for r in &records {
            let name = r
                .to_proto()
                .state()
                .as_str_name()
                .trim_start_matches("CONTAINER_STATE_")
                .to_ascii_lowercase();
            *by_state.entry(name).or_default() += 1;
        }
        gauge(
            &mut e,
            "weft_agent_containers",
            "Containers the agent knows (ended ones until they are pruned), by state.",
            by_state
                .into_iter()
                .map(|(s, n)| (vec![("state", s)], n))
                .collect(),
        )?;
        let running: Vec<_> = records
            .iter()
            .filter(|r| matches!(r.phase, Phase::Running | Phase::Stopping))
            .collect();
        let labels = |r: &crate::model::Record| -> Labels {
            let env = |k: &str| r.spec.env.get(k).cloned().unwrap_or_default();
            vec![
                ("container", r.spec.id.clone()),
                ("application", r.application_id.clone()),
                ("stage", env("WEFT_STAGE")),
                ("task", env("WEFT_TASK_INDEX")),
            ]
        };
        gauge(
            &mut e,
            "weft_agent_container_memory_bytes",
            "Memory a running container uses (last sample).",
            running
                .iter()
                .map(|r| (labels(r), r.memory_bytes))
                .collect(),
        )?;
        weft_common::http::counter(
            &mut e,
            "weft_agent_container_cpu_seconds",
            "CPU time a running container's processes used so far (last sample).",
            running
                .iter()
                .map(|r| (labels(r), r.cpu_usec as f64 / 1e6))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut e,
            "weft_agent_container_gpu_memory_bytes",
            "GPU memory a running container's processes use (last sample; containers given a GPU).",
            running
                .iter()
                .filter(|r| {
                    !r.spec.resources.gpu_indices.is_empty() || r.spec.resources.gpu_share_milli > 0
                })
                .map(|r| (labels(r), r.gpu_memory_used_bytes))
                .collect(),
        )?;
        gauge(
            &mut e,
            "weft_agent_container_memory_peak_bytes",
            "The most memory a running container has used.",
            running
                .iter()
                .map(|r| (labels(r), r.memory_peak_bytes))
                .collect(),
        )?;
        gauge(
            &mut e,
            "weft_agent_container_memory_limit_bytes",
            "A running container's memory quota.",
            running
                .iter()
                .map(|r| (labels(r), r.spec.resources.memory_bytes))
                .collect(),
        )?;
        gauge(
            &mut e,
            "weft_agent_container_vcores",
            "A running container's cores (its CPU quota).",
            running
                .iter()
                .map(|r| (labels(r), r.spec.resources.vcores_milli as f64 / 1000.0))
                .collect(),
        )?;
        gauge(
            &mut e,
            "weft_agent_container_gpus",
            "GPUs a running container was given (a share counts its fraction).",
            running
                .iter()
                .map(|r| {
                    let res = &r.spec.resources;
                    let gpus = if res.gpu_share_milli > 0 {
                        res.gpu_share_milli as f64 / 1000.0
                    } else {
                        res.gpu_indices.len() as f64
                    };
                    (labels(r), gpus)
                })
                .collect(),
        )?;
        let cap = self.mgr.capacity();
        let none = Labels::new;
        gauge(
            &mut e,
            "weft_agent_capacity_vcores",
            "Cores the node offers.",
            vec![(none(), cap.vcores_milli as f64 / 1000.0)],
        )?;
        gauge(
            &mut e,
            "weft_agent_capacity_memory_bytes",
            "Memory the node offers.",
            vec![(none(), cap.memory_bytes)],
        )?;
        gauge(
            &mut e,
            "weft_agent_capacity_gpus",
            "GPUs the node offers.",
            vec![(none(), self.mgr.gpus().len() as u64)],
        )?;
        gauge(
            &mut e,
            "weft_agent_info",
            "1, labelled with how the agent isolates containers.",
            vec![(vec![("driver", self.mgr.driver_kind().to_string())], 1u64)],
        )?;
        Ok(())
    }
}

/// The registry an agent serves.
pub fn registry(mgr: Manager) -> Registry {
    let m = mgr.metrics();
    let mut r = Registry::default();
    r.register(
        "weft_agent_container_ends",
        "Containers that ended, by reason (kills by quota, runtime, request, fencing among them).",
        m.ends.clone(),
    );
    r.register(
        "weft_agent_container_start_seconds",
        "Time from a StartContainer call to the container running (or the start refused).",
        m.start_seconds.clone(),
    );
    r.register(
        "weft_agent_relayed_calls",
        "Calls passed on for the node's own containers over the agent's socket (a master's to the RM leader, its starts on other nodes), by call and outcome.",
        m.relayed.clone(),
    );
    r.register_collector(Box::new(AgentCollector { mgr }));
    r
}
