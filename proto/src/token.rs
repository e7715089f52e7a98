//! Signed tokens: the RM signs, node agents and the RM check.
//!
//! A container token lets a node agent start one container (its id, node,
//! resources) until it expires; an application token lets one attempt of one
//! application master speak for its application. Both are ed25519 signatures
//! by a key the RM group keeps in its replicated state; agents learn the
//! public keys when they register and in every heartbeat answer (or pin one
//! in their configuration). The key rotates: a token names the id of the key
//! that signed it, and a [`KeySet`] holds every key that may have.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;

use crate::v1::{ApplicationTokenBody, ContainerTokenBody, SignedToken};

/// Domain tags: a signature over one kind of token is not valid for another.
const CONTAINER_TAG: &[u8] = b"weft-container-token-v1\0";
const APPLICATION_TAG: &[u8] = b"weft-application-token-v1\0";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token was given")]
    Missing,
    #[error("the token is malformed ({0})")]
    Malformed(String),
    #[error("the token's signature is not the resource manager's")]
    BadSignature,
    #[error("the token expired {0} ms ago")]
    Expired(u64),
    #[error("the token is for {field} {expected:?}, not {actual:?}")]
    Mismatch {
        field: &'static str,
        expected: String,
        actual: String,
    },
    #[error("no signing key is known yet")]
    NoKey,
    #[error("the token was signed by key {0}, which is not known here (dropped after a rotation, or not learned yet)")]
    UnknownKey(u32),
}

fn message(tag: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(tag.len() + body.len());
    m.extend_from_slice(tag);
    m.extend_from_slice(body);
    m
}

/// The RM's signing key and its id (which tokens carry).
#[derive(Clone)]
pub struct TokenSigner {
    key: SigningKey,
    id: u32,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("id", &self.id)
            .field("public_key", &hex::encode(self.public_key()))
            .finish()
    }
}

impl TokenSigner {
    /// A new random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).expect("the OS random number generator");
        Self::from_seed(seed)
    }

    /// Key id 0 (the group's first key); see [`TokenSigner::with_id`].
    pub fn from_seed(seed: [u8; 32]) -> Self {
        TokenSigner {
            key: SigningKey::from_bytes(&seed),
            id: 0,
        }
    }

    /// The same key under id `id` (the one its tokens name).
    pub fn with_id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// From the hex form [`TokenSigner::seed_hex`] gives.
    pub fn from_seed_hex(s: &str) -> Result<Self, TokenError> {
        let v = hex::decode(s).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let seed: [u8; 32] = v
            .try_into()
            .map_err(|_| TokenError::Malformed("a seed is 32 bytes".into()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            key: self.key.verifying_key(),
        }
    }

    fn sign(&self, tag: &[u8], body: Vec<u8>) -> Vec<u8> {
        let signature = self.key.sign(&message(tag, &body)).to_bytes().to_vec();
        SignedToken {
            body,
            signature,
            key_id: self.id,
        }
        .encode_to_vec()
    }

    pub fn sign_container(&self, body: &ContainerTokenBody) -> Vec<u8> {
        self.sign(CONTAINER_TAG, body.encode_to_vec())
    }

    pub fn sign_application(&self, body: &ApplicationTokenBody) -> Vec<u8> {
        self.sign(APPLICATION_TAG, body.encode_to_vec())
    }

    /// Checks an application token's signature (by this key, whatever id
    /// it names) and expiry, and returns what it grants.
    pub fn verify_application(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<ApplicationTokenBody, TokenError> {
        self.verifier().verify_application(token, now_ms)
    }
}

/// The id of the key a token names (None: not a token).
pub fn key_id_of(token: &[u8]) -> Option<u32> {
    decode(token).ok().map(|t| t.key_id)
}

/// Decodes the envelope of a token.
fn decode(token: &[u8]) -> Result<SignedToken, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    SignedToken::decode(token).map_err(|e| TokenError::Malformed(e.to_string()))
}

fn container_body(body: Vec<u8>, now_ms: u64) -> Result<ContainerTokenBody, TokenError> {
    let body = ContainerTokenBody::decode(body.as_slice())
        .map_err(|e| TokenError::Malformed(e.to_string()))?;
    // A container token always expires (0 is long past).
    if body.expires_at_ms <= now_ms {
        return Err(TokenError::Expired(now_ms - body.expires_at_ms));
    }
    Ok(body)
}

fn application_body(body: Vec<u8>, now_ms: u64) -> Result<ApplicationTokenBody, TokenError> {
    let body = ApplicationTokenBody::decode(body.as_slice())
        .map_err(|e| TokenError::Malformed(e.to_string()))?;
    // 0: a token made before application tokens expired.
    if body.expires_at_ms != 0 && body.expires_at_ms <= now_ms {
        return Err(TokenError::Expired(now_ms - body.expires_at_ms));
    }
    Ok(body)
}

/// Every key tokens may be signed with, by id: what an agent checks
/// container tokens with and the RM application tokens. A token is checked
/// by the key its `key_id` names only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    keys: Vec<(u32, TokenVerifier)>,
}

impl KeySet {
    pub fn new(mut keys: Vec<(u32, TokenVerifier)>) -> Self {
        keys.sort_by_key(|(id, _)| *id);
        keys.dedup_by_key(|(id, _)| *id);
        KeySet { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    pub fn get(&self, id: u32) -> Option<&TokenVerifier> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| k)
    }

    /// The key of the highest id (the newest).
    pub fn newest(&self) -> Option<(u32, &TokenVerifier)> {
        self.keys.last().map(|(id, k)| (*id, k))
    }

    fn open(&self, tag: &[u8], token: &[u8]) -> Result<(u32, Vec<u8>), TokenError> {
        let t = decode(token)?;
        let key = self.get(t.key_id).ok_or(if self.keys.is_empty() {
            TokenError::NoKey
        } else {
            TokenError::UnknownKey(t.key_id)
        })?;
        Ok((t.key_id, key.check(tag, t)?))
    }

    /// Checks a container token's signature and expiry (against `now_ms`);
    /// returns the id of the key that signed it and what it grants.
    pub fn verify_container(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<(u32, ContainerTokenBody), TokenError> {
        let (id, body) = self.open(CONTAINER_TAG, token)?;
        Ok((id, container_body(body, now_ms)?))
    }

    /// Checks an application token's signature and expiry; returns the id
    /// of the key that signed it and what it grants.
    pub fn verify_application(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<(u32, ApplicationTokenBody), TokenError> {
        let (id, body) = self.open(APPLICATION_TAG, token)?;
        Ok((id, application_body(body, now_ms)?))
    }
}

/// The RM's public key, as node agents hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenVerifier {
    key: VerifyingKey,
}

impl TokenVerifier {
    pub fn from_bytes(b: &[u8]) -> Result<Self, TokenError> {
        let b: [u8; 32] = b
            .try_into()
            .map_err(|_| TokenError::Malformed("a public key is 32 bytes".into()))?;
        VerifyingKey::from_bytes(&b)
            .map(|key| TokenVerifier { key })
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }

    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        Self::from_bytes(&hex::decode(s.trim()).map_err(|e| TokenError::Malformed(e.to_string()))?)
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    fn check(&self, tag: &[u8], t: SignedToken) -> Result<Vec<u8>, TokenError> {
        let sig = ed25519_dalek::Signature::from_slice(&t.signature)
            .map_err(|_| TokenError::Malformed("a signature is 64 bytes".into()))?;
        self.key
            .verify(&message(tag, &t.body), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        Ok(t.body)
    }

    /// Checks an application token's signature by this one key (whatever
    /// key id the token names: a key pinned in a configuration) and its
    /// expiry, and returns what it grants.
    pub fn verify_application(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<ApplicationTokenBody, TokenError> {
        application_body(self.check(APPLICATION_TAG, decode(token)?)?, now_ms)
    }

    /// Checks a container token's signature by this one key (whatever key
    /// id it names) and its expiry (against `now_ms`), and returns what it
    /// grants.
    pub fn verify_container(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<ContainerTokenBody, TokenError> {
        container_body(self.check(CONTAINER_TAG, decode(token)?)?, now_ms)
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ContainerTokenBody {
        ContainerTokenBody {
            container_id: "c-1".into(),
            application_id: "app-000001".into(),
            node_id: "n1".into(),
            memory_bytes: 1 << 20,
            expires_at_ms: 2_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_signed_container_token_verifies_until_it_expires() {
        let s = TokenSigner::generate();
        let t = s.sign_container(&body());
        assert_eq!(s.verifier().verify_container(&t, 1_999).unwrap(), body());
        assert_eq!(
            s.verifier().verify_container(&t, 2_500),
            Err(TokenError::Expired(500))
        );
    }

    #[test]
    fn forged_or_foreign_tokens_are_refused() {
        let s = TokenSigner::generate();
        let other = TokenSigner::generate();
        let t = other.sign_container(&body());
        assert_eq!(
            s.verifier().verify_container(&t, 0),
            Err(TokenError::BadSignature)
        );
        // The body changed after signing (more memory).
        let mut st = SignedToken::decode(s.sign_container(&body()).as_slice()).unwrap();
        let mut b = body();
        b.memory_bytes = 1 << 30;
        st.body = b.encode_to_vec();
        assert_eq!(
            s.verifier().verify_container(&st.encode_to_vec(), 0),
            Err(TokenError::BadSignature)
        );
        // An application token is not a container token.
        let app = s.sign_application(&ApplicationTokenBody {
            application_id: "app-000001".into(),
            attempt: 1,
            issued_at_ms: 0,
            expires_at_ms: 0,
        });
        assert_eq!(
            s.verifier().verify_container(&app, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            s.verifier().verify_container(&[], 0),
            Err(TokenError::Missing)
        );
        assert!(matches!(
            s.verifier().verify_container(b"garbage", 0),
            Err(TokenError::Malformed(_))
        ));
        assert_eq!(s.verify_application(&app, 0).unwrap().attempt, 1);
    }

    #[test]
    fn a_key_set_checks_each_token_by_the_key_it_names() {
        let old = TokenSigner::generate();
        let new = TokenSigner::generate().with_id(1);
        let both = KeySet::new(vec![(1, new.verifier()), (0, old.verifier())]);
        assert_eq!(both.ids(), vec![0, 1]);
        assert_eq!(both.newest().unwrap().0, 1);
        let app = |s: &TokenSigner, expires_at_ms| {
            s.sign_application(&ApplicationTokenBody {
                application_id: "app-000001".into(),
                attempt: 2,
                issued_at_ms: 0,
                expires_at_ms,
            })
        };
        // Each key's tokens verify, and say which key signed them.
        assert_eq!(both.verify_application(&app(&old, 0), 5).unwrap().0, 0);
        assert_eq!(both.verify_application(&app(&new, 10), 5).unwrap().0, 1);
        let (id, c) = both
            .verify_container(&new.sign_container(&body()), 1_000)
            .unwrap();
        assert_eq!((id, c), (1, body()));
        // An application token past its expiry is refused.
        assert_eq!(
            both.verify_application(&app(&new, 10), 25),
            Err(TokenError::Expired(15))
        );
        // Once the old key is dropped, its tokens are refused by id.
        let only_new = KeySet::new(vec![(1, new.verifier())]);
        assert_eq!(
            only_new.verify_application(&app(&old, 0), 5),
            Err(TokenError::UnknownKey(0))
        );
        // A token naming the new key's id but signed by the old key.
        let forged = old.clone().with_id(1);
        assert_eq!(
            both.verify_application(&app(&forged, 0), 5),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            KeySet::default().verify_application(&app(&old, 0), 5),
            Err(TokenError::NoKey)
        );
    }

    #[test]
    fn keys_round_trip_through_hex() {
        let s = TokenSigner::generate();
        let again = TokenSigner::from_seed_hex(&s.seed_hex()).unwrap();
        assert_eq!(again.public_key(), s.public_key());
        let v = TokenVerifier::from_hex(&hex::encode(s.public_key())).unwrap();
        assert_eq!(v, s.verifier());
        assert!(TokenVerifier::from_hex("abcd").is_err());
    }
}
