//! Starting and watching application masters: accepted jobs get a master
//! container (or an in-process master in standalone mode); a master that
//! fails uses one of its job's attempts.

use super::*;

/// The job spec's file in a master's working directory
/// (`WEFT_JOB_SPEC_FILE`).
pub const SPEC_FILE: &str = "weft-job-spec";
/// The file (in the master's working directory) that holds its application
/// token (`WEFT_APP_TOKEN_FILE`).
pub const TOKEN_FILE: &str = "weft-app-token";

/// A spec up to this size is in the master's environment too
/// (`WEFT_JOB_SPEC`).
pub const SPEC_IN_ENV_BYTES: usize = 64 << 10;

/// What one master pass decided: commands to propose, masters to start
/// again.
#[derive(Default)]
struct PassOut {
    commands: Vec<Command>,
    start_again: Vec<(String, u32, Allocation)>,
}

impl Scheduling {
    /// Accepts submitted jobs, asks for a master container for every job
    /// whose master is not running, and fails jobs whose masters failed
    /// `max_attempts` times.
    ///
    /// A pass looks at the jobs that can need something: those submitted
    /// since the last pass and those it watches (a master granted, starting
    /// or running: its timers; an end being proposed). A job waiting with
    /// its master's ask in the table needs nothing until a round grants it
    /// (which watches it again), so a backlog of waiting jobs costs a pass
    /// nothing: before, every pass looked at every live job, and with
    /// 10,000 waiting the passes took a third of the leader's CPU and made
    /// writes wait. A full pass over every job runs when a leadership
    /// starts and every [`FULL_MASTER_PASS_EVERY`].
    /// Returns how long its pass over the state took (the loop's own
    /// work, without the proposals' round trips).
    pub(super) async fn manage_masters(&self) -> std::time::Duration {
        let cfg = self
            .masters
            .clone()
            .expect("called only when masters are launched");
        if cfg.in_process {
            return self.manage_local_masters().await;
        }
        let mut out = PassOut::default();
        let pass = std::time::Instant::now();
        let now = pass;
        // A full pass after watched ones checks them: a job it finds
        // needing something that they neither watched nor were to see as
        // new is named in a warning (a missed transition: a bug).
        let (full, checked) = {
            let mut t = self.table.lock().expect("table lock");
            let due = t
                .full_pass_at
                .is_none_or(|at| now.duration_since(at) >= FULL_MASTER_PASS_EVERY);
            let checked = (due && t.full_pass_at.is_some())
                .then(|| (std::mem::take(&mut t.watch), t.pass_seq));
            if due {
                t.full_pass_at = Some(now);
                t.watch.clear();
            }
            (due, checked)
        };
        let mut missed = Vec::new();
        let upto = self.raft.state().app_seq;
        if full {
            // In chunks, each under the state's lock on its own: the raft
            // thread applies in between instead of waiting out a pass over
            // every job of a long backlog.
            let mut after: Option<String> = None;
            loop {
                let state = self.raft.state();
                let mut t = self.table.lock().expect("table lock");
                let range = match &after {
                    None => state.apps.range::<_, str>(..),
                    Some(k) => state.apps.range::<_, str>((
                        std::ops::Bound::Excluded(k.as_str()),
                        std::ops::Bound::Unbounded,
                    )),
                };
                let mut seen = 0;
                let mut last = None;
                for (id, app) in range.take(MASTER_PASS_CHUNK) {
                    seen += 1;
                    last = Some(id.clone());
                    // (Watched already: granted while this pass ran.)
                    let (commands, asked, watched_now) = (
                        out.commands.len(),
                        t.masters.contains_key(&app.id),
                        t.watch.contains(&app.id),
                    );
                    let watch = self.master_pass_one(&cfg, &state, &mut t, app, now, &mut out);
                    if watch {
                        t.watch.insert(app.id.clone());
                    }
                    let acted = watch
                        || out.commands.len() > commands
                        || t.masters.contains_key(&app.id) != asked;
                    if let Some((watched, seq)) = &checked {
                        if acted && !watched_now && !watched.contains(&app.id) && app.seq() <= *seq
                        {
                            missed.push(app.id.clone());
                        }
                    }
                }
                match last {
                    Some(k) if seen == MASTER_PASS_CHUNK => after = Some(k.to_string()),
                    _ => break,
                }
            }
        } else {
            let ids: Vec<String> = {
                let t = self.table.lock().expect("table lock");
                t.watch
                    .iter()
                    .cloned()
                    .chain((t.pass_seq + 1..=upto).map(crate::fsm::app_id))
                    .collect()
            };
            for chunk in ids.chunks(MASTER_PASS_CHUNK) {
                let state = self.raft.state();
                let mut t = self.table.lock().expect("table lock");
                for id in chunk {
                    let watch = state.apps.get(id.as_str()).is_some_and(|app| {
                        self.master_pass_one(&cfg, &state, &mut t, app, now, &mut out)
                    });
                    if watch {
                        t.watch.insert(id.clone());
                    } else {
                        t.watch.remove(id);
                    }
                }
            }
        }
        {
            let mut t = self.table.lock().expect("table lock");
            t.pass_seq = t.pass_seq.max(upto);
        }
        if !missed.is_empty() {
            warn!(jobs = ?missed, "master pass over every job found jobs the watched passes missed");
        }
        let pass = pass.elapsed();
        for (app, attempt, a) in out.start_again {
            let s = self.clone();
            tokio::spawn(async move {
                s.start_master(&app, attempt, a, true).await;
                s.table.lock().expect("table lock").launching.remove(&app);
            });
        }
        self.propose_all(out.commands).await;
        pass
    }

    /// One job's master bookkeeping in a pass (see
    /// [`Scheduling::manage_masters`]). True when later passes must look at
    /// it again.
    fn master_pass_one(
        &self,
        cfg: &crate::config::MastersConfig,
        state: &crate::fsm::ClusterState,
        t: &mut Table,
        app: &crate::fsm::App,
        now: std::time::Instant,
        out: &mut PassOut,
    ) -> bool {
        let PassOut {
            commands,
            start_again,
        } = out;
        if app.state.is_terminal() || app.unmanaged {
            if !t.unstarted.is_empty() {
                t.unstarted.remove(&app.id);
            }
            return false;
        }
        if app.state == AppState::Submitted {
            // Accepted, and its master asked for, in one pass.
            commands.push(Command::ApplicationAccepted {
                app_id: app.id.clone(),
                at_ms: now_ms(),
            });
        }
        let last = app
            .am_container
            .as_ref()
            .and_then(|c| state.containers.get(c.as_str()));
        if let Some(c) = last.filter(|c| c.phase != ContainerPhase::Completed) {
            // Granted, its attempt recorded, and not reported
            // running by its node for a while: the leader that
            // recorded it may have died before asking the node to
            // start it. Asked (again) here; at most one start.
            if c.phase == ContainerPhase::Allocated && !t.launching.contains(&app.id) {
                let since = *t.unstarted.entry(app.id.clone()).or_insert(now);
                if now.duration_since(since) >= MASTER_START_AGAIN_AFTER {
                    t.unstarted.insert(app.id.clone(), now);
                    t.launching.insert(app.id.clone());
                    start_again.push((app.id.clone(), app.attempt, c.alloc.clone()));
                }
            } else if !t.unstarted.is_empty() {
                t.unstarted.remove(&app.id);
            }
            // A master that stopped calling is ended (its agent stops
            // it) and replaced; a new leader gives every master a
            // full expiry from its election.
            let seen = *t.last_seen.entry(app.id.clone()).or_insert(now);
            if now.duration_since(seen) > cfg.expiry {
                warn!(app = %app.id, attempt = app.attempt, expiry = ?cfg.expiry, "application master stopped calling; ending it");
                t.last_seen.remove(&app.id);
                commands.push(Command::ContainersCompleted {
                    completions: vec![Completion {
                        container_id: c.alloc.container_id.clone(),
                        state: ContainerEnd::Killed,
                        exit_status: weft_proto::exit_codes::USER_REQUESTED,
                        diagnostic: format!(
                            "the application master made no call for {}",
                            humantime::format_duration(cfg.expiry)
                        ),
                    }],
                    still_running: true,
                    at_ms: now_ms(),
                });
            }
            return true; // its timers are checked every pass
        }
        if t.masters.contains_key(&app.id) || t.launching.contains(&app.id) {
            return t.launching.contains(&app.id) || app.state == AppState::Submitted;
        }
        if app.am_container.is_some() && last.is_none() {
            return true;
        }
        let Ok(spec) = weft_spec::JobSpec::parse(&app.spec, &app.spec_format) else {
            return false; // refused at submission; seen again by a full pass
        };
        let why = last
            .and_then(|c| c.end.as_ref())
            .map(|e| e.diagnostic.clone())
            .unwrap_or_default();
        if let Some(end) = attempts_exhausted(app, &spec, 0, &why) {
            commands.push(end);
            return true; // until its end applies
        }
        // The spec's `am:` resources in full (labels and GPUs too),
        // else the configured default.
        let ask = match &spec.am {
            Some(r) => {
                let (gpus, gpu_share_milli) = r.gpu_split();
                pb::ResourceAsk {
                    resources: Some(pb::Resources {
                        vcores_milli: r.vcores_milli(),
                        memory_bytes: r.memory.as_u64(),
                        gpus,
                        gpu_share_milli,
                        gpu_memory_bytes: r.gpu_memory.map_or(0, |m| m.as_u64()),
                    }),
                    node_labels: r.node_label_expr(),
                    gpu_model: r.gpu_model.clone().unwrap_or_default(),
                    gpu_min_memory_bytes: r.gpu_min_memory.map_or(0, |m| m.as_u64()),
                    ..Default::default()
                }
            }
            None => pb::ResourceAsk {
                resources: Some(pb::Resources {
                    vcores_milli: (cfg.vcores * 1000.0) as u64,
                    memory_bytes: cfg.memory.as_u64(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        t.masters.insert(
            &app.id,
            &app.queue,
            app.seq(),
            pb::ResourceAsk {
                ask_id: MASTER_ASK.into(),
                count: 1,
                placement: pb::PlacementPolicy::Spread as i32,
                ..ask
            },
        );
        app.state == AppState::Submitted
    }

    /// Proposes `commands` at once (one raft round carries them all, not
    /// one round trip each); one not committed is found again next pass.
    async fn propose_all(&self, commands: Vec<Command>) {
        let results =
            futures::future::join_all(commands.into_iter().map(|c| self.raft.propose(c))).await;
        for e in results.into_iter().filter_map(|r| r.err()) {
            debug!(error = %e, "master bookkeeping not committed");
        }
    }

    /// Standalone mode: every live job has a master task inside this
    /// leader. A job found running without one (this process restarted)
    /// gets a new attempt that does not count against `max_attempts` and
    /// adopts what still runs; a master task that ended without finishing
    /// its job counts.
    pub(super) async fn manage_local_masters(&self) -> std::time::Duration {
        let mut commands = Vec::new();
        let mut start = Vec::new();
        let pass = std::time::Instant::now();
        {
            let state = self.raft.state();
            let mut local = self.local.lock().expect("local masters lock");
            local.retain(|id, m| {
                !m.task.is_finished()
                    || state
                        .apps
                        .get(id.as_str())
                        .is_some_and(|a| !a.state.is_terminal())
            });
            for app in state
                .apps
                .values()
                .filter(|a| !a.state.is_terminal() && !a.unmanaged)
            {
                if app.state == AppState::Submitted {
                    commands.push(Command::ApplicationAccepted {
                        app_id: app.id.clone(),
                        at_ms: now_ms(),
                    });
                }
                let failure = match local.get(&app.id) {
                    Some(m) if !m.task.is_finished() => continue,
                    Some(m) => Some(
                        m.failure
                            .lock()
                            .expect("failure lock")
                            .clone()
                            .unwrap_or_else(|| "the master ended early".into()),
                    ),
                    None => None,
                };
                let Ok(spec) = weft_spec::JobSpec::parse(&app.spec, &app.spec_format) else {
                    continue;
                };
                let previous_lost = failure.is_none() && app.attempt > 0;
                let why = failure.unwrap_or_default();
                if let Some(end) = attempts_exhausted(app, &spec, previous_lost as u32, &why) {
                    commands.push(end);
                    continue;
                }
                start.push((app.id.clone(), app.attempt + 1, spec, previous_lost));
            }
        }
        let pass = pass.elapsed();
        self.propose_all(commands).await;
        if start.is_empty() {
            return pass;
        }
        let (Ok(signer), Some(me)) = (
            self.ensure_signer().await,
            self.raft.address_of(self.raft.status().id),
        ) else {
            return pass;
        };
        for (app_id, attempt, spec, previous_lost) in start {
            let started = self
                .raft
                .propose(Command::AttemptStarted {
                    app_id: app_id.clone(),
                    attempt,
                    am_container: None,
                    keep_containers: spec.keep_containers,
                    previous_lost,
                    at_ms: now_ms(),
                })
                .await;
            if !matches!(started, Ok(Outcome::Done)) {
                continue;
            }
            let token = application_token(&signer, &app_id, attempt);
            let failure: Arc<Mutex<Option<String>>> = Arc::default();
            let (id, why, rm) = (app_id.clone(), failure.clone(), vec![me.clone()]);
            let task = tokio::spawn(async move {
                let result = match weft_app_master::client::RmAmClient::new(rm, token) {
                    Ok(rm) => {
                        weft_app_master::runner::Runner::new(id.clone(), attempt, spec, rm)
                            .run()
                            .await
                    }
                    Err(e) => Err(e.into_status()),
                };
                match result {
                    Ok(f) => {
                        info!(app = %id, attempt, status = ?f.status, "in-process master finished")
                    }
                    Err(e) => {
                        warn!(app = %id, attempt, error = %e.message(), "in-process master failed");
                        *why.lock().expect("failure lock") = Some(e.message().to_string());
                    }
                }
            });
            info!(app = %app_id, attempt, "in-process application master started");
            self.local
                .lock()
                .expect("local masters lock")
                .insert(app_id, LocalMaster { task, failure });
        }
        pass
    }

    /// Starts a job's master in its container and records the attempt; a
    /// master that cannot start counts as a failed attempt.
    pub(super) async fn launch_master(&self, app_id: &str, a: Allocation) {
        let Some(app) = self.raft.state().apps.get(app_id).cloned() else {
            return;
        };
        let attempt = app.attempt + 1;
        let keep_containers = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
            .map_or(true, |s| s.keep_containers);
        if self.ensure_signer().await.is_err() {
            return; // the next round asks again
        }
        let started = self
            .raft
            .propose(Command::AttemptStarted {
                app_id: app_id.to_string(),
                attempt,
                am_container: Some(a.container_id.clone()),
                keep_containers,
                previous_lost: false,
                at_ms: now_ms(),
            })
            .await;
        if !matches!(started, Ok(Outcome::Done)) {
            return;
        }
        {
            let mut t = self.table.lock().expect("table lock");
            t.last_seen
                .insert(app_id.to_string(), std::time::Instant::now());
            // The replaced attempt's asks are not placed for it any more:
            // the new master asks for what it needs.
            t.asks.remove(app_id);
        }
        // A leader that dies (or is deposed) here leaves an attempt
        // recorded whose container no agent was asked to start: the next
        // leader starts it (`start_master` with `again`).
        fail::fail_point!("master-attempt-recorded", |_| ());
        self.start_master(app_id, attempt, a, false).await;
    }

    /// Asks the agent to start attempt `attempt`'s master in container
    /// `a`. `again`: a start this leader did not see answered (its
    /// predecessor recorded the attempt and may have died before or after
    /// asking); the agent starts a container id at most once, so an answer
    /// that it has it already means it started, and a node that cannot be
    /// reached is asked again later (or found lost) rather than taken for
    /// a failed master.
    pub(super) async fn start_master(
        &self,
        app_id: &str,
        attempt: u32,
        a: Allocation,
        again: bool,
    ) {
        let cfg = self
            .masters
            .clone()
            .expect("called only when masters are launched");
        // This leader first: the master's first call goes straight here.
        let me = self.raft.address_of(self.raft.status().id);
        let (app, node_addr, rm) = {
            let st = self.raft.state();
            let Some(app) = st.apps.get(app_id).cloned() else {
                return;
            };
            let node_addr = st
                .nodes
                .get(a.node_id.as_str())
                .map(|n| n.address.clone())
                .unwrap_or_default();
            let mut rm: Vec<String> = st.members.values().cloned().collect();
            if let Some(me) = me {
                rm.retain(|a| *a != me);
                rm.insert(0, me);
            }
            (app, node_addr, rm)
        };
        let Ok(signer) = self.ensure_signer().await else {
            return; // the next pass asks again
        };
        let req = pb::StartContainerRequest {
            container_id: a.container_id.clone(),
            command: cfg.command.clone(),
            args: vec![
                "--app-id".into(),
                app_id.to_string(),
                "--attempt".into(),
                attempt.to_string(),
                "--rm".into(),
                rm.join(","),
                "--spec-env".into(),
            ],
            // The spec as a file in the master's working directory, and
            // in the environment too while it fits comfortably (one
            // variable holds at most 128 KiB; a spec may have 1 MiB).
            // The application token in a file of its own, readable by the
            // job's user alone (not in the environment, which the user's
            // other processes can read in /proc and children inherit).
            files: [
                (SPEC_FILE.to_string(), app.spec.clone().into_bytes()),
                (
                    TOKEN_FILE.to_string(),
                    hex::encode(application_token(&signer, app_id, attempt)).into_bytes(),
                ),
            ]
            .into_iter()
            .collect(),
            env: [
                ("WEFT_JOB_SPEC_FILE".to_string(), SPEC_FILE.to_string()),
                ("WEFT_JOB_SPEC_FORMAT".to_string(), app.spec_format.clone()),
                ("WEFT_APP_ID".to_string(), app_id.to_string()),
                ("WEFT_ATTEMPT".to_string(), attempt.to_string()),
                (
                    "WEFT_RM_RETRY_FOR".to_string(),
                    humantime::format_duration(cfg.rm_retry_for).to_string(),
                ),
                ("WEFT_APP_TOKEN_FILE".to_string(), TOKEN_FILE.to_string()),
            ]
            .into_iter()
            .chain(
                (app.spec.len() <= SPEC_IN_ENV_BYTES)
                    .then(|| ("WEFT_JOB_SPEC".to_string(), app.spec.clone())),
            )
            .collect(),
            resources: Some(pb::ContainerResources {
                vcores_milli: a.vcores_milli,
                memory_bytes: a.memory_bytes,
                ..Default::default()
            }),
            token: container_token(
                &signer,
                &a,
                &crate::tokens::Owner {
                    user: app.user.clone(),
                    queue: app.queue.clone(),
                },
            ),
            checkpoint_key: String::new(),
        };
        let result = match self.node_channel(&node_addr) {
            Ok(ch) => {
                let mut c =
                    weft_proto::v1::container_manager_client::ContainerManagerClient::new(ch);
                c.start_container(req).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                info!(app = %app_id, attempt, node = %a.node_id, again, "application master started");
                if again {
                    // A full expiry from its start.
                    self.table
                        .lock()
                        .expect("table lock")
                        .last_seen
                        .insert(app_id.to_string(), std::time::Instant::now());
                }
            }
            Err(e) if again && already_started(&e) => {
                debug!(app = %app_id, attempt, "the application master's start had reached its node");
            }
            Err(e) if again && weft_common::codes::start_refused_transiently(&e) => {
                debug!(app = %app_id, attempt, error = %e.message(), "the application master's node did not answer; asked again later");
            }
            Err(e) => {
                warn!(app = %app_id, attempt, error = %e.message(), "application master could not start");
                // An unreachable node is not the job's fault (a free attempt).
                let unreachable = weft_common::codes::start_refused_transiently(&e);
                if unreachable {
                    self.hold_out(&a.node_id);
                }
                let _ = self
                    .raft
                    .propose(Command::ContainersCompleted {
                        completions: vec![Completion {
                            container_id: a.container_id,
                            state: if unreachable {
                                ContainerEnd::Lost
                            } else {
                                ContainerEnd::Failed
                            },
                            exit_status: weft_proto::exit_codes::LAUNCH_FAILED,
                            diagnostic: format!(
                                "could not start the application master: {}",
                                e.message()
                            ),
                        }],
                        still_running: false,
                        at_ms: now_ms(),
                    })
                    .await;
            }
        }
    }
}

/// An agent's answer that it has the container already (its start went
/// through before) or its token was used (the same).
fn already_started(e: &tonic::Status) -> bool {
    e.code() == tonic::Code::AlreadyExists
        || (e.code() == tonic::Code::PermissionDenied && e.message().contains("already used"))
}

/// How long a master's container may stay granted but not reported running
/// by its node before this leader asks the node to start it (again).
pub const MASTER_START_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The end of a job whose master attempts ran out (`extra_free`: attempts
/// not yet recorded as free), or None while it may try again.
pub(crate) fn attempts_exhausted(
    app: &crate::fsm::App,
    spec: &weft_spec::JobSpec,
    extra_free: u32,
    why: &str,
) -> Option<Command> {
    let free = (app.free_attempts + extra_free).min(FREE_ATTEMPTS);
    let failed = app.attempt.saturating_sub(free);
    (failed >= spec.max_attempts).then(|| Command::ApplicationFinished {
        app_id: app.id.clone(),
        state: AppState::Failed,
        diagnostics: format!("the application master failed {failed} time(s); last: {why}"),
        stages: vec![],
        at_ms: now_ms(),
    })
}
