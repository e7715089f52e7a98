//! `WEFT_TEST_SECURE=1`: the suite's clusters run secured, as a production
//! cluster is: every member, agent, master and client over mutual TLS with
//! certificates of one CA made by the real `rmctl tls`, and users on
//! (`[acl] enabled`), every client call carrying the admin token the first
//! leader makes from `[acl] initial_admin_token_file`. This process acts
//! with a member's certificate towards agents (as the RM does) and with the
//! admin token towards ClientService (as an operator does).
//!
//! Off (the default), every helper here gives what a plaintext cluster
//! needs, so the tests read the same either way. `.ci/run` runs the suite
//! both ways.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use weft_common::tls::{Role, Tls, TlsFiles};

/// Whether this run is the secured one.
pub fn on() -> bool {
    std::env::var("WEFT_TEST_SECURE").is_ok_and(|v| v == "1")
}

/// Prints why a test does not run secured, and says whether to skip it.
pub fn skip(why: &str) -> bool {
    if on() {
        eprintln!("skipped under WEFT_TEST_SECURE=1: {why}");
    }
    on()
}

pub struct Secure {
    dir: PathBuf,
    /// The admin token's secret (also in `token_file`).
    pub secret: String,
    token_file: PathBuf,
    /// Node names that have a certificate already.
    nodes: Mutex<Vec<String>>,
}

/// The directory of this process's CA, certificates and token: a static
/// is never dropped, so it is removed when the test process exits.
static TOP: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_top() {
    if let Some(d) = TOP.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The secured run's CA, certificates and admin secret (made once per test
/// process; this process's TLS installed with the members' certificate).
/// None when off.
pub fn get() -> Option<&'static Secure> {
    static S: OnceLock<Option<Secure>> = OnceLock::new();
    S.get_or_init(|| {
        if !on() {
            return None;
        }
        let top = TOP.get_or_init(|| tempfile::tempdir().unwrap().keep());
        // SAFETY: registers a plain function with no captured state.
        unsafe { libc::atexit(remove_top) };
        let dir = crate::tls::ca_dir(top);
        crate::tls::cert(&dir, "rm", "members");
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).unwrap();
        let secret = format!("weft_{}", hex::encode(raw));
        let token_file = top.join("admin.token");
        std::fs::write(&token_file, &secret).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        weft_common::tls::setup_client(
            Some(&dir.join("weft-ca.pem")),
            Some(&dir.join("rm-members.pem")),
            Some(&dir.join("rm-members-key.pem")),
        )
        .unwrap();
        Some(Secure {
            dir,
            secret,
            token_file,
            nodes: Mutex::new(Vec::new()),
        })
    })
    .as_ref()
}

impl Secure {
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("weft-ca.pem")
    }

    /// The tables a member's config gets.
    pub fn member_toml(&self) -> String {
        let d = &self.dir;
        format!(
            "\n[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n[acl]\nenabled = true\ninitial_admin_token_file = {:?}\n",
            d.join("weft-ca.pem"),
            d.join("rm-members.pem"),
            d.join("rm-members-key.pem"),
            self.token_file
        )
    }

    /// Makes the agent certificate of `node` (once).
    fn node_cert(&self, node: &str) {
        let mut made = self.nodes.lock().unwrap();
        if made.iter().any(|n| n == node) {
            return;
        }
        crate::tls::cert(&self.dir, "agent", node);
        made.push(node.to_string());
    }

    /// The `[tls]` table of the agent of `node` (its certificate made).
    pub fn agent_toml(&self, node: &str) -> String {
        self.node_cert(node);
        let d = &self.dir;
        format!(
            "\n[tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            d.join("weft-ca.pem"),
            d.join(format!("agent-{node}.pem")),
            d.join(format!("agent-{node}-key.pem")),
        )
    }

    /// TLS settings of the agent certificate of `node` (not installed: to
    /// act as that node towards the RM).
    pub fn as_node(&self, node: &str) -> Tls {
        self.node_cert(node);
        Tls::load(
            &TlsFiles {
                ca_file: self.dir.join("weft-ca.pem"),
                cert_file: Some(self.dir.join(format!("agent-{node}.pem"))),
                key_file: Some(self.dir.join(format!("agent-{node}-key.pem"))),
            },
            "tls",
            None,
        )
        .unwrap()
    }
}

/// Extra config tables of a member (empty when off, or when the test
/// secures its cluster itself).
pub fn member_toml(extra: &str) -> String {
    match get() {
        Some(s) if !extra.contains("[tls]") => s.member_toml(),
        _ => String::new(),
    }
}

/// Extra config tables of the agent of `node` (empty when off, or when the
/// test gives the agent its own).
pub fn agent_toml(node: &str, extra: &str) -> String {
    match get() {
        Some(s) if !extra.contains("[tls]") => s.agent_toml(node),
        _ => String::new(),
    }
}

/// A client of the group at `addrs` (with the admin token when secured).
pub fn client<I: IntoIterator<Item = String>>(addrs: I) -> weft_client::RmClient {
    let c = weft_client::RmClient::new(addrs).unwrap();
    match get() {
        Some(s) => c.with_token(&s.secret).unwrap(),
        None => c,
    }
}

/// A request carrying the admin token when secured.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(s) = get() {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", s.secret).parse().unwrap(),
        );
    }
    r
}

/// A channel to the `to` server at `addr` (a member or an agent): TLS with
/// this process's member certificate when secured.
pub async fn channel(addr: &str, to: Role) -> tonic::transport::Channel {
    try_channel(addr, to).await.unwrap()
}

/// [`channel`], or why it could not connect.
pub async fn try_channel(
    addr: &str,
    to: Role,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    get();
    weft_common::net::endpoint(addr, to, Duration::from_secs(2), None)?
        .connect()
        .await
}

/// A channel to the member at `addr` acting as node `node` (its agent
/// certificate when secured).
pub async fn channel_as_node(addr: &str, node: &str) -> tonic::transport::Channel {
    match get() {
        Some(s) => crate::tls::channel(addr, &s.as_node(node)).await,
        None => channel(addr, Role::Rm).await,
    }
}

/// `rmctl` arguments and environment that reach a secured cluster.
pub fn rmctl_setup(cmd: &mut std::process::Command) {
    if let Some(s) = get() {
        cmd.arg("--tls-ca").arg(s.ca_file());
        cmd.env("WEFT_TOKEN", &s.secret);
    }
}

/// Environment a master started by a test needs (the CA when secured).
pub fn master_env() -> Vec<(String, String)> {
    match get() {
        Some(s) => vec![("WEFT_TLS_CA".into(), s.ca_file().display().to_string())],
        None => Vec::new(),
    }
}
