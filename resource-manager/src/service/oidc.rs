//! Users from an OpenID Connect issuer (`[acl.oidc]`): a bearer token that
//! is a JWT signed by one of the issuer's keys names its user in a claim.
//!
//! The issuer's public keys come from a JWKS file (what the issuer serves at
//! its `jwks_uri`, fetched by whatever deploys the cluster: the members make
//! no outgoing call). The file is read at start (a member whose file does
//! not load does not start) and again whenever it changed (its modification
//! time, size or inode, looked at with each token: a stat per token, a read
//! per change): an issuer's new key is taken and a withdrawn one refused
//! with no restart. A replacement that does not load is refused, saying
//! why, and the keys in use stay.
//!
//! A token is accepted when its signature verifies with the key its header
//! names (by `kid`; a file of one key serves tokens without one) under that
//! key's algorithm (a token cannot pick a weaker one, nor HMAC with a public
//! key as its secret: symmetric keys are refused), its `iss` is the
//! configured issuer, its `aud` holds the configured audience, and it has
//! not expired (`exp`, required) and is valid already (`nbf`), within
//! `leeway`. Its user is the `user_claim` claim (a Weft user name), and it
//! is an admin when one of its `groups_claim` groups is in `admin_groups`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The longest JWT accepted (issuers' tokens are a few KiB).
pub const MAX_JWT: usize = 16 * 1024;

/// `[acl.oidc]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer's identifier: tokens' `iss` must be exactly this.
    pub issuer: String,
    /// Tokens' `aud` must hold this (the client id the issuer knows Weft by).
    pub audience: String,
    /// The issuer's JSON Web Key Set.
    pub jwks_file: PathBuf,
    /// The claim naming the user (`sub` by default; `preferred_username`
    /// or `email` where the issuer's subjects are opaque ids).
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The claim listing the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Members of these groups are cluster admins (the only way an OIDC
    /// user is one: `[acl] admins` names users of tokens and certificates,
    /// and a claim a user may edit must not make them an admin).
    #[serde(default)]
    pub admin_groups: Vec<String>,
    /// Put before every OIDC user's name (e.g. `oidc:`): keeps the
    /// issuer's users apart from those of Weft tokens and certificates in
    /// queue ACLs and applications' owners. Empty: none.
    #[serde(default)]
    pub user_prefix: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// The keys read from `jwks_file` (shared by the config's clones).
    #[serde(skip)]
    pub keys: KeyCache,
}

fn default_user_claim() -> String {
    "sub".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_leeway() -> Duration {
    Duration::from_secs(60)
}

/// The keys of the JWKS file and when it was read; one per config, shared
/// by its clones. Two caches are equal whatever they hold (the settings
/// are what a config compares).
#[derive(Clone, Default)]
pub struct KeyCache(Arc<Mutex<Option<Loaded>>>);

impl PartialEq for KeyCache {
    fn eq(&self, _: &KeyCache) -> bool {
        true
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0.lock().expect("oidc keys lock");
        match &*g {
            Some(l) => write!(f, "KeyCache({} keys)", l.keys.len()),
            None => f.write_str("KeyCache(not read)"),
        }
    }
}

struct Loaded {
    /// kid ("" for a key without one) -> its key and algorithm.
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    /// The file as it was read (None: it could not be looked at).
    version: Option<Version>,
}

/// What tells one version of a file from another without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// Who a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub admin: bool,
    /// When the token expires (ms since the epoch).
    pub expires_at_ms: u64,
}

impl OidcConfig {
    /// Checks the settings and reads the JWKS file (at start: a member
    /// whose file does not load does not start).
    pub fn load(&self) -> Result<(), String> {
        for (field, v) in [
            ("issuer", &self.issuer),
            ("audience", &self.audience),
            ("user_claim", &self.user_claim),
            ("groups_claim", &self.groups_claim),
        ] {
            if v.trim().is_empty() {
                return Err(format!("acl.oidc.{field}: must not be empty"));
            }
        }
        if self.leeway > Duration::from_secs(600) {
            return Err("acl.oidc.leeway: at most 10m".into());
        }
        let loaded = read_jwks(&self.jwks_file)
            .map_err(|e| format!("acl.oidc.jwks_file: {}: {e}", self.jwks_file.display()))?;
        *self.keys.0.lock().expect("oidc keys lock") = Some(loaded);
        Ok(())
    }

    /// The user a JWT names, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        if token.len() > MAX_JWT {
            return Err(format!("longer than {MAX_JWT} bytes"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("malformed: {e}"))?;
        let kid = header.kid.clone().unwrap_or_default();
        let (key, alg) = self.key(&kid)?;
        if header.alg != alg {
            return Err(format!(
                "signed with {:?}, but key {kid:?} is for {alg:?}",
                header.alg
            ));
        }
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => "expired".to_string(),
                K::ImmatureSignature => "not valid yet (nbf)".to_string(),
                K::InvalidIssuer => format!("its issuer is not {:?}", self.issuer),
                K::InvalidAudience => format!("its audience does not hold {:?}", self.audience),
                K::InvalidSignature => format!("its signature does not verify with key {kid:?}"),
                K::MissingRequiredClaim(c) => format!("it has no {c:?} claim"),
                _ => format!("malformed: {e}"),
            }
        })?;
        let claims = data.claims;
        let user = claims
            .get(&self.user_claim)
            .and_then(|u| u.as_str())
            .ok_or_else(|| {
                format!(
                    "its {:?} claim (the user) is missing or not a string",
                    self.user_claim
                )
            })?;
        // An address the issuer did not verify is the user's say-so.
        if self.user_claim == "email"
            && claims.get("email_verified").and_then(|v| v.as_bool()) != Some(true)
        {
            return Err("its email is not verified (email_verified is not true)".into());
        }
        let user = format!("{}{user}", self.user_prefix);
        crate::service::auth::check_user("user", &user)
            .map_err(|e| format!("its {:?} claim is not a user name: {e}", self.user_claim))?;
        let groups: Vec<&str> = match claims.get(&self.groups_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|g| g.as_str()).collect(),
            Some(serde_json::Value::String(g)) => vec![g.as_str()],
            _ => vec![],
        };
        let admin = groups
            .iter()
            .any(|g| self.admin_groups.iter().any(|a| a == g));
        // `exp` may be fractional (a NumericDate); what holds a stream open
        // is the same bound the check above used: exp plus the leeway.
        let exp = claims.get("exp").and_then(|e| e.as_f64()).unwrap_or(0.0);
        Ok(Claims {
            user,
            admin,
            expires_at_ms: (exp * 1000.0) as u64 + self.leeway.as_millis() as u64,
        })
    }

    /// The key `kid` names, from the file as it is now (read again when it
    /// changed since it was read).
    fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), String> {
        let mut g = self.keys.0.lock().expect("oidc keys lock");
        let known = |l: &Loaded| l.keys.get(kid).cloned();
        let now = version(&self.jwks_file);
        if g.as_ref().is_none_or(|l| l.version != now) {
            match read_jwks(&self.jwks_file) {
                Ok(l) => *g = Some(l),
                Err(e) => {
                    tracing::warn!(file = %self.jwks_file.display(), error = %e, "acl.oidc.jwks_file does not load; the keys read before stay in use");
                    // Not read again until it changes again.
                    if let Some(l) = g.as_mut() {
                        l.version = now;
                    }
                }
            }
        }
        g.as_ref().and_then(known).ok_or_else(|| {
            if kid.is_empty() {
                "its header names no key (kid), and acl.oidc.jwks_file holds more than one"
                    .to_string()
            } else {
                format!("its key {kid:?} is not in acl.oidc.jwks_file")
            }
        })
    }
}

fn version(path: &Path) -> Option<Version> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Version {
        modified: m.modified().ok()?,
        len: m.len(),
        inode: m.ino(),
    })
}

/// The signing keys of a JWKS file: asymmetric keys only, each with its
/// algorithm (as the key says, else the one its type implies).
fn read_jwks(path: &Path) -> Result<Loaded, String> {
    use std::io::Read;
    const MAX: u64 = 1024 * 1024;
    let version = version(path);
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX + 1).read_to_end(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX {
        return Err("larger than 1 MiB".into());
    }
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    let signing: Vec<&Jwk> = set
        .keys
        .iter()
        .filter(|k| !matches!(k.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .collect();
    // A key this member cannot use is passed over (an issuer may publish
    // keys of kinds it does not take), saying why; a key id twice is not
    // (which one a token means could not be told).
    let mut skipped = Vec::new();
    for k in &signing {
        let kid = k.common.key_id.clone().unwrap_or_default();
        if !kid.is_empty()
            && signing
                .iter()
                .filter(|o| o.common.key_id.as_deref() == Some(&kid))
                .count()
                > 1
        {
            return Err(format!("key id {kid:?} appears twice"));
        }
        let usable = (|| {
            if kid.is_empty() && signing.len() > 1 {
                return Err("no kid, among several keys (no token could name it)".to_string());
            }
            Ok((
                DecodingKey::from_jwk(k).map_err(|e| e.to_string())?,
                algorithm(k)?,
            ))
        })();
        match usable {
            Ok(key) => {
                keys.insert(kid, key);
            }
            Err(e) => skipped.push(format!("key {kid:?}: {e}")),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(file = %path.display(), skipped = ?skipped, "acl.oidc.jwks_file: keys passed over");
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            "no signing key".into()
        } else {
            format!("no usable signing key ({})", skipped.join("; "))
        });
    }
    // A set of one key serves tokens that name none.
    if keys.len() == 1 {
        let (k, v) = keys
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .expect("one");
        if !k.is_empty() {
            keys.insert(String::new(), v);
        }
    }
    Ok(Loaded { keys, version })
}

/// The algorithm a key signs with: its `alg`, else its type's usual one.
fn algorithm(k: &Jwk) -> Result<Algorithm, String> {
    let by_type = match &k.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref c => return Err(format!("curve {c:?} is not supported (P-256, P-384)")),
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric key: an issuer's keys are public keys (RSA, EC, Ed25519)".into(),
            )
        }
    };
    let Some(alg) = k.common.key_algorithm else {
        return Ok(by_type);
    };
    let alg = match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        other => return Err(format!("algorithm {other:?} does not sign")),
    };
    let family_ok = matches!(
        (&k.algorithm, alg),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (
            AlgorithmParameters::EllipticCurve(_),
            Algorithm::ES256 | Algorithm::ES384
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
    );
    if !family_ok || (by_type != alg && matches!(by_type, Algorithm::ES256 | Algorithm::ES384)) {
        return Err(format!("algorithm {alg:?} does not fit its key type"));
    }
    Ok(alg)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// A P-256 key of a test issuer: its signing key and its JWK.
    pub(crate) fn es256(kid: &str) -> (EncodingKey, serde_json::Value) {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = k.public_key_raw();
        assert_eq!(raw.len(), 65);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
        });
        (EncodingKey::from_ec_der(&k.serialize_der()), jwk)
    }

    /// The test RSA key (a fixture: ring makes no RSA keys) and its JWK
    /// without `alg` (as many issuers publish them).
    fn rs256(kid: &str) -> (EncodingKey, serde_json::Value) {
        let der = include_bytes!("../../tests/data/oidc-test-rsa-key.der");
        let pair = ring::rsa::KeyPair::from_der(der).unwrap();
        let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        let (n, e) = (c.n, c.e);
        let jwk = json!({
            "kty": "RSA", "kid": kid,
            "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e),
        });
        (EncodingKey::from_rsa_der(der), jwk)
    }

    pub(crate) const ISSUER: &str = "https://login.example.test/realms/ml";

    /// A token of the test issuer for `sub`, valid for an hour.
    pub(crate) fn claims(sub: &str) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({"iss": ISSUER, "aud": ["weft", "other"], "sub": sub, "iat": now, "exp": now + 3600})
    }

    pub(crate) fn mint(
        key: &EncodingKey,
        alg: Algorithm,
        kid: Option<&str>,
        c: &serde_json::Value,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, c, key).unwrap()
    }

    pub(crate) fn write_jwks(path: &Path, keys: &[&serde_json::Value]) {
        std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
    }

    fn config(jwks: &Path) -> OidcConfig {
        let c: OidcConfig = toml::from_str(&format!(
            "issuer = {ISSUER:?}\naudience = \"weft\"\njwks_file = {:?}\nadmin_groups = [\"ml-admins\"]\n",
            jwks.display()
        ))
        .unwrap();
        c.load().unwrap();
        c
    }

    #[test]
    fn a_token_of_the_issuer_names_its_user_and_every_bad_one_says_why() {
        let tmp = tempfile::tempdir().unwrap();
        let jwks = tmp.path().join("jwks.json");
        let (ec, ec_jwk) = es256("ec-1");
        let (rsa, rsa_jwk) = rs256("rsa-1");
        write_jwks(&jwks, &[&ec_jwk, &rsa_jwk]);
        let c = config(&jwks);
        assert_eq!(c.user_claim, "sub");
        assert_eq!(c.leeway, Duration::from_secs(60));
        let ok = |t: &str| c.verify(t);
        let refused = |t: &str, why: &str| {
            let e = ok(t).unwrap_err();
            assert!(e.contains(why), "{why:?} not in {e:?}");
        };

        let alice = ok(&mint(&ec, Algorithm::ES256, Some("ec-1"), &claims("alice"))).unwrap();
        assert_eq!((alice.user.as_str(), alice.admin), ("alice", false));
        assert!(alice.expires_at_ms > 1000 * jsonwebtoken::get_current_timestamp());
        // RS256 from a key that names no algorithm (its type implies it).
        let bob = ok(&mint(&rsa, Algorithm::RS256, Some("rsa-1"), &claims("bob"))).unwrap();
        assert_eq!(bob.user, "bob");
        // Admins: by group only.
        let mut g = claims("carol");
        g["groups"] = json!(["ml-users", "ml-admins"]);
        assert!(
            ok(&mint(&ec, Algorithm::ES256, Some("ec-1"), &g))
                .unwrap()
                .admin
        );
        // A fractional exp (a NumericDate may be one) holds streams open
        // until exp plus the leeway.
        let now = jsonwebtoken::get_current_timestamp();
        let mut f = claims("dora");
        f["exp"] = json!(now as f64 + 100.5);
        let dora = ok(&mint(&ec, Algorithm::ES256, Some("ec-1"), &f)).unwrap();
        assert_eq!(dora.expires_at_ms, (now * 1000) + 100_500 + 60_000);
        // `alg: none`, hand-made (no library mints one): refused.
        use base64::Engine;
        let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "kid": "ec-1"})),
            b64(claims("mallory"))
        );
        refused(&none, "malformed");
        // PS256 under a key published for RS256 (its type's default).
        refused(
            &mint(&rsa, Algorithm::PS256, Some("rsa-1"), &claims("alice")),
            "signed with PS256",
        );

        let now = jsonwebtoken::get_current_timestamp();
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = claims("alice");
            f(&mut v);
            mint(&ec, Algorithm::ES256, Some("ec-1"), &v)
        };
        refused(&with(&|v| v["exp"] = json!(now - 120)), "expired");
        // Within the leeway it still holds.
        assert!(ok(&with(&|v| v["exp"] = json!(now - 30))).is_ok());
        refused(&with(&|v| v["nbf"] = json!(now + 600)), "not valid yet");
        refused(&with(&|v| v["iss"] = json!("https://evil.test")), "issuer");
        refused(&with(&|v| v["aud"] = json!("someone-else")), "audience");
        refused(
            &with(&|v| {
                v.as_object_mut().unwrap().remove("exp");
            }),
            "\"exp\"",
        );
        refused(
            &with(&|v| {
                v.as_object_mut().unwrap().remove("sub");
            }),
            "\"sub\" claim",
        );
        refused(
            &with(&|v| v["sub"] = json!("alice smith")),
            "not a user name",
        );
        // Another key under a known kid; an unknown kid; the wrong
        // algorithm for the key; HMAC keyed with something public; junk.
        let (other, _) = es256("ec-1");
        refused(
            &mint(&other, Algorithm::ES256, Some("ec-1"), &claims("alice")),
            "signature does not verify",
        );
        refused(
            &mint(&other, Algorithm::ES256, Some("ec-9"), &claims("alice")),
            "\"ec-9\" is not in acl.oidc.jwks_file",
        );
        refused(
            &mint(&rsa, Algorithm::RS384, Some("rsa-1"), &claims("alice")),
            "signed with RS384",
        );
        let hs = mint(
            &EncodingKey::from_secret(b"x"),
            Algorithm::HS256,
            Some("ec-1"),
            &claims("alice"),
        );
        refused(&hs, "signed with HS256");
        refused(
            &mint(&ec, Algorithm::ES256, None, &claims("alice")),
            "names no key",
        );
        refused("a.b.c", "malformed");
        refused(&"x".repeat(MAX_JWT + 1), "longer than");
    }

    #[test]
    fn an_email_user_needs_it_verified_and_a_prefix_keeps_the_issuers_users_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let jwks = tmp.path().join("jwks.json");
        let (ec, jwk) = es256("ec-1");
        write_jwks(&jwks, &[&jwk]);
        let mut c = config(&jwks);
        c.user_claim = "email".into();
        c.user_prefix = "oidc:".into();
        let mut v = claims("id-1");
        v["email"] = json!("alice@example.com");
        let t = mint(&ec, Algorithm::ES256, None, &v);
        assert!(c.verify(&t).unwrap_err().contains("email is not verified"));
        v["email_verified"] = json!(false);
        assert!(c.verify(&mint(&ec, Algorithm::ES256, None, &v)).is_err());
        v["email_verified"] = json!(true);
        let who = c.verify(&mint(&ec, Algorithm::ES256, None, &v)).unwrap();
        assert_eq!(who.user, "oidc:alice@example.com");
        // A user who names themself as an admin is not one: only groups.
        v["email"] = json!("ops");
        let who = c.verify(&mint(&ec, Algorithm::ES256, None, &v)).unwrap();
        assert_eq!((who.user.as_str(), who.admin), ("oidc:ops", false));
    }

    #[test]
    fn a_rotated_key_is_read_from_the_changed_file_and_a_bad_file_keeps_the_old_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let jwks = tmp.path().join("jwks.json");
        let (k1, j1) = es256("k1");
        write_jwks(&jwks, &[&j1]);
        let c = config(&jwks);
        // One key: a token naming no kid uses it.
        assert!(c
            .verify(&mint(&k1, Algorithm::ES256, None, &claims("alice")))
            .is_ok());
        // The issuer rotates: k2 appears in the file; a token signed with it
        // is accepted at once, without a restart (the file changed).
        let (k2, j2) = es256("k2");
        let t2 = mint(&k2, Algorithm::ES256, Some("k2"), &claims("alice"));
        write_jwks(&jwks, &[&j1, &j2]);
        assert_eq!(c.verify(&t2).unwrap().user, "alice");
        // A clone (another service of the member) shares the keys read.
        assert!(c.clone().verify(&t2).is_ok());
        // k1 withdrawn: its tokens are refused at once.
        write_jwks(&jwks, &[&j2]);
        let t1 = mint(&k1, Algorithm::ES256, Some("k1"), &claims("alice"));
        assert!(c.verify(&t1).unwrap_err().contains("\"k1\" is not in"));
        // k2 alone: a token naming no key is k2's.
        assert!(c
            .verify(&mint(&k2, Algorithm::ES256, None, &claims("alice")))
            .is_ok());
        // A file that does not load is not taken: the keys stay.
        std::fs::write(&jwks, "{ not json").unwrap();
        let t3 = mint(&k2, Algorithm::ES256, Some("k3"), &claims("alice"));
        assert!(c.verify(&t3).unwrap_err().contains("\"k3\" is not in"));
        assert!(c.verify(&t2).is_ok());
    }

    #[test]
    fn a_jwks_that_cannot_serve_is_refused_at_start_naming_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let jwks = tmp.path().join("jwks.json");
        let cfg = |jwks: &Path| -> OidcConfig {
            toml::from_str(&format!(
                "issuer = {ISSUER:?}\naudience = \"weft\"\njwks_file = {:?}\n",
                jwks.display()
            ))
            .unwrap()
        };
        let err = |text: &str| {
            std::fs::write(&jwks, text).unwrap();
            cfg(&jwks).load().unwrap_err()
        };
        assert!(cfg(&tmp.path().join("missing.json"))
            .load()
            .unwrap_err()
            .contains("acl.oidc.jwks_file"));
        assert!(err("{}").contains("not a JWKS"));
        assert!(err(r#"{"keys":[]}"#).contains("no signing key"));
        assert!(err(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#)
            .contains("no usable signing key (key \"h\": a symmetric key"));
        // One unusable key among usable ones is passed over.
        let (_, good) = es256("good");
        let text = json!({"keys": [good, {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}).to_string();
        std::fs::write(&jwks, text).unwrap();
        cfg(&jwks).load().unwrap();
        let (_, a) = es256("same");
        let (_, b) = es256("same");
        assert!(err(&json!({"keys": [a, b]}).to_string()).contains("appears twice"));
        let (_, mut a) = es256("a");
        a["alg"] = json!("RS256");
        assert!(err(&json!({"keys": [a]}).to_string()).contains("does not fit"));
        let mut c = cfg(&jwks);
        c.audience = " ".into();
        assert!(c.load().unwrap_err().contains("acl.oidc.audience"));
        // Unknown settings are named.
        let e = toml::from_str::<OidcConfig>(
            "issuer = \"x\"\naudience = \"y\"\njwks_file = \"z\"\nclient_secret = \"s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("client_secret"), "{e}");
    }
}
