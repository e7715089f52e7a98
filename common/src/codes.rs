//! Which gRPC answers are worth trying again: the one list every Weft client
//! uses.

use tonic::{Code, Status};

/// Whether a call's error means "ask again, maybe elsewhere" (the member may
/// be electing, restarting or unreachable).
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// Whether a node agent's refusal to start a container is transient: the
/// node is unreachable, or still busy with containers the RM counts as
/// ended, or has no RM key yet. Such a container is given back and asked for
/// again; it is not the task's failure.
pub fn start_refused_transiently(s: &Status) -> bool {
    retryable(s) || s.code() == Code::ResourceExhausted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert!(retryable(&Status::unavailable("electing")));
        assert!(!retryable(&Status::invalid_argument("spec")));
        assert!(!retryable(&Status::resource_exhausted("full")));
        assert!(start_refused_transiently(&Status::resource_exhausted(
            "full"
        )));
        assert!(!start_refused_transiently(&Status::permission_denied(
            "token"
        )));
    }
}
