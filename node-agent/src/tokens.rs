//! Container tokens: a container starts only under a token the resource
//! manager signed for exactly it (its id, this node, at most these
//! resources), before the token expires, and only once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, RwLock};

use tracing::{info, warn};
use weft_proto::token::{key_id_of, now_ms, KeySet, TokenError, TokenVerifier};
use weft_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::model::ContainerSpec;

/// What a container token granted (see [`Tokens::check`]).
#[derive(Debug, Clone)]
pub struct Grant {
    pub expires_at_ms: u64,
    pub group_key: String,
    pub application_id: String,
    /// The application's user and queue, as the RM signed them.
    pub user: String,
    pub queue: String,
}

/// The keys the agent checks tokens with.
#[derive(Clone)]
enum Keys {
    /// None yet: the agent has not registered.
    None,
    /// `security.token_public_key`: this key checks every token, whatever
    /// key id it names; keys handed out by an RM are not trusted, only
    /// noted: `advertised` says which id the RM gives the pinned key, so a
    /// token of another (a rotation's) is refused as transient. `group`
    /// (the replay check's name of the RM group) is the pinned key's: an
    /// untrusted RM does not get to rename it.
    Pinned {
        key: TokenVerifier,
        advertised: Option<u32>,
        group: String,
    },
    /// The RM group's keys as its last answer gave them, and the group's
    /// identity (hex of its first key's public key).
    Learned { set: KeySet, group: String },
}

/// What the agent checks tokens with.
pub struct Tokens {
    node_id: String,
    keys: RwLock<Keys>,
    /// Container id -> expiry of tokens already used (a token starts its
    /// container once).
    used: Mutex<HashMap<String, u64>>,
    /// The leader's token clock minus this host's wall clock, in ms, as
    /// last measured (0 until an RM answered with its clock).
    offset_ms: AtomicI64,
}

/// A change of the measured offset worth a log line.
const OFFSET_LOGGED_MS: i64 = 1_000;

impl Tokens {
    pub fn new(node_id: String, configured: Option<TokenVerifier>) -> Self {
        Tokens {
            node_id,
            keys: RwLock::new(match configured {
                Some(key) => Keys::Pinned {
                    group: hex::encode(key.to_bytes()),
                    key,
                    advertised: None,
                },
                None => Keys::None,
            }),
            used: Mutex::new(HashMap::new()),
            offset_ms: AtomicI64::new(0),
        }
    }

    /// The leader's token clock as an RM answer gave it (`leader_clock_ms`,
    /// 0 from an RM that does not send it). Token expiry is checked against
    /// the leader's clock as measured here, so clocks that differ between
    /// hosts, or a host clock stepped while it runs, refuse no valid token.
    pub fn observe_leader_clock(&self, leader_clock_ms: u64) {
        if leader_clock_ms == 0 {
            return;
        }
        let offset = leader_clock_ms as i64 - now_ms() as i64;
        let before = self.offset_ms.swap(offset, Ordering::Relaxed);
        if (offset - before).abs() >= OFFSET_LOGGED_MS {
            info!(
                offset_ms = offset,
                "the resource manager's clock differs from this host's; container tokens are checked against the resource manager's"
            );
        }
    }

    /// Now by the leader's token clock, as last measured.
    fn leader_now_ms(&self) -> u64 {
        (now_ms() as i64 + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The newest public key this agent checks tokens with (empty: none
    /// yet). The agent reports it, and the RM offers work only once it is
    /// the group's newest.
    pub fn public_key(&self) -> Vec<u8> {
        match &*self.keys.read().expect("token keys lock") {
            Keys::None => Vec::new(),
            Keys::Pinned { key, .. } => key.to_bytes().to_vec(),
            Keys::Learned { set, .. } => set
                .newest()
                .map(|(_, k)| k.to_bytes().to_vec())
                .unwrap_or_default(),
        }
    }

    /// The keys an RM handed out (at registration or in a heartbeat):
    /// `keys` and the group's identity `group`, or, from an RM that sends
    /// no list, the one key `single` (the group's first).
    pub fn learn(&self, keys: &[pb::TokenKey], group: &[u8], single: &[u8]) {
        let listed: Vec<(u32, TokenVerifier)> = if keys.is_empty() {
            if single.is_empty() {
                return;
            }
            match TokenVerifier::from_bytes(single) {
                Ok(v) => vec![(0, v)],
                Err(e) => {
                    warn!(error = %e, "the resource manager sent an unusable token key");
                    return;
                }
            }
        } else {
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                match TokenVerifier::from_bytes(&k.public_key) {
                    Ok(v) => out.push((k.id, v)),
                    Err(e) => {
                        warn!(key = k.id, error = %e, "the resource manager sent an unusable token key");
                        return;
                    }
                }
            }
            out
        };
        let group = if group.is_empty() {
            // The group's first key names it.
            hex::encode(
                listed
                    .iter()
                    .min_by_key(|(id, _)| *id)
                    .map(|(_, k)| k.to_bytes())
                    .unwrap_or_default(),
            )
        } else {
            hex::encode(group)
        };
        let set = KeySet::new(listed);
        let mut held = self.keys.write().expect("token keys lock");
        match &mut *held {
            Keys::Pinned {
                key, advertised, ..
            } => {
                // The id the RM gives the pinned key (None: it lists it not).
                let id = set.ids().into_iter().find(|id| set.get(*id) == Some(key));
                let newest_is_pinned = set.newest().map(|(_, k)| k) == Some(key);
                if !newest_is_pinned && *advertised != id {
                    warn!(
                        keys = ?set.ids(),
                        pinned_as = ?id,
                        "the resource manager's newest token key is not security.token_public_key: keeping the configured one (this node gets no new work once another key signs, until the configuration names it)"
                    );
                }
                *advertised = id;
                return;
            }
            Keys::Learned {
                set: have,
                group: g,
            } if *have == set && *g == group => return,
            _ => {}
        }
        info!(
            keys = ?set.ids(),
            newest = %set.newest().map(|(_, k)| hex::encode(k.to_bytes())).unwrap_or_default(),
            "token keys from the resource manager"
        );
        *held = Keys::Learned { set, group };
    }

    /// Checks `token`'s signature (with the RM group's keys) and expiry;
    /// returns what it says and the group's name. Transient (NotReady)
    /// where this agent does not hold the token's key yet.
    fn verified(&self, token: &[u8]) -> Result<(pb::ContainerTokenBody, String)> {
        let deny = |m: String| Err(Error::PermissionDenied(m));
        let now = self.leader_now_ms();
        let held = self.keys.read().expect("token keys lock").clone();
        let (checked, group) = match &held {
            // Transient: the caller tries again later or elsewhere.
            Keys::None => return Err(Error::NotReady(
                "this agent has no resource-manager key yet (set security.token_public_key, or wait until it has registered)".into(),
            )),
            Keys::Pinned {
                key,
                advertised,
                group,
            } => match (advertised, key_id_of(token)) {
                // A token of a key the RM has but this agent does not pin.
                (Some(pinned), Some(id)) if *pinned != id => {
                    return Err(Error::NotReady(format!(
                        "the token was signed by the group's key {id}; this agent checks only security.token_public_key"
                    )))
                }
                _ => (key.verify_container(token, now), group.clone()),
            },
            Keys::Learned { set, group } => {
                (set.verify_container(token, now).map(|(_, b)| b), group.clone())
            }
        };
        let body = match checked {
            Ok(b) => b,
            Err(e @ TokenError::Missing) => {
                return deny(format!(
                    "{e}: a container starts only with a token the resource manager signed"
                ))
            }
            // A key newer than this agent's (a rotation whose key has not
            // reached it yet), or one dropped since the token was signed:
            // transient, like no key at all (the master gives the
            // container back and is granted another, under a key held).
            Err(e @ TokenError::UnknownKey(_)) => return Err(Error::NotReady(e.to_string())),
            Err(e) => return deny(e.to_string()),
        };
        Ok((body, group))
    }

    /// Checks `token` for `spec`; returns what it granted: its expiry (for
    /// [`Tokens::spend`] once the container is admitted), the public key
    /// (hex) that checked it (which RM group granted the container) and the
    /// application it was granted to.
    pub fn check(&self, token: &[u8], spec: &ContainerSpec, ports: &[u32]) -> Result<Grant> {
        let (body, group) = self.verified(token)?;
        let mismatch = |what: &str, granted: String, asked: String| {
            Err(Error::PermissionDenied(format!(
                "the token grants {what} {granted}, the request asks for {asked}"
            )))
        };
        if body.container_id != spec.id {
            return mismatch("container", body.container_id, spec.id.clone());
        }
        if body.node_id != self.node_id {
            return mismatch("node", body.node_id, self.node_id.clone());
        }
        let r = &spec.resources;
        if r.memory_bytes > body.memory_bytes {
            return mismatch(
                "memory_bytes",
                body.memory_bytes.to_string(),
                r.memory_bytes.to_string(),
            );
        }
        // 0 vcores asks for no CPU limit at all.
        if body.vcores_milli > 0 && (r.vcores_milli == 0 || r.vcores_milli > body.vcores_milli) {
            return mismatch(
                "vcores_milli",
                body.vcores_milli.to_string(),
                r.vcores_milli.to_string(),
            );
        }
        let mut asked = r.gpu_indices.clone();
        asked.sort_unstable();
        let mut granted = body.gpu_indices.clone();
        granted.sort_unstable();
        if asked != granted {
            return mismatch("GPUs", format!("{granted:?}"), format!("{asked:?}"));
        }
        if r.gpu_share_milli != body.gpu_share_milli {
            return mismatch(
                "gpu_share_milli",
                body.gpu_share_milli.to_string(),
                r.gpu_share_milli.to_string(),
            );
        }
        if body.gpu_memory_bytes > 0
            && (r.gpu_memory_bytes == 0 || r.gpu_memory_bytes > body.gpu_memory_bytes)
        {
            return mismatch(
                "gpu_memory_bytes",
                body.gpu_memory_bytes.to_string(),
                r.gpu_memory_bytes.to_string(),
            );
        }
        // Ports are given like GPUs: exactly those the token names.
        let mut asked = ports.to_vec();
        asked.sort_unstable();
        let mut granted = body.ports.clone();
        granted.sort_unstable();
        if asked != granted {
            return mismatch("ports", format!("{granted:?}"), format!("{asked:?}"));
        }
        Ok(Grant {
            expires_at_ms: body.expires_at_ms,
            group_key: group,
            application_id: body.application_id,
            user: body.user,
            queue: body.queue,
        })
    }

    /// The node a container token (signed by the RM group, not expired)
    /// was granted on: where the agent may pass its start on.
    pub fn node_of(&self, token: &[u8]) -> Result<String> {
        self.verified(token).map(|(b, _)| b.node_id)
    }

    /// Whether `token` is an application token this agent's RM group signed
    /// for `application_id` (a master asking after its own containers).
    pub fn owns(&self, token: &[u8], application_id: &str) -> std::result::Result<(), String> {
        let now = self.leader_now_ms();
        let checked = match &*self.keys.read().expect("token keys lock") {
            Keys::None => return Err("this agent has no resource-manager key yet".into()),
            Keys::Pinned { key, .. } => key.verify_application(token, now),
            Keys::Learned { set, .. } => set.verify_application(token, now).map(|(_, b)| b),
        };
        match checked {
            Ok(body) if body.application_id == application_id && !application_id.is_empty() => {
                Ok(())
            }
            Ok(body) => Err(format!(
                "the application token is {}'s, not this container's application's",
                body.application_id
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Marks the token of container `id` granted by the group of `key`
    /// used; refuses one used before (a replay after the agent forgot the
    /// container it started).
    pub fn spend(&self, key: &str, id: &str, expires_at_ms: u64) -> Result<()> {
        let now = self.leader_now_ms();
        let mut used = self.used.lock().expect("used tokens lock");
        used.retain(|_, exp| *exp > now);
        let k = format!("{key}/{id}");
        if used.contains_key(&k) {
            return Err(Error::PermissionDenied(format!(
                "the token of container {id} was already used"
            )));
        }
        used.insert(k, expires_at_ms);
        Ok(())
    }

    /// Gives back a token whose container could not be launched.
    pub fn unspend(&self, key: &str, id: &str) {
        self.used
            .lock()
            .expect("used tokens lock")
            .remove(&format!("{key}/{id}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ResourceRequest;
    use weft_proto::token::TokenSigner;
    use weft_proto::v1::ContainerTokenBody;

    fn spec(id: &str, memory: u64, vcores: u64) -> ContainerSpec {
        ContainerSpec {
            id: id.into(),
            command: "true".into(),
            args: vec![],
            env: Default::default(),
            files: Default::default(),
            checkpoint_key: String::new(),
            resources: ResourceRequest {
                vcores_milli: vcores,
                memory_bytes: memory,
                ..Default::default()
            },
        }
    }

    fn token(s: &TokenSigner, id: &str, node: &str, memory: u64, expires: u64) -> Vec<u8> {
        s.sign_container(&ContainerTokenBody {
            container_id: id.into(),
            node_id: node.into(),
            vcores_milli: 500,
            memory_bytes: memory,
            expires_at_ms: expires,
            ..Default::default()
        })
    }

    fn denied<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::PermissionDenied(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn only_the_token_of_a_containers_own_application_owns_it() {
        use weft_proto::v1::ApplicationTokenBody;
        let rm = TokenSigner::generate();
        let t = Tokens::new("n1".into(), Some(rm.verifier()));
        let app = |id: &str, s: &TokenSigner| {
            s.sign_application(&ApplicationTokenBody {
                application_id: id.into(),
                attempt: 1,
                issued_at_ms: now_ms(),
                expires_at_ms: now_ms() + 60_000,
            })
        };
        t.owns(&app("app-000001", &rm), "app-000001").unwrap();
        let other = t.owns(&app("app-000002", &rm), "app-000001").unwrap_err();
        assert!(other.contains("app-000002's"), "{other}");
        let forged = t
            .owns(&app("app-000001", &TokenSigner::generate()), "app-000001")
            .unwrap_err();
        assert!(!forged.is_empty());
        // A container token is not an application token.
        let c = token(&rm, "c1", "n1", 64 << 20, now_ms() + 60_000);
        assert!(t.owns(&c, "app-000001").is_err());
        // A record of an earlier agent names no application: nobody owns it.
        assert!(t.owns(&app("", &rm), "").is_err());
    }

    #[test]
    fn expiry_is_checked_against_the_leaders_clock_as_measured() {
        let rm = TokenSigner::generate();
        let t = Tokens::new("n1".into(), Some(rm.verifier()));
        let hour = 3_600_000;
        // A leader whose clock is an hour behind this host's signs a token
        // good for ten minutes by its clock.
        let leader_now = now_ms() - hour;
        let tok = token(&rm, "c1", "n1", 64 << 20, leader_now + 600_000);
        let s = spec("c1", 64 << 20, 500);
        // By this host's clock it expired fifty minutes ago.
        assert!(denied(t.check(&tok, &s, &[])).contains("expired"));
        // Once an answer of that leader says what its clock reads, the
        // token is good.
        t.observe_leader_clock(leader_now);
        t.check(&tok, &s, &[]).unwrap();
        // Spent tokens are kept by the leader's clock too: still refused a
        // second time.
        t.spend("k", "c1", leader_now + 600_000).unwrap();
        assert!(t.spend("k", "c1", leader_now + 600_000).is_err());
        // An answer with no clock (an older RM) changes nothing.
        t.observe_leader_clock(0);
        t.check(&tok, &s, &[]).unwrap();
        // A leader an hour ahead: its token is still checked by its clock,
        // so one that expired by the leader's clock is refused although it
        // is far from expiry by this host's.
        t.observe_leader_clock(now_ms() + hour);
        let stale = token(&rm, "c2", "n1", 64 << 20, now_ms() + hour - 1_000);
        assert!(denied(t.check(&stale, &spec("c2", 64 << 20, 500), &[])).contains("expired"));
    }

    #[test]
    fn ports_are_granted_exactly_as_the_token_names_them() {
        let rm = TokenSigner::generate();
        let t = Tokens::new("n1".into(), Some(rm.verifier()));
        let later = now_ms() + 60_000;
        let tok = rm.sign_container(&ContainerTokenBody {
            container_id: "c1".into(),
            node_id: "n1".into(),
            vcores_milli: 500,
            memory_bytes: 64 << 20,
            expires_at_ms: later,
            ports: vec![20001, 20007],
            ..Default::default()
        });
        let s = spec("c1", 64 << 20, 500);
        t.check(&tok, &s, &[20007, 20001]).unwrap();
        let other = denied(t.check(&tok, &s, &[20001, 20002]));
        assert!(other.contains("ports [20001, 20007]"), "{other}");
        assert!(denied(t.check(&tok, &s, &[20001])).contains("ports"));
        // A token with no ports lets the request ask for none.
        let none = token(&rm, "c1", "n1", 64 << 20, later);
        assert!(denied(t.check(&none, &s, &[22])).contains("grants ports [],"));
        t.check(&none, &s, &[]).unwrap();
    }

    #[test]
    fn only_a_token_for_this_container_node_and_size_passes_and_only_once() {
        let rm = TokenSigner::generate();
        let t = Tokens::new("n1".into(), Some(rm.verifier()));
        let later = now_ms() + 60_000;
        let ok = token(&rm, "c1", "n1", 64 << 20, later);
        let grant = t.check(&ok, &spec("c1", 64 << 20, 500), &[]).unwrap();
        let (exp, key) = (grant.expires_at_ms, grant.group_key);
        assert_eq!(exp, later);
        assert_eq!(
            key,
            hex::encode(rm.public_key()),
            "the group that granted it"
        );
        // Less than granted is fine; more is not; no CPU limit is more.
        t.check(&ok, &spec("c1", 32 << 20, 250), &[]).unwrap();
        assert_eq!(
            denied(t.check(&ok, &spec("c1", 65 << 20, 500), &[])),
            "the token grants memory_bytes 67108864, the request asks for 68157440"
        );
        assert!(denied(t.check(&ok, &spec("c1", 64 << 20, 0), &[])).contains("vcores_milli"));
        assert!(
            denied(t.check(&ok, &spec("c2", 64 << 20, 500), &[])).contains("grants container c1")
        );
        let elsewhere = token(&rm, "c1", "n2", 64 << 20, later);
        assert!(
            denied(t.check(&elsewhere, &spec("c1", 64 << 20, 500), &[])).contains("grants node n2")
        );
        let forged = token(&TokenSigner::generate(), "c1", "n1", 64 << 20, later);
        assert!(denied(t.check(&forged, &spec("c1", 64 << 20, 500), &[])).contains("signature"));
        let old = token(&rm, "c1", "n1", 64 << 20, now_ms() - 1);
        assert!(denied(t.check(&old, &spec("c1", 64 << 20, 500), &[])).contains("expired"));
        assert!(denied(t.check(&[], &spec("c1", 64 << 20, 500), &[])).contains("no token"));
        t.spend(&key, "c1", later).unwrap();
        assert!(matches!(
            t.spend(&key, "c1", later),
            Err(Error::PermissionDenied(m)) if m.contains("already used")
        ));
        // Another group's grant of the same id is another token.
        t.spend("another group", "c1", later).unwrap();
    }

    #[test]
    fn a_configured_key_is_not_replaced_and_a_learned_one_is() {
        let rm = TokenSigner::generate();
        let other = TokenSigner::generate();
        let later = now_ms() + 60_000;
        let pinned = Tokens::new("n1".into(), Some(rm.verifier()));
        pinned.learn(&[], &[], &other.public_key());
        pinned
            .check(&token(&rm, "c", "n1", 1, later), &spec("c", 1, 500), &[])
            .unwrap();
        let learning = Tokens::new("n1".into(), None);
        assert!(learning.public_key().is_empty());
        match learning.check(&token(&rm, "c", "n1", 1, later), &spec("c", 1, 500), &[]) {
            Err(e @ Error::NotReady(_)) => {
                assert!(e.to_string().contains("no resource-manager key yet"));
                assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
            }
            other => panic!("not a transient refusal: {other:?}"),
        }
        learning.learn(&[], &[], &rm.public_key());
        assert_eq!(learning.public_key(), rm.public_key());
        learning
            .check(&token(&rm, "c", "n1", 1, later), &spec("c", 1, 500), &[])
            .unwrap();
    }

    #[test]
    fn rotated_keys_check_their_own_tokens_and_the_group_stays_one() {
        let first = TokenSigner::generate();
        let second = TokenSigner::generate().with_id(1);
        let third = TokenSigner::generate().with_id(2);
        let later = now_ms() + 60_000;
        let listed = |ks: &[&TokenSigner]| -> Vec<pb::TokenKey> {
            ks.iter()
                .map(|k| pb::TokenKey {
                    id: k.id(),
                    public_key: k.public_key().to_vec(),
                })
                .collect()
        };
        let group = first.public_key();
        let t = Tokens::new("n1".into(), None);
        t.learn(&listed(&[&first, &second]), &group, &second.public_key());
        assert_eq!(t.public_key(), second.public_key(), "reports the newest");
        let s = spec("c", 1, 500);
        let g1 = t
            .check(&token(&first, "c", "n1", 1, later), &s, &[])
            .unwrap();
        let g2 = t
            .check(&token(&second, "c", "n1", 1, later), &s, &[])
            .unwrap();
        assert_eq!(g1.group_key, hex::encode(group));
        assert_eq!(g2.group_key, g1.group_key, "one group whichever key signed");
        // A key newer than those held: transient (the agent learns it at
        // its next heartbeat).
        match t.check(&token(&third, "c", "n1", 1, later), &s, &[]) {
            Err(e @ Error::NotReady(_)) => assert!(e.to_string().contains("key 2"), "{e}"),
            other => panic!("not a transient refusal: {other:?}"),
        }
        // The first key dropped: its tokens are refused (transiently: the
        // master is granted the container again under a key held).
        t.learn(&listed(&[&second, &third]), &group, &third.public_key());
        match t.check(&token(&first, "c", "n1", 1, later), &s, &[]) {
            Err(e @ Error::NotReady(_)) => assert!(e.to_string().contains("key 0"), "{e}"),
            other => panic!("not refused: {other:?}"),
        }
        let g3 = t
            .check(&token(&third, "c", "n1", 1, later), &s, &[])
            .unwrap();
        assert_eq!(g3.group_key, hex::encode(group));
        // A forged token naming a held key's id.
        let forged = TokenSigner::generate().with_id(2);
        assert!(
            denied(t.check(&token(&forged, "c", "n1", 1, later), &s, &[])).contains("signature")
        );
        // A pinned agent keeps its key whatever the RM hands out.
        let pinned = Tokens::new("n1".into(), Some(first.verifier()));
        pinned.learn(&listed(&[&second]), &group, &second.public_key());
        assert_eq!(pinned.public_key(), first.public_key());
        pinned
            .check(&token(&first, "c", "n1", 1, later), &s, &[])
            .unwrap();
        assert!(
            denied(pinned.check(&token(&second, "c", "n1", 1, later), &s, &[]))
                .contains("signature")
        );
        // Once the RM lists the pinned key as its key 0, a token of its key
        // 1 is refused as transient (the RM stops offering this node work),
        // not as a forgery that would fail the task.
        pinned.learn(&listed(&[&first, &second]), &group, &second.public_key());
        match pinned.check(&token(&second, "c", "n1", 1, later), &s, &[]) {
            Err(e @ Error::NotReady(_)) => assert!(e.to_string().contains("key 1"), "{e}"),
            other => panic!("not a transient refusal: {other:?}"),
        }
        let g = pinned
            .check(&token(&first, "c", "n1", 1, later), &s, &[])
            .unwrap();
        assert_eq!(
            g.group_key,
            hex::encode(first.public_key()),
            "the pinned key's"
        );
    }
}
