//! Why an application waits or failed (`rmctl why`, ExplainApplication,
//! `/v1/apps/{id}/why`): its waiting parts, each with what keeps it from
//! being placed now ([`crate::scheduler::explain`] over the applied state
//! and this leader's table of asks), and a failed one's first failing task.

use std::collections::BTreeMap;

use super::*;
use crate::fsm::ContainerEnd;
use crate::scheduler::explain::explain;

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
        let t = self.table.lock().expect("table lock");
        let seq = app.seq();
        // Nodes held for other applications' units, by the view's index.
        let index: HashMap<&str, usize> = node_ids
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
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
        let own: Vec<&str> = t
            .held
            .iter()
            .filter(|h| h.app == id)
            .flat_map(|h| h.nodes.iter().map(String::as_str))
            .collect();
        if let Some(ra) = t.masters.ask_of(id) {
            let unit = [to_ask(ra, 0, q, &app.user)];
            let b = explain(&cluster, &queues, &unit, &held);
            out.waiting.push(pb::WaitingPart {
                what: "master".into(),
                tasks: 1,
                reason: b.kind().into(),
                detail: b.to_string(),
                ahead: ahead(&st, &t, &app.queue, id, ra.priority as i32, seq),
            });
        } else if t.launching.contains(id) {
            out.waiting.push(pb::WaitingPart {
                what: "master".into(),
                tasks: 1,
                reason: "starting".into(),
                detail: "its master's container is granted and starting".into(),
                ahead: 0,
            });
        }
        // The master's asks, grouped: a gang whole; other tasks by stage
        // and shape (one ask per task).
        let mut groups: BTreeMap<(String, bool), Vec<(&pb::ResourceAsk, u32)>> = BTreeMap::new();
        for (ra, count) in t.asks.get(id).into_iter().flatten() {
            if *count == 0 {
                continue;
            }
            let key = if ra.gang_id.is_empty() {
                let stage = ra.ask_id.split('/').next().unwrap_or(&ra.ask_id);
                let stage = stage.split('.').next().unwrap_or(stage);
                (format!("stage {stage}"), false)
            } else {
                (format!("gang {}", ra.gang_id), true)
            };
            groups.entry(key).or_default().push((ra, *count));
        }
        for ((what, gang), asks) in groups {
            let tasks: u32 = asks.iter().map(|(_, c)| c).sum();
            let unit: Vec<Ask> = if gang {
                asks.iter()
                    .flat_map(|(ra, c)| (0..*c).map(|_| to_ask(ra, 0, q, &app.user)))
                    .collect()
            } else {
                vec![to_ask(asks[0].0, 0, q, &app.user)]
            };
            let b = explain(&cluster, &queues, &unit, &held);
            out.waiting.push(pb::WaitingPart {
                what,
                tasks,
                reason: b.kind().into(),
                detail: b.to_string(),
                ahead: ahead(&st, &t, &app.queue, id, asks[0].0.priority as i32, seq),
            });
        }
        if !own.is_empty() {
            if let Some(w) = out.waiting.iter_mut().find(|w| w.reason == "no_room") {
                w.detail.push_str(&format!(
                    "; {} {} held for it (it waited long): nothing new is placed there, and it starts as they drain",
                    if own.len() == 1 { "node" } else { "nodes" },
                    own.join(", ")
                ));
            }
        }
        out.summary = match out.waiting.first() {
            Some(w) => format!("{} waits: {}", w.what, w.detail),
            None if app.unmanaged && app.state != AppState::Running => {
                "its master is run by its submitter and has not called yet".into()
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

/// A failed application's first failing task: the container that ended
/// first otherwise than succeeding (the tasks its master stopped after it
/// ended later).
fn first_failure(st: &ClusterState, app: &str) -> Option<pb::TaskFailure> {
    st.containers_of(app)
        .filter_map(|c| c.end.as_ref().map(|e| (c, e)))
        .filter(|(_, e)| e.state != ContainerEnd::Succeeded)
        .min_by_key(|(c, _)| (c.changed_at_ms, c.alloc.container_id.clone()))
        .map(|(c, e)| pb::TaskFailure {
            task: c.alloc.ask_id.clone(),
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
