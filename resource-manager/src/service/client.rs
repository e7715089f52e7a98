//! ClientService: submit, list, watch and kill applications; nodes, queues,
//! members and task logs.

use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_proto::v1 as pb;

use crate::error::Error;
use crate::fsm::{App, AppState, Command, ContainerPhase, NodeState, Outcome, QueueSpec};
use crate::raft_node::MemberChange;

use super::audit_log::Note;
use super::*;

/// A token as reported (never its secret or hash).
/// The group's token keys as `rmctl acl signing-keys` shows them (public
/// halves only).
fn signing_keys(st: &crate::fsm::ClusterState, now_ms: u64) -> pb::SigningKeysResponse {
    let signing = st.signing_key(now_ms).map(|k| k.id);
    let keys = &st.token_keys;
    pb::SigningKeysResponse {
        keys: keys
            .iter()
            .enumerate()
            .map(|(i, k)| pb::SigningKey {
                id: k.id,
                public_key: weft_proto::token::TokenSigner::from_seed_hex(&k.seed_hex)
                    .map(|s| hex::encode(s.public_key()))
                    .unwrap_or_default(),
                created_at_ms: k.created_at_ms,
                signs_from_ms: k.signs_from_ms,
                replaced_at_ms: keys.get(i + 1).map_or(0, |n| n.signs_from_ms),
                dropped_at_ms: k.drop_at_ms,
                signing: Some(k.id) == signing,
            })
            .collect(),
        group: st.token_group.clone(),
    }
}

fn acl_token(t: &crate::fsm::AclToken) -> pb::AclToken {
    pb::AclToken {
        accessor: t.accessor.clone(),
        user: t.user.clone(),
        admin: t.admin,
        description: t.description.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
    }
}

#[tonic::async_trait]
impl pb::client_service_server::ClientService for RmService {
    async fn submit_application(
        &self,
        req: Request<pb::SubmitApplicationRequest>,
    ) -> Result<Response<pb::SubmitApplicationResponse>, Status> {
        let mut note = Note::new("submit_application", &req);
        let r: Result<Response<pb::SubmitApplicationResponse>, Status> = async {
            let who = self.who(&req, &req.get_ref().user).await?;
            note.who = Some(who.clone());
            let r = req.into_inner();
            // A user submits as themself; an admin may submit for another.
            if !r.user.is_empty() && r.user != who.user && !who.admin {
                return Err(Status::permission_denied(format!(
                    "{who} may not submit as user {}",
                    r.user
                )));
            }
            let user = if !r.user.is_empty() && who.admin {
                auth::check_user("user", &r.user)?;
                r.user.clone()
            } else {
                who.user.clone()
            };
            if r.spec.trim().is_empty() {
                return Err(Error::InvalidArgument {
                    field: "spec",
                    reason: "must not be empty".into(),
                }
                .into());
            }
            let format = if r.spec_format.is_empty() {
                "yaml".to_string()
            } else {
                r.spec_format.to_lowercase()
            };
            let spec = weft_spec::JobSpec::parse(&r.spec, &format)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let (name, queue) = (spec.name.clone(), spec.queue.clone());
            {
                let st = self.raft.state();
                if !st.queues.is_empty() {
                    let specs: Vec<QueueSpec> = st.queues.values().cloned().collect();
                    let mut sorted = specs.clone();
                    sorted.sort_by_key(|q| q.name.matches('.').count());
                    let tree =
                        crate::scheduler::Queues::from_specs(&sorted).map_err(Status::internal)?;
                    let Some(i) = tree.index(&queue) else {
                        return Err(Error::InvalidArgument {
                            field: "queue",
                            reason: format!("no queue {queue}"),
                        }
                        .into());
                    };
                    if !tree.is_leaf(i) {
                        return Err(Error::InvalidArgument {
                            field: "queue",
                            reason: format!("{queue} has sub-queues; submit to one of them"),
                        }
                        .into());
                    }
                    if !tree.may_submit(i, &user) {
                        let whom = if user == who.user {
                            who.to_string()
                        } else {
                            format!("user {user}")
                        };
                        return Err(Status::permission_denied(format!(
                            "queue: {whom} may not submit to {queue}"
                        )));
                    }
                }
            }
            self.check_fits(&spec, &queue, &user)?;
            // Without launched masters every application's master is the
            // submitter's to run.
            let unmanaged = r.unmanaged_master || !self.scheduling.launches_masters();
            let signer = if unmanaged {
                Some(self.scheduling.ensure_signer().await?)
            } else {
                None
            };
            let cmd = Command::SubmitApplication {
                request_id: r.request_id,
                name,
                queue: if queue.is_empty() {
                    "root".into()
                } else {
                    queue
                },
                user: user.clone(),
                spec: r.spec,
                spec_format: format,
                unmanaged,
                // Its master is the leader's to launch: accepted in the same
                // entry (one raft entry per submission, not two).
                accepted: !unmanaged,
                service: spec.kind == weft_spec::JobKind::Service,
                priority: spec.priority,
                at_ms: now_ms(),
            };
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self.raft.propose(cmd).await? {
                Outcome::Submitted { app_id } => Ok(Response::new({
                    self.scheduling.poke();
                    note.target = app_id.clone();
                    // A master's token only for an application whose master
                    // its submitter runs (a retry may name an earlier one).
                    let theirs = self
                        .raft
                        .state()
                        .apps
                        .get(app_id.as_str())
                        .is_some_and(|a| a.unmanaged && a.user == user);
                    pb::SubmitApplicationResponse {
                        application_token: signer
                            .filter(|_| theirs)
                            .map(|s| crate::tokens::application_token(&s, &app_id, 1))
                            .unwrap_or_default(),
                        application_id: app_id,
                    }
                })),
                Outcome::Rejected(why) => Err(Status::invalid_argument(why)),
                other => Err(Status::internal(format!("submission applied as {other:?}"))),
            }
        }
        .await;
        self.audit.record(&note, &r);
        crate::metrics::RmMetrics::outcome(&self.raft.metrics().submissions, &r);
        r
    }

    async fn get_application(
        &self,
        req: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ApplicationReport>, Status> {
        let who = self.who(&req, "").await?;
        let id = &req.get_ref().application_id;
        let report = self.get_app(id).await?;
        self.check_app(&who, id, "see")?;
        Ok(Response::new(report))
    }

    async fn list_applications(
        &self,
        req: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        let who = self.who(&req, "").await?;
        let r = req.into_inner();
        let size = match r.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n as usize > MAX_PAGE_SIZE => {
                return Err(Error::InvalidArgument {
                    field: "page_size",
                    reason: format!("{n} is over the most a page holds, {MAX_PAGE_SIZE}"),
                }
                .into())
            }
            n => n as usize,
        };
        // A token is the last id of the page before: an application id.
        if r.page_token.len() > 64 || r.page_token.chars().any(|c| c.is_control()) {
            return Err(Error::InvalidArgument {
                field: "page_token",
                reason: "not a token this service gave (pass next_page_token as it came)".into(),
            }
            .into());
        }
        self.raft.read_barrier().await?;
        let st = self.raft.state();
        let after = (
            std::ops::Bound::Excluded(r.page_token.as_str()),
            std::ops::Bound::Unbounded,
        );
        let from: imbl::ordmap::RangedIter<'_, crate::fsm::Id, _, _> = if r.page_token.is_empty() {
            st.apps.range::<_, str>(..)
        } else {
            st.apps.range::<_, str>(after)
        };
        let mut matching = from
            .map(|(_, a)| a)
            .filter(|a| r.queue.is_empty() || a.queue == r.queue)
            .filter(|a| r.user.is_empty() || a.user == r.user)
            .filter(|a| r.name.is_empty() || a.name == r.name)
            .filter(|a| r.states.is_empty() || r.states.contains(&(app_state(a.state) as i32)))
            // A user sees their own and their queues' applications.
            .filter(|a| who.may_manage(&st, a));
        let page: Vec<&crate::fsm::App> = matching.by_ref().take(size).collect();
        let next_page_token = match (page.last(), matching.next()) {
            (Some(last), Some(_)) => last.id.clone(),
            _ => String::new(),
        };
        let applications = page.into_iter().map(|a| self.app_report(&st, a)).collect();
        Ok(Response::new(pb::ListApplicationsResponse {
            applications,
            next_page_token,
        }))
    }

    async fn kill_application(
        &self,
        req: Request<pb::KillApplicationRequest>,
    ) -> Result<Response<pb::KillApplicationResponse>, Status> {
        let mut note = Note::new("kill_application", &req);
        let r: Result<Response<pb::KillApplicationResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let app_id = req.into_inner().application_id;
            note.target = app_id.clone();
            if !who.admin {
                self.raft.read_barrier().await?;
                self.check_app(&who, &app_id, "kill")?;
            }
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::KillApplication {
                    app_id,
                    at_ms: now_ms(),
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Error::NotFound(why).into()),
                _ => Ok(Response::new(pb::KillApplicationResponse {})),
            }
        }
        .await;
        self.audit.record(&note, &r);
        crate::metrics::RmMetrics::outcome(&self.raft.metrics().kills, &r);
        r
    }

    async fn scale_application(
        &self,
        req: Request<pb::ScaleApplicationRequest>,
    ) -> Result<Response<pb::ScaleApplicationResponse>, Status> {
        let mut note = Note::new("scale_application", &req);
        let r: Result<Response<pb::ScaleApplicationResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let r = req.into_inner();
            note.target = r.application_id.clone();
            if u64::from(r.replicas) > weft_spec::MAX_INSTANCES {
                return Err(Error::InvalidArgument {
                    field: "replicas",
                    reason: format!("{}; at most {}", r.replicas, weft_spec::MAX_INSTANCES),
                }
                .into());
            }
            self.raft.read_barrier().await?;
            let (stage, previous) = {
                let st = self.raft.state();
                let app = st.apps.get(r.application_id.as_str()).ok_or_else(|| {
                    Error::NotFound(format!(
                        "application_id: no application {}",
                        r.application_id
                    ))
                })?;
                who.require_app(&st, app, "scale")?;
                let spec = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
                    .map_err(|e| Status::internal(format!("the stored spec: {e}")))?;
                let services: Vec<&weft_spec::StageSpec> =
                    spec.stages.iter().filter(|s| s.is_service()).collect();
                let stage = match (r.stage.as_str(), services.as_slice()) {
                    (_, []) => {
                        return Err(Error::InvalidArgument {
                            field: "application_id",
                            reason: format!(
                                "{} is not a service (it has no stage of replicas)",
                                r.application_id
                            ),
                        }
                        .into())
                    }
                    ("", [one]) => *one,
                    ("", _) => {
                        return Err(Error::InvalidArgument {
                            field: "stage",
                            reason: format!(
                                "{} has several stages of replicas: name one of {}",
                                r.application_id,
                                services
                                    .iter()
                                    .map(|s| s.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        }
                        .into())
                    }
                    (name, _) => *services.iter().find(|s| s.name == name).ok_or_else(|| {
                        Status::from(Error::InvalidArgument {
                            field: "stage",
                            reason: format!(
                                "{} has no stage of replicas named {name:?}",
                                r.application_id
                            ),
                        })
                    })?,
                };
                if app.state.is_terminal() {
                    return Err(Status::failed_precondition(format!(
                        "application_id: {} has finished",
                        r.application_id
                    )));
                }
                let previous = app
                    .replicas
                    .get(&stage.name)
                    .copied()
                    .or(stage.replicas)
                    .unwrap_or_default();
                (stage.name.clone(), previous)
            };
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::ScaleStage {
                    app_id: r.application_id.clone(),
                    stage: stage.clone(),
                    replicas: r.replicas,
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Status::failed_precondition(why)),
                _ => Ok(Response::new(pb::ScaleApplicationResponse {
                    stage,
                    replicas: r.replicas,
                    previous,
                })),
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn update_application(
        &self,
        req: Request<pb::UpdateApplicationRequest>,
    ) -> Result<Response<pb::UpdateApplicationResponse>, Status> {
        let mut note = Note::new("update_application", &req);
        let r: Result<Response<pb::UpdateApplicationResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let r = req.into_inner();
            note.target = r.application_id.clone();
            let format = if r.spec_format.is_empty() {
                "yaml".to_string()
            } else {
                r.spec_format.to_lowercase()
            };
            let new = weft_spec::JobSpec::parse(&r.spec, &format)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.raft.read_barrier().await?;
            let (queue, user) = {
                let st = self.raft.state();
                let app = st.apps.get(r.application_id.as_str()).ok_or_else(|| {
                    Error::NotFound(format!(
                        "application_id: no application {}",
                        r.application_id
                    ))
                })?;
                who.require_app(&st, app, "update")?;
                // New commands run as the application's user: only that
                // user (or a cluster admin) may give them, not an admin of
                // its queue, and only while that user may still submit to
                // its queue.
                if !who.admin && who.user != app.user {
                    return Err(Status::permission_denied(format!(
                        "{who} may not update application {}: only its user or a cluster admin may (an update runs new commands as user {})",
                        app.id, app.user
                    )));
                }
                if !st.queues.is_empty() {
                    let mut specs: Vec<QueueSpec> = st.queues.values().cloned().collect();
                    specs.sort_by_key(|q| q.name.matches('.').count());
                    let tree =
                        crate::scheduler::Queues::from_specs(&specs).map_err(Status::internal)?;
                    if tree
                        .index(&app.queue)
                        .is_some_and(|i| !tree.may_submit(i, &app.user))
                    {
                        return Err(Status::permission_denied(format!(
                            "queue: user {} may no longer submit to {}",
                            app.user, app.queue
                        )));
                    }
                }
                let old = weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
                    .map_err(|e| Status::internal(format!("the stored spec: {e}")))?;
                check_update(&r.application_id, &old, &new)?;
                if old == new {
                    return Err(Error::InvalidArgument {
                        field: "spec",
                        reason: format!(
                            "the same as revision {} of {}: nothing to roll out",
                            app.spec_revision, app.id
                        ),
                    }
                    .into());
                }
                if app.state.is_terminal() {
                    return Err(Status::failed_precondition(format!(
                        "application_id: {} has finished",
                        r.application_id
                    )));
                }
                (app.queue.clone(), app.user.clone())
            };
            self.check_fits(&new, &queue, &user)?;
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::UpdateSpec {
                    app_id: r.application_id.clone(),
                    spec: r.spec,
                    spec_format: format,
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Status::failed_precondition(why)),
                _ => Ok(Response::new(pb::UpdateApplicationResponse {
                    spec_revision: self
                        .raft
                        .state()
                        .apps
                        .get(r.application_id.as_str())
                        .map_or(0, |a| a.spec_revision),
                })),
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    type WatchApplicationStream = ReceiverStream<Result<pb::ApplicationReport, Status>>;

    async fn watch_application(
        &self,
        req: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<Self::WatchApplicationStream>, Status> {
        let who = self.who(&req, "").await?;
        let id = req.into_inner().application_id;
        let first = self.get_app(&id).await?;
        self.check_app(&who, &id, "watch")?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while last.state < pb::ApplicationState::Succeeded as i32 {
                // A watcher gone (a REST wait that timed out, a client let
                // go) ends the polling at once, not at the next change.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tx.closed() => return,
                }
                let now = match me.get_app(&id).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // A token revoked or expired meanwhile, or a right lost,
                // ends the stream.
                if let Err(e) = me.still_may(&who, &id, "watch") {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if now != last {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.who(&req, "").await?;
        self.raft.read_barrier().await?;
        let live = self
            .liveness
            .lock()
            .expect("liveness lock")
            .last_heartbeat
            .clone();
        let (now, wall) = (self.clock.now(), self.clock.wall_ms());
        let st = self.raft.state();
        let nodes = st
            .nodes
            .values()
            .map(|n| pb::NodeReport {
                node_id: n.id.clone(),
                address: n.address.clone(),
                state: node_state(n.state) as i32,
                capacity: Some(pb::NodeCapacity {
                    vcores_milli: n.vcores_milli,
                    memory_bytes: n.memory_bytes,
                    gpus: n
                        .gpus
                        .iter()
                        .map(|g| pb::GpuDevice {
                            index: g.index,
                            uuid: g.uuid.clone(),
                            model: g.model.clone(),
                            memory_bytes: g.memory_bytes,
                        })
                        .collect(),
                }),
                used: Some({
                    let u = st.node_use(&n.id);
                    pb::Resources {
                        vcores_milli: u.vcores_milli,
                        memory_bytes: u.memory_bytes,
                        gpus: u.gpus.len() as u32,
                        gpu_share_milli: u.shares.values().map(|sh| sh.0).sum(),
                        ..Default::default()
                    }
                }),
                labels: n.labels.clone().into_iter().collect(),
                containers: st.node_use(&n.id).containers,
                last_heartbeat_ms: live
                    .get(&n.id)
                    .map(|t| {
                        wall.saturating_sub(now.saturating_duration_since(*t).as_millis() as u64)
                    })
                    .unwrap_or(0),
                ready: n.ready,
                gpu_use: {
                    let u = st.node_use(&n.id);
                    n.gpus
                        .iter()
                        .map(|g| {
                            let (milli, mem) = u.shares.get(&g.index).copied().unwrap_or((0, 0));
                            pb::GpuUse {
                                index: g.index,
                                whole: u.gpus.contains(&g.index),
                                share_milli: milli,
                                share_memory_bytes: mem,
                            }
                        })
                        .collect()
                },
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let mut note = Note::new("drain_node", &req);
        let r: Result<Response<pb::DrainNodeResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let node_id = req.into_inner().node_id;
            note.target = node_id.clone();
            who.require_admin(&format!("drain node {node_id}"))?;
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::SetNodeState {
                    node_id,
                    state: NodeState::Draining,
                    at_ms: now_ms(),
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Error::NotFound(why).into()),
                _ => Ok(Response::new(pb::DrainNodeResponse {})),
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn list_queues(
        &self,
        req: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        self.who(&req, "").await?;
        self.raft.read_barrier().await?;
        let st = self.raft.state();
        let specs: Vec<QueueSpec> = if st.queues.is_empty() {
            crate::config::queue_specs(&[])
        } else {
            st.queues.values().cloned().collect()
        };
        let res = |v: u64, m: u64, g: u32| pb::Resources {
            vcores_milli: v,
            memory_bytes: m,
            gpus: g,
            ..Default::default()
        };
        let queues = specs
            .iter()
            .map(|q| {
                let mine =
                    |a: &&App| a.queue == q.name || a.queue.starts_with(&format!("{}.", q.name));
                let count = |f: fn(AppState) -> bool| {
                    st.apps.values().filter(mine).filter(|a| f(a.state)).count() as u32
                };
                pb::QueueReport {
                    weight: q.weight,
                    user_limit: Some(res(
                        q.user_limit_vcores_milli,
                        q.user_limit_memory_bytes,
                        q.user_limit_gpus,
                    )),
                    submit_acl: q.submit_acl.clone(),
                    admin_acl: q.admin_acl.clone(),
                    name: q.name.clone(),
                    guaranteed: Some(res(
                        q.guaranteed_vcores_milli,
                        q.guaranteed_memory_bytes,
                        q.guaranteed_gpus,
                    )),
                    maximum: Some(res(q.max_vcores_milli, q.max_memory_bytes, q.max_gpus)),
                    used: Some(pb::Resources::default()),
                    pending_applications: count(|s| {
                        matches!(s, AppState::Submitted | AppState::Accepted)
                    }),
                    running_applications: count(|s| s == AppState::Running),
                }
            })
            .collect();
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.who(&req, "").await?;
        let s = self.raft.status();
        let st = self.raft.state();
        let mut capacity = pb::Resources::default();
        let mut used = pb::Resources::default();
        for n in st.nodes.values().filter(|n| n.state == NodeState::Running) {
            capacity.vcores_milli += n.vcores_milli;
            capacity.memory_bytes += n.memory_bytes;
            capacity.gpus += n.gpus.len() as u32;
            let u = st.node_use(&n.id);
            used.vcores_milli += u.vcores_milli;
            used.memory_bytes += u.memory_bytes;
            used.gpus += u.gpus.len() as u32;
            used.gpu_share_milli += u.shares.values().map(|sh| sh.0).sum::<u32>();
        }
        let members = if s.members.is_empty() {
            self.raft.peers().keys().copied().collect()
        } else {
            s.members.clone()
        };
        Ok(Response::new(pb::ClusterStatusResponse {
            members: members
                .iter()
                .map(|&id| pb::ClusterMember {
                    id,
                    address: self.raft.address_in(&st, id).unwrap_or_default(),
                    is_leader: id == s.leader_id,
                    is_learner: s.learners.contains(&id),
                    http_url: st.member_http.get(&id).cloned().unwrap_or_default(),
                })
                .collect(),
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit,
            applied_index: s.applied,
            nodes: st.nodes.len() as u32,
            capacity: Some(capacity),
            used: Some(used),
            snapshot_index: s.snapshot_index,
            member_id: s.id,
            scheduler: Some({
                let x = self.scheduling.stats();
                pb::SchedulerStats {
                    rounds: x.rounds,
                    committed: x.committed,
                    placed: x.placed,
                    refused_at_verify: x.refused_at_verify,
                    refused_at_apply: x.refused_at_apply,
                }
            }),
        }))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        let mut note = Note::new("add_member", &req);
        let r: Result<Response<pb::AddMemberResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let r = req.into_inner();
            note.target = format!("member {} at {}", r.id, r.address);
            who.require_admin(&format!("add member {}", r.id))?;
            if r.id == 0 {
                return Err(Error::InvalidArgument {
                    field: "id",
                    reason: "must be above 0".into(),
                }
                .into());
            }
            if r.address.trim().is_empty() {
                return Err(Error::InvalidArgument {
                    field: "address",
                    reason: "must not be empty".into(),
                }
                .into());
            }
            if self.raft.status().members.contains(&r.id) {
                return Err(Error::InvalidArgument {
                    field: "id",
                    reason: format!("{} is already a member", r.id),
                }
                .into());
            }
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            self.change_members(MemberChange::Add {
                id: r.id,
                address: r.address,
            })
            .await?;
            Ok(Response::new(pb::AddMemberResponse {}))
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let mut note = Note::new("remove_member", &req);
        let r: Result<Response<pb::RemoveMemberResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let id = req.into_inner().id;
            note.target = format!("member {id}");
            who.require_admin(&format!("remove member {id}"))?;
            let st = self.raft.status();
            if !st.members.contains(&id) {
                return Err(Error::NotFound(format!("id: {id} is not a member")).into());
            }
            if st.members.len() == 1 {
                return Err(Error::InvalidArgument {
                    field: "id",
                    reason: format!("{id} is the last member"),
                }
                .into());
            }
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            self.change_members(MemberChange::Remove { id }).await?;
            Ok(Response::new(pb::RemoveMemberResponse {}))
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn set_queues(
        &self,
        req: Request<pb::SetQueuesRequest>,
    ) -> Result<Response<pb::SetQueuesResponse>, Status> {
        let mut note = Note::new("set_queues", &req);
        let r: Result<Response<pb::SetQueuesResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            note.target = "queues".into();
            who.require_admin("change the queues")?;
            let specs = crate::config::parse_queues(&req.get_ref().config_toml).map_err(|e| {
                Status::invalid_argument(e.to_string().trim_start_matches("config: ").to_string())
            })?;
            self.raft.read_barrier().await?;
            {
                // Nothing accepted may lose its queue.
                let st = self.raft.state();
                if !st.queues.is_empty() {
                    for a in st.apps.values().filter(|a| !a.state.is_terminal()) {
                        if !specs.iter().any(|q| q.name == a.queue) {
                            return Err(Error::InvalidArgument {
                                field: "queues",
                                reason: format!(
                                    "{} is missing but application {} runs in it",
                                    a.queue, a.id
                                ),
                            }
                            .into());
                        }
                    }
                }
            }
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::SetQueues { queues: specs })
                .await?
            {
                Outcome::Rejected(why) => Err(Status::invalid_argument(why)),
                _ => Ok(Response::new(pb::SetQueuesResponse {})),
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn acl_bootstrap(
        &self,
        req: Request<pb::AclBootstrapRequest>,
    ) -> Result<Response<pb::AclTokenSecret>, Status> {
        let mut note = Note::new("acl_bootstrap", &req);
        let r: Result<Response<pb::AclTokenSecret>, Status> = async {
            self.require_acl()?;
            let chosen = req.into_inner().secret;
            // The first admin token comes from the configured file: nobody
            // else may take the cluster by bootstrapping first.
            if let Some(initial) = &self.acl.initial_admin_secret {
                if auth::secret_hash(&chosen) != auth::secret_hash(initial) {
                    return Err(Status::permission_denied(
                        "this cluster's first admin token is the one acl.initial_admin_token_file holds: bootstrap with that secret, or use it as your token",
                    ));
                }
            }
            let secret = if chosen.is_empty() {
                auth::new_secret()
            } else if auth::is_secret(&chosen) {
                chosen
            } else {
                return Err(Error::InvalidArgument {
                    field: "secret",
                    reason: "must be `weft_` and 64 hex digits, or empty".into(),
                }
                .into());
            };
            let (secret, token) = auth::token_with(secret, "admin", true, "bootstrap", now_ms(), 0);
            note.target = format!("token {} of user admin", token.accessor);
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::AclBootstrap {
                    token: token.clone(),
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Status::failed_precondition(why)),
                _ => Ok(Response::new(pb::AclTokenSecret {
                    token: Some(acl_token(&token)),
                    secret,
                })),
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn create_acl_token(
        &self,
        req: Request<pb::CreateAclTokenRequest>,
    ) -> Result<Response<pb::AclTokenSecret>, Status> {
        let mut note = Note::new("create_acl_token", &req);
        let r: Result<Response<pb::AclTokenSecret>, Status> = async {
            self.require_acl()?;
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let r = req.into_inner();
            note.target = format!("a token of user {}", r.user);
            who.require_admin(&format!("make a token for user {}", r.user))?;
            auth::check_user("user", &r.user)?;
            if r.description.len() > 1024 {
                return Err(Error::InvalidArgument {
                    field: "description",
                    reason: format!("is {} bytes; at most 1024", r.description.len()),
                }
                .into());
            }
            // Ten years at most: a TTL past that is a unit mistake.
            const MAX_TTL_S: u64 = 10 * 366 * 24 * 3600;
            if r.ttl_seconds > MAX_TTL_S {
                return Err(Error::InvalidArgument {
                    field: "ttl_seconds",
                    reason: format!("{} is over ten years (0 = never expires)", r.ttl_seconds),
                }
                .into());
            }
            let (secret, token) = auth::new_token(
                &r.user,
                r.admin,
                &r.description,
                now_ms(),
                r.ttl_seconds * 1000,
            );
            note.target = format!("token {} of user {}", token.accessor, token.user);
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::AclTokenCreate {
                    token: token.clone(),
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Status::failed_precondition(why)),
                _ => {
                    tracing::info!(by = %who, user = %token.user, admin = token.admin, accessor = %token.accessor, "token made");
                    Ok(Response::new(pb::AclTokenSecret {
                        token: Some(acl_token(&token)),
                        secret,
                    }))
                }
            }

        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn list_acl_tokens(
        &self,
        req: Request<pb::ListAclTokensRequest>,
    ) -> Result<Response<pb::ListAclTokensResponse>, Status> {
        self.require_acl()?;
        self.who(&req, "").await?.require_admin("list tokens")?;
        self.raft.read_barrier().await?;
        let st = self.raft.state();
        Ok(Response::new(pb::ListAclTokensResponse {
            tokens: st.acl_tokens.values().map(acl_token).collect(),
        }))
    }

    async fn revoke_acl_token(
        &self,
        req: Request<pb::RevokeAclTokenRequest>,
    ) -> Result<Response<pb::RevokeAclTokenResponse>, Status> {
        let mut note = Note::new("revoke_acl_token", &req);
        let r: Result<Response<pb::RevokeAclTokenResponse>, Status> = async {
            self.require_acl()?;
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            let accessor = req.into_inner().accessor;
            note.target = format!("token {accessor}");
            who.require_admin(&format!("revoke token {accessor}"))?;
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            note.proposed = true;
            match self
                .raft
                .propose(Command::AclTokenRevoke {
                    accessor: accessor.clone(),
                })
                .await?
            {
                Outcome::Rejected(why) => Err(Error::NotFound(why).into()),
                _ => {
                    tracing::info!(by = %who, %accessor, "token revoked");
                    Ok(Response::new(pb::RevokeAclTokenResponse {}))
                }
            }
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::SigningKeysResponse>, Status> {
        let mut note = Note::new("rotate_signing_key", &req);
        note.target = "the token signing key".into();
        let r: Result<Response<pb::SigningKeysResponse>, Status> = async {
            let who = self.who(&req, "").await?;
            note.who = Some(who.clone());
            who.require_admin("rotate the token signing key")?;
            let r = req.into_inner();
            const MIN_KEEP: u64 = 10;
            const MAX_KEEP: u64 = 30 * 24 * 3600;
            let keep_s = match r.keep_previous_seconds {
                0 => crate::tokens::DEFAULT_KEY_OVERLAP.as_secs(),
                s if (MIN_KEEP..=MAX_KEEP).contains(&s) => s,
                s => {
                    return Err(Error::InvalidArgument {
                        field: "keep_previous_seconds",
                        reason: format!(
                            "{s} is out of range: between {MIN_KEEP} s and 30 days (0: an hour)"
                        ),
                    }
                    .into())
                }
            };
            if r.request_id.len() > 128 {
                return Err(Error::InvalidArgument {
                    field: "request_id",
                    reason: format!("is {} bytes; at most 128", r.request_id.len()),
                }
                .into());
            }
            // A follower sends the caller on before anything is proposed.
            self.raft.ensure_leader()?;
            self.scheduling.ensure_signer().await?;
            // The clock tokens are signed by (steps of the wall clock do not
            // move it).
            let now = crate::tokens::token_clock_ms();
            // Agents learn the new key in the next heartbeat answers before
            // any token is signed with it.
            let ahead = (self.heartbeat_interval * 3).max(Duration::from_secs(2));
            note.proposed = true;
            let outcome = self
                .raft
                .propose(Command::RotateTokenKey {
                    seed_hex: weft_proto::token::TokenSigner::generate().seed_hex(),
                    request_id: r.request_id,
                    at_ms: now,
                    signs_from_ms: now + ahead.as_millis() as u64,
                    keep_previous_ms: keep_s * 1000,
                })
                .await?;
            if let Outcome::Rejected(why) = outcome {
                return Err(Status::failed_precondition(why));
            }
            let st = self.raft.state();
            if let Some(k) = st.token_keys.last() {
                note.target = format!("the token signing key (now key {})", k.id);
                tracing::info!(by = %who, key = k.id, signs_from_ms = k.signs_from_ms, keep_previous_s = keep_s, "token signing key rotated");
            }
            Ok(Response::new(signing_keys(&st, crate::tokens::token_clock_ms())))
        }
        .await;
        self.audit.record(&note, &r);
        r
    }

    async fn list_signing_keys(
        &self,
        req: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::SigningKeysResponse>, Status> {
        self.who(&req, "")
            .await?
            .require_admin("list the token signing keys")?;
        self.raft.read_barrier().await?;
        Ok(Response::new(signing_keys(
            &self.raft.state(),
            crate::tokens::token_clock_ms(),
        )))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = self.who(&req, "").await?;
        Ok(Response::new(pb::WhoAmIResponse {
            method: who.method_name().into(),
            accessor: match &who.method {
                auth::Method::Token { accessor } => accessor.clone(),
                _ => String::new(),
            },
            user: who.user,
            admin: who.admin,
            acl_enabled: self.acl_on(),
        }))
    }

    async fn explain_application(
        &self,
        req: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ApplicationExplanation>, Status> {
        let who = self.who(&req, "").await?;
        let id = req.into_inner().application_id;
        // The asks it explains live on the leader: a follower sends the
        // caller there (its read barrier says so).
        self.raft.read_barrier().await?;
        self.check_app(&who, &id, "see")?;
        self.raft.ensure_leader()?;
        Ok(Response::new(self.scheduling.explain(&id)?))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let who = self.who(&req, "").await?;
        let id = req.into_inner().application_id;
        self.raft.read_barrier().await?;
        let st = self.raft.state();
        let app = st.apps.get(id.as_str()).ok_or_else(|| {
            Status::from(Error::NotFound(format!(
                "application_id: no application {id}"
            )))
        })?;
        who.require_app(&st, app, "see")?;
        let master = app.am_container.clone();
        let mut tasks: Vec<pb::TaskReport> = st
            .containers_of(&id)
            .map(|c| {
                use crate::fsm::{ContainerEnd, ContainerPhase};
                let state = match (&c.end, c.phase) {
                    (Some(e), _) => match e.state {
                        ContainerEnd::Succeeded => "succeeded",
                        ContainerEnd::Failed => "failed",
                        ContainerEnd::Killed => "killed",
                        ContainerEnd::Lost => "lost",
                        ContainerEnd::NodeLost => "node_lost",
                    },
                    (None, ContainerPhase::Running) => "running",
                    (None, _) => "allocated",
                };
                let a = &c.alloc;
                pb::TaskReport {
                    task: crate::leader::scheduling::why::task_name(
                        &a.ask_id,
                        master.as_deref() == Some(a.container_id.as_str()),
                    ),
                    container_id: a.container_id.clone(),
                    node_id: a.node_id.clone(),
                    state: state.into(),
                    exit_status: c.end.as_ref().map_or(0, |e| e.exit_status),
                    diagnostic: c
                        .end
                        .as_ref()
                        .map(|e| e.diagnostic.clone())
                        .unwrap_or_default(),
                    allocated_at_ms: c.allocated_at_ms,
                    changed_at_ms: c.changed_at_ms,
                    resources: Some(pb::Resources {
                        vcores_milli: a.vcores_milli,
                        memory_bytes: a.memory_bytes,
                        gpus: a.gpus.len() as u32,
                        gpu_share_milli: a.gpu_share.as_ref().map_or(0, |g| g.milli),
                        gpu_memory_bytes: a.gpu_share.as_ref().map_or(0, |g| g.memory_bytes),
                    }),
                    gpus: a.gpus.clone(),
                }
            })
            .collect();
        tasks.sort_by(|a, b| {
            (a.allocated_at_ms, &a.container_id).cmp(&(b.allocated_at_ms, &b.container_id))
        });
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    type GetTaskLogsStream = ReceiverStream<Result<pb::TaskLogChunk, Status>>;

    /// A task's stdout or stderr, read from (and, with `follow`, followed
    /// on) the node agent that ran it. `task` is a container id, a task
    /// (`stage/index` or `stage.role/index`: its latest container), or empty
    /// for the application master's container.
    async fn get_task_logs(
        &self,
        req: Request<pb::GetTaskLogsRequest>,
    ) -> Result<Response<Self::GetTaskLogsStream>, Status> {
        let who = self.who(&req, "").await?;
        let r = req.into_inner();
        self.raft.read_barrier().await?;
        let (container, address, ended) = {
            let st = self.raft.state();
            let app = st.apps.get(r.application_id.as_str()).ok_or_else(|| {
                Error::NotFound(format!(
                    "application_id: no application {}",
                    r.application_id
                ))
            })?;
            who.require_app(&st, app, "read the logs of")?;
            let c = if r.task.is_empty() {
                app.am_container
                    .as_ref()
                    .and_then(|id| st.containers.get(id.as_str()))
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "task: {} has no master container (it runs inside the RM); name a task, e.g. stage/0",
                            r.application_id
                        ))
                    })?
            } else {
                st.containers_of(&r.application_id)
                    .filter(|c| c.alloc.container_id == r.task || c.alloc.ask_id == r.task)
                    .max_by_key(|c| (c.allocated_at_ms, c.alloc.container_id.clone()))
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "task: {} has no task or container {:?} (tasks are named stage/index, e.g. {}/0)",
                            r.application_id,
                            r.task,
                            weft_spec::JobSpec::parse(&app.spec, &app.spec_format)
                                .ok()
                                .and_then(|s| s.stages.first().map(|s| s.name.clone()))
                                .unwrap_or_else(|| "stage".into())
                        ))
                    })?
            };
            let address = st
                .nodes
                .get(c.alloc.node_id.as_str())
                .map(|n| n.address.clone());
            (
                c.alloc.container_id.clone(),
                address.ok_or_else(|| c.alloc.node_id.clone()),
                c.phase == ContainerPhase::Completed,
            )
        };
        // An ended task's logs from the store when its node cannot give
        // them (gone, lost, or past its retention there).
        let address = match address {
            Ok(a) => a,
            Err(node) => {
                if ended {
                    if let Some(s) = self.stored_logs(&container, r.stderr, r.offset).await? {
                        return Ok(s);
                    }
                }
                return Err(Status::unavailable(format!("node {node} is not known")));
            }
        };
        let mut agent = weft_proto::v1::container_manager_client::ContainerManagerClient::new(
            weft_common::net::endpoint(
                &address,
                weft_common::tls::Role::Agent,
                Duration::from_secs(2),
                None,
            )
            .map_err(|e| Status::internal(format!("node address {address:?}: {e}")))?
            .connect_lazy(),
        );
        let read = pb::ReadLogsRequest {
            container_id: container.clone(),
            stream: if r.stderr {
                pb::LogStream::Stderr as i32
            } else {
                pb::LogStream::Stdout as i32
            },
            offset: r.offset,
            follow: r.follow,
        };
        // A container granted but not started on its agent yet (its master
        // is starting it) has no logs there: a follower waits for it to
        // start, for as long as its token lets it start; a reader is told.
        let deadline = tokio::time::Instant::now() + crate::tokens::CONTAINER_TOKEN_LIFETIME;
        let mut upstream = loop {
            match agent.read_logs(read.clone()).await {
                Ok(s) => break s.into_inner(),
                Err(e)
                    if ended
                        && matches!(
                            e.code(),
                            tonic::Code::NotFound
                                | tonic::Code::Unavailable
                                | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    match self.stored_logs(&container, r.stderr, r.offset).await? {
                        Some(s) => return Ok(s),
                        None => return Err(e),
                    }
                }
                Err(e) if e.code() == tonic::Code::NotFound => {
                    let starting = self
                        .raft
                        .state()
                        .containers
                        .get(container.as_str())
                        .is_some_and(|c| c.phase == ContainerPhase::Allocated);
                    if !starting {
                        return Err(e);
                    }
                    if !r.follow {
                        return Err(Status::failed_precondition(format!(
                            "task: container {container} has not started yet (no logs); --follow waits for it"
                        )));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        let app_id = r.application_id.clone();
        tokio::spawn(async move {
            loop {
                // A caller gone (a follow of a quiet task let go) ends the
                // stream from the agent at once, not at its next chunk.
                let next = tokio::select! {
                    m = upstream.message() => m,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(Some(chunk)) => {
                        // A token revoked or expired meanwhile, or a right
                        // lost, ends a follow.
                        if let Err(e) = me.still_may(&who, &app_id, "read the logs of") {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        let out = pb::TaskLogChunk {
                            offset: chunk.offset,
                            data: chunk.data,
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return; // the caller went away
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl RmService {
    /// An ended container's stream of logs as the store holds it (`[logs]
    /// aggregate_dir`, written by its agent when it ended), from `offset`
    /// (or from where the kept tail starts, if later); None where there is
    /// no store or it holds none of this container.
    async fn stored_logs(
        &self,
        container: &str,
        stderr: bool,
        offset: u64,
    ) -> Result<Option<Response<ReceiverStream<Result<pb::TaskLogChunk, Status>>>>, Status> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let Some(dir) = &self.log_store else {
            return Ok(None);
        };
        let name = if stderr { "stderr" } else { "stdout" };
        let d = dir.join(container);
        // Nothing through a link: the container's directory must be one,
        // and its files regular files (see docs/node-agent.md, "Logs": the
        // store is written by agents only).
        let (file, start) = {
            let d2 = d.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<(std::fs::File, u64)>> {
                let d = d2;
                use std::io::Read;
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::symlink_metadata(&d) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(std::io::Error::other("not a directory")),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                }
                let open = |n: &str| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(d.join(n))
                        .and_then(|f| {
                            if f.metadata()?.is_file() {
                                Ok(f)
                            } else {
                                Err(std::io::Error::other("not a regular file"))
                            }
                        })
                };
                let file = match open(name) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                let mut start = String::new();
                if let Ok(mut f) = open(&format!("{name}.start")) {
                    f.by_ref().take(32).read_to_string(&mut start)?;
                }
                Ok(Some((file, start.trim().parse().unwrap_or(0))))
            })
            .await
            .map_err(|e| Status::internal(format!("logs.aggregate_dir: {e}")))?
            .map_err(|e| {
                Status::internal(format!(
                    "logs.aggregate_dir: reading {}: {e}",
                    d.join(name).display()
                ))
            })?
            .map_or((None, 0), |(f, s)| (Some(f), s))
        };
        let Some(file) = file else {
            return Ok(None);
        };
        let mut file = tokio::fs::File::from_std(file);
        let mut at = offset.max(start);
        file.seek(std::io::SeekFrom::Start(at - start))
            .await
            .map_err(|e| Status::internal(format!("logs.aggregate_dir: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("logs.aggregate_dir: {e}"))))
                            .await;
                        return;
                    }
                };
                let chunk = pb::TaskLogChunk {
                    offset: at,
                    data: buf[..n].to_vec(),
                };
                at += n as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Some(Response::new(ReceiverStream::new(rx))))
    }

    /// Who calls (see [`auth::authenticate`]).
    pub(crate) async fn who<T>(
        &self,
        req: &Request<T>,
        claimed: &str,
    ) -> Result<auth::Who, Status> {
        if let Some(r) = auth::jwt_first(&self.acl, req) {
            return r;
        }
        let r = auth::authenticate(&self.acl, &self.raft.state(), req, claimed, now_ms());
        match r {
            // A follower may not have applied a token made an instant ago
            // through the leader: it sends the caller there (whose answer
            // is final: it applied the token before answering its maker).
            Err(e)
                if e.code() == tonic::Code::Unauthenticated
                    && e.message().starts_with("token not recognised") =>
            {
                self.raft.ensure_leader()?;
                Err(e)
            }
            r => r,
        }
    }

    /// PERMISSION_DENIED unless `who` may `what` application `id` (one that
    /// does not exist passes: the call then says it is not found).
    fn check_app(&self, who: &auth::Who, id: &str, what: &str) -> Result<(), Status> {
        let st = self.raft.state();
        match st.apps.get(id) {
            Some(app) => who.require_app(&st, app, what),
            None => Ok(()),
        }
    }

    /// For a stream that outlives its call's start: UNAUTHENTICATED when
    /// the caller's token was revoked or expired since, PERMISSION_DENIED
    /// when it may no longer `what` application `id`.
    fn still_may(&self, who: &auth::Who, id: &str, what: &str) -> Result<(), Status> {
        let st = self.raft.state();
        if !who.still_valid(&st, now_ms()) {
            return Err(Status::unauthenticated(format!(
                "{who}: the token was revoked or expired"
            )));
        }
        match st.apps.get(id) {
            Some(app) => who.require_app(&st, app, what),
            None => Ok(()),
        }
    }

    /// Whether this member enforces users: its config says so, or the
    /// cluster was bootstrapped (then always).
    fn acl_on(&self) -> bool {
        self.acl.enabled || self.raft.state().acl_bootstrapped
    }

    fn require_acl(&self) -> Result<(), Status> {
        if self.acl_on() {
            return Ok(());
        }
        Err(Status::failed_precondition(
            "ACLs are off on this member: set `[acl] enabled = true` in every member's config",
        ))
    }

    /// Refuses a job whose tasks could never be placed on the nodes known now
    /// (skipped while no node has registered), naming the task's field.
    fn check_fits(&self, spec: &weft_spec::JobSpec, queue: &str, user: &str) -> Result<(), Status> {
        let st = self.raft.state();
        if st.nodes.is_empty() {
            return Ok(());
        }
        let (cluster, _) = crate::view::cluster_view(&st);
        let queues = crate::view::queue_view(&st);
        let Some(q) = queues.index(queue) else {
            return Ok(()); // checked above when queues are configured
        };
        for t in spec.task_shapes() {
            let r = t.resources;
            let (whole, share) = r.gpu_split();
            let mut ask = crate::scheduler::Ask::new(0, q, r.vcores_milli(), r.memory.as_u64());
            ask.user = user.to_string();
            ask.gpu = if share > 0 {
                crate::scheduler::GpuAsk::Share {
                    milli: share,
                    memory: r.gpu_memory.map_or(0, |m| m.as_u64()),
                }
            } else if whole > 0 {
                crate::scheduler::GpuAsk::Whole(whole)
            } else {
                crate::scheduler::GpuAsk::None
            };
            ask.gpu_model = r.gpu_model.clone();
            ask.gpu_min_memory = r.gpu_min_memory.map_or(0, |m| m.as_u64());
            ask.labels = r
                .node_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if let Err(e) = crate::scheduler::validate_ask(&cluster.nodes, &queues, &ask) {
                // "resources.vcores: ..." -> "stages[1].roles.worker.resources.vcores: ..."
                let msg = match e.strip_prefix("resources") {
                    _ if e.starts_with("queue") => e.clone(),
                    Some(rest) => format!("{}{rest}", t.field),
                    None => format!("{}.{e}", t.field),
                };
                return Err(Status::invalid_argument(msg));
            }
        }
        Ok(())
    }

    async fn change_members(&self, change: MemberChange) -> Result<(), Status> {
        match self.raft.change_members(change).await? {
            Outcome::Rejected(why) => Err(Status::failed_precondition(why)),
            _ => Ok(()),
        }
    }
}

/// Applications a ListApplications page holds when the caller says nothing.
pub const DEFAULT_PAGE_SIZE: usize = 1000;
/// The most a ListApplications page holds.
pub const MAX_PAGE_SIZE: usize = 10_000;

/// What an update of a running service may change: its stages of replicas
/// (command, resources, ports, health, restart, replicas...), nothing
/// else; each refusal names the field.
fn check_update(
    id: &str,
    old: &weft_spec::JobSpec,
    new: &weft_spec::JobSpec,
) -> Result<(), Status> {
    let bad = |field: &'static str, reason: String| -> Status {
        Error::InvalidArgument { field, reason }.into()
    };
    if !old.stages.iter().any(|s| s.is_service()) {
        return Err(bad(
            "application_id",
            format!("{id} is not a service (only a service's replicas are updated in place)"),
        ));
    }
    if new.kind != weft_spec::JobKind::Service {
        return Err(bad("kind", "an update of a service is a service".into()));
    }
    if new.queue != old.queue {
        return Err(bad(
            "queue",
            format!(
                "{} cannot change in an update (it is {})",
                new.queue, old.queue
            ),
        ));
    }
    for (same, field) in [
        (new.name == old.name, "name"),
        (new.am == old.am, "am"),
        (new.max_attempts == old.max_attempts, "max_attempts"),
        (
            new.keep_containers == old.keep_containers,
            "keep_containers",
        ),
        (new.priority == old.priority, "priority"),
    ] {
        if !same {
            return Err(bad(
                field,
                "cannot change in an update (only a stage of replicas can)".into(),
            ));
        }
    }
    let names = |s: &weft_spec::JobSpec| -> Vec<(String, bool)> {
        s.stages
            .iter()
            .map(|st| (st.name.clone(), st.is_service()))
            .collect()
    };
    if names(old) != names(new) {
        return Err(bad(
            "stages",
            format!(
                "an update keeps the stages as they are ({}), changing only what a stage of replicas runs",
                old.stages
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for (i, (o, n)) in old.stages.iter().zip(&new.stages).enumerate() {
        if !o.is_service() && o != n {
            return Err(Status::invalid_argument(format!(
                "stages[{i}]: {} is not a stage of replicas: an update cannot change it",
                o.name
            )));
        }
    }
    Ok(())
}
