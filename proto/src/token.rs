//! Signed tokens: the RM signs, node agents and the RM check.
//!
//! A container token lets a node agent start one container (its id, node,
//! resources) until it expires; an application token lets one attempt of one
//! application master speak for its application. Both are ed25519 signatures
//! by a key the RM group keeps in its replicated state; agents learn the
//! public key when they register (or from their configuration).

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
}

fn message(tag: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(tag.len() + body.len());
    m.extend_from_slice(tag);
    m.extend_from_slice(body);
    m
}

/// The RM's signing key.
#[derive(Clone)]
pub struct TokenSigner {
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
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

    pub fn from_seed(seed: [u8; 32]) -> Self {
        TokenSigner {
            key: SigningKey::from_bytes(&seed),
        }
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
        SignedToken { body, signature }.encode_to_vec()
    }

    pub fn sign_container(&self, body: &ContainerTokenBody) -> Vec<u8> {
        self.sign(CONTAINER_TAG, body.encode_to_vec())
    }

    pub fn sign_application(&self, body: &ApplicationTokenBody) -> Vec<u8> {
        self.sign(APPLICATION_TAG, body.encode_to_vec())
    }

    /// Checks an application token's signature and returns what it grants.
    pub fn verify_application(&self, token: &[u8]) -> Result<ApplicationTokenBody, TokenError> {
        self.verifier().verify_application(token)
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

    fn open(&self, tag: &[u8], token: &[u8]) -> Result<Vec<u8>, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let t = SignedToken::decode(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let sig = ed25519_dalek::Signature::from_slice(&t.signature)
            .map_err(|_| TokenError::Malformed("a signature is 64 bytes".into()))?;
        self.key
            .verify(&message(tag, &t.body), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        Ok(t.body)
    }

    /// Checks an application token's signature and returns what it grants
    /// (an agent checking a master asking after its own containers).
    pub fn verify_application(&self, token: &[u8]) -> Result<ApplicationTokenBody, TokenError> {
        let body = self.open(APPLICATION_TAG, token)?;
        ApplicationTokenBody::decode(body.as_slice())
            .map_err(|e| TokenError::Malformed(e.to_string()))
    }

    /// Checks a container token's signature and expiry (against `now_ms`)
    /// and returns what it grants.
    pub fn verify_container(
        &self,
        token: &[u8],
        now_ms: u64,
    ) -> Result<ContainerTokenBody, TokenError> {
        let body = self.open(CONTAINER_TAG, token)?;
        let body = ContainerTokenBody::decode(body.as_slice())
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        if body.expires_at_ms <= now_ms {
            return Err(TokenError::Expired(now_ms - body.expires_at_ms));
        }
        Ok(body)
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
        assert_eq!(s.verify_application(&app).unwrap().attempt, 1);
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
