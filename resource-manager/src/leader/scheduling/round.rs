//! One scheduling round: the table's asks and the kept view in, the
//! allocations to propose out (ports numbered against the latest state).

use super::*;

impl Scheduling {
    /// One round over the table: the allocations to propose and, for each,
    /// its (app, ask id). None when nothing is placed. The view kept
    /// from the last round is patched under the state's lock (the nodes
    /// that changed since); the scheduler runs on a blocking thread with
    /// no lock held (the raft thread applies meanwhile); ports are then
    /// numbered against the latest state.
    pub(super) async fn round(
        &self,
        reservations: &mut Reservations,
        view: &mut crate::view::View,
        term: u64,
        counter: &mut u64,
    ) -> Option<Planned> {
        let Some(mut input) = self.round_input(view) else {
            self.table.lock().expect("table lock").held.clear();
            return None;
        };
        {
            let held = self.unreachable.lock().expect("unreachable lock");
            view.hold_out(held.keys().map(String::as_str));
        }
        let mut held = std::mem::take(reservations);
        // What each spread group holds, by the view's node index.
        view.cluster().spread = std::mem::take(&mut input.spread)
            .into_iter()
            .map(|(g, nodes)| {
                let by_index = nodes
                    .into_iter()
                    .filter_map(|(id, n)| view.index_of(&id).map(|i| (i as u32, n)))
                    .collect();
                (g, by_index)
            })
            .collect();
        let mut kept = std::mem::take(view);
        let pre = input.preempt.take();
        let (out, input, held, kept, victims) = tokio::task::spawn_blocking(move || {
            let (out, _) =
                scheduler::schedule_with(kept.cluster(), &mut input.queues, &input.asks, &mut held);
            // What the round left waiting, where it may preempt.
            let victims = pre.as_ref().map_or_else(Vec::new, |p| {
                let placed: HashSet<u64> = out.iter().map(|a| a.ask).collect();
                let q = &input.queues;
                let total = kept.cluster().capacity();
                let waiting: Vec<Ask> = input
                    .asks
                    .iter()
                    .filter(|a| !placed.contains(&a.id))
                    .filter(|a| {
                        p.settings.within_queue[a.queue]
                            || q.within_guarantee(a.queue, a.res(), total)
                    })
                    .cloned()
                    .collect();
                scheduler::preempt::plan(
                    kept.cluster(),
                    q,
                    &waiting,
                    &p.running,
                    &p.stopping,
                    &p.settings,
                )
            });
            (out, input, held, kept, pre.map(|p| (p, victims)))
        })
        .await
        .expect("the scheduler does not panic");
        *view = kept;
        if let Some((pre, victims)) = victims {
            self.preempt(&pre, victims, &input.asks, &input.keys).await;
        }
        let node_ids = view.ids();
        *reservations = held;
        self.publish_held(reservations, &input, node_ids);
        if out.is_empty() {
            return None;
        }
        let RoundInput {
            asks,
            keys,
            gangs,
            busy,
            preemption,
            ..
        } = input;
        let state = self.raft.state();
        let mut allocations = Vec::with_capacity(out.len());
        let mut out_keys = Vec::with_capacity(out.len());
        // Ports taken on each node so far: given to its containers, bound
        // there by anything, or given earlier in this round.
        let mut taken: HashMap<usize, BTreeSet<u16>> = HashMap::new();
        // Gangs a member of which found too few ports (the state moved on
        // while the round ran): dropped whole, asked again next round.
        let mut short: HashSet<String> = HashSet::new();
        for p in out {
            let i = p.ask as usize;
            let ports = if asks[i].ports == 0 {
                Vec::new()
            } else {
                let Some(node) = state.nodes.get(node_ids[p.node].as_str()) else {
                    continue;
                };
                let used = taken.entry(p.node).or_insert_with(|| {
                    let mut u = state.node_use(&node.id).ports;
                    u.extend(busy.get(&node.id).into_iter().flatten());
                    u
                });
                let free: Vec<u16> = (node.ports.first..=node.ports.last)
                    .filter(|q| !used.contains(q))
                    .take(asks[i].ports as usize)
                    .collect();
                if free.len() < asks[i].ports as usize {
                    short.extend(gangs[i].clone());
                    continue;
                }
                used.extend(&free);
                free
            };
            *counter += 1;
            let (app, ask_id) = keys[i].clone();
            let share = matches!(asks[i].gpu, GpuAsk::Share { .. });
            allocations.push(Allocation {
                container_id: format!("c{term:x}-{counter}"),
                app_id: app.clone(),
                node_id: node_ids[p.node].clone(),
                vcores_milli: asks[i].vcores,
                memory_bytes: asks[i].memory,
                gpus: if share {
                    vec![]
                } else {
                    p.gpus.iter().map(|g| g.device as u32).collect()
                },
                gpu_share: if share {
                    p.gpus.first().map(|g| crate::fsm::GpuShare {
                        device: g.device as u32,
                        milli: g.milli,
                        memory_bytes: g.memory,
                    })
                } else {
                    None
                },
                ask_id: ask_id.clone(),
                gang: gangs[i].clone(),
                ports,
                priority: asks[i].priority,
                preemption_grace_ms: preemption[i].0,
                min_available: preemption[i].1,
            });
            out_keys.push((app, ask_id));
        }
        drop(state);
        if !short.is_empty() {
            let (a, k): (Vec<Allocation>, Vec<(String, String)>) = allocations
                .into_iter()
                .zip(out_keys)
                .filter(|(a, _)| a.gang.as_ref().is_none_or(|g| !short.contains(g)))
                .unzip();
            (allocations, out_keys) = (a, k);
        }
        (!allocations.is_empty()).then_some((allocations, out_keys))
    }

    /// Records which nodes the round held for whom (for `why`).
    fn publish_held(&self, reservations: &Reservations, input: &RoundInput, node_ids: &[String]) {
        let mut out = Vec::new();
        for (key, nodes) in reservations.held() {
            let i = match *key {
                crate::scheduler::UnitKey::Ask(key) => {
                    input.asks.iter().position(|a| a.unit_key() == key)
                }
                crate::scheduler::UnitKey::Gang(q, g) => input
                    .asks
                    .iter()
                    .position(|a| a.gang == Some(g) && a.queue == q),
            };
            let Some((app, ask)) = i.and_then(|i| input.keys.get(i)) else {
                continue;
            };
            let what = match i.and_then(|i| input.gangs.get(i)).cloned().flatten() {
                Some(g) => format!("gang {}", g.rsplit('/').next().unwrap_or(&g)),
                None => ask.clone(),
            };
            out.push(HeldNodes {
                app: app.clone(),
                what,
                nodes: nodes
                    .iter()
                    .filter_map(|&n| node_ids.get(n).cloned())
                    .collect(),
            });
        }
        self.table.lock().expect("table lock").held = out;
    }

    /// The scheduler's input, taken from the state and the table (locks
    /// held only here). None when nothing is asked for.
    pub(super) fn round_input(&self, view: &mut crate::view::View) -> Option<RoundInput> {
        let state = self.raft.state();
        let queues = queue_view(&state);
        let mut t = self.table.lock().expect("table lock");
        // Asks of applications that ended leave the table with the round
        // that first sees them ended: nothing is planned for them again.
        let live = |id: &str| state.apps.get(id).filter(|a| !a.state.is_terminal());
        t.undelivered.retain(|id, _| live(id).is_some());
        let mut asks = Vec::new();
        let mut keys = Vec::new();
        let mut gangs: Vec<Option<String>> = Vec::new();
        let mut preemption: Vec<(u64, u32)> = Vec::new();
        let mut spread: HashMap<u64, HashMap<String, u32>> = HashMap::new();
        // One lookup of each application: its asks are kept and turned into
        // the scheduler's in the same pass.
        let table = &mut *t;
        table.asks.retain(|app_id, list| {
            let Some(app) = live(app_id) else {
                return false;
            };
            // A master the RM ended is being stopped: its asks wait for
            // the next attempt's (which replace them).
            if state.ended_master(app).is_some() {
                return true;
            }
            let Some(q) = queues.index(&app.queue) else {
                return true;
            };
            // A task whose earlier container the RM ended while it may
            // still run (a replaced attempt's, a released one) is placed
            // again only once its agent says it stopped: never two runs of
            // one task at once.
            let mut uncertain: std::collections::HashMap<&str, u32> = Default::default();
            let spreads = list
                .iter()
                .any(|(ra, _)| ra.placement == pb::PlacementPolicy::Spread as i32);
            for c in state.containers_of(app_id) {
                if c.phase == crate::fsm::ContainerPhase::Completed && c.holding {
                    *uncertain.entry(c.alloc.ask_id.as_str()).or_default() += 1;
                }
                // What a spread group already holds on each node.
                if spreads && c.phase != crate::fsm::ContainerPhase::Completed {
                    *spread
                        .entry(spread_key(app_id, &c.alloc.ask_id))
                        .or_default()
                        .entry(c.alloc.node_id.clone())
                        .or_default() += 1;
                }
            }
            // A gang with a member still stopping waits whole: its other
            // members alone would be a partial gang.
            let held_gangs: HashSet<&str> = list
                .iter()
                .filter(|(ra, _)| {
                    !ra.gang_id.is_empty() && uncertain.contains_key(ra.ask_id.as_str())
                })
                .map(|(ra, _)| ra.gang_id.as_str())
                .collect();
            for (ra, count) in list.iter() {
                if held_gangs.contains(ra.gang_id.as_str()) {
                    continue;
                }
                let count =
                    count.saturating_sub(uncertain.get(ra.ask_id.as_str()).copied().unwrap_or(0));
                for k in 0..count {
                    let mut a = to_ask(ra, asks.len() as u64, q, &app.user);
                    // Scheduled (and preempted) by the priority its spec was
                    // submitted with, whatever its master says.
                    a.priority = app.priority.min(i32::MAX as u32) as i32;
                    // The same key round after round (its index changes
                    // as other asks come and go): its wait for room counts.
                    a.key = ask_key(app_id, &ra.ask_id, k);
                    if a.placement == scheduler::Placement::Spread {
                        a.spread_group = spread_key(app_id, &ra.ask_id);
                    }
                    if !ra.gang_id.is_empty() {
                        a.gang = Some(gang_key(app_id, &ra.gang_id));
                    }
                    a.seq = app.seq();
                    asks.push(a);
                    keys.push((app_id.clone(), ra.ask_id.clone()));
                    gangs
                        .push((!ra.gang_id.is_empty()).then(|| format!("{app_id}/{}", ra.gang_id)));
                    // A master's word, bounded: a grace of at most the
                    // spec's bound, a minimum only for a service's replicas.
                    preemption.push((
                        ra.preemption_grace_ms
                            .min(weft_spec::MAX_PREEMPTION_GRACE.as_millis() as u64),
                        if app.service { ra.min_available } else { 0 },
                    ));
                }
            }
            true
        });
        // Each queue's oldest waiting jobs' masters; a job found ended on
        // the way leaves the table.
        let mut ended = Vec::new();
        for waiting in table.masters.queues() {
            let mut taken = 0;
            for (app_id, ra) in waiting {
                if taken == MASTERS_PER_ROUND {
                    break;
                }
                let Some(app) = live(app_id) else {
                    ended.push(app_id.clone());
                    continue;
                };
                let Some(q) = queues.index(&app.queue) else {
                    break;
                };
                let mut a = to_ask(ra, asks.len() as u64, q, &app.user);
                a.seq = app.seq();
                a.key = ask_key(app_id, MASTER_ASK, 0);
                asks.push(a);
                keys.push((app_id.clone(), MASTER_ASK.to_string()));
                gangs.push(None);
                preemption.push((0, 0));
                taken += 1;
            }
        }
        for app in ended {
            table.masters.remove(&app);
        }
        drop(t);
        if asks.is_empty() {
            return None;
        }
        let busy = self.busy_ports.lock().expect("busy ports lock").clone();
        view.refresh(&state, &busy);
        let preempt = self.preempt_input(&state, &queues, &asks, view);
        Some(RoundInput {
            queues,
            asks,
            keys,
            gangs,
            busy,
            spread,
            preemption,
            preempt,
        })
    }
}

/// What one scheduling round works on.
pub(crate) struct RoundInput {
    queues: Queues,
    asks: Vec<Ask>,
    /// Per ask: (app, ask id).
    keys: Vec<(String, String)>,
    /// Per ask: its gang key (app/gang id), if in a gang.
    gangs: Vec<Option<String>>,
    busy: HashMap<String, BTreeSet<u16>>,
    /// Spread groups: how many each node holds.
    spread: HashMap<u64, HashMap<String, u32>>,
    /// Per ask: its preemption grace (ms) and its stage's minimum available.
    preemption: Vec<(u64, u32)>,
    /// The preemption planner's input, when it may run.
    preempt: Option<super::preempt::PreemptInput>,
}
