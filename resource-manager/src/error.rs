//! The resource manager's error type and its one mapping to `tonic::Status`.

/// gRPC metadata key carrying the leader's address on NotLeader answers.
pub use weft_common::leader::LEADER_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// This member is not the leader; `leader` is the leader's client address
    /// when known.
    #[error("not the leader{}", leader.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_else(|| "; no leader is known yet".into()))]
    NotLeader { leader: Option<String> },
    /// The write may or may not have been committed (leadership changed while
    /// it was in flight); retrying a submission with the same request id is safe.
    #[error("{0}")]
    Unavailable(String),
    #[error("raft storage: {0}")]
    Storage(String),
    #[error("config: {0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn sled(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } | Error::Config(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::NotLeader { leader } => {
                let mut s = tonic::Status::unavailable(msg);
                if let Some(l) = leader.and_then(|l| l.parse().ok()) {
                    s.metadata_mut().insert(LEADER_HEADER, l);
                }
                s
            }
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Storage(_) => tonic::Status::internal(msg),
        }
    }
}
