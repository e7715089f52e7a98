//! Apply: each command changes the state deterministically (no clock, no
//! randomness: the command carries its time), keeping the derived usage and
//! indexes in step (O(change)).

use std::collections::BTreeMap;

use super::*;

impl ClusterState {
    /// Applies one command. Deterministic: the same state and command give the
    /// same result on every member.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::RegisterNode {
                node_id,
                address,
                vcores_milli,
                memory_bytes,
                gpus,
                labels,
                running,
                ended,
                ready,
                ports,
                at_ms,
            } => {
                // Ends the agent could not report before: as it saw them.
                for done in ended {
                    let on_node = self
                        .containers
                        .get(done.container_id.as_str())
                        .is_some_and(|c| c.alloc.node_id == *node_id);
                    if !on_node || running.contains(&done.container_id) {
                        continue;
                    }
                    let end = self.touch(&done.container_id, |c| {
                        c.holding = false;
                        let ends = c.phase != ContainerPhase::Completed;
                        if ends {
                            c.phase = ContainerPhase::Completed;
                            c.end = Some(done.clone());
                            c.changed_at_ms = *at_ms;
                        }
                        ends
                    });
                    if end == Some(true) {
                        self.note_master_end(&done.container_id);
                    }
                }
                // Containers the agent neither runs nor reports ended: lost
                // while it was away. Only those known to have started: one
                // still ALLOCATED may be starting at this very moment (an
                // agent registers again on every leader change; found by
                // the fault harness: a task ended here, rerun, and running
                // twice at once). Its master ends it if its start fails.
                for id in self.end_containers_on(node_id, running, ContainerEnd::Lost, *at_ms) {
                    self.note_master_end(&id);
                }
                let u = self.node_use(node_id);
                if u.vcores_milli > *vcores_milli
                    || u.memory_bytes > *memory_bytes
                    || u.gpus.iter().any(|&g| g as usize >= gpus.len())
                {
                    return Outcome::Rejected(format!(
                        "capacity: below what the node's running containers use ({} vcores_milli, {} bytes, GPUs {:?})",
                        u.vcores_milli, u.memory_bytes, u.gpus
                    ));
                }
                let (registered_at_ms, drain) =
                    self.nodes
                        .get(node_id.as_str())
                        .map_or((*at_ms, false), |n| {
                            (
                                n.registered_at_ms,
                                n.drain || n.state == NodeState::Draining,
                            )
                        });
                self.node_changes.mark(node_id);
                self.nodes.insert(
                    node_id.as_str().into(),
                    Node {
                        id: node_id.clone(),
                        address: address.clone(),
                        vcores_milli: *vcores_milli,
                        memory_bytes: *memory_bytes,
                        gpus: gpus.clone(),
                        labels: labels.clone(),
                        state: if drain {
                            NodeState::Draining
                        } else {
                            NodeState::Running
                        },
                        ready: *ready,
                        ports: *ports,
                        drain,
                        registered_at_ms,
                        state_changed_at_ms: *at_ms,
                    },
                );
                Outcome::Done
            }
            Command::NodeUnready { node_id, at_ms } => match self.nodes.get_mut(node_id.as_str()) {
                Some(n) => {
                    if n.ready {
                        n.ready = false;
                        n.state_changed_at_ms = *at_ms;
                        self.node_changes.mark(node_id);
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::NodeReady { node_id, at_ms } => match self.nodes.get_mut(node_id.as_str()) {
                Some(n) if n.state == NodeState::Lost => Outcome::Rejected(format!(
                    "node_id: {node_id} is lost: it must register again"
                )),
                Some(n) => {
                    if !n.ready {
                        n.ready = true;
                        n.state_changed_at_ms = *at_ms;
                        self.node_changes.mark(node_id);
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::SetNodeState {
                node_id,
                state,
                at_ms,
            } => match self.nodes.get_mut(node_id.as_str()) {
                Some(n) => {
                    n.drain |= *state == NodeState::Draining;
                    if n.state != *state {
                        n.state = *state;
                        n.state_changed_at_ms = *at_ms;
                        self.node_changes.mark(node_id);
                    }
                    if *state == NodeState::Lost {
                        let ended =
                            self.end_containers_on(node_id, &[], ContainerEnd::NodeLost, *at_ms);
                        for id in ended {
                            self.note_master_end(&id);
                        }
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::SubmitApplication {
                request_id,
                name,
                queue,
                user,
                spec,
                spec_format,
                unmanaged,
                accepted,
                service,
                priority,
                at_ms,
            } => {
                if !request_id.is_empty() {
                    if let Some(id) = self.submissions.get(request_id) {
                        // A retry of the same user's submission; another
                        // user's request id names nothing of theirs.
                        return match self.apps.get(id.as_str()) {
                            Some(a) if a.user != *user => Outcome::Rejected(format!(
                                "request_id: {request_id:?} is another submission's; retry with an id of your own"
                            )),
                            _ => Outcome::Submitted { app_id: id.clone() },
                        };
                    }
                }
                self.app_seq += 1;
                let id = super::app_id(self.app_seq);
                self.apps.insert(
                    id.as_str().into(),
                    App {
                        id: id.clone(),
                        name: name.clone(),
                        queue: queue.clone(),
                        user: user.clone(),
                        state: if *accepted {
                            AppState::Accepted
                        } else {
                            AppState::Submitted
                        },
                        spec: spec.clone(),
                        spec_format: spec_format.clone(),
                        submitted_at_ms: *at_ms,
                        finished_at_ms: 0,
                        diagnostics: String::new(),
                        attempt: 0,
                        am_container: None,
                        unmanaged: *unmanaged,
                        free_attempts: 0,
                        stages: Vec::new(),
                        service: *service,
                        priority: *priority,
                        preempted: 0,
                        preempted_recently: BTreeMap::new(),
                        endpoints: Vec::new(),
                        replicas: BTreeMap::new(),
                        spec_revision: 0,
                        rollout: String::new(),
                        rollout_stopped: 0,
                        prior_specs: Vec::new(),
                    },
                );
                if !request_id.is_empty() {
                    self.submissions.insert(request_id.clone(), id.clone());
                }
                Outcome::Submitted { app_id: id }
            }
            Command::KillApplication { app_id, at_ms } => {
                match self.apps.get_mut(app_id.as_str()) {
                    Some(a) if a.state.is_terminal() => Outcome::Done,
                    Some(a) => {
                        a.state = AppState::Killed;
                        a.endpoints.clear();
                        a.finished_at_ms = *at_ms;
                        a.diagnostics = "killed on request".into();
                        self.end_app_containers(app_id, *at_ms, "its application was killed");
                        Outcome::Done
                    }
                    None => Outcome::Rejected(format!("application_id: no application {app_id}")),
                }
            }
            Command::ApplicationAccepted { app_id, .. } => match self.apps.get_mut(app_id.as_str())
            {
                Some(a) if a.state == AppState::Submitted => {
                    a.state = AppState::Accepted;
                    Outcome::Done
                }
                Some(a) => Outcome::Rejected(format!(
                    "application_id: {app_id} is {:?}, not submitted",
                    a.state
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::AttemptStarted {
                app_id,
                attempt,
                am_container,
                keep_containers,
                previous_lost,
                ..
            } => match self.apps.get_mut(app_id.as_str()) {
                Some(a) if a.state.is_terminal() => {
                    Outcome::Rejected(format!("application_id: {app_id} already ended"))
                }
                Some(a) if *attempt <= a.attempt => Outcome::Rejected(format!(
                    "attempt: {attempt} is not after attempt {} of {app_id}",
                    a.attempt
                )),
                Some(a) => {
                    if *previous_lost && a.attempt > 0 {
                        a.free_attempts += 1;
                    }
                    a.attempt = *attempt;
                    a.am_container = am_container.clone();
                    a.state = AppState::Running;
                    // The new attempt's master reports its own.
                    a.endpoints.clear();
                    // The previous attempt's running task containers: kept
                    // for the new attempt to adopt (work-preserving), or
                    // ended. Ones not known to run yet end either way (the
                    // new attempt cannot tell whether they were started).
                    let keep = am_container.clone().unwrap_or_default();
                    let ids = self
                        .app_containers
                        .get(app_id.as_str())
                        .cloned()
                        .unwrap_or_default();
                    for id in &ids {
                        self.touch(id, |c| {
                            if c.phase != ContainerPhase::Completed
                                && c.alloc.container_id != keep
                                && !(*keep_containers
                                    && c.alloc.ask_id != MASTER_ASK
                                    && c.phase == ContainerPhase::Running)
                            {
                                c.holding = true; // it may run (or be starting) until its agent says not
                                c.phase = ContainerPhase::Completed;
                                c.end = Some(Completion {
                                    container_id: c.alloc.container_id.clone(),
                                    state: ContainerEnd::Killed,
                                    exit_status: -105,
                                    diagnostic: format!(
                                        "attempt {attempt} replaced the attempt that ran it"
                                    ),
                                });
                            }
                        });
                    }
                    // Its container may have ended already, between its
                    // allocation and this record (its node registered again
                    // without it, or was lost): through no fault of the
                    // master, which never ran.
                    if let Some(id) = am_container {
                        self.note_master_end(id);
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ApplicationFinished {
                app_id,
                state,
                diagnostics,
                stages,
                at_ms,
            } => {
                if !state.is_terminal() {
                    return Outcome::Rejected(format!("state: {state:?} is not a final state"));
                }
                match self.apps.get_mut(app_id.as_str()) {
                    Some(a) if a.state.is_terminal() => Outcome::Done,
                    Some(a) => {
                        a.state = *state;
                        a.diagnostics = diagnostics.clone();
                        a.finished_at_ms = *at_ms;
                        a.endpoints.clear();
                        if !stages.is_empty() {
                            a.stages = stages.clone();
                        }
                        self.end_app_containers(app_id, *at_ms, "its application ended");
                        Outcome::Done
                    }
                    None => Outcome::Rejected(format!("application_id: no application {app_id}")),
                }
            }
            Command::ContainersAllocated { allocations, at_ms } => {
                let verdict = self.verify_plan(allocations);
                for a in &verdict.accepted {
                    self.app_containers
                        .entry(a.app_id.as_str().into())
                        .or_default()
                        .insert(a.container_id.as_str().into());
                    self.node_containers
                        .entry(a.node_id.as_str().into())
                        .or_default()
                        .insert(a.container_id.as_str().into());
                    self.containers.insert(
                        a.container_id.as_str().into(),
                        Container {
                            alloc: a.clone(),
                            phase: ContainerPhase::Allocated,
                            end: None,
                            allocated_at_ms: *at_ms,
                            changed_at_ms: *at_ms,
                            holding: false,
                            preempted: None,
                        },
                    );
                    Self::charge_node(&mut self.usage, &mut self.node_changes, a, true);
                    Self::charge_queue(&mut self.queue_usage, &self.apps, a, true);
                }
                if verdict.refused.is_empty() {
                    Outcome::Done
                } else {
                    Outcome::PartlyApplied {
                        refused: verdict.refused,
                    }
                }
            }
            Command::ContainersLaunched {
                container_ids,
                at_ms,
            } => {
                for id in container_ids {
                    if let Some(c) = self.containers.get_mut(id.as_str()) {
                        if c.phase == ContainerPhase::Allocated {
                            c.phase = ContainerPhase::Running;
                            c.changed_at_ms = *at_ms;
                        }
                    }
                }
                Outcome::Done
            }
            Command::ContainersCompleted {
                completions,
                still_running,
                at_ms,
            } => {
                for done in completions {
                    let ended = self.touch(&done.container_id, |c| {
                        let ends = c.phase != ContainerPhase::Completed;
                        if ends {
                            c.holding = *still_running;
                            c.phase = ContainerPhase::Completed;
                            c.end = Some(done.clone());
                            c.changed_at_ms = *at_ms;
                        }
                        ends
                    });
                    if ended == Some(true) {
                        self.note_master_end(&done.container_id);
                    }
                }
                Outcome::Done
            }
            Command::PreemptContainers { preemptions, at_ms } => {
                let mut refused = Vec::new();
                for p in preemptions {
                    // Only what still runs: an end that came first stands.
                    let done = self.touch(&p.container_id, |c| {
                        if c.phase != ContainerPhase::Running {
                            return None;
                        }
                        c.phase = ContainerPhase::Completed;
                        c.holding = true;
                        c.end = Some(Completion {
                            container_id: p.container_id.clone(),
                            state: ContainerEnd::Killed,
                            exit_status: weft_proto::exit_codes::PREEMPTED,
                            diagnostic: p.diagnostic.clone(),
                        });
                        c.changed_at_ms = *at_ms;
                        c.preempted = Some(PreemptedStop {
                            grace_ms: p.grace_ms,
                            at_ms: *at_ms,
                        });
                        Some((c.alloc.app_id.clone(), c.alloc.ask_id.clone()))
                    });
                    let Some(Some((app, ask))) = done else {
                        refused.push(Refusal {
                            container_id: p.container_id.clone(),
                            reason: "not running".into(),
                        });
                        continue;
                    };
                    if let Some(a) = self.apps.get_mut(app.as_str()) {
                        a.preempted = a.preempted.saturating_add(1);
                        let hour_ago = at_ms.saturating_sub(PREEMPTION_WINDOW_MS);
                        a.preempted_recently.retain(|_, times| {
                            times.retain(|&t| t > hour_ago);
                            !times.is_empty()
                        });
                        a.preempted_recently.entry(ask).or_default().push(*at_ms);
                    }
                }
                if refused.is_empty() {
                    Outcome::Done
                } else {
                    Outcome::PartlyApplied { refused }
                }
            }
            Command::ReportProgress {
                app_id,
                attempt,
                stages,
            } => match self.apps.get_mut(app_id.as_str()) {
                Some(a) if !a.state.is_terminal() && a.attempt == *attempt => {
                    a.stages = stages.clone();
                    Outcome::Done
                }
                Some(_) => Outcome::Rejected(format!(
                    "attempt: {attempt} of {app_id} is not its live attempt"
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ReportEndpoints {
                app_id,
                attempt,
                endpoints,
                rollout,
                rollout_stopped,
            } => match self.apps.get_mut(app_id.as_str()) {
                Some(a) if !a.state.is_terminal() && a.attempt == *attempt => {
                    a.endpoints = endpoints.clone();
                    a.rollout = rollout.clone();
                    a.rollout_stopped = *rollout_stopped;
                    Outcome::Done
                }
                Some(_) => Outcome::Rejected(format!(
                    "attempt: {attempt} of {app_id} is not its live attempt"
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::UpdateSpec {
                app_id,
                spec,
                spec_format,
            } => match self.apps.get_mut(app_id.as_str()) {
                Some(a) if !a.state.is_terminal() => {
                    // The revision replaced stays known (the last two), for
                    // a new attempt whose replicas still run it.
                    let prior = PriorSpec {
                        revision: a.spec_revision,
                        spec: std::mem::replace(&mut a.spec, spec.clone()),
                        spec_format: std::mem::replace(&mut a.spec_format, spec_format.clone()),
                    };
                    a.prior_specs.insert(0, prior);
                    a.prior_specs.truncate(PRIOR_SPECS);
                    a.spec_revision += 1;
                    a.replicas.clear();
                    a.rollout_stopped = 0;
                    Outcome::Done
                }
                Some(a) => Outcome::Rejected(format!(
                    "application_id: {app_id} has finished ({:?})",
                    a.state
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ScaleStage {
                app_id,
                stage,
                replicas,
            } => match self.apps.get_mut(app_id.as_str()) {
                Some(a) if !a.state.is_terminal() => {
                    a.replicas.insert(stage.clone(), *replicas);
                    Outcome::Done
                }
                Some(a) => Outcome::Rejected(format!(
                    "application_id: {app_id} has finished ({:?})",
                    a.state
                )),
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
            Command::ContainersStopped { container_ids } => {
                for id in container_ids {
                    self.touch(id, |c| {
                        if c.phase == ContainerPhase::Completed {
                            c.holding = false;
                        }
                    });
                }
                Outcome::Done
            }
            Command::PruneContainers { finished_before_ms } => {
                let done: Vec<String> = self
                    .apps
                    .values()
                    .filter(|a| a.state.is_terminal() && a.finished_at_ms < *finished_before_ms)
                    .map(|a| a.id.clone())
                    .collect();
                for app in done {
                    self.prune_ended_containers(&app);
                }
                Outcome::Done
            }
            Command::PruneApplications {
                finished_before_ms,
                keep,
            } => {
                let mut finished: Vec<(u64, Id)> = self
                    .apps
                    .values()
                    .filter(|a| a.state.is_terminal())
                    .map(|a| (a.finished_at_ms, a.id.as_str().into()))
                    .collect();
                finished.sort();
                let excess = finished.len().saturating_sub(*keep as usize);
                let mut pruned = false;
                for (i, (at, app)) in finished.into_iter().enumerate() {
                    if i >= excess && at >= *finished_before_ms {
                        continue;
                    }
                    if !self.prune_ended_containers(&app) {
                        continue;
                    }
                    self.apps.remove(app.as_str());
                    pruned = true;
                }
                if pruned {
                    let gone: Vec<String> = self
                        .submissions
                        .iter()
                        .filter(|(_, app)| !self.apps.contains_key(app.as_str()))
                        .map(|(request, _)| request.clone())
                        .collect();
                    for request in gone {
                        self.submissions.remove(&request);
                    }
                }
                Outcome::Done
            }
            Command::SetTokenKey { seed_hex } => {
                if self.token_keys.is_empty() {
                    if let Err(e) = self.set_first_token_key(seed_hex) {
                        return Outcome::Rejected(e);
                    }
                }
                Outcome::Done
            }
            Command::RotateTokenKey {
                seed_hex,
                request_id,
                at_ms,
                signs_from_ms,
                keep_previous_ms,
            } => {
                if !request_id.is_empty()
                    && self.token_keys.iter().any(|k| k.request_id == *request_id)
                {
                    return Outcome::Done;
                }
                let Some(last) = self.token_keys.last() else {
                    return Outcome::Rejected("the group has no token key yet: it makes one when its first leader is elected".into());
                };
                if last.signs_from_ms > *at_ms {
                    return Outcome::Rejected(format!(
                        "key {} was made by a rotation and signs only from {} (Unix ms): rotate again after that",
                        last.id, last.signs_from_ms
                    ));
                }
                if self.token_keys.len() >= MAX_TOKEN_KEYS {
                    return Outcome::Rejected(format!(
                        "{MAX_TOKEN_KEYS} token keys are held: rotate again once replaced keys are dropped (rmctl acl signing-keys lists when)"
                    ));
                }
                if weft_proto::token::TokenSigner::from_seed_hex(seed_hex).is_err() {
                    return Outcome::Rejected("seed_hex: not a 32-byte key seed in hex".into());
                }
                let id = last.id + 1;
                let drop_at = signs_from_ms.saturating_add(*keep_previous_ms);
                let last = self.token_keys.last_mut().expect("checked above");
                last.drop_at_ms = drop_at;
                self.token_keys.push(TokenKey {
                    id,
                    seed_hex: seed_hex.clone(),
                    created_at_ms: *at_ms,
                    signs_from_ms: *signs_from_ms,
                    drop_at_ms: 0,
                    request_id: request_id.clone(),
                });
                Outcome::Done
            }
            Command::DropTokenKeys { before_ms } => {
                let newest = self.token_keys.last().map(|k| k.id);
                self.token_keys.retain(|k| {
                    Some(k.id) == newest || k.drop_at_ms == 0 || k.drop_at_ms > *before_ms
                });
                Outcome::Done
            }
            Command::AclBootstrap { token } => {
                // A retry of the bootstrap that made this very token.
                if self
                    .acl_tokens
                    .get(&token.accessor)
                    .is_some_and(|t| t.secret_sha256 == token.secret_sha256 && t.admin)
                {
                    return Outcome::Done;
                }
                if self.acl_bootstrapped {
                    return Outcome::Rejected(
                        "the cluster's ACLs were bootstrapped already (an admin makes more tokens with `rmctl acl token create`)".into(),
                    );
                }
                self.acl_bootstrapped = true;
                self.acl_tokens
                    .insert(token.accessor.clone(), token.clone());
                Outcome::Done
            }
            Command::AclTokenCreate { token } => {
                if self.acl_tokens.contains_key(&token.accessor) {
                    return Outcome::Rejected(format!(
                        "accessor: a token {} exists already",
                        token.accessor
                    ));
                }
                self.acl_tokens
                    .insert(token.accessor.clone(), token.clone());
                Outcome::Done
            }
            Command::AclTokensPrune { expired_before_ms } => {
                self.acl_tokens
                    .retain(|_, t| t.expires_at_ms == 0 || t.expires_at_ms >= *expired_before_ms);
                Outcome::Done
            }
            Command::SetMemberHttp { member, url } => {
                if url.is_empty() {
                    self.member_http.remove(member);
                } else {
                    self.member_http.insert(*member, url.clone());
                }
                Outcome::Done
            }
            Command::AclTokenRevoke { accessor } => {
                if self.acl_tokens.remove(accessor).is_none() {
                    return Outcome::Rejected(format!("accessor: no token {accessor}"));
                }
                Outcome::Done
            }
            Command::SetQueues { queues } => {
                let mut names = std::collections::BTreeSet::new();
                for q in queues {
                    if q.name != "root" && !q.name.starts_with("root.") {
                        return Outcome::Rejected(format!(
                            "queues.name: {:?} must be root or start with \"root.\"",
                            q.name
                        ));
                    }
                    if !names.insert(q.name.as_str()) {
                        return Outcome::Rejected(format!("queues.name: {} appears twice", q.name));
                    }
                }
                self.queues = queues.iter().map(|q| (q.name.clone(), q.clone())).collect();
                Outcome::Done
            }
        }
    }

    /// Changes container `id` with `f`, keeping the derived usage in step
    /// (O(change)). None when there is no such container.
    pub(super) fn touch<R>(&mut self, id: &str, f: impl FnOnce(&mut Container) -> R) -> Option<R> {
        let c = self.containers.get_mut(id)?;
        let (occupied, active) = (c.occupies_node(), c.phase != ContainerPhase::Completed);
        let r = f(c);
        let c = &self.containers[id];
        let (now_occupied, now_active) = (c.occupies_node(), c.phase != ContainerPhase::Completed);
        if occupied != now_occupied {
            Self::charge_node(
                &mut self.usage,
                &mut self.node_changes,
                &c.alloc,
                now_occupied,
            );
        }
        if active != now_active {
            Self::charge_queue(&mut self.queue_usage, &self.apps, &c.alloc, now_active);
        }
        Some(r)
    }

    pub(super) fn charge_node(
        usage: &mut BTreeMap<Id, NodeUse>,
        changes: &mut changes::NodeChanges,
        a: &Allocation,
        add: bool,
    ) {
        changes.mark(&a.node_id);
        let u = usage.entry(a.node_id.as_str().into()).or_default();
        u.charge(a, add);
        if u.containers == 0 {
            usage.remove(a.node_id.as_str());
        }
    }

    pub(super) fn charge_queue(
        usage: &mut BTreeMap<String, BTreeMap<String, QueueUse>>,
        apps: &imbl::OrdMap<Id, App>,
        a: &Allocation,
        add: bool,
    ) {
        let Some(app) = apps.get(a.app_id.as_str()) else {
            return;
        };
        let gpu = 1000 * a.gpus.len() as u64 + a.gpu_share.map_or(0, |sh| sh.milli as u64);
        let users = usage.entry(app.queue.clone()).or_default();
        let u = users.entry(app.user.clone()).or_default();
        if add {
            u.vcores_milli += a.vcores_milli;
            u.memory_bytes += a.memory_bytes;
            u.gpu_milli += gpu;
            u.containers += 1;
        } else {
            u.vcores_milli -= a.vcores_milli;
            u.memory_bytes -= a.memory_bytes;
            u.gpu_milli -= gpu;
            u.containers -= 1;
        }
        if u.containers == 0 {
            users.remove(&app.user);
            if users.is_empty() {
                usage.remove(&app.queue);
            }
        }
    }

    /// A master that ended through no fault of its own (its node lost,
    /// unreachable or fenced, its agent gone or shutting down) does not use one of
    /// its application's `max_attempts`.
    pub(super) fn note_master_end(&mut self, container_id: &str) {
        let Some(c) = self.containers.get(container_id) else {
            return;
        };
        let Some(end) = &c.end else {
            return;
        };
        let not_its_fault = matches!(end.state, ContainerEnd::NodeLost | ContainerEnd::Lost)
            || end.exit_status == weft_proto::exit_codes::AGENT_SHUTDOWN
            || end.exit_status == weft_proto::exit_codes::FENCED;
        if c.alloc.ask_id != MASTER_ASK || !not_its_fault {
            return;
        }
        if let Some(a) = self.apps.get_mut(c.alloc.app_id.as_str()) {
            if a.am_container.as_deref() == Some(container_id) {
                a.free_attempts += 1;
            }
        }
    }

    /// Ends every unfinished container of `app_id` (agents stop them at their
    /// next heartbeat).
    pub(super) fn end_app_containers(&mut self, app_id: &str, at_ms: u64, why: &str) {
        let ids = self.app_containers.get(app_id).cloned().unwrap_or_default();
        for id in &ids {
            self.touch(id, |c| {
                if c.phase != ContainerPhase::Completed {
                    c.holding = true; // it may run (or be starting) until its agent says not
                    c.phase = ContainerPhase::Completed;
                    c.changed_at_ms = at_ms;
                    c.end = Some(Completion {
                        container_id: c.alloc.container_id.clone(),
                        state: ContainerEnd::Killed,
                        exit_status: -105,
                        diagnostic: why.to_string(),
                    });
                }
            });
        }
    }

    /// Ends every unfinished container on `node_id` except those in `keep`
    /// (for `Lost`, a registration's verdict: only containers known to have
    /// started). Returns the ids of the containers it ended.
    pub(super) fn end_containers_on(
        &mut self,
        node_id: &str,
        keep: &[String],
        end: ContainerEnd,
        at_ms: u64,
    ) -> Vec<String> {
        let mut ended = Vec::new();
        let on = self
            .node_containers
            .get(node_id)
            .cloned()
            .unwrap_or_default();
        for id in &on {
            if keep.iter().any(|k| k == id.as_str()) {
                continue;
            }
            // A registration speaks for started containers only.
            if end == ContainerEnd::Lost
                && self
                    .containers
                    .get(id.as_str())
                    .is_some_and(|c| c.phase == ContainerPhase::Allocated)
            {
                continue;
            }
            self.touch(id, |c| {
                // Whatever the RM ended there no longer runs either.
                c.holding = false;
                if c.phase != ContainerPhase::Completed {
                    c.phase = ContainerPhase::Completed;
                    c.changed_at_ms = at_ms;
                    c.end = Some(Completion {
                        container_id: c.alloc.container_id.clone(),
                        state: end,
                        exit_status: match end {
                            ContainerEnd::NodeLost => -100,
                            _ => -109,
                        },
                        diagnostic: match end {
                            ContainerEnd::NodeLost => {
                                format!("node {node_id} was lost (no heartbeat)")
                            }
                            _ => format!("node {node_id} registered again without it"),
                        },
                    });
                    ended.push(c.alloc.container_id.clone());
                }
            });
        }
        ended
    }
}

impl ClusterState {
    /// Drops the ended containers of `app` (those still holding a node's
    /// resources stay). True when none is left.
    fn prune_ended_containers(&mut self, app: &str) -> bool {
        let Some(ids) = self.app_containers.get_mut(app) else {
            return true;
        };
        ids.retain(|id| match self.containers.get(id) {
            Some(c) if !c.occupies_node() => {
                if let Some(on) = self.node_containers.get_mut(c.alloc.node_id.as_str()) {
                    on.remove(id);
                    if on.is_empty() {
                        self.node_containers.remove(c.alloc.node_id.as_str());
                    }
                }
                self.containers.remove(id);
                false
            }
            _ => true,
        });
        let none_left = ids.is_empty();
        if none_left {
            self.app_containers.remove(app);
        }
        none_left
    }
}
