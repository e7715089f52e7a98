//! Client library for Weft's resource manager (`ClientService`); `rmctl` and
//! the application master are built on it.
//!
//! [`RmClient`] takes any subset of the RM members' addresses, finds the
//! leader, follows NotLeader answers (the `weft-leader` metadata) and retries
//! across elections with backoff until a deadline, so callers do not see a
//! failover. Submissions carry a request id, so a retried submission never
//! creates a second application.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weft_client::Error> {
//! let rm = weft_client::RmClient::new(["127.0.0.1:7101", "127.0.0.1:7102"])?;
//! let spec = std::fs::read_to_string("job.yaml").unwrap_or_default();
//! let id = rm.submit(&spec, "yaml", "alice").await?;
//! let report = rm.get_application(&id).await?;
//! println!("{id}: {:?}", report.state());
//! # Ok(()) }
//! ```

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;
use weft_proto::v1 as pb;
use weft_proto::v1::client_service_client::ClientServiceClient;

pub use weft_proto::v1 as proto;

use weft_common::leader::LeaderClient;
pub use weft_common::leader::{Error, LEADER_HEADER};

/// A client of the RM group.
pub struct RmClient {
    rm: LeaderClient,
    credentials: Credentials,
}

/// What every call carries to say who the caller is: a user's bearer token
/// (`rmctl acl`), if any. (A client certificate is the channel's own.)
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// The ClientService stub every call gets: its requests carry the token.
pub type Rpc = ClientServiceClient<InterceptedService<Channel, Credentials>>;

/// A request id unique to this process and moment.
fn request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl RmClient {
    /// A client of the members at `addresses` (host:port), retrying for 30 s.
    pub fn new<I, S>(addresses: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(RmClient {
            rm: LeaderClient::new(addresses)?,
            credentials: Credentials::default(),
        })
    }

    /// Sends `token` (a secret from `rmctl acl`, `weft_...`) with every call.
    pub fn with_token(mut self, token: &str) -> Result<Self, Error> {
        let token = token.trim();
        let v: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            Error::Rpc(Status::invalid_argument(
                "token: not a token (printable ASCII, as `rmctl acl` printed it)",
            ))
        })?;
        self.credentials.bearer = Some(v);
        Ok(self)
    }

    /// Sets how long a call keeps retrying across failovers.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.rm = self.rm.with_deadline(Some(deadline));
        self
    }

    /// Sets how long one request may take before the call tries again
    /// (default 10 s). A frozen member is left sooner than this: its
    /// connection's keepalive pings go unanswered (`weft_common::net`).
    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.rm = self.rm.with_request_timeout(t);
        self
    }

    fn channel(&self, addr: &str) -> Result<Channel, Error> {
        self.rm.channel(addr)
    }

    /// Calls `f` on the leader, following redirects and retrying retryable
    /// errors with backoff until the deadline.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(Rpc) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.rm
            .call(|ch| {
                f(ClientServiceClient::with_interceptor(
                    ch,
                    self.credentials.clone(),
                ))
            })
            .await
    }

    /// Submits a job spec; returns the application id. Retries reuse one
    /// request id, so at most one application is created.
    pub async fn submit(&self, spec: &str, format: &str, user: &str) -> Result<String, Error> {
        self.submit_with(spec, format, user, false)
            .await
            .map(|r| r.application_id)
    }

    /// Submits a job spec. With `unmanaged_master` the caller runs the
    /// application master itself: the answer carries the application token
    /// that master must present (attempt 1).
    pub async fn submit_with(
        &self,
        spec: &str,
        format: &str,
        user: &str,
        unmanaged_master: bool,
    ) -> Result<pb::SubmitApplicationResponse, Error> {
        let req = pb::SubmitApplicationRequest {
            spec: spec.to_string(),
            spec_format: format.to_string(),
            user: user.to_string(),
            request_id: request_id(),
            unmanaged_master,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.submit_application(req).await }
        })
        .await
    }

    pub async fn get_application(&self, id: &str) -> Result<pb::ApplicationReport, Error> {
        let req = pb::GetApplicationRequest {
            application_id: id.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.get_application(req).await }
        })
        .await
    }

    /// Why `id` waits (each waiting part and what keeps it from being
    /// placed now) or why it failed.
    pub async fn explain_application(&self, id: &str) -> Result<pb::ApplicationExplanation, Error> {
        let req = pb::GetApplicationRequest {
            application_id: id.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.explain_application(req).await }
        })
        .await
    }

    /// The application's tasks and its master's container: where each
    /// runs or ran, its state and how it ended.
    pub async fn list_tasks(&self, id: &str) -> Result<pb::ListTasksResponse, Error> {
        let req = pb::GetApplicationRequest {
            application_id: id.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.list_tasks(req).await }
        })
        .await
    }

    /// Every application `req`'s filters match, page after page (from
    /// `req.page_token`, `req.page_size` a page).
    pub async fn list_applications(
        &self,
        mut req: pb::ListApplicationsRequest,
    ) -> Result<Vec<pb::ApplicationReport>, Error> {
        let mut all = Vec::new();
        loop {
            let page = self.list_applications_page(req.clone()).await?;
            all.extend(page.applications);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            req.page_token = page.next_page_token;
        }
    }

    /// One page of applications, with the token of the next.
    pub async fn list_applications_page(
        &self,
        req: pb::ListApplicationsRequest,
    ) -> Result<pb::ListApplicationsResponse, Error> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.list_applications(req).await }
        })
        .await
    }

    /// Sets how many replicas a service's stage keeps (`stage` empty: its
    /// only stage of replicas).
    pub async fn scale_application(
        &self,
        id: &str,
        stage: &str,
        replicas: u32,
    ) -> Result<pb::ScaleApplicationResponse, Error> {
        let req = pb::ScaleApplicationRequest {
            application_id: id.into(),
            stage: stage.into(),
            replicas,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.scale_application(req).await }
        })
        .await
    }

    /// Replaces a running service's spec (`format`: yaml or toml): its
    /// master rolls the change out one replica at a time. Returns the new
    /// spec revision.
    pub async fn update_application(
        &self,
        id: &str,
        spec: &str,
        format: &str,
    ) -> Result<u32, Error> {
        let req = pb::UpdateApplicationRequest {
            application_id: id.into(),
            spec: spec.into(),
            spec_format: format.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.update_application(req).await }
        })
        .await
        .map(|r| r.spec_revision)
    }

    /// A service's healthy replicas (as its master last reported them).
    pub async fn endpoints(&self, id: &str) -> Result<Vec<pb::Endpoint>, Error> {
        Ok(self.get_application(id).await?.endpoints)
    }

    pub async fn kill_application(&self, id: &str) -> Result<(), Error> {
        let req = pb::KillApplicationRequest {
            application_id: id.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.kill_application(req).await }
        })
        .await
        .map(|_| ())
    }

    /// A task's stdout (or stderr) from `offset`, read from the node that
    /// ran it; with `follow`, the stream goes on until the task ends. `task`
    /// is `stage/index` (`stage.role/index` in a gang with roles), a
    /// container id, or empty for the application master.
    pub async fn task_logs(
        &self,
        app: &str,
        task: &str,
        stderr: bool,
        offset: u64,
        follow: bool,
    ) -> Result<tonic::Streaming<pb::TaskLogChunk>, Error> {
        let req = pb::GetTaskLogsRequest {
            application_id: app.into(),
            task: task.into(),
            stderr,
            offset,
            follow,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.get_task_logs(req).await }
        })
        .await
    }

    /// The application's report now and at every change, until it ends.
    pub async fn watch_application(
        &self,
        id: &str,
    ) -> Result<tonic::Streaming<pb::ApplicationReport>, Error> {
        let req = pb::GetApplicationRequest {
            application_id: id.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.watch_application(req).await }
        })
        .await
    }

    /// Waits for the application's end (following its watch stream, and
    /// watching again from another member if the stream breaks); returns
    /// the final report.
    pub async fn wait_application(&self, id: &str) -> Result<pb::ApplicationReport, Error> {
        loop {
            let mut stream = self.watch_application(id).await?;
            loop {
                match stream.message().await {
                    Ok(Some(r)) if r.state >= pb::ApplicationState::Succeeded as i32 => {
                        return Ok(r)
                    }
                    Ok(Some(_)) => {}
                    // The stream ended or broke (a failover): watch again.
                    Ok(None) | Err(_) => break,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn list_nodes(&self) -> Result<Vec<pb::NodeReport>, Error> {
        self.call(|mut c| async move { c.list_nodes(pb::ListNodesRequest {}).await })
            .await
            .map(|r| r.nodes)
    }

    pub async fn drain_node(&self, id: &str) -> Result<(), Error> {
        let req = pb::DrainNodeRequest { node_id: id.into() };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.drain_node(req).await }
        })
        .await
        .map(|_| ())
    }

    pub async fn list_queues(&self) -> Result<Vec<pb::QueueReport>, Error> {
        self.call(|mut c| async move { c.list_queues(pb::ListQueuesRequest {}).await })
            .await
            .map(|r| r.queues)
    }

    /// Adds member `id` at `address` to the RM group (start it with `--join`).
    pub async fn add_member(&self, id: u64, address: &str) -> Result<(), Error> {
        let req = pb::AddMemberRequest {
            id,
            address: address.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.add_member(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Removes member `id` from the RM group.
    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        let req = pb::RemoveMemberRequest { id };
        self.call(|mut c| async move { c.remove_member(req).await })
            .await
            .map(|_| ())
    }

    /// Replaces the queue tree with the `[[queues]]` tables of `config_toml`.
    pub async fn set_queues(&self, config_toml: &str) -> Result<(), Error> {
        let req = pb::SetQueuesRequest {
            config_toml: config_toml.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.set_queues(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Makes the first admin token (works once, on a cluster with ACLs on).
    /// The secret is chosen here, so that a retry whose first try was
    /// applied (its answer lost to a failover) gets the same token.
    pub async fn acl_bootstrap(&self) -> Result<pb::AclTokenSecret, Error> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).expect("the OS random number generator");
        let req = pb::AclBootstrapRequest {
            secret: format!("weft_{}", hex::encode(raw)),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.acl_bootstrap(req).await }
        })
        .await
    }

    /// Makes a token for `user` (admins only); `ttl` None = never expires.
    pub async fn create_acl_token(
        &self,
        user: &str,
        admin: bool,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<pb::AclTokenSecret, Error> {
        let req = pb::CreateAclTokenRequest {
            user: user.into(),
            admin,
            ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
            description: description.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.create_acl_token(req).await }
        })
        .await
    }

    pub async fn list_acl_tokens(&self) -> Result<Vec<pb::AclToken>, Error> {
        self.call(|mut c| async move { c.list_acl_tokens(pb::ListAclTokensRequest {}).await })
            .await
            .map(|r| r.tokens)
    }

    pub async fn revoke_acl_token(&self, accessor: &str) -> Result<(), Error> {
        let req = pb::RevokeAclTokenRequest {
            accessor: accessor.into(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.revoke_acl_token(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Makes a new token signing key (admins only). The key it replaces
    /// keeps verifying for `keep_previous` after the new one signs (None:
    /// an hour, so that every token it signed has expired). One request id
    /// across retries: a rotation applied whose answer was lost is not
    /// made twice.
    pub async fn rotate_signing_key(
        &self,
        keep_previous: Option<Duration>,
    ) -> Result<pb::SigningKeysResponse, Error> {
        let req = pb::RotateSigningKeyRequest {
            request_id: request_id(),
            keep_previous_seconds: keep_previous.map_or(0, |d| d.as_secs().max(1)),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.rotate_signing_key(req).await }
        })
        .await
    }

    /// The group's token signing keys (public halves; admins only).
    pub async fn list_signing_keys(&self) -> Result<pb::SigningKeysResponse, Error> {
        self.call(|mut c| async move { c.list_signing_keys(pb::ListSigningKeysRequest {}).await })
            .await
    }

    /// Who the cluster takes this client for.
    pub async fn who_am_i(&self) -> Result<pb::WhoAmIResponse, Error> {
        self.call(|mut c| async move { c.who_am_i(pb::WhoAmIRequest {}).await })
            .await
    }

    /// Cluster status as the leader sees it.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        self.call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
            .await
    }

    /// Cluster status as the member at `addr` sees it (no redirect).
    pub async fn member_status(&self, addr: &str) -> Result<pb::ClusterStatusResponse, Error> {
        let mut c =
            ClientServiceClient::with_interceptor(self.channel(addr)?, self.credentials.clone());
        c.cluster_status(pb::ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(Error::Rpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(matches!(
            RmClient::new(Vec::<String>::new()),
            Err(Error::NoAddress(_))
        ));
        assert!(matches!(RmClient::new([" "]), Err(Error::NoAddress(_))));
        assert!(RmClient::new(["127.0.0.1:7100", "h:1"]).is_ok());
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(request_id(), request_id());
    }

    #[tokio::test]
    async fn unreachable_rm_is_one_clear_error() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = RmClient::new([format!("127.0.0.1:{port}")])
            .unwrap()
            .with_deadline(Duration::from_millis(300));
        let e = c.cluster_status().await.unwrap_err();
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&format!(
                "cannot reach a resource-manager leader at 127.0.0.1:{port}"
            )),
            "{e}"
        );
    }
}
