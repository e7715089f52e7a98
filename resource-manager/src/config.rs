//! Resource-manager configuration: defaults, a TOML file, then flags;
//! [`RmConfig::validate`] runs before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmConfig {
    /// This member's raft id (1, 2, 3...). Must be a key of `peers`.
    pub id: u64,
    /// Address every service of this member listens on.
    pub listen: SocketAddr,
    /// Raft log, hard state and snapshots.
    pub data_dir: PathBuf,
    /// Every initial member: raft id -> address (host:port) others reach it at.
    /// A joining member lists the members it joins, and itself.
    pub peers: BTreeMap<String, String>,
    /// Join an existing group (added with `rmctl cluster add-member`) instead
    /// of bootstrapping a new one. Only read when the data dir is empty.
    pub join: bool,
    pub raft: RaftConfig,
    /// How the leader starts application masters.
    pub masters: MastersConfig,
    /// Interval node agents are asked to heartbeat at.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Queue tree (`root` is implied). The leader makes the replicated queue
    /// configuration match this list when it takes office.
    pub queues: Vec<QueueConfig>,
    /// A node silent for this long is declared LOST and its tasks may run
    /// elsewhere; its agent kills its containers before this bound passes
    /// without an answer (it fences itself). A new leader first waits this
    /// long itself (plus two election timeouts), so an election never causes
    /// false losses. 30 s by default: long enough for a real network's
    /// hiccups and a leader failover, short enough to rerun lost work soon.
    #[serde(with = "humantime_serde")]
    pub node_expiry: Duration,
    /// How long the state keeps the containers of finished applications
    /// (their reports, task logs by name); then they are dropped.
    #[serde(with = "humantime_serde")]
    pub container_retention: Duration,
    /// How long the state keeps finished applications (their reports,
    /// and their submissions' request ids); then they are dropped.
    #[serde(with = "humantime_serde")]
    pub finished_app_retention: Duration,
    /// The most finished applications the state keeps; the oldest go
    /// first (YARN's `max-completed-applications`).
    pub max_finished_apps: u64,
    /// Mutual TLS for every connection (files made by `rmctl tls`).
    pub tls: Option<weft_common::tls::TlsFiles>,
    /// Serve plaintext on a non-loopback `listen` (refused without this
    /// when `tls` is not set).
    pub insecure: bool,
    /// Who may call what (users' tokens and certificates).
    pub acl: AclConfig,
    /// A JSON line for every write asked of this member (who, what, from
    /// where, outcome) is appended to this file.
    pub audit_log: Option<PathBuf>,
    /// HTTP beside gRPC: the REST API (`/v1/...`, `/openapi.json`) and
    /// `/metrics`.
    pub http: HttpConfig,
    /// Task logs that outlive their node.
    pub logs: LogsConfig,
    /// Preemption: queues under their guarantee take capacity back.
    pub preemption: PreemptionConfig,
}

/// `[preemption]`: when the leader stops running containers so that
/// waiting ones fit (see `docs/resource-manager.md`, "Preemption").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreemptionConfig {
    /// Off by default: a queue under its guarantee waits for borrowed
    /// capacity to drain by itself.
    pub enabled: bool,
    /// A container runs at least this long before it may be preempted.
    #[serde(with = "humantime_serde")]
    pub min_runtime: Duration,
    /// A task (an application's ask) is preempted at most this many times
    /// an hour.
    pub max_per_hour: u32,
    /// Most containers one round preempts.
    pub max_per_round: usize,
}

impl Default for PreemptionConfig {
    fn default() -> Self {
        PreemptionConfig {
            enabled: false,
            min_runtime: Duration::from_secs(60),
            max_per_hour: 3,
            max_per_round: 64,
        }
    }
}

/// `[logs]`: where ended tasks' logs are kept off their nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// The directory agents copy ended containers' logs to (their `[logs]
    /// aggregate_dir`, a shared file system): a task's logs are read from
    /// it when its node cannot give them (lost, gone, or past its
    /// retention).
    pub aggregate_dir: Option<PathBuf>,
}

/// `[http]`: what the member serves over HTTP (HTTPS with its certificate
/// where it has `[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where to serve it; unset, nothing is served.
    pub listen: Option<std::net::SocketAddr>,
    /// `host:port` where users and the other members reach it, when that is
    /// not `listen` (a proxy, a NAT). Unset: `listen`, or, where `listen`
    /// is a wildcard (0.0.0.0, ::), this member's host in `peers` with
    /// `listen`'s port. Followers send REST writes on to the leader's.
    pub advertise: Option<String>,
}

impl HttpConfig {
    /// This member's HTTP base URL, once `listen` is bound to `bound`;
    /// `peer` is its own raft address (host:port).
    pub fn url(&self, bound: std::net::SocketAddr, peer: &str, tls: bool) -> String {
        let scheme = if tls { "https" } else { "http" };
        let host_port = match &self.advertise {
            Some(a) => a.clone(),
            None if bound.ip().is_unspecified() => {
                let host = peer.rsplit_once(':').map(|(h, _)| h).unwrap_or(peer);
                format!("{host}:{}", bound.port())
            }
            None => bound.to_string(),
        };
        format!("{scheme}://{host_port}")
    }

    fn validate(&self) -> Result<()> {
        let Some(a) = &self.advertise else {
            return Ok(());
        };
        let bad = |why: &str| Err(Error::Config(format!("http.advertise: {a:?} {why}")));
        if self.listen.is_none() {
            return bad("is set but http.listen is not (nothing is served)");
        }
        let what = "is not host:port (a host name, an IPv4 address or a [bracketed] IPv6 address, and a port from 1 to 65535)";
        let Ok(auth) = a.parse::<axum::http::uri::Authority>() else {
            return bad(what);
        };
        let host = auth.host();
        if auth.as_str() != a
            || host.is_empty()
            || a.contains('@')
            || auth.port_u16().is_none_or(|p| p == 0)
            || (host.contains(':') && !host.starts_with('['))
        {
            return bad(what);
        }
        Ok(())
    }
}

/// Users and what they may do. Off, every caller may do anything and is the
/// user it says it is; on, every ClientService call needs a user's token
/// (`authorization: Bearer ...`) or a client certificate, a user sees and
/// kills only their own applications (or those of queues they administer),
/// and queues, members, drains and tokens are for admins. Every member of a
/// group should have the same setting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    pub enabled: bool,
    /// Users who are admins whatever their token says (e.g. a client
    /// certificate's name: an operator who holds the CA can always mint
    /// one, so a cluster whose admin tokens are lost is not locked out).
    pub admins: Vec<String>,
    /// A file (mode 0600) holding the secret of the first admin token
    /// (`weft_` and 64 hex digits, e.g. `echo "weft_$(openssl rand -hex
    /// 32)"`): the first leader makes that token, as `rmctl acl
    /// bootstrap` would, so a deployment tool can secure a cluster without
    /// a step after it starts. Until it is made, calls with it are told to
    /// try again (UNAVAILABLE), not refused.
    pub initial_admin_token_file: Option<PathBuf>,
    /// The secret read from `initial_admin_token_file` (by
    /// [`AclConfig::read_initial_admin_token`]).
    #[serde(skip)]
    pub initial_admin_secret: Option<String>,
    /// Users from an OpenID Connect issuer: bearer JWTs it signed name
    /// their user (see [`crate::service::oidc`]).
    pub oidc: Option<crate::service::oidc::OidcConfig>,
}

impl AclConfig {
    /// Reads `initial_admin_token_file` into `initial_admin_secret`: the
    /// file must be readable by its owner only and hold one secret.
    pub fn read_initial_admin_token(&mut self) -> Result<()> {
        let Some(path) = &self.initial_admin_token_file else {
            return Ok(());
        };
        let bad = |why: String| {
            Error::Config(format!(
                "acl.initial_admin_token_file: {}: {why}",
                path.display()
            ))
        };
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "may be read by others (mode {:o}): `chmod 600` it",
                mode & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let secret = text.trim();
        if !crate::service::auth::is_secret(secret) {
            return Err(bad("must hold one secret: `weft_` and 64 hex digits".into()));
        }
        self.initial_admin_secret = Some(secret.to_string());
        Ok(())
    }

    /// Checks `[acl.oidc]` and reads its JWKS file (a member whose file
    /// does not load does not start).
    pub fn load_oidc(&self) -> Result<()> {
        let Some(oidc) = &self.oidc else {
            return Ok(());
        };
        if !self.enabled {
            return Err(Error::Config(
                "acl.oidc: users from an OIDC issuer need acl.enabled = true".into(),
            ));
        }
        oidc.load().map_err(Error::Config)
    }
}

impl Default for RmConfig {
    fn default() -> Self {
        RmConfig {
            id: 1,
            listen: "127.0.0.1:7100".parse().expect("literal address"),
            data_dir: PathBuf::from("/var/lib/weft/rm"),
            peers: BTreeMap::new(),
            join: false,
            raft: RaftConfig::default(),
            masters: MastersConfig::default(),
            heartbeat_interval: Duration::from_secs(1),
            node_expiry: Duration::from_secs(30),
            container_retention: Duration::from_secs(3600),
            finished_app_retention: Duration::from_secs(7 * 24 * 3600),
            max_finished_apps: 10_000,
            queues: Vec::new(),
            tls: None,
            insecure: false,
            acl: AclConfig::default(),
            audit_log: None,
            http: HttpConfig::default(),
            logs: LogsConfig::default(),
            preemption: PreemptionConfig::default(),
        }
    }
}

/// One queue of the tree, as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Dotted path under root, e.g. `root.research.vision`; parents first.
    pub name: String,
    pub guaranteed: QueueResources,
    /// Unset fields mean no maximum.
    pub maximum: QueueResources,
    pub weight: Option<u32>,
    /// Users allowed to submit; empty = everyone.
    pub submit_acl: Vec<String>,
    /// Most one user may use in this queue; unset fields mean no limit.
    pub user_limit: QueueResources,
    /// Users who administer this queue and the queues under it: they see
    /// and kill every application in them (with `[acl]` on).
    pub admin_acl: Vec<String>,
    /// With `[preemption]` on: a higher priority in this queue may preempt
    /// a lower one of it.
    pub priority_preemption: bool,
    /// The longest grace this queue's preempted containers get, whatever
    /// their stage asks.
    #[serde(with = "humantime_serde")]
    pub max_preemption_grace: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueResources {
    pub vcores: Option<f64>,
    pub memory: Option<bytesize::ByteSize>,
    pub gpus: Option<u32>,
}

impl QueueConfig {
    pub fn to_spec(&self) -> crate::fsm::QueueSpec {
        let g = &self.guaranteed;
        let m = &self.maximum;
        crate::fsm::QueueSpec {
            name: self.name.clone(),
            guaranteed_vcores_milli: g.vcores.map_or(0, |v| (v * 1000.0) as u64),
            guaranteed_memory_bytes: g.memory.map_or(0, |b| b.as_u64()),
            guaranteed_gpus: g.gpus.unwrap_or(0),
            max_vcores_milli: m.vcores.map_or(0, |v| (v * 1000.0) as u64),
            max_memory_bytes: m.memory.map_or(0, |b| b.as_u64()),
            max_gpus: m.gpus.unwrap_or(0),
            weight: self.weight.unwrap_or(1),
            submit_acl: self.submit_acl.clone(),
            user_limit_vcores_milli: self.user_limit.vcores.map_or(0, |v| (v * 1000.0) as u64),
            user_limit_memory_bytes: self.user_limit.memory.map_or(0, |b| b.as_u64()),
            user_limit_gpus: self.user_limit.gpus.unwrap_or(0),
            admin_acl: self.admin_acl.clone(),
            priority_preemption: self.priority_preemption,
            max_preemption_grace_ms: self
                .max_preemption_grace
                .map_or(0, |d| d.as_millis().max(1) as u64),
        }
    }
}

/// `[[queues]]` tables alone (what `rmctl queue set` sends).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuesFile {
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
}

/// Parses and checks a queues file: the specs to replicate, `root` first.
pub fn parse_queues(text: &str) -> Result<Vec<crate::fsm::QueueSpec>> {
    let f: QueuesFile = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
    let specs = queue_specs(&f.queues);
    crate::scheduler::Queues::from_specs(&specs).map_err(Error::Config)?;
    Ok(specs)
}

/// The configured queues as replicated specs, `root` first.
pub fn queue_specs(queues: &[QueueConfig]) -> Vec<crate::fsm::QueueSpec> {
    let mut out = Vec::new();
    if !queues.iter().any(|q| q.name == "root") {
        out.push(
            QueueConfig {
                name: "root".into(),
                ..Default::default()
            }
            .to_spec(),
        );
    }
    out.extend(queues.iter().map(QueueConfig::to_spec));
    out
}

/// Application masters: one per job attempt, started by the leader in a
/// container on a node it picks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MastersConfig {
    /// Start masters for submitted jobs. Off: masters are run by hand (or by
    /// another system) through the ApplicationMasterService.
    pub launch: bool,
    /// The `app-master` program as the nodes see it.
    pub command: String,
    /// Resources of a master whose job spec names none (`am:`).
    pub vcores: f64,
    pub memory: bytesize::ByteSize,
    /// A master that makes no call for this long is ended and replaced (an
    /// Allocate call waits at most a third of it, so a master waiting in
    /// one is never taken for a silent one).
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// How long a master keeps retrying while no RM leader answers (a
    /// whole-group outage) before it gives up its attempt; its tasks keep
    /// running meanwhile. Handed to masters as `WEFT_RM_RETRY_FOR`.
    #[serde(with = "humantime_serde")]
    pub rm_retry_for: Duration,
    /// Run each job's master as a task inside the leader instead of in a
    /// container (standalone mode); `command`, `vcores`, `memory` and
    /// `expiry` then do not apply.
    pub in_process: bool,
}

impl Default for MastersConfig {
    fn default() -> Self {
        MastersConfig {
            launch: true,
            command: "app-master".into(),
            vcores: 0.5,
            memory: bytesize::ByteSize::mib(256),
            expiry: Duration::from_secs(60),
            rm_retry_for: Duration::from_secs(15 * 60),
            in_process: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Raft's clock.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Snapshot the state and compact the log every this many entries.
    pub snapshot_every: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 1000,
        }
    }
}

impl RmConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Peers with numeric ids. Without peers, this member alone (at `listen`).
    pub fn peer_map(&self) -> Result<BTreeMap<u64, String>> {
        if self.peers.is_empty() {
            return Ok(BTreeMap::from([(self.id, self.listen.to_string())]));
        }
        let mut m = BTreeMap::new();
        for (k, v) in &self.peers {
            let id: u64 = k.parse().ok().filter(|&i| i > 0).ok_or_else(|| {
                Error::Config(format!("peers: {k:?} is not a raft id (a number above 0)"))
            })?;
            if v.is_empty() {
                return Err(Error::Config(format!(
                    "peers.{k}: address must not be empty"
                )));
            }
            m.insert(id, v.clone());
        }
        Ok(m)
    }

    pub fn validate(&self) -> Result<()> {
        if self.id == 0 {
            return Err(Error::Config("id: must be above 0".into()));
        }
        let peers = self.peer_map()?;
        if !peers.contains_key(&self.id) {
            return Err(Error::Config(format!(
                "peers: must list this member's id {}",
                self.id
            )));
        }
        if self.raft.heartbeat_ticks == 0 || self.raft.election_ticks <= self.raft.heartbeat_ticks {
            return Err(Error::Config(
                "raft.election_ticks: must be greater than raft.heartbeat_ticks (and that above 0)"
                    .into(),
            ));
        }
        self.http.validate()?;
        if let Some(d) = &self.logs.aggregate_dir {
            if !d.is_absolute() {
                return Err(Error::Config(
                    "logs.aggregate_dir: must be an absolute path".into(),
                ));
            }
        }
        if self.raft.tick < Duration::from_millis(1) {
            return Err(Error::Config("raft.tick: must be at least 1ms".into()));
        }
        if self.node_expiry <= self.heartbeat_interval {
            return Err(Error::Config(
                "node_expiry: must be longer than heartbeat_interval".into(),
            ));
        }
        // The same rules the scheduler's queue tree applies.
        crate::scheduler::Queues::from_specs(&queue_specs(&self.queues)).map_err(Error::Config)?;
        if self.finished_app_retention < Duration::from_secs(1) {
            return Err(Error::Config(
                "finished_app_retention: must be at least 1s".into(),
            ));
        }
        if self.max_finished_apps == 0 {
            return Err(Error::Config(
                "max_finished_apps: must be at least 1 (a finished application is kept until it is read)".into(),
            ));
        }
        if self.raft.snapshot_every == 0 {
            return Err(Error::Config("raft.snapshot_every: must be above 0".into()));
        }
        if self.masters.expiry < Duration::from_secs(1) {
            return Err(Error::Config("masters.expiry: must be at least 1s".into()));
        }
        if self.masters.rm_retry_for < Duration::from_secs(1) {
            return Err(Error::Config(
                "masters.rm_retry_for: must be at least 1s".into(),
            ));
        }
        // Users without TLS are users in name only: anyone could pose as a
        // node (ResourceTracker takes a node's word without certificates)
        // and tokens would cross the network readable.
        if self.acl.enabled && self.tls.is_none() && !self.insecure {
            return Err(Error::Config(
                "acl.enabled: needs a [tls] section (without it any caller can pose as a node and tokens cross the network in clear); set `insecure = true` to run users over plaintext anyway (tests, a single trusted host)".into(),
            ));
        }
        // The REST API on the HTTP port is the ClientService: the same
        // rule as the gRPC port's.
        if let Some(h) = self.http.listen {
            weft_common::tls::check_listen(
                h,
                self.tls.is_some(),
                self.insecure,
                weft_common::tls::Role::Rm,
            )
            .map_err(|e| Error::Config(format!("http.{e}")))?;
        }
        // Last: a field that is wrong anyway is named first.
        weft_common::tls::check_listen(
            self.listen,
            self.tls.is_some(),
            self.insecure,
            weft_common::tls::Role::Rm,
        )
        .map_err(Error::Config)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_http_url_is_advertise_or_the_bound_address_or_the_peers_host() {
        let h = HttpConfig {
            listen: Some("0.0.0.0:7180".parse().unwrap()),
            advertise: None,
        };
        assert!(h.validate().is_ok());
        let any: std::net::SocketAddr = "0.0.0.0:7180".parse().unwrap();
        assert_eq!(
            h.url(any, "rm1.example:7100", true),
            "https://rm1.example:7180"
        );
        assert_eq!(h.url(any, "[fd00::1]:7100", false), "http://[fd00::1]:7180");
        let lo: std::net::SocketAddr = "127.0.0.1:41000".parse().unwrap();
        assert_eq!(h.url(lo, "whatever:1", false), "http://127.0.0.1:41000");
        let a = HttpConfig {
            advertise: Some("lb.example:443".into()),
            ..h.clone()
        };
        assert!(a.validate().is_ok());
        assert_eq!(a.url(any, "rm1:7100", true), "https://lb.example:443");
        for good in ["[fd00::1]:443", "10.0.0.1:7180", "rm-1.example.com:80"] {
            let g = HttpConfig {
                advertise: Some(good.into()),
                ..h.clone()
            };
            assert!(g.validate().is_ok(), "{good}");
        }
        for bad in [
            "https://lb:443",
            "lb",
            "lb:0",
            "lb:http",
            ":80",
            "lb/x:80",
            "fd00::1:443",
            "u@lb:80",
            "lb\\x:80",
            "l b:80",
        ] {
            let e = HttpConfig {
                advertise: Some(bad.into()),
                ..h.clone()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains("http.advertise"), "{bad}: {e}");
        }
        let e = HttpConfig {
            listen: None,
            advertise: Some("lb:80".into()),
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("http.listen is not"), "{e}");
    }

    #[test]
    fn the_initial_admin_token_file_is_read_only_when_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("admin.token");
        let mut acl = AclConfig {
            enabled: true,
            initial_admin_token_file: Some(f.clone()),
            ..Default::default()
        };
        let err = |acl: &mut AclConfig| acl.read_initial_admin_token().unwrap_err().to_string();
        assert!(
            err(&mut acl).contains("acl.initial_admin_token_file"),
            "missing file"
        );
        let secret = format!("weft_{}", "0f".repeat(32));
        std::fs::write(&f, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(err(&mut acl).contains("may be read by others (mode 644)"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        acl.read_initial_admin_token().unwrap();
        assert_eq!(acl.initial_admin_secret.as_deref(), Some(secret.as_str()));
        std::fs::write(&f, "hunter2").unwrap();
        assert!(err(&mut acl).contains("`weft_` and 64 hex digits"));
    }
    use super::*;

    #[test]
    fn the_deployment_examples_are_valid_configs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deploy");
        for i in 1..=3 {
            let c = RmConfig::load(&dir.join(format!("rm-{i}.toml"))).unwrap();
            c.validate().unwrap();
            assert_eq!(c.id, i);
            assert_eq!(c.peers.len(), 3);
            assert_eq!(c.queues.len(), 2);
            assert!(c.acl.enabled);
            assert_eq!(c.queues[0].admin_acl, vec!["research-lead".to_string()]);
        }
    }

    #[test]
    fn parses_and_validates() {
        let c = RmConfig::from_toml(
            "id = 2\nlisten = \"127.0.0.1:7102\"\ndata_dir = \"/tmp/rm2\"\n[peers]\n1 = \"127.0.0.1:7101\"\n2 = \"127.0.0.1:7102\"\n3 = \"127.0.0.1:7103\"\n[raft]\ntick = \"50ms\"\nsnapshot_every = 10\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.peer_map().unwrap().len(), 3);
        assert_eq!(c.raft.tick, Duration::from_millis(50));
        let mut bad = c.clone();
        bad.id = 4;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("peers: must list this member's id 4"));
        let mut bad = c.clone();
        bad.acl.enabled = true;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("acl.enabled: needs a [tls] section"));
        bad.insecure = true;
        bad.validate().unwrap();
        let mut bad = c.clone();
        bad.max_finished_apps = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_finished_apps: must be at least 1"));
        let mut bad = c.clone();
        bad.finished_app_retention = Duration::from_millis(10);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("finished_app_retention: must be at least 1s"));
        let mut bad = c;
        bad.peers.insert("x".into(), "h:1".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("\"x\" is not a raft id"));
        assert!(RmConfig::from_toml("idd = 1")
            .unwrap_err()
            .to_string()
            .contains("idd"));
    }
}
