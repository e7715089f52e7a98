//! The REST API (`/v1/...`) beside gRPC, on the member's `[http]` port.
//!
//! Every handler is a ClientService call made in-process: the same
//! authentication (the `Authorization: Bearer` header, or the client
//! certificate of an HTTPS connection), the same checks, the same audit
//! lines and the same messages; an error is JSON naming the field at fault.
//! A member that is not the leader sends calls that need it (writes, and
//! reads, which the leader answers after a read barrier, as over gRPC) to
//! the leader: `307 Temporary Redirect` to the leader's HTTP URL (which the
//! leader records in the state when it starts to lead); clients follow it
//! as `curl -L` does.
//! The OpenAPI document is made from these handlers and types
//! ([`ApiDoc`]), served at `/openapi.json` and kept in `docs/openapi.json`.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio_stream::StreamExt;
use utoipa::{IntoParams, OpenApi};
use weft_common::net::ConnInfo;
use weft_proto::v1 as pb;
use weft_proto::v1::client_service_server::ClientService;

use crate::service::RmService;

pub mod types;
use types::*;

/// The longest a `wait` holds a request open.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// How long a call sent to a member that knows no leader (or not its
/// URL) is tried again before it is answered 503: an election's length.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);
/// The longest a unary call passed on to the leader may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a log read waits for its first bytes before it answers 200
/// (errors before then are answered as errors).
pub const FIRST_CHUNK_WAIT: Duration = Duration::from_secs(2);
/// A `wait` without `timeout`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// The largest request body taken (a spec; the spec's own limit is checked
/// after, naming it).
pub const MAX_BODY: usize = weft_spec::MAX_SPEC_BYTES + (64 << 10);

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weft REST API",
        description = "Weft's resource manager over HTTP/JSON: submit, list, follow and kill applications, read task logs, see nodes, queues and the RM group. The same calls, rights and messages as the gRPC ClientService. A member that is not the leader answers calls that need the leader (writes, and reads, which it answers after a read barrier) with 307 Temporary Redirect to the leader's URL: follow redirects (`curl -L`).",
    ),
    paths(
        submit, list_apps, get_app, kill_app, scale_app, update_app, endpoints, wait_app, why, tasks, task_logs,
        list_nodes, drain_node, list_queues, cluster, whoami
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "applications", description = "Submit, list, follow and kill applications; their tasks' logs."),
        (name = "cluster", description = "Nodes, queues, the RM group, the caller."),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(
                            "A Weft token (`rmctl acl token create`) or, where the cluster trusts an OIDC issuer, its JWT. Not needed where users are off; over HTTPS a client certificate serves instead.",
                        ))
                        .build(),
                ),
            );
    }
}

/// The OpenAPI document, as served and as kept in `docs/openapi.json`.
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document is JSON");
    s.push('\n');
    s
}

/// The REST routes (and `/openapi.json`) over `svc`.
pub fn router(svc: RmService) -> Router {
    let doc = openapi_json();
    Router::new()
        .route("/v1/apps", post(submit).get(list_apps))
        .route("/v1/apps/{id}", get(get_app))
        .route("/v1/apps/{id}/kill", post(kill_app))
        .route("/v1/apps/{id}/scale", post(scale_app))
        .route("/v1/apps/{id}/update", post(update_app))
        .route("/v1/apps/{id}/endpoints", get(endpoints))
        .route("/v1/apps/{id}/wait", get(wait_app))
        .route("/v1/apps/{id}/why", get(why))
        .route("/v1/apps/{id}/tasks", get(tasks))
        .route("/v1/apps/{id}/logs", get(task_logs))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}/drain", post(drain_node))
        .route("/v1/queues", get(list_queues))
        .route("/v1/cluster", get(cluster))
        .route("/v1/whoami", get(whoami))
        .route("/", get(|| async { axum::response::Redirect::to("/ui/") }))
        .route(
            "/ui",
            get(|| async { axum::response::Redirect::to("/ui/") }),
        )
        .route(
            "/ui/",
            get(|| async { ui_file("text/html; charset=utf-8", UI_INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { ui_file("text/javascript; charset=utf-8", UI_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { ui_file("text/css; charset=utf-8", UI_CSS) }),
        )
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc) }),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                None,
                "no such endpoint (see /openapi.json)".into(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(same_origin_writes))
        .with_state(svc)
}

/// Refuses a write a browser sends from a page of another origin (its
/// `Origin` header names a host other than the one asked): a page a user
/// visits cannot submit, kill or drain through their browser. Tools
/// (curl, scripts, the Python client) send no `Origin`.
async fn same_origin_writes(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        // HTTP/1.1 names the host in `Host`, HTTP/2 in `:authority`.
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        if let Some(origin) = origin {
            let origin_host = origin.split_once("://").map(|(_, h)| h).unwrap_or(origin);
            if Some(origin_host) != host {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_denied",
                    Some("Origin"),
                    format!(
                        "Origin: a write from a page of {origin} to {} is refused (cross-site)",
                        host.unwrap_or("this member")
                    ),
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// The web UI, built into the binary (no network needed to serve it).
const UI_INDEX: &str = include_str!("../../ui/index.html");
const UI_JS: &str = include_str!("../../ui/app.js");
const UI_CSS: &str = include_str!("../../ui/style.css");

/// A file of the web UI: only this origin's scripts and styles may run on
/// its pages (no inline script, nothing from elsewhere).
fn ui_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// A failed call: its HTTP status and a JSON [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    location: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, field: Option<&str>, message: String) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                code: code.into(),
                field: field.map(Into::into),
                message,
            },
            location: None,
        }
    }

    fn bad(field: &str, why: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            Some(field),
            format!("{field}: {why}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if let Some(l) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            r.headers_mut().insert(header::LOCATION, l);
        }
        r
    }
}

/// The field a gRPC message names: its head before `": "` where that is a
/// field path (`spec`, `queue`, `stages[0].resources.memory`).
fn field_of(message: &str) -> Option<&str> {
    let (head, _) = message.split_once(": ")?;
    (!head.is_empty()
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c)))
    .then_some(head)
}

fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `InvalidArgument` -> `invalid_argument`.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The caller of a request as the gRPC service sees one: its bearer
/// header, its connection (remote address, client certificate), and where
/// it asked (for a redirect to the leader).
pub struct Caller {
    authorization: Option<HeaderValue>,
    conn: Option<ConnInfo>,
    path_and_query: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Caller {
            authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
            conn: parts
                .extensions
                .get::<ConnectInfo<ConnInfo>>()
                .map(|c| c.0.clone()),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default(),
        })
    }
}

impl Caller {
    /// `msg` as a gRPC request of this caller.
    fn req<T>(&self, msg: T) -> Result<tonic::Request<T>, ApiError> {
        let mut r = tonic::Request::new(msg);
        if let Some(v) = &self.authorization {
            let v = tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes()).map_err(|_| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    Some("authorization"),
                    "authorization: not ASCII (expected `Bearer weft_...`)".into(),
                )
            })?;
            r.metadata_mut()
                .insert(crate::service::auth::AUTHORIZATION, v);
        }
        if let Some(c) = &self.conn {
            r.extensions_mut().insert(c.clone());
        }
        Ok(r)
    }

    /// Makes the gRPC call `local` with `msg` as this caller. A call that
    /// needs the leader, made of a follower, goes on to the leader: over
    /// gRPC with the caller's bearer token (`remote`: the leader then
    /// authenticates the caller itself), or, for a caller known only by
    /// its client certificate (which a member cannot pass on), as a `307`
    /// to the leader's HTTP URL. While no leader (or no address of it) is
    /// known, the call is tried again for up to [`LEADER_WAIT`] before it
    /// is answered 503.
    async fn call<T, R, F, Fut, G, GFut>(
        &self,
        svc: &RmService,
        msg: T,
        local: F,
        remote: G,
    ) -> Result<R, ApiError>
    where
        T: Clone,
        F: Fn(RmService, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
        G: Fn(Forward, T) -> GFut,
        GFut: std::future::Future<Output = Result<R, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let s = match local(svc.clone(), self.req(msg.clone())?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            if !is_not_leader(&s) {
                return Err(self.fail(s));
            }
            let status = svc.raft().status();
            let mut last = s.message().to_string();
            if status.leader_id != 0 && status.leader_id != status.id {
                if self.may_forward(svc) {
                    if let Some(addr) = svc.raft().address_of(status.leader_id) {
                        let fw = Forward {
                            addr,
                            authorization: self.authorization.clone(),
                        };
                        match remote(fw, msg.clone()).await {
                            Ok(r) => return Ok(r),
                            // Deposed meanwhile, or not reached: again.
                            Err(s) if s.code() == tonic::Code::Unavailable => {
                                last = s.message().to_string()
                            }
                            Err(s) => return Err(self.fail(s)),
                        }
                    }
                } else if let Some(url) = svc
                    .raft()
                    .state()
                    .member_http
                    .get(&status.leader_id)
                    .cloned()
                {
                    let mut e = ApiError::new(
                        StatusCode::TEMPORARY_REDIRECT,
                        "unavailable",
                        None,
                        format!(
                            "not the leader; the leader (member {}) is {url}",
                            status.leader_id
                        ),
                    );
                    e.location = Some(format!("{url}{}", self.path_and_query));
                    return Err(e);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    None,
                    format!("{last}; try again"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether this member may pass the call on to the leader in the
    /// caller's name: it carries a bearer token (the leader checks it), or
    /// users are off here (the call is marked as passed on: a leader that
    /// enforces users takes it for no one, never for this member). A caller
    /// known by its client certificate alone is redirected instead.
    fn may_forward(&self, svc: &RmService) -> bool {
        self.authorization.is_some() || (!svc.acl.enabled && !svc.raft().state().acl_bootstrapped)
    }

    /// A gRPC error as this caller's answer.
    fn fail(&self, s: tonic::Status) -> ApiError {
        let field = match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::NotFound => field_of(s.message()),
            _ => None,
        };
        ApiError::new(
            http_status(s.code()),
            &code_name(s.code()),
            field,
            s.message().to_string(),
        )
    }
}

/// A call passed on to the leader over gRPC, with the caller's bearer
/// token.
pub struct Forward {
    addr: String,
    authorization: Option<HeaderValue>,
}

/// A stream of replies, made here or by the leader.
type Replies<M> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<M, tonic::Status>> + Send>>;

impl Forward {
    async fn client(
        &self,
    ) -> Result<tonic::client::Grpc<tonic::transport::Channel>, tonic::Status> {
        let ch = weft_common::net::endpoint(
            &self.addr,
            weft_common::tls::Role::Rm,
            Duration::from_secs(2),
            None,
        )
        .map_err(|e| tonic::Status::unavailable(format!("the leader at {}: {e}", self.addr)))?
        .connect_lazy();
        let mut g = tonic::client::Grpc::new(ch);
        g.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("the leader at {}: {e}", self.addr)))?;
        Ok(g)
    }

    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, tonic::Status> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            crate::service::auth::FORWARDED,
            tonic::metadata::AsciiMetadataValue::from_static("1"),
        );
        if let Some(v) = &self.authorization {
            let v = tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes())
                .map_err(|_| tonic::Status::unauthenticated("authorization: not ASCII"))?;
            r.metadata_mut()
                .insert(crate::service::auth::AUTHORIZATION, v);
        }
        Ok(r)
    }

    /// A unary ClientService call on the leader (`path`: its gRPC path).
    async fn unary<T, R>(self, path: &'static str, msg: T) -> Result<R, tonic::Status>
    where
        T: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut g = self.client().await?;
        let mut req = self.request(msg)?;
        req.set_timeout(FORWARD_TIMEOUT);
        g.unary(
            req,
            axum::http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    /// A server-streaming ClientService call on the leader.
    async fn stream<T, R>(self, path: &'static str, msg: T) -> Result<Replies<R>, tonic::Status>
    where
        T: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut g = self.client().await?;
        let req = self.request(msg)?;
        let s = g
            .server_streaming(
                req,
                axum::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await?
            .into_inner();
        Ok(Box::pin(s))
    }
}

/// A unary ClientService call made here, or on the leader.
macro_rules! unary {
    ($caller:expr, $svc:expr, $msg:expr, $method:ident, $name:literal) => {
        $caller
            .call(
                &$svc,
                $msg,
                |svc, req| async move { svc.$method(req).await },
                |fw, m| fw.unary(concat!("/weft.v1.ClientService/", $name), m),
            )
            .await
    };
}

/// A server-streaming ClientService call made here, or on the leader.
macro_rules! streaming {
    ($caller:expr, $svc:expr, $msg:expr, $method:ident, $name:literal) => {
        $caller
            .call(
                &$svc,
                $msg,
                |svc, req| async move {
                    svc.$method(req)
                        .await
                        .map(|r| r.map(|s| Box::pin(s) as Replies<_>))
                },
                |fw, m| fw.stream(concat!("/weft.v1.ClientService/", $name), m),
            )
            .await
    };
}

fn is_not_leader(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.message().starts_with("not the leader")
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        // serde names the field: "unknown field `x`, expected ..." or
        // "q: invalid digit ...".
        let named = text.split('`').nth(1).filter(|_| text.contains("field `"));
        let prefixed = text
            .split_once("query string: ")
            .and_then(|(_, rest)| rest.split_once(": "))
            .map(|(f, _)| f)
            .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let field = named.or(prefixed).map(str::to_string);
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            field.as_deref(),
            text,
        )
    })
}

/// Query parameters of `POST /v1/apps`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SubmitQuery {
    /// The spec's format: yaml, json or toml. Default: from Content-Type
    /// (application/json, application/toml, anything else YAML).
    pub format: Option<String>,
    /// Submit as this user (admins only; others submit as themselves).
    pub user: Option<String>,
}

/// Submits an application: the body is its spec (YAML, JSON or TOML).
/// An `Idempotency-Key` header makes a retry safe: the same key answers
/// the application it made first.
#[utoipa::path(
    post,
    path = "/v1/apps",
    tag = "applications",
    params(
        SubmitQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submission answer the application its first try made (at most 128 bytes)."),
    ),
    request_body(
        description = "The job spec, as `rmctl submit -f` takes it.",
        content(
            (String = "application/yaml"),
            (String = "application/json"),
            (String = "application/toml"),
        )
    ),
    responses(
        (status = 201, description = "Submitted; Location is its URL.", body = Submitted),
        (status = 307, description = "Sent to a follower: the leader's URL is in Location.", body = ErrorBody),
        (status = 400, description = "A bad spec or parameter, naming the field.", body = ErrorBody),
        (status = 401, description = "No or a bad token.", body = ErrorBody),
        (status = 403, description = "May not submit to that queue, or as that user.", body = ErrorBody),
        (status = 413, description = "The body is over the size taken.", body = ErrorBody),
    )
)]
async fn submit(
    State(svc): State<RmService>,
    caller: Caller,
    headers: HeaderMap,
    q: Result<Query<SubmitQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let (spec, spec_format) = spec_body(&headers, q.format, body)?;
    let request_id = match headers.get("idempotency-key") {
        // One of its own, so that the tries this member makes while a
        // leader is elected submit it once.
        None => {
            let mut raw = [0u8; 16];
            getrandom::getrandom(&mut raw).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    None,
                    format!("no randomness for a request id: {e}"),
                )
            })?;
            format!("rest-{}", hex::encode(raw))
        }
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| ApiError::bad("Idempotency-Key", "not ASCII"))?;
            if k.len() > 128 {
                return Err(ApiError::bad(
                    "Idempotency-Key",
                    format!("is {} bytes; at most 128", k.len()),
                ));
            }
            k.to_string()
        }
    };
    let msg = pb::SubmitApplicationRequest {
        spec,
        spec_format,
        user: q.user.unwrap_or_default(),
        request_id,
        unmanaged_master: false,
    };
    let id = unary!(caller, svc, msg, submit_application, "SubmitApplication")?.application_id;
    let mut r = (
        StatusCode::CREATED,
        Json(Submitted {
            application_id: id.clone(),
        }),
    )
        .into_response();
    if let Ok(l) = HeaderValue::from_str(&format!("/v1/apps/{id}")) {
        r.headers_mut().insert(header::LOCATION, l);
    }
    Ok(r)
}

/// A spec body (`POST /v1/apps`, `POST /v1/apps/{id}/update`): its text
/// and format, from `?format=` or its Content-Type (only a spec's own
/// types: a page of another site cannot send them without asking).
fn spec_body(
    headers: &HeaderMap,
    format: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, String), ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_argument",
            Some("spec"),
            format!("spec: the body is over {MAX_BODY} bytes, the most taken"),
        ),
        e => ApiError::bad("spec", e.body_text()),
    })?;
    let spec = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad("spec", format!("not UTF-8 ({e})")))?;
    // Only a spec's own media types: a browser cannot send these from
    // another site without asking first (a form's types, text/plain
    // included, it could).
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let media = ct.split(';').next().unwrap_or("").trim();
    let by_type = match media {
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml" => "yaml",
        "application/json" => "json",
        "application/toml" | "text/toml" => "toml",
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_argument",
                Some("Content-Type"),
                format!(
                    "Content-Type: {media:?} is not a spec's; send application/yaml, application/json or application/toml (curl: -H 'Content-Type: application/yaml')"
                ),
            ))
        }
    };
    let format = match format {
        Some(f) => match f.to_ascii_lowercase().as_str() {
            "yaml" | "yml" | "json" | "toml" => f.to_ascii_lowercase(),
            _ => {
                return Err(ApiError::bad(
                    "format",
                    format!("{f:?} is not yaml, json or toml"),
                ))
            }
        },
        None => by_type.to_string(),
    };
    // JSON is YAML (1.2) to the spec's parser.
    let format = match format.as_str() {
        "yml" | "json" => "yaml".into(),
        _ => format,
    };
    Ok((spec, format))
}

/// Query parameters of `GET /v1/apps`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// States, comma-separated (submitted, accepted, running, succeeded,
    /// failed, killed); `active` for the first three, `finished` for the last three.
    pub state: Option<String>,
    pub user: Option<String>,
    pub queue: Option<String>,
    pub name: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub page_size: Option<u32>,
    /// The `next_page_token` of the page before.
    pub page_token: Option<String>,
}

fn states(s: &str) -> Result<Vec<i32>, ApiError> {
    let mut out = Vec::new();
    for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let w = w.to_ascii_lowercase();
        let these: Vec<AppState> = match w.as_str() {
            "active" => AppState::ALL.into_iter().filter(|a| !a.finished()).collect(),
            "finished" => AppState::ALL.into_iter().filter(|a| a.finished()).collect(),
            _ => match AppState::ALL.into_iter().find(|a| a.name() == w) {
                Some(a) => vec![a],
                None => {
                    return Err(ApiError::bad(
                        "state",
                        format!(
                            "{w:?} is not a state (submitted, accepted, running, succeeded, failed, killed, active, finished)"
                        ),
                    ))
                }
            },
        };
        out.extend(these.into_iter().map(|a| a.pb() as i32));
    }
    Ok(out)
}

/// Lists applications, oldest first, a page at a time: a user sees their
/// own and those of queues they administer; an admin sees all.
#[utoipa::path(
    get,
    path = "/v1/apps",
    tag = "applications",
    params(ListQuery),
    responses(
        (status = 200, body = AppList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    )
)]
async fn list_apps(
    State(svc): State<RmService>,
    caller: Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<AppList>, ApiError> {
    let q = query(q)?;
    let msg = pb::ListApplicationsRequest {
        queue: q.queue.unwrap_or_default(),
        user: q.user.unwrap_or_default(),
        states: states(q.state.as_deref().unwrap_or(""))?,
        name: q.name.unwrap_or_default(),
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token.unwrap_or_default(),
    };
    let r = unary!(caller, svc, msg, list_applications, "ListApplications")?;
    Ok(Json(AppList {
        applications: r.applications.into_iter().map(Into::into).collect(),
        next_page_token: (!r.next_page_token.is_empty()).then_some(r.next_page_token),
    }))
}

/// One application.
#[utoipa::path(
    get,
    path = "/v1/apps/{id}",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id.")),
    responses(
        (status = 200, body = App),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not the caller's, nor of a queue they administer.", body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn get_app(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<App>, ApiError> {
    let msg = pb::GetApplicationRequest { application_id: id };
    let r = unary!(caller, svc, msg, get_application, "GetApplication")?;
    Ok(Json(r.into()))
}

/// Kills an application: its master and every task end, as KILLED.
#[utoipa::path(
    post,
    path = "/v1/apps/{id}/kill",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id.")),
    responses(
        (status = 200, description = "Killed (or it had finished already).", body = Killed),
        (status = 307, description = "Sent to a follower: the leader's URL is in Location.", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn kill_app(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Killed>, ApiError> {
    let msg = pb::KillApplicationRequest {
        application_id: id.clone(),
    };
    unary!(caller, svc, msg, kill_application, "KillApplication")?;
    Ok(Json(Killed { application_id: id }))
}

/// Query parameters of `POST /v1/apps/{id}/scale`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ScaleQuery {
    /// How many replicas the stage keeps (0 to 100000).
    pub replicas: u32,
    /// The service's stage of replicas (needed where it has several).
    pub stage: Option<String>,
}

/// Sets how many replicas a service's stage keeps running (its user, or
/// an admin of its queue or the cluster).
#[utoipa::path(
    post,
    path = "/v1/apps/{id}/scale",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id."), ScaleQuery),
    responses(
        (status = 200, description = "Scaled: its master starts or stops replicas.", body = Scaled),
        (status = 307, description = "Sent to a follower: the leader's URL is in Location.", body = ErrorBody),
        (status = 400, description = "Not a service, no such stage, or too many replicas.", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn scale_app(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<ScaleQuery>, QueryRejection>,
) -> Result<Json<Scaled>, ApiError> {
    let q = query(q)?;
    let msg = pb::ScaleApplicationRequest {
        application_id: id.clone(),
        stage: q.stage.unwrap_or_default(),
        replicas: q.replicas,
    };
    let r = unary!(caller, svc, msg, scale_application, "ScaleApplication")?;
    Ok(Json(Scaled {
        application_id: id,
        stage: r.stage,
        replicas: r.replicas,
        previous: r.previous,
    }))
}

/// Query parameters of `POST /v1/apps/{id}/update`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UpdateQuery {
    /// The spec's format: yaml, json or toml (default: from Content-Type).
    pub format: Option<String>,
}

/// Replaces a running service's spec (the body, as for a submit): its
/// master rolls the change out one replica at a time, a new replica
/// healthy before an old one stops; `rollout` in the application says how
/// it goes. Only its stages of replicas may change.
#[utoipa::path(
    post,
    path = "/v1/apps/{id}/update",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id."), UpdateQuery),
    request_body(content = String, description = "The new spec.", content_type = "application/yaml"),
    responses(
        (status = 200, description = "Taken: its master rolls it out.", body = Updated),
        (status = 307, description = "Sent to a follower: the leader's URL is in Location.", body = ErrorBody),
        (status = 400, description = "A bad spec, or a change an update cannot make, naming the field.", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 415, body = ErrorBody),
    )
)]
async fn update_app(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<UpdateQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Updated>, ApiError> {
    let q = query(q)?;
    let (spec, spec_format) = spec_body(&headers, q.format, body)?;
    let msg = pb::UpdateApplicationRequest {
        application_id: id.clone(),
        spec,
        spec_format,
    };
    let r = unary!(caller, svc, msg, update_application, "UpdateApplication")?;
    Ok(Json(Updated {
        application_id: id,
        spec_revision: r.spec_revision,
    }))
}

/// A service's healthy replicas: where a load balancer or a client finds
/// them (host and named ports), as its master last reported them.
#[utoipa::path(
    get,
    path = "/v1/apps/{id}/endpoints",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id.")),
    responses(
        (status = 200, body = EndpointList),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn endpoints(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EndpointList>, ApiError> {
    let msg = pb::GetApplicationRequest {
        application_id: id.clone(),
    };
    let r = unary!(caller, svc, msg, get_application, "GetApplication")?;
    Ok(Json(EndpointList {
        application_id: id,
        endpoints: r.endpoints.into_iter().map(Into::into).collect(),
    }))
}

/// Query parameters of `GET /v1/apps/{id}/wait`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The longest to wait, e.g. `30s`, `2m` (default 30s, at most 5m).
    pub timeout: Option<String>,
}

/// Waits until the application finishes or `timeout` passes (a long poll),
/// and answers it as it is then: a script calls again while `state` is
/// not succeeded, failed or killed.
#[utoipa::path(
    get,
    path = "/v1/apps/{id}/wait",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id."), WaitQuery),
    responses(
        (status = 200, description = "Finished, or as it is at the timeout.", body = App),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn wait_app(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<App>, ApiError> {
    let q = query(q)?;
    let timeout = match q.timeout.as_deref() {
        None => DEFAULT_WAIT,
        Some(t) => {
            let d = humantime::parse_duration(t).map_err(|e| {
                ApiError::bad(
                    "timeout",
                    format!("{t:?} is not a duration such as 30s ({e})"),
                )
            })?;
            if d > MAX_WAIT {
                return Err(ApiError::bad(
                    "timeout",
                    format!(
                        "{t} is over the most, {}",
                        humantime::format_duration(MAX_WAIT)
                    ),
                ));
            }
            d
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let msg = pb::GetApplicationRequest { application_id: id };
    let mut reports: Replies<pb::ApplicationReport> = streaming!(
        caller,
        svc,
        msg.clone(),
        watch_application,
        "WatchApplication"
    )?;
    let mut last: Option<pb::ApplicationReport> = None;
    loop {
        match tokio::time::timeout_at(deadline, reports.next()).await {
            Ok(Some(Ok(r))) => {
                let done = r.state >= pb::ApplicationState::Succeeded as i32;
                last = Some(r);
                if done {
                    break;
                }
            }
            Ok(Some(Err(s))) => return Err(caller.fail(s)),
            // The stream ends only after a finished report, or at the
            // deadline.
            Ok(None) | Err(_) => break,
        }
    }
    match last {
        Some(r) => Ok(Json(r.into())),
        // A short timeout that passed before the watch's first report (a
        // busy member): the application as it is now, as promised.
        None => {
            let r = unary!(caller, svc, msg, get_application, "GetApplication")?;
            Ok(Json(r.into()))
        }
    }
}

/// Why the application waits (each waiting part: what keeps it from being
/// placed now, and how many tasks of others are ahead of it in its queue)
/// or why it failed (its first failing task). The leader answers.
#[utoipa::path(
    get,
    path = "/v1/apps/{id}/why",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id.")),
    responses(
        (status = 200, body = Why),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn why(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Why>, ApiError> {
    let msg = pb::GetApplicationRequest { application_id: id };
    let r = unary!(caller, svc, msg, explain_application, "ExplainApplication")?;
    Ok(Json(r.into()))
}

/// Its containers: each task's runs, their nodes, and how each ended.
#[utoipa::path(
    get,
    path = "/v1/apps/{id}/tasks",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id.")),
    responses(
        (status = 200, body = TaskList),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn tasks(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskList>, ApiError> {
    let msg = pb::GetApplicationRequest { application_id: id };
    let r = unary!(caller, svc, msg, list_tasks, "ListTasks")?;
    Ok(Json(r.into()))
}

/// Query parameters of `GET /v1/apps/{id}/logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// A task (`stage/index`, e.g. `train/0`: its latest container) or a
    /// container id; absent, the application master's.
    pub task: Option<String>,
    /// `stdout` (default) or `stderr`.
    pub stream: Option<String>,
    /// Start at this byte (default 0).
    pub offset: Option<u64>,
    /// Keep the response open and send what the task writes until it ends.
    pub follow: Option<bool>,
}

/// A task's output, as it is on its node (chunked; with `follow`, until
/// the task ends).
#[utoipa::path(
    get,
    path = "/v1/apps/{id}/logs",
    tag = "applications",
    params(("id" = String, Path, description = "The application's id."), LogsQuery),
    responses(
        (status = 200, description = "The bytes, from `offset`.", body = String, content_type = "text/plain"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such application, task or container.", body = ErrorBody),
    )
)]
async fn task_logs(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let stderr = match q.stream.as_deref() {
        None | Some("stdout") => false,
        Some("stderr") => true,
        Some(s) => {
            return Err(ApiError::bad(
                "stream",
                format!("{s:?} is not stdout or stderr"),
            ))
        }
    };
    let msg = pb::GetTaskLogsRequest {
        application_id: id,
        task: q.task.unwrap_or_default(),
        stderr,
        offset: q.offset.unwrap_or(0),
        follow: q.follow.unwrap_or(false),
    };
    let mut chunks: Replies<pb::TaskLogChunk> =
        streaming!(caller, svc, msg, get_task_logs, "GetTaskLogs")?;
    // The first chunk (or error) decides the answer's status when it comes
    // at once; a follow of a quiet task answers 200 after a moment and
    // streams what comes (an error after the head ends the body early).
    let first = match tokio::time::timeout(FIRST_CHUNK_WAIT, chunks.next()).await {
        Err(_) | Ok(None) => None,
        Ok(Some(Ok(c))) => Some(c),
        Ok(Some(Err(s))) => return Err(caller.fail(s)),
    };
    let rest = chunks.map(|r| {
        r.map(|c| Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(s.message().to_string()))
    });
    let head = tokio_stream::iter(first.map(|c| Ok::<_, std::io::Error>(Bytes::from(c.data))));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(head.chain(rest)),
    )
        .into_response())
}

/// The nodes and what they hold.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "cluster",
    responses((status = 200, body = NodeList), (status = 401, body = ErrorBody))
)]
async fn list_nodes(
    State(svc): State<RmService>,
    caller: Caller,
) -> Result<Json<NodeList>, ApiError> {
    let r = unary!(
        caller,
        svc,
        pb::ListNodesRequest {},
        list_nodes,
        "ListNodes"
    )?;
    Ok(Json(NodeList {
        nodes: r.nodes.into_iter().map(Into::into).collect(),
    }))
}

/// Drains a node (admins): no new work goes to it; what runs there ends
/// on its own.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/drain",
    tag = "cluster",
    params(("id" = String, Path, description = "The node's id.")),
    responses(
        (status = 200, description = "Draining.", body = Node),
        (status = 307, description = "Sent to a follower: the leader's URL is in Location.", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
async fn drain_node(
    State(svc): State<RmService>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let msg = pb::DrainNodeRequest {
        node_id: id.clone(),
    };
    unary!(caller, svc, msg, drain_node, "DrainNode")?;
    let nodes = unary!(
        caller,
        svc,
        pb::ListNodesRequest {},
        list_nodes,
        "ListNodes"
    )?
    .nodes;
    nodes
        .into_iter()
        .find(|n| n.node_id == id)
        .map(|n| Json(n.into()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                Some("node_id"),
                format!("node_id: no node {id}"),
            )
        })
}

/// The queues: guarantees, limits, use and applications.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "cluster",
    responses((status = 200, body = QueueList), (status = 401, body = ErrorBody))
)]
async fn list_queues(
    State(svc): State<RmService>,
    caller: Caller,
) -> Result<Json<QueueList>, ApiError> {
    let r = unary!(
        caller,
        svc,
        pb::ListQueuesRequest {},
        list_queues,
        "ListQueues"
    )?;
    Ok(Json(QueueList {
        queues: r.queues.into_iter().map(Into::into).collect(),
    }))
}

/// The RM group, its leader, and the cluster's capacity and use.
#[utoipa::path(
    get,
    path = "/v1/cluster",
    tag = "cluster",
    responses((status = 200, body = Cluster), (status = 401, body = ErrorBody))
)]
async fn cluster(State(svc): State<RmService>, caller: Caller) -> Result<Json<Cluster>, ApiError> {
    let r = unary!(
        caller,
        svc,
        pb::ClusterStatusRequest {},
        cluster_status,
        "ClusterStatus"
    )?;
    Ok(Json(r.into()))
}

/// Who the caller is.
#[utoipa::path(
    get,
    path = "/v1/whoami",
    tag = "cluster",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody))
)]
async fn whoami(State(svc): State<RmService>, caller: Caller) -> Result<Json<WhoAmI>, ApiError> {
    let r = unary!(caller, svc, pb::WhoAmIRequest {}, who_am_i, "WhoAmI")?;
    Ok(Json(r.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document kept in the repository is the one the code makes: a
    /// change to an endpoint or a type must change `docs/openapi.json`
    /// with it (`WEFT_BLESS=1 cargo test -p weft-resource-manager openapi`
    /// writes it).
    #[test]
    fn the_openapi_document_in_docs_is_the_one_the_code_makes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let made = openapi_json();
        if std::env::var_os("WEFT_BLESS").is_some() {
            std::fs::write(&path, &made).unwrap();
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == made,
            "docs/openapi.json differs from the API the code serves; rewrite it with \
             `WEFT_BLESS=1 cargo test -p weft-resource-manager openapi` and review the diff"
        );
        // Every route is in it.
        let v: serde_json::Value = serde_json::from_str(&made).unwrap();
        for p in [
            "/v1/apps",
            "/v1/apps/{id}",
            "/v1/apps/{id}/kill",
            "/v1/apps/{id}/wait",
            "/v1/apps/{id}/why",
            "/v1/apps/{id}/tasks",
            "/v1/apps/{id}/logs",
            "/v1/nodes",
            "/v1/nodes/{id}/drain",
            "/v1/queues",
            "/v1/cluster",
            "/v1/whoami",
        ] {
            assert!(v["paths"][p].is_object(), "{p} is not in the document");
        }
    }

    #[test]
    fn errors_name_their_field() {
        assert_eq!(field_of("queue: no queue x"), Some("queue"));
        assert_eq!(
            field_of("stages[0].resources.memory: must be above 0"),
            Some("stages[0].resources.memory")
        );
        assert_eq!(field_of("not the leader; the leader is x"), None);
        assert_eq!(field_of("user bob may not kill: x"), None);
        assert_eq!(code_name(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "permission_denied"
        );
        assert!(states("running,finished").unwrap().len() == 4);
        let e = states("runing").unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("state"));
        assert!(
            e.body.message.contains("\"runing\" is not a state"),
            "{}",
            e.body.message
        );
    }
}
