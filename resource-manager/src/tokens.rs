//! The tokens the leader signs with the group's ed25519 key (the seed is in
//! the replicated state, set once by the first leader): container tokens,
//! which an agent checks before it starts a container (what may run, where,
//! with which resources, until when), and application tokens, which a
//! master attempt presents on every ApplicationMasterService call. Signing
//! happens outside every lock (callers copy what they sign first).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use weft_proto::token::TokenSigner;
use weft_proto::v1 as pb;

use crate::fsm::Allocation;
use crate::service::now_ms;

/// The clock tokens are dated by: the wall clock read once, when this
/// process first dated a token, moved on by the monotonic clock since. A
/// step of the wall clock while the process runs (NTP, an operator's
/// `date -s`) does not move it, so a leader whose clock jumps an hour back
/// still signs tokens the agents accept; a clock that was already wrong when
/// the process started is corrected for by the agents, which measure the
/// leader's token clock in every registration and heartbeat answer
/// (`leader_clock_ms`) and check expiry against it.
pub fn token_clock_ms() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall) = ANCHOR.get_or_init(|| (Instant::now(), now_ms()));
    wall + at.elapsed().as_millis() as u64
}

/// How long a container token lets an agent start its container.
pub const CONTAINER_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// Whose a container is: its application's user and queue (signed into
/// its token, so that an agent may run it as that user).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    pub user: String,
    pub queue: String,
}

impl Owner {
    /// The owner of `app_id`'s containers (empty when it is gone).
    pub fn of(state: &crate::fsm::ClusterState, app_id: &str) -> Owner {
        state
            .apps
            .get(app_id)
            .map(|a| Owner {
                user: a.user.clone(),
                queue: a.queue.clone(),
            })
            .unwrap_or_default()
    }
}

/// The container token an agent needs to start `a`.
pub fn container_token(signer: &TokenSigner, a: &Allocation, owner: &Owner) -> Vec<u8> {
    let now = token_clock_ms();
    signer.sign_container(&pb::ContainerTokenBody {
        container_id: a.container_id.clone(),
        application_id: a.app_id.clone(),
        node_id: a.node_id.clone(),
        vcores_milli: a.vcores_milli,
        memory_bytes: a.memory_bytes,
        gpu_indices: match a.gpu_share {
            Some(sh) => vec![sh.device],
            None => a.gpus.clone(),
        },
        gpu_share_milli: a.gpu_share.map_or(0, |sh| sh.milli),
        gpu_memory_bytes: a.gpu_share.map_or(0, |sh| sh.memory_bytes),
        issued_at_ms: now,
        expires_at_ms: now + CONTAINER_TOKEN_LIFETIME.as_millis() as u64,
        ports: a.ports.iter().map(|&p| p as u32).collect(),
        user: owner.user.clone(),
        queue: owner.queue.clone(),
    })
}

/// How long a key replaced by a rotation keeps verifying by default: every
/// container token it signed has expired long before (they live
/// [`CONTAINER_TOKEN_LIFETIME`]), and every live master, which calls the RM
/// every second or so, has been given an application token of the new key.
pub const DEFAULT_KEY_OVERLAP: Duration = Duration::from_secs(3600);

/// An application token for `attempt` of `app`. It ends with its attempt,
/// not by time (masters written against the API before keys rotated keep
/// working); one signed by a key other than the signing one is renewed in
/// the master's next Allocate answer.
pub fn application_token(signer: &TokenSigner, app: &str, attempt: u32) -> Vec<u8> {
    signer.sign_application(&pb::ApplicationTokenBody {
        application_id: app.to_string(),
        attempt,
        issued_at_ms: token_clock_ms(),
        expires_at_ms: 0,
    })
}

/// Whether an application token signed by key `key_id` that expires at
/// `expires_at_ms` (0: never) is due for a new one at `now_ms`, when
/// `signing` is the key that signs now: when its key is another, or it
/// expires within [`DEFAULT_KEY_OVERLAP`].
pub fn renewal_due(key_id: u32, expires_at_ms: u64, signing: u32, now_ms: u64) -> bool {
    key_id != signing
        || (expires_at_ms != 0 && expires_at_ms < now_ms + DEFAULT_KEY_OVERLAP.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_token_is_renewed_when_its_key_is_replaced_or_it_nears_expiry() {
        let overlap = DEFAULT_KEY_OVERLAP.as_millis() as u64;
        assert!(
            !renewal_due(3, 0, 3, 10_000),
            "the signing key's, no expiry"
        );
        assert!(renewal_due(2, 0, 3, 10_000), "signed by the key replaced");
        assert!(!renewal_due(3, 10_000 + 2 * overlap, 3, 10_000));
        assert!(
            renewal_due(3, 10_000 + overlap - 1, 3, 10_000),
            "expires soon"
        );
    }
}
