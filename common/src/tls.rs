//! Mutual TLS for every gRPC connection a Weft process opens or serves, when
//! configured; the certificates `rmctl tls` makes; and the identity a peer's
//! certificate names.
//!
//! One cluster CA signs every certificate. A certificate's role is one of
//! its DNS names: `rm.weft` (a resource-manager member), `agent.weft` (a
//! node agent), `client.weft` (a user or a tool); its common name is the
//! member's, node's or user's name. A connection to a member verifies that
//! the server holds an `rm.weft` certificate of the CA, one to an agent an
//! `agent.weft` one, whatever address it dialled (as Nomad checks
//! `server.<region>.nomad`): a node's certificate cannot pose as a member,
//! and a user's (made for client authentication only) cannot serve at all.
//!
//! Servers require TLS and verify a client certificate when one is shown
//! (one of another CA ends the handshake); whether a call needs one, and of
//! which role, is the service's to say ([`peer`]): raft messages only from
//! members. Application masters have no certificate of their own: they
//! verify the servers with the CA and prove themselves with their
//! application token, as before.
//!
//! A process installs its settings at start ([`install`]); every endpoint
//! and server made through [`crate::net`] then uses them. A daemon reads its
//! files again on SIGHUP and when they change ([`spawn_reloader`]): new
//! connections get the new certificate (a server presents it, a client
//! shows it, and a changed CA bundle is trusted) without a restart;
//! established ones keep theirs. A replacement that does not load is
//! refused, saying why, and the files in use stay in use.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A resource-manager member.
    Rm,
    /// A node agent.
    Agent,
    /// A user or a tool (client authentication only).
    Client,
}

impl Role {
    /// The DNS name that marks a certificate as this role's.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Rm => "rm.weft",
            Role::Agent => "agent.weft",
            Role::Client => "client.weft",
        }
    }

    fn from_dns_name(name: &str) -> Option<Role> {
        [Role::Rm, Role::Agent, Role::Client]
            .into_iter()
            .find(|r| r.dns_name() == name)
    }

    /// `rm`, `agent` or `client`.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "rm" => Ok(Role::Rm),
            "agent" => Ok(Role::Agent),
            "client" => Ok(Role::Client),
            other => Err(format!("{other:?} is not a role: rm, agent or client")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Rm => "rm",
            Role::Agent => "agent",
            Role::Client => "client",
        })
    }
}

/// The `[tls]` section of a member's or an agent's config, and what
/// `rmctl --tls-ca/--tls-cert/--tls-key` name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM): every peer's certificate must be
    /// signed by it.
    pub ca_file: PathBuf,
    /// This process's certificate (PEM), signed by that CA.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Loaded, checked TLS settings.
#[derive(Clone)]
pub struct Tls {
    /// Where the CA's certificate was read from (handed to containers as
    /// `WEFT_TLS_CA`).
    pub ca_file: PathBuf,
    ca: Certificate,
    identity: Option<Identity>,
    /// The role and name of this process's own certificate.
    pub own: Option<PeerIdentity>,
    /// How this process serves, when it has a certificate of its own.
    server: Option<Arc<rustls::ServerConfig>>,
    /// What it was loaded from, to load again.
    files: TlsFiles,
    need: Option<Role>,
    /// When its certificate stops being valid (RFC 3339).
    pub not_after: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("own", &self.own).finish()
    }
}

/// The role and name a certificate holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// None for a certificate of the CA that names no Weft role.
    pub role: Option<Role>,
    /// Its common name: a member's, node's or user's name.
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Some(r) => write!(f, "the {r} certificate of {:?}", self.name),
            None => write!(f, "a certificate of {:?} without a Weft role", self.name),
        }
    }
}

fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: {}: {e}", path.display()))
}

fn first_pem(bytes: &[u8], tag: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(bytes)
        .filter_map(Result::ok)
        .find(|p| p.label == tag)
        .map(|p| p.contents)
}

/// The identity a DER certificate names.
pub fn identity_of(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let role = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Role::from_dns_name(d),
                _ => None,
            })
        });
    Some(PeerIdentity { role, name })
}

impl Tls {
    /// Reads and checks `files`. `section` prefixes the field an error
    /// names (`tls` gives `tls.cert_file: ...`); `need` is the role this
    /// process's own certificate must have (members and agents need one;
    /// clients may go without).
    pub fn load(files: &TlsFiles, section: &str, need: Option<Role>) -> Result<Tls, String> {
        let field = |f: &str| format!("{section}.{f}");
        let ca_pem = read(&files.ca_file, &field("ca_file"))?;
        let ca_der = first_pem(&ca_pem, "CERTIFICATE").ok_or_else(|| {
            format!(
                "{}: {} holds no PEM certificate",
                field("ca_file"),
                files.ca_file.display()
            )
        })?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| {
            format!(
                "{}: {} is not a certificate: {e}",
                field("ca_file"),
                files.ca_file.display()
            )
        })?;
        if !ca.is_ca() {
            return Err(format!(
                "{}: {} is not a CA certificate (make one with `rmctl tls ca create`)",
                field("ca_file"),
                files.ca_file.display()
            ));
        }
        let (cert_file, key_file) = match (&files.cert_file, &files.key_file, need) {
            (Some(c), Some(k), _) => (c, k),
            (None, None, None) => {
                return Ok(Tls {
                    ca_file: files.ca_file.clone(),
                    ca: Certificate::from_pem(ca_pem),
                    identity: None,
                    own: None,
                    server: None,
                    files: files.clone(),
                    need,
                    not_after: None,
                })
            }
            (None, _, _) => {
                let role = need.unwrap_or(Role::Client);
                return Err(format!(
                    "{}: required ({}): make one with `rmctl tls cert create --role {role} --name NAME`",
                    field("cert_file"),
                    if need.is_some() {
                        format!("a {role} needs a certificate of its own")
                    } else {
                        "key_file is given".to_string()
                    },
                ));
            }
            (Some(_), None, _) => {
                return Err(format!("{}: required beside cert_file", field("key_file")))
            }
        };
        let cert_pem = read(cert_file, &field("cert_file"))?;
        let key_pem = read(key_file, &field("key_file"))?;
        let cert_der = first_pem(&cert_pem, "CERTIFICATE").ok_or_else(|| {
            format!(
                "{}: {} holds no PEM certificate",
                field("cert_file"),
                cert_file.display()
            )
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            format!(
                "{}: {} is not a certificate: {e}",
                field("cert_file"),
                cert_file.display()
            )
        })?;
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err(format!(
                "{}: {} was not signed by the CA in {} ({})",
                field("cert_file"),
                cert_file.display(),
                field("ca_file"),
                files.ca_file.display()
            ));
        }
        if !cert.validity().is_valid() {
            return Err(format!(
                "{}: {} is valid only from {} to {}",
                field("cert_file"),
                cert_file.display(),
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        let own = identity_of(&cert_der).expect("parsed above");
        if let Some(role) = need {
            if own.role != Some(role) {
                return Err(format!(
                    "{}: {} is {own}; this process needs a {role} certificate (`rmctl tls cert create --role {role} --name NAME`)",
                    field("cert_file"),
                    cert_file.display()
                ));
            }
        }
        let key_text = String::from_utf8(key_pem.clone()).map_err(|_| {
            format!(
                "{}: {} is not PEM text",
                field("key_file"),
                key_file.display()
            )
        })?;
        let key = rcgen::KeyPair::from_pem(&key_text).map_err(|e| {
            format!(
                "{}: {} is not a private key: {e}",
                field("key_file"),
                key_file.display()
            )
        })?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(format!(
                "{}: {} is not the key of {}",
                field("key_file"),
                key_file.display(),
                cert_file.display()
            ));
        }
        let server = rustls_server(&ca_pem, &cert_pem, &key_pem)
            .map_err(|e| format!("{}: {e}", field("cert_file")))?;
        let not_after = cert
            .validity()
            .not_after
            .to_rfc2822()
            .unwrap_or_else(|_| cert.validity().not_after.to_string());
        Ok(Tls {
            ca_file: files.ca_file.clone(),
            ca: Certificate::from_pem(ca_pem),
            identity: Some(Identity::from_pem(cert_pem, key_pem)),
            own: Some(own),
            server: Some(Arc::new(server)),
            files: files.clone(),
            need,
            not_after: Some(not_after),
        })
    }

    /// The rustls settings this process serves with (None without a
    /// certificate of its own).
    pub fn rustls_server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server.clone()
    }

    /// How a connection to a `to` server is made.
    pub fn client_config(&self, to: Role) -> ClientTlsConfig {
        let c = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(to.dns_name());
        match &self.identity {
            Some(id) => c.identity(id.clone()),
            None => c,
        }
    }
}

/// How a server with this CA bundle, certificate chain and key serves: TLS
/// 1.2 or 1.3 (ring), HTTP/2, a client certificate of one of the bundle's
/// CAs verified when shown (whether a call needs one is the service's to
/// say).
fn rustls_server(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.map_err(|e| format!("the CA bundle: {e}"))?)
            .map_err(|e| format!("the CA bundle: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("the CA bundle: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("the key: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session tickets: Weft's clients keep their connections (members,
    // agents, the RM towards agents) or are processes that connect once
    // (masters, rmctl) and never resume; each ticket was made, encrypted
    // and sent for nothing on every handshake.
    cfg.send_tls13_tickets = 0;
    // The server picks the suite: AES-128-GCM with SHA-256 first, whose
    // handshake hashing runs on the CPU's SHA extensions (SHA-384, the
    // clients' first choice, has none to run on).
    cfg.ignore_client_order = true;
    Ok(cfg)
}

static CURRENT: RwLock<Option<Arc<Tls>>> = RwLock::new(None);
/// Bumped at every install and reload: connection caches made under an
/// older generation are dropped, so new connections show the new
/// certificate.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Makes every endpoint and server of this process use `tls` from now on.
/// The first call wins (false after it): later changes come through
/// [`reload`].
pub fn install(tls: Tls) -> bool {
    let mut cur = CURRENT.write().expect("tls lock");
    if cur.is_some() {
        return false;
    }
    *cur = Some(Arc::new(tls));
    GENERATION.fetch_add(1, Ordering::SeqCst);
    true
}

/// This process's TLS settings now, if it has any.
pub fn installed() -> Option<Arc<Tls>> {
    CURRENT.read().expect("tls lock").clone()
}

/// Changes with every install and reload (see [`GENERATION`]).
pub fn generation() -> u64 {
    GENERATION.load(Ordering::SeqCst)
}

/// What a reload put in place: the identity and when it stops being valid.
pub type Reloaded = (Option<PeerIdentity>, Option<String>);

/// Loads the installed settings' files again and, when they load and
/// check, uses them from now on. Ok(Some(identity, not_after)) when
/// reloaded, Ok(None) when nothing is installed; the error says what is
/// wrong with the new files (the old settings stay).
pub fn reload() -> Result<Option<Reloaded>, String> {
    let Some(cur) = installed() else {
        return Ok(None);
    };
    let new = Tls::load(&cur.files, "tls", cur.need)?;
    if let (Some(old), Some(now)) = (&cur.own, &new.own) {
        if old != now {
            return Err(format!(
                "tls.cert_file: {} is now {now}, not {old} as at start: a process keeps its identity (restart it to change it)",
                cur.files.cert_file.as_deref().unwrap_or(Path::new("")).display()
            ));
        }
    }
    let said = (new.own.clone(), new.not_after.clone());
    *CURRENT.write().expect("tls lock") = Some(Arc::new(new));
    GENERATION.fetch_add(1, Ordering::SeqCst);
    Ok(Some(said))
}

/// What identifies a file's content for the change watch: its inode, size
/// and modification time (a file replaced by a rename has a new inode).
fn stamp(p: &Path) -> Option<(u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// How often a daemon looks whether its certificate files changed.
pub const RELOAD_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads on SIGHUP and when the files change (looked at every `every`),
/// on the current tokio runtime. Does nothing without installed settings.
pub fn spawn_reloader(every: std::time::Duration) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    let Some(cur) = installed() else {
        return;
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let mut first = false;
    STARTED.call_once(|| first = true);
    if !first {
        return; // one per process (a standalone RM and its agent share it)
    }
    let files: Vec<PathBuf> = [
        Some(cur.files.ca_file.clone()),
        cur.files.cert_file.clone(),
        cur.files.key_file.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let stamps = |fs: &[PathBuf]| fs.iter().map(|f| stamp(f)).collect::<Vec<_>>();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file change only");
                None
            }
        };
        let mut seen = stamps(&files);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => {
                    let now = stamps(&files);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "the files changed"
                }
            };
            match reload() {
                Ok(Some((identity, not_after))) => tracing::info!(
                    why,
                    identity = %identity.map(|i| i.to_string()).unwrap_or_else(|| "none".into()),
                    not_after = not_after.as_deref().unwrap_or("-"),
                    "TLS certificates reloaded: new connections use them"
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(why, error = %e, "TLS certificates not reloaded: the files in use stay in use"),
            }
        }
    });
}

/// The identity of the client certificate a request came with, if any.
pub fn peer<T>(req: &tonic::Request<T>) -> Option<PeerIdentity> {
    let info = req.extensions().get::<crate::net::ConnInfo>()?;
    info.peer.as_deref().cloned()
}

/// Whether a request may act as `role`: without TLS (a loopback or
/// `insecure` process) anybody may (None); with it, only a caller whose
/// client certificate is of that role (its identity, read once). The
/// refusal names what the caller showed.
pub fn require_role<T>(
    req: &tonic::Request<T>,
    role: Role,
    what: &str,
) -> Result<Option<PeerIdentity>, tonic::Status> {
    if installed().is_none() {
        return Ok(None);
    }
    match peer(req) {
        Some(p) if p.role == Some(role) => Ok(Some(p)),
        Some(p) => Err(tonic::Status::permission_denied(format!(
            "{what} is accepted only from a {role} certificate; this connection showed {p}"
        ))),
        None => Err(tonic::Status::permission_denied(format!(
            "{what} is accepted only from a {role} certificate; this connection showed none"
        ))),
    }
}

/// Whether a daemon may serve on `listen` as configured: with TLS
/// anywhere; without it, on a loopback address, or elsewhere only when told
/// `insecure` (anyone who reaches the port is then everyone). The refusal
/// names the field and says how to secure it.
pub fn check_listen(
    listen: std::net::SocketAddr,
    tls: bool,
    insecure: bool,
    role: Role,
) -> Result<(), String> {
    if tls || insecure || listen.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "listen: {listen} is not a loopback address and no [tls] section is set: anyone who reaches it could act as anyone. Secure it (`rmctl tls ca create`, `rmctl tls cert create --role {role} --name NAME`, then a [tls] section with ca_file, cert_file and key_file), or set `insecure = true` to serve plaintext anyway"
    ))
}

/// Loads and installs the TLS settings of a process that serves nothing
/// (rmctl, an application master): the CA named by `ca` (a `WEFT_TLS_CA`
/// a container was given, a `--tls-ca` flag), with a client certificate if
/// one is named. Nothing without a CA.
pub fn setup_client(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<(), String> {
    let Some(ca) = ca else {
        if cert.is_some() || key.is_some() {
            return Err("--tls-ca: required with --tls-cert and --tls-key".into());
        }
        return Ok(());
    };
    let files = TlsFiles {
        ca_file: ca.to_path_buf(),
        cert_file: cert.map(Path::to_path_buf),
        key_file: key.map(Path::to_path_buf),
    };
    let tls = Tls::load(&files, "tls", None).map_err(|e| {
        e.replacen("tls.ca_file", "--tls-ca", 1)
            .replacen("tls.cert_file", "--tls-cert", 1)
            .replacen("tls.key_file", "--tls-key", 1)
    })?;
    install(tls);
    Ok(())
}

/// Loads and installs a daemon's TLS settings (`section` names the
/// config section in errors), or says once how it serves without them.
pub fn setup_daemon(
    files: Option<&TlsFiles>,
    role: Role,
    listen: std::net::SocketAddr,
) -> Result<(), String> {
    match files {
        Some(f) => {
            let tls = Tls::load(f, "tls", Some(role))?;
            let own = tls.own.clone();
            let not_after = tls.not_after.clone();
            install(tls);
            if let Some(own) = own {
                tracing::info!(identity = %own, not_after = not_after.as_deref().unwrap_or("-"), "mutual TLS on: serving TLS only (certificates reload on SIGHUP and when their files change)");
            }
        }
        None if listen.ip().is_loopback() => {
            tracing::warn!(%listen, "no [tls]: serving plaintext on loopback only")
        }
        None => tracing::warn!(
            %listen,
            "no [tls] and `insecure = true`: serving plaintext; anyone who reaches this port is everyone"
        ),
    }
    Ok(())
}

/// Files `rmctl tls` wrote.
#[derive(Debug, Clone)]
pub struct Made {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("--name: {name:?} must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "--name: {name:?} may hold only letters, digits, '.', '-' and '_'"
        ));
    }
    Ok(())
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{} exists: remove it first, or write to another --dir",
                    path.display()
                )
            } else {
                format!("{}: {e}", path.display())
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn validity(params: &mut rcgen::CertificateParams, days: u32) -> Result<(), String> {
    if days == 0 || days > 36_500 {
        return Err(format!("--days: {days} must be 1 to 36500"));
    }
    let now = time::OffsetDateTime::now_utc();
    // A day back: a peer whose clock is behind, or steps back while it
    // runs (NTP, a VM restored), accepts it (Weft's own tokens ride out
    // such steps; the certificates must too).
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days.into());
    Ok(())
}

/// The CA's files in `dir`.
pub fn ca_paths(dir: &Path) -> Made {
    Made {
        cert: dir.join("weft-ca.pem"),
        key: dir.join("weft-ca-key.pem"),
    }
}

/// Makes the cluster CA in `dir` (`weft-ca.pem`, `weft-ca-key.pem`, the key
/// readable by its owner only). Refuses to overwrite.
pub fn create_ca(dir: &Path, days: u32) -> Result<Made, String> {
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        // A name of its own: a peer of another cluster's CA is then told
        // "unknown issuer", not a bad signature.
        .push(
            rcgen::DnType::CommonName,
            format!("Weft cluster CA {:08x}", fastrand::u32(..)),
        );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days)?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let made = ca_paths(dir);
    write_new(&made.key, &key.serialize_pem(), true)?;
    write_new(&made.cert, &cert.pem(), false)?;
    Ok(made)
}

/// What `rmctl tls cert create` is asked for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub role: Role,
    pub name: String,
    /// More DNS names and addresses the certificate holds (for tools that
    /// check the host they dialled).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

/// Signs a certificate for `req` with the CA at `ca` and writes it to `dir`
/// as `ROLE-NAME.pem` and `ROLE-NAME-key.pem`. Refuses to overwrite.
pub fn create_cert(ca: &Made, dir: &Path, req: &CertRequest) -> Result<Made, String> {
    check_name(&req.name)?;
    let ca_pem = std::fs::read_to_string(&ca.cert)
        .map_err(|e| format!("--ca: {}: {e}", ca.cert.display()))?;
    let ca_key_pem = std::fs::read_to_string(&ca.key)
        .map_err(|e| format!("--ca-key: {}: {e}", ca.key.display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| format!("--ca-key: {}: not a private key: {e}", ca.key.display()))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| format!("--ca: {}: not a CA certificate: {e}", ca.cert.display()))?;
    let mut names = vec![req.role.dns_name().to_string()];
    for d in &req.dns {
        if !names.contains(d) {
            names.push(d.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| format!("--dns: {e}"))?;
    for ip in &req.ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(*ip));
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, req.name.as_str());
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match req.role {
        Role::Client => vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        Role::Rm | Role::Agent => vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, req.days)?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    let made = Made {
        cert: dir.join(format!("{}-{}.pem", req.role, req.name)),
        key: dir.join(format!("{}-{}-key.pem", req.role, req.name)),
    };
    write_new(&made.key, &key.serialize_pem(), true)?;
    write_new(&made.cert, &cert.pem(), false)?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(role: Role, name: &str) -> CertRequest {
        CertRequest {
            role,
            name: name.into(),
            dns: vec![],
            ips: vec![],
            days: 30,
        }
    }

    fn files(ca: &Made, m: &Made) -> TlsFiles {
        TlsFiles {
            ca_file: ca.cert.clone(),
            cert_file: Some(m.cert.clone()),
            key_file: Some(m.key.clone()),
        }
    }

    #[test]
    fn made_certificates_load_with_their_role_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(dir.path(), 10).unwrap();
        let rm = create_cert(&ca, dir.path(), &request(Role::Rm, "rm1")).unwrap();
        let tls = Tls::load(&files(&ca, &rm), "tls", Some(Role::Rm)).unwrap();
        assert_eq!(
            tls.own,
            Some(PeerIdentity {
                role: Some(Role::Rm),
                name: "rm1".into()
            })
        );
        assert!(tls.rustls_server().is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&rm.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a private key is its owner's only");
        let again = create_cert(&ca, dir.path(), &request(Role::Rm, "rm1")).unwrap_err();
        assert!(again.contains("exists"), "{again}");
    }

    #[test]
    fn a_server_picks_aes_128_with_sha_256_and_sends_no_tickets() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(dir.path(), 10).unwrap();
        let rm = create_cert(&ca, dir.path(), &request(Role::Rm, "rm1")).unwrap();
        let tls = Tls::load(&files(&ca, &rm), "tls", Some(Role::Rm)).unwrap();
        let mut server = rustls::ServerConnection::new(tls.rustls_server().unwrap()).unwrap();
        // A client as tonic makes one: the provider's default order (which
        // puts AES-256-GCM-SHA384 first), resumption on.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_file(&ca.cert).unwrap())
            .unwrap();
        let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tickets = Arc::new(rustls::client::ClientSessionMemoryCache::new(8));
        let mut client_cfg = client_cfg;
        client_cfg.resumption = rustls::client::Resumption::store(tickets.clone());
        assert_eq!(
            client_cfg.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_cfg),
            Role::Rm.dns_name().try_into().unwrap(),
        )
        .unwrap();
        let mut rounds = 0;
        while client.is_handshaking()
            || server.is_handshaking()
            || client.wants_write()
            || server.wants_write()
        {
            rounds += 1;
            assert!(rounds < 20, "the handshake ends");
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert_eq!(
            server.negotiated_cipher_suite().unwrap().suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        use rustls::client::ClientSessionStore;
        let name: rustls::pki_types::ServerName<'static> = Role::Rm.dns_name().try_into().unwrap();
        assert!(
            tickets.take_tls13_ticket(&name).is_none(),
            "the server sent a session ticket"
        );
    }

    #[test]
    fn a_wrong_role_another_ca_or_a_mismatched_key_is_refused_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_ca(dir.path(), 10).unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = create_ca(other_dir.path(), 10).unwrap();
        let agent = create_cert(&ca, dir.path(), &request(Role::Agent, "n1")).unwrap();
        let stranger = create_cert(&other, other_dir.path(), &request(Role::Rm, "rm1")).unwrap();

        let e = Tls::load(&files(&ca, &agent), "tls", Some(Role::Rm)).unwrap_err();
        assert!(
            e.starts_with("tls.cert_file:")
                && e.contains("agent certificate of \"n1\"")
                && e.contains("needs a rm certificate"),
            "{e}"
        );

        let e = Tls::load(&files(&ca, &stranger), "tls", Some(Role::Rm)).unwrap_err();
        assert!(
            e.starts_with("tls.cert_file:") && e.contains("not signed by the CA"),
            "{e}"
        );

        let mut mixed = files(&ca, &agent);
        mixed.key_file = Some(stranger.key.clone());
        let e = Tls::load(&mixed, "tls", Some(Role::Agent)).unwrap_err();
        assert!(
            e.starts_with("tls.key_file:") && e.contains("is not the key of"),
            "{e}"
        );

        let none = TlsFiles {
            ca_file: ca.cert.clone(),
            cert_file: None,
            key_file: None,
        };
        let e = Tls::load(&none, "tls", Some(Role::Agent)).unwrap_err();
        assert!(e.starts_with("tls.cert_file: required"), "{e}");
        assert!(
            Tls::load(&none, "tls", None).is_ok(),
            "a client may go without"
        );

        let e = Tls::load(
            &TlsFiles {
                ca_file: agent.cert.clone(),
                ..none.clone()
            },
            "tls",
            None,
        )
        .unwrap_err();
        assert!(
            e.starts_with("tls.ca_file:") && e.contains("not a CA"),
            "{e}"
        );

        let e = create_cert(&ca, dir.path(), &request(Role::Client, "a/b")).unwrap_err();
        assert!(e.starts_with("--name:"), "{e}");
    }
}
