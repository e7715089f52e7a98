//! Preemption in the leader's loop (with `[preemption] enabled`): a round
//! that leaves units of a queue under its guarantee (or, where the queue
//! allows it, of a higher priority) waiting runs the planner
//! ([`crate::scheduler::preempt`]) over what the round left, and the
//! victims it names are ended in one `PreemptContainers` command: their
//! masters hear of it at once and ask again (no retry used), their agents
//! stop them after their grace, and the waiting units take the room in the
//! rounds after that.

use super::*;
use crate::fsm::{Preemption, DEFAULT_PREEMPTION_GRACE_MS, PREEMPTION_WINDOW_MS};
use crate::scheduler::preempt::{self as planner, Reason, Running, Settings, Stopping};
use crate::scheduler::{GpuGrant, Res};

/// The planner runs at most this often (it walks every container under
/// the state's lock; rounds come much more often under load).
pub const PLAN_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// What the planner needs from the state, taken under its lock.
pub(crate) struct PreemptInput {
    pub(crate) running: Vec<Running>,
    pub(crate) stopping: Vec<Stopping>,
    pub(crate) settings: Settings,
    /// Per running container: its id, its grace (ms, capped by its queue)
    /// and its queue's name.
    pub(crate) meta: Vec<(String, u64, String)>,
    /// Queue names by index.
    pub(crate) queue_names: Vec<String>,
}

/// A container's GPUs as the scheduler grants them.
fn grants_of(state: &ClusterState, a: &Allocation) -> Vec<GpuGrant> {
    match a.gpu_share {
        Some(sh) => vec![GpuGrant {
            device: sh.device as usize,
            milli: sh.milli,
            memory: sh.memory_bytes,
        }],
        None => a
            .gpus
            .iter()
            .map(|&d| GpuGrant {
                device: d as usize,
                milli: 1000,
                memory: state
                    .nodes
                    .get(a.node_id.as_str())
                    .and_then(|n| n.gpus.get(d as usize))
                    .map_or(0, |g| g.memory_bytes),
            })
            .collect(),
    }
}

fn res_of(a: &Allocation) -> Res {
    Res::new(
        a.vcores_milli,
        a.memory_bytes,
        match a.gpu_share {
            Some(sh) => sh.milli as u64,
            None => 1000 * a.gpus.len() as u64,
        },
    )
}

impl Scheduling {
    /// The planner's input when preemption is on and a waiting ask may
    /// preempt (its queue is under its guarantee, or lets priorities
    /// preempt); None otherwise. `view` was refreshed from `state`.
    pub(super) fn preempt_input(
        &self,
        state: &ClusterState,
        queues: &Queues,
        asks: &[Ask],
        view: &crate::view::View,
    ) -> Option<PreemptInput> {
        let cfg = &self.preemption;
        if !cfg.enabled || asks.is_empty() {
            return None;
        }
        let specs = |q: usize| state.queues.get(queues.confs[q].name.as_str());
        let within: Vec<bool> = (0..queues.confs.len())
            .map(|q| specs(q).is_some_and(|s| s.priority_preemption))
            .collect();
        let total = view.capacity();
        let may = asks
            .iter()
            .any(|a| within[a.queue] || queues.within_guarantee(a.queue, a.res(), total));
        if !may {
            return None;
        }
        {
            let mut at = self.planned_at.lock().expect("planned_at lock");
            if at.is_some_and(|t| t.elapsed() < PLAN_EVERY) {
                return None;
            }
            *at = Some(std::time::Instant::now());
        }
        let now = now_ms();
        let min_runtime = cfg.min_runtime.as_millis() as u64;
        let mut input = PreemptInput {
            running: Vec::new(),
            stopping: Vec::new(),
            settings: Settings {
                within_queue: within,
                max_victims: cfg.max_per_round,
                ..Settings::default()
            },
            meta: Vec::new(),
            queue_names: queues.confs.iter().map(|c| c.name.clone()).collect(),
        };
        for node in state.nodes.values() {
            let Some(ni) = view.index_of(&node.id) else {
                continue;
            };
            for c in state.containers_on(&node.id) {
                let a = &c.alloc;
                if c.phase == ContainerPhase::Completed {
                    if c.holding {
                        input.stopping.push(Stopping {
                            node: ni,
                            res: res_of(a),
                            grants: grants_of(state, a),
                            ports: a.ports.len() as u32,
                        });
                    }
                    continue;
                }
                if c.phase != ContainerPhase::Running {
                    continue;
                }
                let Some(app) = state.apps.get(a.app_id.as_str()) else {
                    continue;
                };
                let Some(q) = queues.index(&app.queue) else {
                    continue;
                };
                let recent = app.preempted_recently.get(&a.ask_id).map_or(0, |t| {
                    t.iter()
                        .filter(|&&t| t + PREEMPTION_WINDOW_MS > now)
                        .count()
                });
                let protected = a.ask_id == MASTER_ASK
                    || app.state.is_terminal()
                    || now.saturating_sub(c.changed_at_ms) < min_runtime
                    || recent >= cfg.max_per_hour as usize;
                let group = if a.min_available > 0 {
                    let g = spread_key(&a.app_id, &a.ask_id);
                    input.settings.keep.insert(g, a.min_available);
                    g
                } else {
                    0
                };
                let cap = specs(q).map_or(0, |s| s.max_preemption_grace_ms);
                let mut grace = if a.preemption_grace_ms == 0 {
                    DEFAULT_PREEMPTION_GRACE_MS
                } else {
                    a.preemption_grace_ms
                };
                if cap > 0 {
                    grace = grace.min(cap);
                }
                input.running.push(Running {
                    node: ni,
                    queue: q,
                    user: app.user.clone(),
                    priority: a.priority,
                    started_ms: c.changed_at_ms,
                    res: res_of(a),
                    grants: grants_of(state, a),
                    ports: a.ports.len() as u32,
                    gang: a.gang.as_deref().map(|g| gang_key(&a.app_id, g)),
                    group,
                    protected,
                });
                input
                    .meta
                    .push((a.container_id.clone(), grace, app.queue.clone()));
            }
        }
        (!input.running.is_empty()).then_some(input)
    }

    /// Ends `victims` (from the planner, over `asks` and their `keys`) in
    /// one command.
    pub(super) async fn preempt(
        &self,
        input: &PreemptInput,
        victims: Vec<planner::Victim>,
        asks: &[Ask],
        keys: &[(String, String)],
    ) {
        if victims.is_empty() {
            return;
        }
        let preemptions: Vec<(Preemption, String, Reason)> = victims
            .iter()
            .map(|v| {
                let (id, grace, vq) = &input.meta[v.running];
                let ask = &asks[v.for_ask as usize];
                let (app, ask_id) = &keys[v.for_ask as usize];
                let what = if ask_id == MASTER_ASK {
                    format!("{app}'s master")
                } else {
                    format!("{app} ({ask_id})")
                };
                let q = &input.queue_names[ask.queue];
                let diagnostic = match v.reason {
                    Reason::Reclaim => format!(
                        "preempted to reclaim capacity for {what} of queue {q}, which is under its guarantee (queue {vq} runs above its own); {}s to checkpoint",
                        grace / 1000
                    ),
                    Reason::Priority => format!(
                        "preempted for {what}, of higher priority ({}) in queue {q}; {}s to checkpoint",
                        ask.priority,
                        grace / 1000
                    ),
                };
                (
                    Preemption {
                        container_id: id.clone(),
                        grace_ms: *grace,
                        diagnostic,
                    },
                    vq.clone(),
                    v.reason,
                )
            })
            .collect();
        for (p, _, _) in &preemptions {
            info!(container_id = %p.container_id, grace_ms = p.grace_ms, why = %p.diagnostic, "preempting");
        }
        let refused = match self
            .raft
            .propose(Command::PreemptContainers {
                preemptions: preemptions.iter().map(|(p, _, _)| p.clone()).collect(),
                at_ms: now_ms(),
            })
            .await
        {
            Ok(Outcome::Done) => Vec::new(),
            Ok(Outcome::PartlyApplied { refused }) => refused,
            Ok(other) => {
                warn!(outcome = ?other, "preemption refused");
                return;
            }
            Err(e) => {
                debug!(error = %e, "preemption not committed; the next round plans again");
                return;
            }
        };
        let metrics = self.raft.metrics();
        for (p, queue, reason) in &preemptions {
            if refused.iter().any(|r| r.container_id == p.container_id) {
                continue;
            }
            let reason = match reason {
                Reason::Reclaim => "reclaim",
                Reason::Priority => "priority",
            };
            metrics
                .preemptions
                .get_or_create(&vec![
                    ("queue", queue.clone()),
                    ("reason", reason.to_string()),
                ])
                .inc();
        }
        // Their masters hear of it now; their agents at their next
        // heartbeat.
        self.poke();
    }
}
