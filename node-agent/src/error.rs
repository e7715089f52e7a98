//! The agent's error type and its one mapping to `tonic::Status`.

use std::path::PathBuf;

/// Everything that can go wrong in the agent that a caller should hear about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or wrong; `field` names it in the request.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The request is valid but the node cannot honour it now.
    #[error("{field}: {reason}")]
    ResourceExhausted { field: &'static str, reason: String },
    #[error("container_id: {0} already exists on this node")]
    AlreadyExists(String),
    #[error("container_id: no container {0} on this node")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("config: {0}")]
    Config(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gpu probe: {0}")]
    Gpu(String),
    #[error("agent is shutting down")]
    ShuttingDown,
    /// The agent cannot start work yet (no token key): a transient refusal,
    /// answered UNAVAILABLE so callers try again later or elsewhere.
    #[error("not ready: {0}")]
    NotReady(String),
    /// The container token is missing, forged, expired or not for this request.
    #[error("token: {0}")]
    PermissionDenied(String),
}

/// The agent's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } | Error::Config(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::ResourceExhausted { .. } => tonic::Status::resource_exhausted(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::ShuttingDown | Error::NotReady(_) => tonic::Status::unavailable(msg),
            Error::PermissionDenied(_) => tonic::Status::permission_denied(msg),
            Error::Io { .. } | Error::Gpu(_) => tonic::Status::internal(msg),
        }
    }
}
