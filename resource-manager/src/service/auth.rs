//! Who calls, and what they may do (`[acl]` in the members' config).
//!
//! A ClientService call names its user by a bearer token
//! (`authorization: Bearer weft_...`, made by `rmctl acl`), or by the client
//! certificate it came with (its common name is the user). Tokens live in the
//! replicated state as the SHA-256 of their secret; the accessor, which
//! names a token in lists and revocations, is the first 16 hex digits of
//! that hash, so a lookup is one map search. With ACLs off every caller is
//! the user it says it is, and may do anything (as before ACLs existed).

use sha2::{Digest, Sha256};
use tonic::{Request, Status};
use weft_common::tls::Role;

use crate::config::AclConfig;
use crate::fsm::{AclToken, App, ClusterState};

/// Metadata key of the bearer token.
pub const AUTHORIZATION: &str = "authorization";
/// Prefix of every secret (so that secret scanners find leaked ones).
pub const SECRET_PREFIX: &str = "weft_";
/// Metadata a member sets on a user's call it passes on to the leader: the
/// member's own identity then stands for no one.
pub const FORWARDED: &str = "weft-forwarded";
/// The longest a user name may be.
pub const MAX_USER: usize = 128;

/// How a caller was recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// ACLs off: the caller is who it says.
    None,
    Token {
        accessor: String,
    },
    Certificate,
    /// A JWT from the configured OIDC issuer (`[acl.oidc]`).
    Oidc {
        /// When it expires (ms since the epoch).
        expires_at_ms: u64,
    },
    /// A member's certificate (another member, a benchmark acting as one).
    Member,
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub user: String,
    pub admin: bool,
    pub method: Method,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.method {
            Method::None => write!(f, "user {}", self.user),
            Method::Token { accessor } => write!(f, "user {} (token {accessor})", self.user),
            Method::Certificate => write!(f, "user {} (client certificate)", self.user),
            Method::Oidc { .. } => write!(f, "user {} (OIDC token)", self.user),
            Method::Member => write!(f, "member {}", self.user),
        }
    }
}

impl Who {
    pub fn method_name(&self) -> &'static str {
        match self.method {
            Method::None => "none",
            Method::Token { .. } => "token",
            Method::Certificate => "certificate",
            Method::Oidc { .. } => "oidc",
            Method::Member => "member",
        }
    }

    /// PERMISSION_DENIED unless an admin.
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        if self.admin {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{self} may not {what}: only admins may"
        )))
    }

    /// Whether the caller may see and kill `app`: their own, one of a queue
    /// they administer, or any for an admin.
    pub fn may_manage(&self, st: &ClusterState, app: &App) -> bool {
        self.admin || app.user == self.user || administers(st, &app.queue, &self.user)
    }

    /// Whether what recognised the caller still holds: its token is not
    /// revoked nor expired (for streams that outlive the call's start).
    pub fn still_valid(&self, st: &ClusterState, now_ms: u64) -> bool {
        match &self.method {
            Method::Token { accessor } => st
                .acl_tokens
                .get(accessor)
                .is_some_and(|t| t.expires_at_ms == 0 || t.expires_at_ms > now_ms),
            Method::Oidc { expires_at_ms } => *expires_at_ms > now_ms,
            _ => true,
        }
    }

    /// PERMISSION_DENIED naming who and what, unless [`Who::may_manage`].
    pub fn require_app(&self, st: &ClusterState, app: &App, what: &str) -> Result<(), Status> {
        if self.may_manage(st, app) {
            return Ok(());
        }
        // Whose it is and where it runs are not said: those are for those
        // who may see it.
        Err(Status::permission_denied(format!(
            "{self} may not {what} application {}: only its user, an admin of its queue or a cluster admin may",
            app.id
        )))
    }
}

/// Whether `user` is in the admin ACL of `queue` or of a queue above it.
pub fn administers(st: &ClusterState, queue: &str, user: &str) -> bool {
    let mut q = queue;
    loop {
        if st
            .queues
            .get(q)
            .is_some_and(|s| s.admin_acl.iter().any(|u| u == user))
        {
            return true;
        }
        match q.rsplit_once('.') {
            Some((parent, _)) => q = parent,
            None => return false,
        }
    }
}

/// SHA-256 of a secret, hex.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh secret: the prefix and 32 random bytes in hex.
pub fn new_secret() -> String {
    let mut raw = [0u8; 32];
    getrandom::getrandom(&mut raw).expect("the OS random number generator");
    format!("{SECRET_PREFIX}{}", hex::encode(raw))
}

/// Whether `s` has the form of a secret (a caller-chosen bootstrap one).
pub fn is_secret(s: &str) -> bool {
    s.strip_prefix(SECRET_PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A new token for `user`: the secret (shown once) and what the state keeps.
pub fn new_token(
    user: &str,
    admin: bool,
    description: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> (String, AclToken) {
    token_with(new_secret(), user, admin, description, now_ms, ttl_ms)
}

/// The token of a given secret.
pub fn token_with(
    secret: String,
    user: &str,
    admin: bool,
    description: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> (String, AclToken) {
    let hash = secret_hash(&secret);
    let token = AclToken {
        accessor: hash[..16].to_string(),
        secret_sha256: hash,
        user: user.to_string(),
        admin,
        description: description.to_string(),
        created_at_ms: now_ms,
        expires_at_ms: if ttl_ms == 0 {
            0
        } else {
            now_ms.saturating_add(ttl_ms)
        },
    };
    (secret, token)
}

/// Checks a user name given to a token: what a queue ACL and a report can
/// hold.
pub fn check_user(field: &'static str, user: &str) -> Result<(), crate::error::Error> {
    let bad = |reason: &str| crate::error::Error::InvalidArgument {
        field,
        reason: reason.into(),
    };
    if user.is_empty() {
        return Err(bad("must not be empty"));
    }
    if user.len() > MAX_USER {
        return Err(bad(&format!("is {} bytes; at most {MAX_USER}", user.len())));
    }
    if user
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(bad("must hold no spaces, commas or control characters"));
    }
    Ok(())
}

/// The bearer secret of a request, if it carries one; a malformed header is
/// an error naming it.
fn bearer<T>(req: &Request<T>) -> Result<Option<String>, Status> {
    let Some(v) = req.metadata().get(AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        Status::unauthenticated("authorization: not ASCII (expected `Bearer weft_...`)")
    })?;
    let secret = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization: expected `Bearer <token secret>`"))?
        .trim();
    Ok(Some(secret.to_string()))
}

/// A JWT's verdict when the request carries one and this member trusts an
/// OIDC issuer (None otherwise): needs no state, so a caller checks it
/// before taking the state's lock (a JWKS file read again and a signature
/// checked do not hold up the raft thread's writes).
pub fn jwt_first<T>(acl: &AclConfig, req: &Request<T>) -> Option<Result<Who, Status>> {
    acl.oidc.as_ref()?;
    match bearer(req) {
        Ok(Some(secret)) if is_jwt(&secret) => Some(oidc_user(acl, &secret)),
        _ => None,
    }
}

fn is_jwt(secret: &str) -> bool {
    !secret.starts_with(SECRET_PREFIX) && secret.matches('.').count() == 2
}

/// The user of a JWT (a bearer token of three dotted parts), if this
/// member trusts an OIDC issuer and the token is valid.
fn oidc_user(acl: &AclConfig, jwt: &str) -> Result<Who, Status> {
    let Some(oidc) = &acl.oidc else {
        return Err(Status::unauthenticated(
            "OIDC token refused: this cluster takes no tokens from an OIDC issuer (acl.oidc is not set); use a Weft token (`rmctl acl token create`) or a client certificate",
        ));
    };
    let c = oidc
        .verify(jwt)
        .map_err(|why| Status::unauthenticated(format!("OIDC token refused: {why}")))?;
    Ok(Who {
        user: c.user,
        admin: c.admin,
        method: Method::Oidc {
            expires_at_ms: c.expires_at_ms,
        },
    })
}

/// Who calls: from the bearer token if one came, else the client
/// certificate. UNAUTHENTICATED, saying why, when ACLs are on and neither
/// names a user. `claimed` is the user a request names itself (submissions),
/// used only with ACLs off.
pub fn authenticate<T>(
    acl: &AclConfig,
    st: &ClusterState,
    req: &Request<T>,
    claimed: &str,
    now_ms: u64,
) -> Result<Who, Status> {
    // Once bootstrapped, users are the cluster's: a member whose config
    // says off (a rolling change, a mistake) enforces them all the same.
    if !acl.enabled && !st.acl_bootstrapped {
        return Ok(Who {
            user: if claimed.is_empty() {
                "anonymous".into()
            } else {
                claimed.to_string()
            },
            admin: true,
            method: Method::None,
        });
    }
    let listed_admin = |user: &str| acl.admins.iter().any(|a| a == user);
    if let Some(secret) = bearer(req)? {
        let refused = || {
            Status::unauthenticated("token not recognised (revoked, or never made by this cluster)")
        };
        if is_jwt(&secret) {
            return oidc_user(acl, &secret);
        }
        if !secret.starts_with(SECRET_PREFIX) || secret.len() > 256 {
            return Err(refused());
        }
        let hash = secret_hash(&secret);
        // The configured first admin token, not made yet: the leader
        // makes it as soon as it leads; the caller tries again.
        if !st.acl_bootstrapped
            && acl
                .initial_admin_secret
                .as_deref()
                .is_some_and(|s| secret_hash(s) == hash)
        {
            return Err(Status::unavailable(
                "users are being set up: the leader makes the initial admin token (acl.initial_admin_token_file) as soon as it leads; try again",
            ));
        }
        let t = st.acl_tokens.get(&hash[..16]).ok_or_else(refused)?;
        if t.secret_sha256 != hash {
            return Err(refused());
        }
        if t.expires_at_ms != 0 && t.expires_at_ms <= now_ms {
            return Err(Status::unauthenticated(format!(
                "token {} of user {} expired {} s ago",
                t.accessor,
                t.user,
                (now_ms - t.expires_at_ms) / 1000
            )));
        }
        return Ok(Who {
            user: t.user.clone(),
            admin: t.admin || listed_admin(&t.user),
            method: Method::Token {
                accessor: t.accessor.clone(),
            },
        });
    }
    match weft_common::tls::peer(req) {
        Some(p) if p.role == Some(Role::Client) => {
            check_user("user", &p.name).map_err(|e| {
                Status::unauthenticated(format!(
                    "the client certificate's name {:?} is not a user name: {e}",
                    p.name
                ))
            })?;
            Ok(Who {
                admin: listed_admin(&p.name),
                user: p.name,
                method: Method::Certificate,
            })
        }
        // A member passing on a user's call (the REST API of a follower)
        // is never the caller: without the user's token it is no one.
        Some(p) if p.role == Some(Role::Rm) && req.metadata().get(FORWARDED).is_some() => {
            Err(Status::unauthenticated(
                "no credentials: pass a user's token (--token, WEFT_TOKEN or token_file in rmctl.toml) or client certificate",
            ))
        }
        Some(p) if p.role == Some(Role::Rm) => Ok(Who {
            user: p.name,
            admin: true,
            method: Method::Member,
        }),
        Some(p) => Err(Status::unauthenticated(format!(
            "this connection showed {p}, which names no user; pass a user's token or client certificate"
        ))),
        None => Err(Status::unauthenticated(
            "no credentials: pass a user's token (--token, WEFT_TOKEN or token_file in rmctl.toml) or client certificate",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::QueueSpec;

    fn on() -> AclConfig {
        AclConfig {
            enabled: true,
            admins: vec!["root-cert".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_call_a_member_passes_on_without_a_token_is_no_one() {
        let from_member = |forwarded: bool| {
            let mut r = Request::new(());
            r.extensions_mut().insert(weft_common::net::ConnInfo {
                remote: None,
                peer: Some(std::sync::Arc::new(weft_common::tls::PeerIdentity {
                    role: Some(Role::Rm),
                    name: "rm2".into(),
                })),
                local_uid: None,
            });
            if forwarded {
                r.metadata_mut().insert(FORWARDED, "1".parse().unwrap());
            }
            r
        };
        let st = ClusterState {
            acl_bootstrapped: true,
            ..Default::default()
        };
        // A member's own call is the member's (an admin).
        let w = authenticate(&on(), &st, &from_member(false), "", 0).unwrap();
        assert!(w.admin && matches!(w.method, Method::Member));
        // One it passes on for a user with no token is refused, not the
        // member's: a follower that thinks users are off cannot lend its
        // identity to an anonymous caller.
        let e = authenticate(&on(), &st, &from_member(true), "", 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().starts_with("no credentials"), "{}", e.message());
        // Users off everywhere: anonymous, as it would be called directly.
        let off = AclConfig::default();
        let w = authenticate(&off, &ClusterState::default(), &from_member(true), "", 0).unwrap();
        assert_eq!(w.user, "anonymous");
    }

    fn with_token(secret: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(AUTHORIZATION, format!("Bearer {secret}").parse().unwrap());
        r
    }

    #[test]
    fn tokens_are_found_by_hash_and_expire() {
        let mut st = ClusterState::default();
        let (secret, t) = new_token("alice", false, "", 1_000, 60_000);
        assert!(secret.starts_with("weft_") && secret.len() == 5 + 64);
        assert_eq!(t.accessor, t.secret_sha256[..16]);
        assert_eq!(t.expires_at_ms, 61_000);
        st.acl_tokens.insert(t.accessor.clone(), t.clone());
        let who = authenticate(&on(), &st, &with_token(&secret), "bob", 2_000).unwrap();
        assert_eq!(who.user, "alice");
        assert!(!who.admin);
        assert_eq!(
            who.to_string(),
            format!("user alice (token {})", t.accessor)
        );
        // Expired.
        let e = authenticate(&on(), &st, &with_token(&secret), "", 61_000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("expired"), "{}", e.message());
        // Forged: right shape, unknown; and one whose accessor matches but
        // not the rest cannot exist (the accessor is the hash's prefix).
        let forged = format!("weft_{}", "ab".repeat(32));
        let e = authenticate(&on(), &st, &with_token(&forged), "", 2_000).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // None at all.
        let e = authenticate(&on(), &st, &Request::new(()), "alice", 2_000).unwrap_err();
        assert!(e.message().starts_with("no credentials"), "{}", e.message());
        // Not a bearer header.
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        let e = authenticate(&on(), &st, &r, "", 2_000).unwrap_err();
        assert!(e.message().contains("Bearer"), "{}", e.message());
        // ACLs off: who they say, admin.
        let who = authenticate(&AclConfig::default(), &st, &Request::new(()), "bob", 0).unwrap();
        assert_eq!((who.user.as_str(), who.admin), ("bob", true));
    }

    #[test]
    fn the_configured_initial_admin_token_waits_until_the_leader_makes_it() {
        let mut st = ClusterState::default();
        let secret = new_secret();
        let mut acl = on();
        acl.initial_admin_secret = Some(secret.clone());
        // Not made yet: try again (retryable), not refused.
        let e = authenticate(&acl, &st, &with_token(&secret), "", 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());
        // Any other secret is refused as before.
        let e = authenticate(&acl, &st, &with_token(&new_secret()), "", 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Made (as the leader does): an admin.
        st.apply(&crate::fsm::Command::AclBootstrap {
            token: token_with(secret.clone(), "admin", true, "initial", 1, 0).1,
        });
        let who = authenticate(&acl, &st, &with_token(&secret), "", 2).unwrap();
        assert!(who.admin && who.user == "admin", "{who}");
        // Revoked later: refused, not "being set up".
        st.acl_tokens.clear();
        let e = authenticate(&acl, &st, &with_token(&secret), "", 3).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn queue_admins_inherit_down_the_tree() {
        let mut st = ClusterState::default();
        let mut q = QueueSpec::named("root.research");
        q.admin_acl = vec!["carol".into()];
        st.queues.insert(q.name.clone(), q);
        st.queues.insert(
            "root.research.vision".into(),
            QueueSpec::named("root.research.vision"),
        );
        assert!(administers(&st, "root.research.vision", "carol"));
        assert!(administers(&st, "root.research", "carol"));
        assert!(!administers(&st, "root", "carol"));
        assert!(!administers(&st, "root.research.vision", "dave"));
    }

    #[test]
    fn user_names_are_checked() {
        assert!(check_user("user", "alice").is_ok());
        assert!(check_user("user", "").is_err());
        assert!(check_user("user", "a b").is_err());
        assert!(check_user("user", &"x".repeat(MAX_USER + 1)).is_err());
    }
}
