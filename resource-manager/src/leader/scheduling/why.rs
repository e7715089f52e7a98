//! Why an application waits or failed (`rmctl why`, ExplainApplication,
//! `/v1/apps/{id}/why`): its waiting parts, each with what keeps it from
//! being placed now ([`crate::scheduler::explain`] over the applied state
//! and this leader's table of asks), and a failed one's first failing task.
//! What it needs is copied under the state's lock and the table's (in that
//! order, as everywhere); the explaining runs with neither held.

use std::collections::BTreeMap;

use super::*;
use crate::fsm::ContainerEnd;
use crate::scheduler::explain::explain;

/// What groups asks into one waiting part: its name, whether a gang, and
/// (outside gangs) the shape asked for.
type GroupKey = (String, bool, Vec<u64>);

/// One waiting part, as copied from the table.
struct Part {
    what: String,
    tasks: u32,
    /// Its asks: a gang's every member; otherwise one of its shape.
    unit: Vec<Ask>,
    ahead: u32,
}

impl Scheduling {
    /// The explanation of `id` as this leader sees it now.
    pub(crate) fn explain(&self, id: &str) -> Result<pb::ApplicationExplanation, Status> {
        let st = self.raft.state();
        let app = st.apps.get(id).ok_or_else(|| {
            Status::from(Error::NotFound(format!(
                "application_id: no application {id}"
            )))
        })?;
        let mut out = pb::ApplicationExplanation {
            application_id: id.to_string(),
            state: crate::service::app_state(app.state) as i32,
            ..Default::default()
        };
        match app.state {
            AppState::Succeeded => {
                out.summary = "it succeeded".into();
                return Ok(out);
            }
            AppState::Killed => {
                out.summary = format!("it was killed: {}", app.diagnostics);
                return Ok(out);
            }
            AppState::Failed => {
                out.failure = first_failure(&st, id);
                out.summary = match &out.failure {
                    Some(f) => format!(
                        "it failed: task {} {} on node {}: {}",
                        f.task, f.reason, f.node_id, f.diagnostic
                    ),
                    None => format!("it failed: {}", app.diagnostics),
                };
                return Ok(out);
            }
            _ => {}
        }
        let (cluster, node_ids) = crate::view::cluster_view(&st);
        let queues = queue_view(&st);
        let Some(q) = queues.index(&app.queue) else {
            out.summary = format!("its queue {} is not configured now", app.queue);
            return Ok(out);
        };
        let (unmanaged, running, seq) = (app.unmanaged, app.state == AppState::Running, app.seq());
        let t = self.table.lock().expect("table lock");
        let index: HashMap<&str, usize> = node_ids
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        // Nodes held for other applications' units, by the view's index.
        let held: Vec<(usize, String)> = t
            .held
            .iter()
            .filter(|h| h.app != id)
            .flat_map(|h| {
                let who = format!("{} {}", h.app, h.what);
                h.nodes
                    .iter()
                    .filter_map(|n| index.get(n.as_str()).map(|&i| (i, who.clone())))
                    .collect::<Vec<_>>()
            })
            .collect();
        let own: Vec<String> = t
            .held
            .iter()
            .filter(|h| h.app == id)
            .flat_map(|h| h.nodes.iter().cloned())
            .collect();
        let mut parts: Vec<Part> = Vec::new();
        let mut starting = false;
        if let Some(ra) = t.masters.ask_of(id) {
            parts.push(Part {
                what: "master".into(),
                tasks: 1,
                unit: vec![to_ask(ra, 0, q, &app.user)],
                ahead: ahead(&st, &t, &app.queue, id, ra.priority as i32, seq),
            });
        } else if t.launching.contains(id) {
            starting = true;
        }
        // The master's asks, grouped: a gang whole; other tasks by stage
        // (and role) and shape (one ask per task).
        let mut groups: BTreeMap<GroupKey, Vec<(&pb::ResourceAsk, u32)>> = BTreeMap::new();
        for (ra, count) in t.asks.get(id).into_iter().flatten() {
            if *count == 0 {
                continue;
            }
            let key = if ra.gang_id.is_empty() {
                let stage = ra.ask_id.split('/').next().unwrap_or(&ra.ask_id);
                let r = ra.resources.unwrap_or_default();
                (
                    format!("stage {stage}"),
                    false,
                    vec![
                        r.vcores_milli,
                        r.memory_bytes,
                        r.gpus as u64,
                        r.gpu_share_milli as u64,
                        r.gpu_memory_bytes,
                    ],
                )
            } else {
                (format!("gang {}", ra.gang_id), true, Vec::new())
            };
            groups.entry(key).or_default().push((ra, *count));
        }
        for ((what, gang, _), asks) in groups {
            let tasks: u32 = asks.iter().map(|(_, c)| c).sum();
            let unit: Vec<Ask> = if gang {
                asks.iter()
                    .flat_map(|(ra, c)| (0..*c).map(|_| to_ask(ra, 0, q, &app.user)))
                    .collect()
            } else {
                vec![to_ask(asks[0].0, 0, q, &app.user)]
            };
            parts.push(Part {
                what,
                tasks,
                unit,
                ahead: ahead(&st, &t, &app.queue, id, asks[0].0.priority as i32, seq),
            });
        }
        // A master that has not called this leader yet (just started, or
        // this member leads since a moment): its asks are not known here.
        let unheard = !t.synced.contains(id) && t.masters.ask_of(id).is_none() && !starting;
        drop(t);
        drop(st);

        if starting {
            out.waiting.push(pb::WaitingPart {
                what: "master".into(),
                tasks: 1,
                reason: "starting".into(),
                detail: "its master's container is granted and starting".into(),
                ahead: 0,
            });
        }
        for p in parts {
            let b = explain(&cluster, &queues, &p.unit, &held);
            let mut detail = b.to_string();
            if !own.is_empty() && b.kind() == "no_room" {
                detail.push_str(&format!(
                    "; {} {} held for it (it waited long): nothing new is placed there, and it starts as they drain",
                    if own.len() == 1 { "node" } else { "nodes" },
                    own.join(", ")
                ));
            }
            out.waiting.push(pb::WaitingPart {
                what: p.what,
                tasks: p.tasks,
                reason: b.kind().into(),
                detail,
                ahead: p.ahead,
            });
        }
        out.summary = match out.waiting.first() {
            Some(w) => format!("{} waits: {}", w.what, w.detail),
            None if unmanaged && !running => {
                "its master is run by its submitter and has not called yet".into()
            }
            None if unheard => {
                "its master has not told this leader what it needs yet (it has just started, or this member leads since a moment): ask again shortly".into()
            }
            None => "nothing of it waits: what it asked for is placed".into(),
        };
        Ok(out)
    }
}

/// Tasks of other applications in `queue` that a round takes before one of
/// `app`'s at `priority`: higher priority, or the same and submitted
/// earlier (their masters count as one task each).
fn ahead(st: &ClusterState, t: &Table, queue: &str, app: &str, priority: i32, seq: u64) -> u32 {
    let mut n = 0u32;
    for (other, list) in &t.asks {
        if other == app {
            continue;
        }
        let Some(o) = st.apps.get(other.as_str()) else {
            continue;
        };
        if o.queue != queue || o.state.is_terminal() {
            continue;
        }
        for (ra, count) in list {
            let p = ra.priority as i32;
            if p > priority || (p == priority && o.seq() < seq) {
                n = n.saturating_add(*count);
            }
        }
    }
    n.saturating_add(t.masters.ahead_in(queue, seq))
}

/// What a container ran: its task, or `master` (this attempt's or an
/// earlier one's).
pub(crate) fn task_name(ask_id: &str, is_master: bool) -> String {
    if is_master || ask_id == MASTER_ASK {
        "master".into()
    } else {
        ask_id.to_string()
    }
}

/// A failed application's first failing task: the container that ended
/// first otherwise than succeeding (the tasks its master stopped after it
/// ended later; containers the RM ended as bookkeeping, an attempt
/// replaced, are passed over).
fn first_failure(st: &ClusterState, app: &str) -> Option<pb::TaskFailure> {
    let master = st.apps.get(app).and_then(|a| a.am_container.clone());
    st.containers_of(app)
        .filter_map(|c| c.end.as_ref().map(|e| (c, e)))
        .filter(|(_, e)| e.state != ContainerEnd::Succeeded && e.exit_status != -105)
        .min_by_key(|(c, _)| (c.changed_at_ms, c.alloc.container_id.clone()))
        .map(|(c, e)| pb::TaskFailure {
            task: task_name(
                &c.alloc.ask_id,
                master.as_deref() == Some(c.alloc.container_id.as_str()),
            ),
            container_id: c.alloc.container_id.clone(),
            node_id: c.alloc.node_id.clone(),
            reason: match e.state {
                ContainerEnd::Failed => "failed",
                ContainerEnd::Killed => "killed",
                ContainerEnd::Lost => "lost",
                ContainerEnd::NodeLost => "node_lost",
                ContainerEnd::Succeeded => "succeeded",
            }
            .into(),
            diagnostic: e.diagnostic.clone(),
            exit_status: e.exit_status,
        })
}
