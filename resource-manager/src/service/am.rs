//! The ApplicationMasterService: masters register, send their asks and
//! receive their allocations and completions (Allocate long-polls), and
//! finish. Answers come from the leader's scheduling table.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::debug;
use weft_proto::v1 as pb;

use crate::error::Error;
use crate::fsm::{
    AppState, ClusterState, Command, Completion, ContainerEnd, ContainerPhase, Outcome,
};
use crate::scheduler::{self};
use crate::service::now_ms;

use crate::leader::scheduling::*;
use crate::view::{cluster_view, queue_view};

/// The ApplicationMasterService.
pub struct AmService {
    s: Scheduling,
}

impl AmService {
    pub fn new(s: Scheduling) -> Self {
        AmService { s }
    }

    /// Checks an application token: signed by one of this group's keys,
    /// not expired, for this application and (when the call names one) this
    /// attempt. Returns the attempt the token is for.
    fn authorize(&self, token: &[u8], app: &str, attempt: u32) -> Result<u32, Status> {
        self.authorize_renewing(token, app, attempt).map(|(a, _)| a)
    }

    /// [`AmService::authorize`], and a new token for the same attempt when
    /// the one shown is due for renewal (see `tokens::renewal_due`).
    fn authorize_renewing(
        &self,
        token: &[u8],
        app: &str,
        attempt: u32,
    ) -> Result<(u32, Option<Vec<u8>>), Status> {
        let keys = self.s.keys();
        if keys.set.is_empty() {
            return Err(Status::unavailable(
                "the resource manager has no token key yet",
            ));
        }
        let now = crate::tokens::token_clock_ms();
        let (key_id, body) = keys
            .set
            .verify_application(token, now)
            .map_err(|e| Status::permission_denied(format!("application_token: {e}")))?;
        if body.application_id != app {
            return Err(Status::permission_denied(format!(
                "application_token: issued for {}, not {app}",
                body.application_id
            )));
        }
        if attempt != 0 && attempt != body.attempt {
            return Err(Status::permission_denied(format!(
                "application_token: issued for attempt {}, not {attempt}",
                body.attempt
            )));
        }
        self.s
            .table
            .lock()
            .expect("table lock")
            .last_seen
            .insert(app.to_string(), std::time::Instant::now());
        let renewed = keys.signer(now).and_then(|signer| {
            crate::tokens::renewal_due(key_id, body.expires_at_ms, signer.id(), now)
                .then(|| crate::tokens::application_token(&signer, app, body.attempt))
        });
        Ok((body.attempt, renewed))
    }

    /// The application, if it is live and `attempt` (when given) is current.
    fn live_app(&self, id: &str, attempt: u32) -> Result<crate::fsm::App, Status> {
        let st = self.s.raft.state();
        match st.apps.get(id) {
            // The token checked is the group's, so the group has the
            // application: this member is behind (a leader deposed without
            // knowing it yet, cut off from the others). Retryable, so the
            // caller tries the others (a NOT_FOUND here failed masters
            // whose calls reached such a member).
            None => Err(Status::unavailable(format!(
                "application_id: {id} is not known to this member yet (its token is the group's: this member is behind the leader)"
            ))),
            Some(a) if a.state.is_terminal() => Err(Status::failed_precondition(format!(
                "application_id: {id} already ended ({:?})",
                a.state
            ))),
            Some(a) => attempt_is_live(&st, a, attempt).map(|()| a.clone()),
        }
    }
}

#[tonic::async_trait]
impl pb::application_master_service_server::ApplicationMasterService for AmService {
    async fn register_application_master(
        &self,
        req: Request<pb::RegisterApplicationMasterRequest>,
    ) -> Result<Response<pb::RegisterApplicationMasterResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        r.attempt = self.authorize(&r.application_token, &r.application_id, r.attempt)?;
        let app = self.live_app(&r.application_id, r.attempt)?;
        if r.attempt > app.attempt {
            let keep_containers = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
                .map_or(true, |s| s.keep_containers);
            let started = self
                .s
                .raft
                .propose(Command::AttemptStarted {
                    app_id: r.application_id.clone(),
                    attempt: r.attempt,
                    am_container: None,
                    keep_containers,
                    previous_lost: false,
                    at_ms: now_ms(),
                })
                .await?;
            if let Outcome::Rejected(why) = started {
                return Err(Status::failed_precondition(why));
            }
        }
        // Work-preserving restart: what earlier attempts left running, and
        // what they finished.
        let signer = self.s.signer();
        let st = self.s.raft.state();
        let app = st.apps.get(r.application_id.as_str());
        let mut resp = pb::RegisterApplicationMasterResponse {
            replicas: app
                .map(|a| a.replicas.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
            spec_revision: app.map_or(0, |a| a.spec_revision),
            rollout_stopped: app.map_or(0, |a| a.rollout_stopped),
            prior_specs: app
                .map(|a| {
                    a.prior_specs
                        .iter()
                        .map(|p| pb::PriorSpec {
                            revision: p.revision,
                            spec: p.spec.clone(),
                            spec_format: p.spec_format.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            spec: app.map(|a| a.spec.clone()).unwrap_or_default(),
            spec_format: app.map(|a| a.spec_format.clone()).unwrap_or_default(),
            max_container: st
                .nodes
                .values()
                .map(|n| (n.vcores_milli, n.memory_bytes))
                .max()
                .map(|(v, m)| pb::Resources {
                    vcores_milli: v,
                    memory_bytes: m,
                    ..Default::default()
                }),
            ..Default::default()
        };
        // Ends already known to the new attempt are not reported again.
        let mut delivered = Vec::new();
        for c in st.containers_of(&r.application_id) {
            if c.alloc.ask_id == MASTER_ASK {
                continue;
            }
            match c.phase {
                ContainerPhase::Running => {
                    resp.running_containers
                        .push(pb_allocation(&st, &c.alloc, signer.as_ref()));
                }
                ContainerPhase::Completed
                    if c.end
                        .as_ref()
                        .is_some_and(|e| e.state == ContainerEnd::Succeeded) =>
                {
                    delivered.push(c.alloc.container_id.clone());
                    resp.succeeded_containers
                        .push(pb_allocation(&st, &c.alloc, None));
                }
                _ => {}
            }
        }
        drop(st);
        let mut t = self.s.table.lock().expect("table lock");
        t.reported.extend(delivered);
        drop(t);
        Ok(Response::new(resp))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        let renewed;
        (r.attempt, renewed) =
            self.authorize_renewing(&r.application_token, &r.application_id, r.attempt)?;
        let renew = |mut resp: pb::AllocateResponse| {
            if let Some(t) = &renewed {
                resp.application_token = t.clone();
            }
            // A service's scaled stages, as they are when it answers, and
            // its spec where an update made a newer one.
            if let Some(a) = self.s.raft.state().apps.get(r.application_id.as_str()) {
                resp.replicas = a.replicas.iter().map(|(k, v)| (k.clone(), *v)).collect();
                if a.spec_revision > r.spec_revision {
                    resp.spec_revision = a.spec_revision;
                    resp.spec = a.spec.clone();
                    resp.spec_format = a.spec_format.clone();
                }
            }
            Response::new(resp)
        };
        let app = self.live_app(&r.application_id, r.attempt)?;
        // Progress, replicated when it changed.
        if !r.stages.is_empty() && r.attempt == app.attempt {
            let stages: Vec<crate::fsm::StageProgress> = r.stages.iter().map(Into::into).collect();
            if stages != app.stages {
                // Off the call's path: progress is advisory.
                let (raft, cmd) = (
                    self.s.raft.clone(),
                    Command::ReportProgress {
                        app_id: r.application_id.clone(),
                        attempt: r.attempt,
                        stages,
                    },
                );
                tokio::spawn(async move {
                    if let Err(e) = raft.propose(cmd).await {
                        debug!(error = %e, "progress not recorded");
                    }
                });
            }
        }
        // A service's healthy replicas, replicated when they changed.
        if r.reports_endpoints && r.attempt == app.attempt {
            if r.endpoints.len() as u64 > weft_spec::MAX_INSTANCES {
                return Err(Error::InvalidArgument {
                    field: "endpoints",
                    reason: format!(
                        "{} endpoints; at most {}",
                        r.endpoints.len(),
                        weft_spec::MAX_INSTANCES
                    ),
                }
                .into());
            }
            // Only this application's containers that have not ended, as
            // the RM knows them (node, host, stage, the ports it gave):
            // a master cannot advertise another's address.
            let endpoints: Vec<crate::fsm::Endpoint> = {
                let st = self.s.raft.state();
                r.endpoints
                    .iter()
                    .filter_map(|e| {
                        let c = st.containers.get(e.container_id.as_str())?;
                        if c.alloc.app_id != r.application_id
                            || c.phase == ContainerPhase::Completed
                        {
                            return None;
                        }
                        let host = st
                            .nodes
                            .get(c.alloc.node_id.as_str())
                            .map(|n| {
                                let h = n
                                    .address
                                    .rsplit_once(':')
                                    .map_or(n.address.as_str(), |(h, _)| h);
                                h.trim_start_matches('[').trim_end_matches(']').to_string()
                            })
                            .unwrap_or_default();
                        let ask = c.alloc.ask_id.as_str();
                        Some(crate::fsm::Endpoint {
                            stage: ask.split_once('/').map_or(ask, |(s, _)| s).to_string(),
                            index: e.index,
                            container_id: c.alloc.container_id.clone(),
                            node_id: c.alloc.node_id.clone(),
                            host,
                            ports: e
                                .ports
                                .iter()
                                .filter(|(name, p)| {
                                    name.len() <= 32
                                        && c.alloc.ports.iter().any(|q| u32::from(*q) == **p)
                                })
                                .take(weft_spec::MAX_PORTS + 1)
                                .map(|(k, v)| (k.clone(), *v))
                                .collect(),
                        })
                    })
                    .collect()
            };
            let rollout: String = r.rollout.chars().take(1024).collect();
            if endpoints != app.endpoints
                || rollout != app.rollout
                || r.rollout_stopped != app.rollout_stopped
            {
                // Proposed before answering: a client told of a replica
                // by its endpoints can reach it.
                let cmd = Command::ReportEndpoints {
                    app_id: r.application_id.clone(),
                    attempt: r.attempt,
                    endpoints,
                    rollout,
                    rollout_stopped: r.rollout_stopped,
                };
                if let Err(e) = self.s.raft.propose(cmd).await {
                    debug!(error = %e, "endpoints not recorded");
                }
            }
        }
        // Check every ask before taking any.
        check_sizes(&r)?;
        {
            let state = self.s.raft.state();
            let queues = queue_view(&state);
            let q = queues.index(&app.queue).ok_or_else(|| {
                Status::failed_precondition(format!("queue: {} no longer exists", app.queue))
            })?;
            // The nodes' view only where there are asks to judge.
            let cluster = (!r.asks.is_empty()).then(|| cluster_view(&state).0);
            for (i, ra) in r.asks.iter().enumerate() {
                let cluster = cluster.as_ref().expect("made where there are asks");
                let res = ra.resources.unwrap_or_default();
                if res.gpu_share_milli > 1000 || (res.gpu_share_milli > 0 && res.gpus > 0) {
                    return Err(Error::InvalidArgument {
                        field: "asks.resources.gpu_share_milli",
                        reason: format!(
                            "ask {:?}: a share is of one GPU (1 to 1000 thousandths), not combined with whole gpus",
                            ra.ask_id
                        ),
                    }
                    .into());
                }
                if res.memory_bytes == 0 {
                    return Err(Error::InvalidArgument {
                        field: "asks.resources.memory_bytes",
                        reason: format!("ask {:?} must ask for some memory", ra.ask_id),
                    }
                    .into());
                }
                // With no node registered yet (a cluster starting), asks wait
                // for nodes rather than being judged against none.
                if cluster.nodes.is_empty() {
                    continue;
                }
                scheduler::validate_ask(&cluster.nodes, &queues, &to_ask(ra, 0, q, &app.user))
                    .map_err(|e| {
                        Status::invalid_argument(format!("asks[{i}] ({}): {e}", ra.ask_id))
                    })?;
            }
        }
        // Releases end their containers (the agents stop them at their next heartbeat).
        if !r.releases.is_empty() {
            let known: Vec<String> = {
                let st = self.s.raft.state();
                r.releases
                    .iter()
                    .filter(|id| {
                        st.containers
                            .get(id.as_str())
                            .is_some_and(|c| c.alloc.app_id == r.application_id)
                    })
                    .cloned()
                    .collect()
            };
            let completions = known
                .into_iter()
                .map(|id| Completion {
                    container_id: id,
                    state: ContainerEnd::Killed,
                    exit_status: weft_proto::exit_codes::USER_REQUESTED,
                    diagnostic: "released by the application master".into(),
                })
                .collect();
            self.s
                .raft
                .propose(Command::ContainersCompleted {
                    completions,
                    still_running: true,
                    at_ms: now_ms(),
                })
                .await?;
        }
        {
            let signer = self.s.signer();
            // Lock order everywhere: the state, then the table.
            let st = self.s.raft.state();
            let mut t = self.s.table.lock().expect("table lock");
            let newly_synced = t.synced.insert(r.application_id.clone());
            if newly_synced {
                let waiting: Vec<pb::Allocation> = st
                    .containers_of(&r.application_id)
                    .filter(|c| {
                        c.phase == ContainerPhase::Allocated && c.alloc.ask_id != MASTER_ASK
                    })
                    .map(|c| pb_allocation(&st, &c.alloc, signer.as_ref()))
                    .collect();
                let list = t.undelivered.entry(r.application_id.clone()).or_default();
                for a in waiting {
                    if !list.iter().any(|x| x.container_id == a.container_id) {
                        list.push(a);
                    }
                }
            }
            let undelivered: Vec<String> = t
                .undelivered
                .get(&r.application_id)
                .map(|v| v.iter().map(|a| a.ask_id.clone()).collect())
                .unwrap_or_default();
            let list = r
                .asks
                .iter()
                .map(|a| {
                    let already = undelivered.iter().filter(|x| **x == a.ask_id).count() as u32;
                    (a.clone(), a.count.saturating_sub(already))
                })
                .collect();
            let asks_changed = t.asks.get(&r.application_id) != Some(&list);
            t.asks.insert(r.application_id.clone(), list);
            // A round for what changed: new or different asks, releases, a
            // master first heard under this leader. A master calling again
            // with the same asks (a long poll each second while it waits)
            // wakes no one: the loop runs when the state changes and every
            // half second anyway.
            if asks_changed || newly_synced || !r.releases.is_empty() {
                self.s.wake.notify_one();
            }
        }
        // Long poll: answer at once when something is waiting, else wait.
        let wait = Duration::from_millis(r.wait_ms).min(self.s.max_wait());
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.s.delivered.notified();
            // A leader that stepped down meanwhile (the waiters are woken)
            // sends the master on at once rather than at the deadline; one
            // whose table was reset (a new leadership, even its own again)
            // answers at once, so that the master calls again with its asks.
            self.s.raft.ensure_leader()?;
            if !self
                .s
                .table
                .lock()
                .expect("table lock")
                .synced
                .contains(&r.application_id)
            {
                return Ok(renew(pb::AllocateResponse::default()));
            }
            if let Some(resp) = self.take_news(&r.application_id, r.attempt)? {
                return Ok(renew(resp));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(renew(
                    self.take_news(&r.application_id, r.attempt)?
                        .unwrap_or_default(),
                ));
            }
        }
    }

    async fn finish_application_master(
        &self,
        req: Request<pb::FinishApplicationMasterRequest>,
    ) -> Result<Response<pb::FinishApplicationMasterResponse>, Status> {
        let mut r = req.into_inner();
        self.s.raft.ensure_leader()?;
        r.attempt = self.authorize(&r.application_token, &r.application_id, r.attempt)?;
        {
            let st = self.s.raft.state();
            if let Some(a) = st.apps.get(r.application_id.as_str()) {
                if r.attempt > 0 && r.attempt < a.attempt {
                    return Err(Status::failed_precondition(format!(
                        "attempt: {} of {} was replaced by attempt {}",
                        r.attempt, r.application_id, a.attempt
                    )));
                }
            }
        }
        let state = match pb::FinalStatus::try_from(r.final_status) {
            Ok(pb::FinalStatus::Succeeded) => AppState::Succeeded,
            Ok(pb::FinalStatus::Failed) => AppState::Failed,
            Ok(pb::FinalStatus::Killed) => AppState::Killed,
            _ => {
                return Err(Error::InvalidArgument {
                    field: "final_status",
                    reason: "must be SUCCEEDED, FAILED or KILLED".into(),
                }
                .into())
            }
        };
        match self
            .s
            .raft
            .propose(Command::ApplicationFinished {
                app_id: r.application_id.clone(),
                state,
                diagnostics: r.diagnostics,
                stages: r.stages.iter().map(Into::into).collect(),
                at_ms: now_ms(),
            })
            .await?
        {
            Outcome::Rejected(why) => Err(Error::NotFound(why).into()),
            _ => {
                self.s
                    .table
                    .lock()
                    .expect("table lock")
                    .asks
                    .remove(&r.application_id);
                Ok(Response::new(pb::FinishApplicationMasterResponse {}))
            }
        }
    }
}

impl AmService {
    /// What has come for `app` since its master last asked: containers
    /// allocated to it and containers of it that ended. Refused to an
    /// attempt that has been replaced while it waited: what was allocated
    /// is the new attempt's (a replaced master that started it would run a
    /// task beside the new attempt's run of it).
    fn take_news(&self, app: &str, attempt: u32) -> Result<Option<pb::AllocateResponse>, Status> {
        let state = self.s.raft.state();
        if let Some(a) = state.apps.get(app) {
            attempt_is_live(&state, a, attempt)?;
        }
        let mut t = self.s.table.lock().expect("table lock");
        let allocations = t.undelivered.remove(app).unwrap_or_default();
        let mut completed = Vec::new();
        for c in state.containers_of(app) {
            if c.phase == ContainerPhase::Completed && !t.reported.contains(&c.alloc.container_id) {
                t.reported.insert(c.alloc.container_id.clone());
                let end = c.end.clone();
                completed.push(pb::ContainerStatus {
                    container_id: c.alloc.container_id.clone(),
                    state: match end.as_ref().map(|e| e.state) {
                        Some(ContainerEnd::Succeeded) => pb::ContainerState::Succeeded,
                        Some(ContainerEnd::Failed) => pb::ContainerState::Failed,
                        Some(ContainerEnd::Lost) => pb::ContainerState::Lost,
                        _ => pb::ContainerState::Killed,
                    } as i32,
                    exit: end.map(|e| pb::ContainerExit {
                        exit_status: e.exit_status,
                        diagnostic: e.diagnostic,
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        if allocations.is_empty() && completed.is_empty() {
            return Ok(None);
        }
        Ok(Some(pb::AllocateResponse {
            allocations,
            completed,
            lost_nodes: vec![],
            ..Default::default()
        }))
    }
}

/// Whether `attempt` (0: the caller did not say) of `app` may still act: it
/// has not been replaced, and the master container the RM launched for it
/// has not been ended (a master the RM ended is being stopped; what it
/// would be handed now would run beside the next attempt's work).
fn attempt_is_live(st: &ClusterState, app: &crate::fsm::App, attempt: u32) -> Result<(), Status> {
    if attempt > 0 && attempt < app.attempt {
        return Err(Status::failed_precondition(format!(
            "attempt: {attempt} of {} was replaced by attempt {}",
            app.id, app.attempt
        )));
    }
    if let Some(c) = st.ended_master(app) {
        return Err(Status::failed_precondition(format!(
            "attempt: {} of {} has ended: its master's container {} ended ({})",
            app.attempt,
            app.id,
            c.alloc.container_id,
            c.end
                .as_ref()
                .map(|e| e.diagnostic.as_str())
                .unwrap_or("no reason recorded")
        )));
    }
    Ok(())
}

/// Asks one Allocate call may carry (a master asks per stage and role).
pub const MAX_ASKS_PER_CALL: usize = 10_000;
/// Containers one Allocate call may release.
pub const MAX_RELEASES_PER_CALL: usize = 100_000;

/// Bounds on an Allocate call's size, each refusal naming the field.
pub fn check_sizes(r: &pb::AllocateRequest) -> Result<(), Error> {
    if r.asks.len() > MAX_ASKS_PER_CALL {
        return Err(Error::InvalidArgument {
            field: "asks",
            reason: format!(
                "{} asks in one call, at most {MAX_ASKS_PER_CALL}",
                r.asks.len()
            ),
        });
    }
    if let Some(a) = r
        .asks
        .iter()
        .find(|a| u64::from(a.count) > weft_spec::MAX_INSTANCES)
    {
        return Err(Error::InvalidArgument {
            field: "asks.count",
            reason: format!(
                "ask {:?} asks for {} containers, at most {} (a stage's tasks)",
                a.ask_id,
                a.count,
                weft_spec::MAX_INSTANCES
            ),
        });
    }
    if r.releases.len() > MAX_RELEASES_PER_CALL {
        return Err(Error::InvalidArgument {
            field: "releases",
            reason: format!(
                "{} releases in one call, at most {MAX_RELEASES_PER_CALL}",
                r.releases.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn allocate_calls_are_bounded_and_the_bound_is_named() {
        let ask = |count| pb::ResourceAsk {
            ask_id: "work".into(),
            count,
            ..Default::default()
        };
        let call = |asks: Vec<pb::ResourceAsk>, releases: usize| pb::AllocateRequest {
            asks,
            releases: vec!["c".into(); releases],
            ..Default::default()
        };
        check_sizes(&call(
            vec![ask(100_000); MAX_ASKS_PER_CALL],
            MAX_RELEASES_PER_CALL,
        ))
        .unwrap();
        for (r, field) in [
            (call(vec![ask(1); MAX_ASKS_PER_CALL + 1], 0), "asks:"),
            (call(vec![ask(100_001)], 0), "asks.count:"),
            (call(vec![], MAX_RELEASES_PER_CALL + 1), "releases:"),
        ] {
            let e = check_sizes(&r).unwrap_err().to_string();
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }
}
