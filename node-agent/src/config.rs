//! Agent configuration: defaults, then a TOML file, then command-line flags.
//! [`AgentConfig::validate`] runs before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration of one node agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Node id reported to the RM; defaults to the hostname.
    pub node_id: Option<String>,
    /// Address the ContainerManager service listens on.
    pub listen: SocketAddr,
    /// Address the RM and app masters use to reach this agent; defaults to `listen`
    /// (with the bound port when `listen` asks for port 0).
    pub advertise_address: Option<String>,
    /// Resource-manager members (host:port). Empty: the agent runs unregistered.
    pub rm_addresses: Vec<String>,
    /// Root of container work directories and logs.
    pub work_dir: PathBuf,
    /// Node labels (e.g. `gpu = "a100"`), reported at registration.
    pub labels: BTreeMap<String, String>,
    pub resources: ResourcesConfig,
    pub containers: ContainersConfig,
    pub logs: LogsConfig,
    pub gpu: GpuConfig,
    pub heartbeat: HeartbeatConfig,
    pub security: SecurityConfig,
    pub ports: PortsConfig,
    /// Mutual TLS for every connection (files made by `rmctl tls`).
    pub tls: Option<weft_common::tls::TlsFiles>,
    /// Serve plaintext on a non-loopback `listen` (refused without this
    /// when `tls` is not set).
    pub insecure: bool,
    /// HTTP beside gRPC: `/metrics`.
    pub http: HttpConfig,
}

/// `[http]`: what the agent serves over HTTP (HTTPS with its certificate
/// where it has `[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where to serve it; unset, nothing is served.
    pub listen: Option<SocketAddr>,
}

/// Ports the RM hands to this node's containers (gang addresses, named
/// `ports:` of a stage): each container gets its own, never one bound on
/// the node by anything else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortsConfig {
    /// First port of the range (inclusive).
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl Default for PortsConfig {
    fn default() -> Self {
        PortsConfig {
            first: 20000,
            last: 32000,
        }
    }
}

/// Container tokens: the agent starts a container only with a token the
/// resource manager signed for it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// The RM group's public key (hex, 64 digits). When set, only it is
    /// trusted; when not, the key the RM hands out at registration is used
    /// (and until then nothing can start).
    pub token_public_key: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_id: None,
            listen: "0.0.0.0:7200".parse().expect("literal address"),
            advertise_address: None,
            rm_addresses: Vec::new(),
            work_dir: PathBuf::from("/var/lib/weft/agent"),
            labels: BTreeMap::new(),
            resources: ResourcesConfig::default(),
            containers: ContainersConfig::default(),
            logs: LogsConfig::default(),
            gpu: GpuConfig::default(),
            heartbeat: HeartbeatConfig::default(),
            security: SecurityConfig::default(),
            ports: PortsConfig::default(),
            tls: None,
            insecure: false,
            http: HttpConfig::default(),
        }
    }
}

/// What the node offers: discovered, minus reserved, unless overridden.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Cores kept for the system and the agent itself.
    pub reserved_vcores: f64,
    /// Memory kept for the system and the agent itself.
    pub reserved_memory: ByteSize,
    /// Offer exactly this many cores instead of the discovered count.
    pub vcores: Option<f64>,
    /// Offer exactly this much memory instead of the discovered amount.
    pub memory: Option<ByteSize>,
}

/// Which isolation driver runs containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriverChoice {
    /// cgroup v2 when usable, else cgroup v1, else the procfs monitor.
    Auto,
    CgroupV2,
    CgroupV1,
    Procfs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainersConfig {
    pub driver: DriverChoice,
    /// Name of the cgroup (in each hierarchy) under which this agent's
    /// containers live; also scopes the procfs driver. One per agent.
    pub cgroup_parent: String,
    /// How often each container's usage is checked against its quotas.
    #[serde(with = "humantime_serde")]
    pub monitor_interval: Duration,
    /// Default time between SIGTERM and SIGKILL when stopping a container.
    #[serde(with = "humantime_serde")]
    pub stop_grace_period: Duration,
    /// pids limit for containers that do not ask for one.
    pub default_pids_limit: u32,
    /// Keep a container's work directory after it ends.
    pub keep_work_dirs: bool,
    /// How many of a tree's biggest processes a quota-kill diagnostic lists.
    pub diagnostic_processes: usize,
    /// Program run as `<shim> __weft-shim` between the agent and each
    /// container (it lets containers outlive an agent restart); default:
    /// the agent's own program.
    pub shim: Option<PathBuf>,
    /// Run each task as its application's user: the uid, gid and groups
    /// that user has on this node; its work dir and logs are that user's,
    /// readable by it alone. A user missing here is refused at start.
    /// Needs the agent to run as root. Off: tasks run as the agent's user.
    pub run_as_user: bool,
    /// With `run_as_user`: the queues whose tasks may run as root (a job
    /// submitted by root elsewhere is refused).
    pub root_queues: Vec<String>,
    /// Where tasks' checkpoints live (`<dir>/<application>/<task>`, a
    /// task's WEFT_CHECKPOINT_DIR and its work dir's `checkpoint`): a
    /// shared file system lets a preempted task resume on another node.
    /// Default: `<work_dir>/checkpoints` (a rerun on this node only).
    pub checkpoint_dir: Option<PathBuf>,
    /// An application's checkpoints are removed once nothing in them
    /// changed for this long and none of its containers runs here.
    #[serde(with = "humantime_serde")]
    pub checkpoint_retention: Duration,
}

impl Default for ContainersConfig {
    fn default() -> Self {
        ContainersConfig {
            driver: DriverChoice::Auto,
            cgroup_parent: "weft".into(),
            monitor_interval: Duration::from_millis(250),
            stop_grace_period: Duration::from_secs(5),
            default_pids_limit: 4096,
            keep_work_dirs: false,
            diagnostic_processes: 5,
            shim: None,
            run_as_user: false,
            root_queues: Vec::new(),
            checkpoint_dir: None,
            checkpoint_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// How long logs of an ended container are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Total size of ended containers' logs kept; the oldest go first past it.
    pub disk_budget: ByteSize,
    /// How often retention is applied.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Log reads (ReadLogs streams, following or not) served at once; one
    /// more is refused with RESOURCE_EXHAUSTED until one ends. Each holds
    /// an open file and a task, so without a bound a client could exhaust
    /// the agent.
    pub max_streams: usize,
    /// Log aggregation: when a container ends its stdout and stderr are
    /// copied to `<aggregate_dir>/<container id>/` (a shared file system
    /// the resource manager reads too, its `[logs] aggregate_dir`), so they
    /// outlive this node and its retention. Unset: kept here only.
    pub aggregate_dir: Option<std::path::PathBuf>,
    /// The most of each stream copied: its last bytes past this.
    pub aggregate_max: ByteSize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            retention: Duration::from_secs(24 * 3600),
            disk_budget: ByteSize::gib(1),
            sweep_interval: Duration::from_secs(60),
            max_streams: 256,
            aggregate_dir: None,
            aggregate_max: ByteSize::mib(64),
        }
    }
}

/// Where GPUs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuProbeChoice {
    /// NVIDIA's NVML; no driver means zero GPUs (said once in the log).
    Nvml,
    /// No GPUs.
    None,
    /// The devices listed in `gpu.fake` (for tests and demos on machines without GPUs).
    Fake,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub probe: GpuProbeChoice,
    pub fake: FakeGpuConfig,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            probe: GpuProbeChoice::Nvml,
            fake: FakeGpuConfig::default(),
        }
    }
}

/// A configured set of fake GPUs. Per-process GPU memory is read from
/// `usage_dir`: a file named after a pid holding lines `<uuid> <bytes>` says
/// that process uses that much memory on that device, as NVML would report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeGpuConfig {
    pub devices: Vec<FakeGpuDevice>,
    pub usage_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpuDevice {
    pub uuid: String,
    pub model: String,
    pub memory: ByteSize,
    /// Minor number of its device file (major 195); the device's index when absent.
    #[serde(default)]
    pub minor: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// Time between heartbeats (the RM may ask for another).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest wait between retries while no RM answers; keep it well under
    /// the RM's `node_expiry`, which a new leader gives every node from its
    /// election (tries against a member that is down cost next to nothing).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl AgentConfig {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("reading config", path, e))?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Checks what serde cannot: ranges and relations between fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::Config(format!("{field}: {why}")));
        if let Some(id) = &self.node_id {
            if id.is_empty() {
                return bad("node_id", "must not be empty");
            }
        }
        if !valid_name(&self.containers.cgroup_parent) {
            return bad(
                "containers.cgroup_parent",
                "must be 1-64 characters of letters, digits, '-', '_' or '.', not starting with '.'",
            );
        }
        if self.containers.monitor_interval < Duration::from_millis(10) {
            return bad("containers.monitor_interval", "must be at least 10ms");
        }
        if self.containers.default_pids_limit == 0 {
            return bad("containers.default_pids_limit", "must be at least 1");
        }
        if self.heartbeat.interval.is_zero() {
            return bad("heartbeat.interval", "must be greater than zero");
        }
        if let Some(d) = &self.logs.aggregate_dir {
            if !d.is_absolute() {
                return bad("logs.aggregate_dir", "must be an absolute path");
            }
        }
        if self.logs.aggregate_max.as_u64() == 0 {
            return bad("logs.aggregate_max", "must be above 0");
        }
        if self.logs.max_streams == 0 {
            return bad("logs.max_streams", "must be at least 1");
        }
        if self.logs.sweep_interval.is_zero() {
            return bad("logs.sweep_interval", "must be greater than zero");
        }
        if self.resources.reserved_vcores.is_nan() || self.resources.reserved_vcores < 0.0 {
            return bad("resources.reserved_vcores", "must be zero or more");
        }
        if let Some(v) = self.resources.vcores {
            if v.is_nan() || v <= 0.0 {
                return bad("resources.vcores", "must be greater than zero");
            }
        }
        if self.ports.first == 0 || self.ports.first > self.ports.last {
            return bad(
                "ports",
                "first must be 1 or more and at most last (the range is inclusive)",
            );
        }
        if let Some(k) = &self.security.token_public_key {
            if let Err(e) = weft_proto::token::TokenVerifier::from_hex(k) {
                return bad("security.token_public_key", &e.to_string());
            }
        }
        if self.gpu.probe == GpuProbeChoice::Fake {
            let mut seen = std::collections::HashSet::new();
            for d in &self.gpu.fake.devices {
                if d.uuid.is_empty() {
                    return bad("gpu.fake.devices.uuid", "must not be empty");
                }
                if !seen.insert(&d.uuid) {
                    return bad(
                        "gpu.fake.devices.uuid",
                        &format!("{} appears twice", d.uuid),
                    );
                }
            }
        }
        // Last: a field that is wrong anyway is named first.
        weft_common::tls::check_listen(
            self.listen,
            self.tls.is_some(),
            self.insecure,
            weft_common::tls::Role::Agent,
        )
        .map_err(Error::Config)
    }
}

/// A name safe to use as one path component: cgroup and directory names.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deployment_example_is_a_valid_config() {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deploy/agent.toml");
        let c = AgentConfig::load(&p).unwrap();
        c.validate().unwrap();
        assert_eq!(c.rm_addresses.len(), 3);
        assert!(c.containers.run_as_user);
    }

    #[test]
    fn parses_a_full_file_and_validates() {
        let c = AgentConfig::from_toml(
            r#"
            node_id = "gpu-7"
            listen = "127.0.0.1:0"
            rm_addresses = ["127.0.0.1:7100"]
            work_dir = "/tmp/x"
            labels = { gpu = "a100" }
            [resources]
            reserved_vcores = 1.5
            reserved_memory = "2GiB"
            [containers]
            driver = "cgroup-v1"
            monitor_interval = "100ms"
            stop_grace_period = "2s"
            [logs]
            retention = "1h"
            disk_budget = "10MiB"
            [gpu]
            probe = "fake"
            [[gpu.fake.devices]]
            uuid = "GPU-1"
            model = "A100"
            memory = "40GiB"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.containers.driver, DriverChoice::CgroupV1);
        assert_eq!(c.containers.monitor_interval, Duration::from_millis(100));
        assert_eq!(c.resources.reserved_memory, ByteSize::gib(2));
        assert_eq!(c.gpu.fake.devices[0].memory, ByteSize::gib(40));
        assert_eq!(c.logs.disk_budget, ByteSize::mib(10));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = AgentConfig::from_toml("[containers]\nmonitr_interval = \"1s\"\n").unwrap_err();
        assert!(e.to_string().contains("monitr_interval"), "{e}");
    }

    #[test]
    fn a_non_loopback_listen_address_needs_tls_or_insecure() {
        let c = AgentConfig::default();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7200");
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(
                "listen: 0.0.0.0:7200 is not a loopback address and no [tls] section is set"
            ) && e.contains("--role agent")
                && e.contains("insecure = true"),
            "{e}"
        );
        let insecure = AgentConfig::from_toml("insecure = true\n").unwrap();
        insecure.validate().unwrap();
        let tls = AgentConfig::from_toml(
            "[tls]\nca_file = \"/etc/weft/tls/weft-ca.pem\"\ncert_file = \"a.pem\"\nkey_file = \"a-key.pem\"\n",
        )
        .unwrap();
        tls.validate().unwrap();
        let loopback = AgentConfig::from_toml("listen = \"127.0.0.1:7200\"\n").unwrap();
        loopback.validate().unwrap();
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = AgentConfig::default();
        c.containers.cgroup_parent = "../etc".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("containers.cgroup_parent"), "{e}");
        let mut c = AgentConfig::default();
        c.containers.monitor_interval = Duration::from_millis(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("monitor_interval"));
    }
}
