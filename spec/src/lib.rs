//! The job spec (DESIGN section 8): YAML or TOML, one serde model, checked by
//! [`JobSpec::parse`] so that a bad spec is refused at submit with an error
//! naming the field (`stages[1].after: ...`) and nothing is stored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// A spec refused: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A whole job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// `batch` (default): the job ends when its stages have. `service`:
    /// its stages of `replicas` are kept running, healthy, until the job
    /// is killed.
    #[serde(default)]
    pub kind: JobKind,
    #[serde(default = "root")]
    pub queue: String,
    #[serde(default)]
    pub priority: u32,
    /// Application-master attempts.
    #[serde(default = "one")]
    pub max_attempts: u32,
    /// Resources of the application master's own container.
    #[serde(default)]
    pub am: Option<ResourcesSpec>,
    /// Work-preserving restarts: a new master attempt adopts the tasks the
    /// previous one left running (false: they are stopped and rerun).
    #[serde(default = "yes")]
    pub keep_containers: bool,
    pub stages: Vec<StageSpec>,
}

fn yes() -> bool {
    true
}

fn root() -> String {
    "root".into()
}

fn one() -> u32 {
    1
}

/// What a job is: work that ends, or a service that runs until killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Batch,
    Service,
}

/// When a service's replica that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever way it ended.
    #[default]
    Always,
    /// Only when it failed (an exit of 0 leaves its place empty).
    OnFailure,
}

/// How a service's replicas are restarted: after `backoff`, doubled at each
/// restart of the same replica up to `max_backoff`; more than `limit`
/// restarts of the stage within `window` fail the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    #[serde(default)]
    pub policy: RestartPolicy,
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    #[serde(default = "default_restart_limit")]
    pub limit: u32,
    #[serde(default = "default_restart_window", with = "humantime_serde")]
    pub window: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartPolicy::Always,
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            limit: default_restart_limit(),
            window: default_restart_window(),
        }
    }
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_restart_limit() -> u32 {
    10
}
fn default_restart_window() -> Duration {
    Duration::from_secs(600)
}

/// A replica's health check, made by the service's master: exactly one of
/// `http` (a GET on a named port answering 2xx or 3xx), `tcp` (a connect to
/// a named port) or `command` (run by the master with `WEFT_REPLICA_HOST`
/// and `WEFT_REPLICA_PORT_<NAME>` set; exit 0 is healthy). A replica is
/// healthy from its first passing check; `failures` failing checks in a
/// row make it unhealthy (it is replaced). Checks failing within `grace`
/// of its start, before it was ever healthy, do not count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(default)]
    pub http: Option<HttpCheck>,
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_failures")]
    pub failures: u32,
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_failures() -> u32 {
    3
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

/// An HTTP GET on one of the stage's named ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub port: String,
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_path() -> String {
    "/".into()
}

/// A TCP connect to one of the stage's named ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub port: String,
}

/// Longest HTTP health-check path.
pub const MAX_HEALTH_PATH: usize = 1024;
/// Most restarts a stage's `restart.limit` may allow in its window.
pub const MAX_RESTART_LIMIT: u32 = 100_000;

/// Cores of a task whose stage gives no `resources`.
pub const DEFAULT_VCORES: f64 = 1.0;
/// Memory of a task whose stage gives no `resources`.
pub const DEFAULT_MEMORY: ByteSize = ByteSize::gib(1);

/// What a task needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    /// Cores (0.5 = half a core).
    pub vcores: f64,
    pub memory: ByteSize,
    /// Whole GPUs (1, 2...), or a share of one (0.25).
    #[serde(default)]
    pub gpus: f64,
    /// GPU-memory quota of a share (required with a fractional `gpus`).
    #[serde(default)]
    pub gpu_memory: Option<ByteSize>,
    #[serde(default)]
    pub gpu_model: Option<String>,
    #[serde(default)]
    pub gpu_min_memory: Option<ByteSize>,
    /// Node labels that must all be present (`{ gpu: a100 }`).
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    #[default]
    None,
    Tensorflow,
    Pytorch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementSpec {
    #[default]
    Pack,
    Spread,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    #[serde(default)]
    pub after: Vec<String>,
    /// Identical tasks (or use `roles`).
    #[serde(default)]
    pub instances: Option<u32>,
    /// A service's stage (`kind: service`): this many replicas kept
    /// running (instead of `instances`; `rmctl app scale` changes it).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// How a service's replicas are restarted (defaults: always, 1 s
    /// backoff doubling to 1 m, at most 10 restarts in 10 m).
    #[serde(default)]
    pub restart: Option<RestartSpec>,
    /// A service's replicas' health check (none: running is healthy).
    #[serde(default)]
    pub health: Option<HealthSpec>,
    #[serde(default)]
    pub roles: Option<BTreeMap<String, RoleSpec>>,
    pub command: String,
    #[serde(default)]
    pub resources: Option<ResourcesSpec>,
    #[serde(default)]
    pub framework: Framework,
    /// Start every task together (distributed training).
    #[serde(default)]
    pub gang: bool,
    #[serde(default)]
    pub max_retries: u32,
    #[serde(default, with = "humantime_serde")]
    pub max_runtime: Option<Duration>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `pack` (default for batch stages) or `spread` (default for a
    /// service's replicas: one node's loss takes as few as it can).
    #[serde(default)]
    pub placement: Option<PlacementSpec>,
    /// Named ports each task gets on its node (`WEFT_PORT_<NAME>`), chosen
    /// by the RM from the node's port range: never one in use there.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Time a preempted task has between SIGTERM and SIGKILL to write its
    /// checkpoint (default 30s; at most 1h, and the queue may cap it).
    #[serde(default, with = "humantime_serde")]
    pub preemption_grace: Option<Duration>,
    /// A service's stage: the fewest replicas preemption leaves running
    /// (default 1; at most `replicas`).
    #[serde(default)]
    pub min_available: Option<u32>,
}

/// The longest `preemption_grace` a stage may give.
pub const MAX_PREEMPTION_GRACE: Duration = Duration::from_secs(3600);

impl StageSpec {
    /// Its preemption grace (default 30 s).
    pub fn preemption_grace(&self) -> Duration {
        self.preemption_grace.unwrap_or(Duration::from_secs(30))
    }

    /// A service's stage: replicas preemption leaves running (default 1);
    /// 0 for a batch stage.
    pub fn min_available(&self) -> u32 {
        if self.is_service() {
            self.min_available.unwrap_or(1)
        } else {
            0
        }
    }
}

/// Most named ports a stage may ask for.
pub const MAX_PORTS: usize = 16;
/// Largest spec text accepted (bytes).
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Most stages in a job.
pub const MAX_STAGES: usize = 256;
/// Most tasks in one stage (instances, or all roles' instances together).
pub const MAX_INSTANCES: u64 = 100_000;
/// Most environment variables a stage may set.
pub const MAX_ENV_VARS: usize = 256;
/// Longest environment variable value (bytes).
pub const MAX_ENV_VALUE_BYTES: usize = 32 << 10;
/// Highest priority.
pub const MAX_PRIORITY: u32 = 1000;
/// Least memory a container may ask for (the agent refuses less).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub instances: u32,
    pub resources: ResourcesSpec,
    /// Overrides the stage's command for this role.
    #[serde(default)]
    pub command: Option<String>,
}

/// One task a stage runs, with the field path of its resources (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskShape<'a> {
    pub stage: &'a str,
    pub role: Option<&'a str>,
    pub instances: u32,
    pub resources: &'a ResourcesSpec,
    pub field: String,
}

const TF_ROLES: [&str; 4] = ["chief", "ps", "worker", "evaluator"];
const TORCH_ROLES: [&str; 2] = ["master", "worker"];

impl JobSpec {
    /// Parses `text` as `format` (`yaml`, `yml` or `toml`) and checks it.
    pub fn parse(text: &str, format: &str) -> Result<JobSpec, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(bad(
                "spec",
                format!("{} bytes; at most {MAX_SPEC_BYTES}", text.len()),
            ));
        }
        let spec: JobSpec = match format {
            "yaml" | "yml" => serde_yaml_ng::from_str(text)
                .map_err(|e| bad("spec", format!("not a valid job spec: {e}")))?,
            "toml" => toml::from_str(text).map_err(|e| {
                bad(
                    "spec",
                    format!("not a valid job spec: {}", e.to_string().trim()),
                )
            })?,
            other => return Err(bad("spec_format", format!("{other:?} is not yaml or toml"))),
        };
        let mut spec = spec;
        spec.fill_defaults();
        spec.validate()?;
        Ok(spec)
    }

    /// What a stage leaves out: without `instances` or `roles` it runs one
    /// task; a stage of `instances` without `resources` gets
    /// [`DEFAULT_VCORES`] and [`DEFAULT_MEMORY`] per task (no GPU).
    pub fn fill_defaults(&mut self) {
        for s in &mut self.stages {
            if s.roles.is_some() {
                continue;
            }
            if s.replicas.is_none() {
                s.instances.get_or_insert(1);
            }
            s.resources.get_or_insert_with(|| ResourcesSpec {
                vcores: DEFAULT_VCORES,
                memory: DEFAULT_MEMORY,
                gpus: 0.0,
                gpu_memory: None,
                gpu_model: None,
                gpu_min_memory: None,
                node_labels: BTreeMap::new(),
            });
        }
    }

    /// The spec as YAML that [`JobSpec::parse`] reads back as it is.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a job spec always serializes")
    }

    /// Every check serde cannot make.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty"));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1"));
        }
        if self.priority > MAX_PRIORITY {
            return Err(bad(
                "priority",
                format!("{} is above the highest, {MAX_PRIORITY}", self.priority),
            ));
        }
        if self.stages.len() > MAX_STAGES {
            return Err(bad(
                "stages",
                format!("{} stages; at most {MAX_STAGES}", self.stages.len()),
            ));
        }
        if let Some(am) = &self.am {
            check_resources("am", am)?;
        }
        if self.stages.is_empty() {
            return Err(bad("stages", "a job needs at least one stage"));
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            let f = format!("stages[{i}]");
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(
                    format!("{f}.name"),
                    format!("{:?} must be letters, digits, '-' or '_'", s.name),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(bad(
                    format!("{f}.name"),
                    format!("{} is used by two stages", s.name),
                ));
            }
            if s.command.trim().is_empty() {
                return Err(bad(format!("{f}.command"), "must not be empty"));
            }
            if s.ports.len() > MAX_PORTS {
                return Err(bad(
                    format!("{f}.ports"),
                    format!("{} ports; at most {MAX_PORTS}", s.ports.len()),
                ));
            }
            let mut port_names = std::collections::BTreeSet::new();
            for (k, p) in s.ports.iter().enumerate() {
                let ok = !p.is_empty()
                    && p.len() <= 32
                    && p.starts_with(|c: char| c.is_ascii_lowercase())
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !ok {
                    return Err(bad(
                        format!("{f}.ports[{k}]"),
                        format!("{p:?} must be 1-32 lowercase letters, digits or '_', starting with a letter"),
                    ));
                }
                if !port_names.insert(p.as_str()) {
                    return Err(bad(
                        format!("{f}.ports[{k}]"),
                        format!("{p} is named twice"),
                    ));
                }
            }
            check_service_stage(self.kind, &f, s)?;
            match (&s.instances.or(s.replicas), &s.roles) {
                (Some(_), Some(_)) => {
                    return Err(bad(&f, "give either instances or roles, not both"))
                }
                (None, None) => return Err(bad(&f, "give instances (with resources) or roles")),
                (Some(0), _) => {
                    let field = if s.replicas.is_some() {
                        "replicas"
                    } else {
                        "instances"
                    };
                    return Err(bad(format!("{f}.{field}"), "must be at least 1"));
                }
                (Some(_), None) => {
                    let r = s.resources.as_ref().ok_or_else(|| {
                        bad(
                            format!("{f}.resources"),
                            "required with instances or replicas",
                        )
                    })?;
                    check_resources(&format!("{f}.resources"), r)?;
                }
                (None, Some(roles)) => {
                    if roles.is_empty() {
                        return Err(bad(format!("{f}.roles"), "must name at least one role"));
                    }
                    if s.resources.is_some() {
                        return Err(bad(
                            format!("{f}.resources"),
                            "with roles, resources go in each role",
                        ));
                    }
                    for (name, r) in roles {
                        if r.instances == 0 {
                            return Err(bad(
                                format!("{f}.roles.{name}.instances"),
                                "must be at least 1",
                            ));
                        }
                        check_resources(&format!("{f}.roles.{name}.resources"), &r.resources)?;
                    }
                }
            }
            let allowed: &[&str] = match s.framework {
                Framework::Tensorflow => &TF_ROLES,
                Framework::Pytorch => &TORCH_ROLES,
                Framework::None => &[],
            };
            if let (Some(roles), false) = (&s.roles, allowed.is_empty()) {
                if let Some(r) = roles.keys().find(|r| !allowed.contains(&r.as_str())) {
                    return Err(bad(
                        format!("{f}.roles.{r}"),
                        format!(
                            "not a {:?} role (expected one of {})",
                            s.framework,
                            allowed.join(", ")
                        )
                        .to_lowercase(),
                    ));
                }
            }
            if s.framework != Framework::None && !s.gang {
                return Err(bad(
                    format!("{f}.gang"),
                    "distributed training (framework) stages must be gang: true",
                ));
            }
            let tasks: u64 = match (&s.instances.or(s.replicas), &s.roles) {
                (Some(n), _) => u64::from(*n),
                (None, Some(roles)) => roles.values().map(|r| u64::from(r.instances)).sum(),
                (None, None) => 0,
            };
            if tasks > MAX_INSTANCES {
                let field = if s.instances.is_some() {
                    format!("{f}.instances")
                } else if s.replicas.is_some() {
                    format!("{f}.replicas")
                } else {
                    format!("{f}.roles")
                };
                return Err(bad(
                    field,
                    format!("{tasks} tasks; at most {MAX_INSTANCES} in a stage"),
                ));
            }
            if s.env.len() > MAX_ENV_VARS {
                return Err(bad(
                    format!("{f}.env"),
                    format!("{} variables; at most {MAX_ENV_VARS}", s.env.len()),
                ));
            }
            for (env, value) in &s.env {
                if env.is_empty()
                    || env.contains('=')
                    || env.contains('\0')
                    || env.starts_with("WEFT_")
                {
                    return Err(bad(
                        format!("{f}.env"),
                        format!("{env:?} is not a variable a job may set"),
                    ));
                }
                if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
                    return Err(bad(
                        format!("{f}.env.{env}"),
                        format!(
                            "{} bytes; a value is at most {MAX_ENV_VALUE_BYTES} bytes, without NUL",
                            value.len()
                        ),
                    ));
                }
            }
        }
        for (i, s) in self.stages.iter().enumerate() {
            for a in &s.after {
                if !names.contains(a.as_str()) {
                    return Err(bad(
                        format!("stages[{i}].after"),
                        format!("unknown stage {a:?}"),
                    ));
                }
                if *a == s.name {
                    return Err(bad(
                        format!("stages[{i}].after"),
                        "a stage cannot wait for itself",
                    ));
                }
            }
        }
        if self.kind == JobKind::Service && !self.stages.iter().any(|s| s.replicas.is_some()) {
            return Err(bad(
                "kind",
                "a service needs a stage of replicas (stages[N].replicas)",
            ));
        }
        if let Some(cycle) = self.cycle() {
            return Err(bad(
                "stages.after",
                format!("a cycle: {}", cycle.join(" -> ")),
            ));
        }
        Ok(())
    }

    /// A cycle in `after`, if any (stage names in order, first repeated last).
    /// A depth-first walk with its own stack, not recursion: a long chain of
    /// stages costs memory in the heap, never the thread's stack.
    fn cycle(&self) -> Option<Vec<String>> {
        let idx: BTreeMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        // 0 = unvisited, 1 = on the path, 2 = done.
        let mut mark = vec![0u8; self.stages.len()];
        for root in 0..self.stages.len() {
            if mark[root] != 0 {
                continue;
            }
            // The path: each stage with the next of its `after` to look at.
            let mut path: Vec<(usize, usize)> = vec![(root, 0)];
            mark[root] = 1;
            while let Some(&mut (i, ref mut next)) = path.last_mut() {
                let Some(a) = self.stages[i].after.get(*next) else {
                    mark[i] = 2;
                    path.pop();
                    continue;
                };
                *next += 1;
                let j = idx[a.as_str()];
                match mark[j] {
                    0 => {
                        mark[j] = 1;
                        path.push((j, 0));
                    }
                    1 => {
                        let start = path.iter().position(|&(p, _)| p == j).expect("on the path");
                        let mut c: Vec<String> = path[start..]
                            .iter()
                            .map(|&(p, _)| self.stages[p].name.clone())
                            .collect();
                        c.push(self.stages[j].name.clone());
                        return Some(c);
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// Every distinct task shape of the job, for fit checks.
    pub fn task_shapes(&self) -> Vec<TaskShape<'_>> {
        let mut out = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            match (&s.roles, &s.resources, s.instances.or(s.replicas)) {
                (Some(roles), _, _) => {
                    for (name, r) in roles {
                        out.push(TaskShape {
                            stage: &s.name,
                            role: Some(name),
                            instances: r.instances,
                            resources: &r.resources,
                            field: format!("stages[{i}].roles.{name}.resources"),
                        });
                    }
                }
                (None, Some(r), Some(n)) => out.push(TaskShape {
                    stage: &s.name,
                    role: None,
                    instances: n,
                    resources: r,
                    field: format!("stages[{i}].resources"),
                }),
                _ => {}
            }
        }
        out
    }
}

impl StageSpec {
    /// A service's stage: replicas kept running.
    pub fn is_service(&self) -> bool {
        self.replicas.is_some()
    }

    /// How tasks are placed: as given, else spread for a service's
    /// replicas and packed for batch tasks.
    pub fn placement(&self) -> PlacementSpec {
        self.placement.unwrap_or(if self.is_service() {
            PlacementSpec::Spread
        } else {
            PlacementSpec::Pack
        })
    }

    /// The restart policy of a service's replicas (the defaults if none
    /// is given).
    pub fn restart(&self) -> RestartSpec {
        self.restart.clone().unwrap_or_default()
    }
}

/// The fields only a service's stage takes, and their bounds.
fn check_service_stage(kind: JobKind, f: &str, s: &StageSpec) -> Result<(), SpecError> {
    if let Some(g) = s.preemption_grace {
        if g > MAX_PREEMPTION_GRACE {
            return Err(bad(
                format!("{f}.preemption_grace"),
                format!("{}s is more than 1h", g.as_secs()),
            ));
        }
    }
    if let (Some(m), Some(r)) = (s.min_available, s.replicas) {
        if m > r {
            return Err(bad(
                format!("{f}.min_available"),
                format!("{m} is more than its replicas, {r}"),
            ));
        }
    }
    if !s.is_service() {
        for (given, field) in [
            (s.restart.is_some(), "restart"),
            (s.health.is_some(), "health"),
            (s.min_available.is_some(), "min_available"),
        ] {
            if given {
                return Err(bad(
                    format!("{f}.{field}"),
                    "only a service's stage (with replicas) takes it",
                ));
            }
        }
        return Ok(());
    }
    if kind != JobKind::Service {
        return Err(bad(
            format!("{f}.replicas"),
            "only a job of kind: service keeps replicas running (give instances for batch work)",
        ));
    }
    if s.instances.is_some() {
        return Err(bad(f, "give either replicas or instances, not both"));
    }
    if s.gang || s.framework != Framework::None {
        return Err(bad(
            format!("{f}.gang"),
            "a service's replicas are not a gang (no gang or framework)",
        ));
    }
    if let Some(r) = &s.restart {
        if r.limit == 0 || r.limit > MAX_RESTART_LIMIT {
            return Err(bad(
                format!("{f}.restart.limit"),
                format!("{} is not from 1 to {MAX_RESTART_LIMIT}", r.limit),
            ));
        }
        if r.max_backoff < r.backoff {
            return Err(bad(
                format!("{f}.restart.max_backoff"),
                "must not be below backoff",
            ));
        }
        if r.max_backoff > Duration::from_secs(3600) {
            return Err(bad(format!("{f}.restart.max_backoff"), "at most 1h"));
        }
        if r.window < Duration::from_secs(1) || r.window > Duration::from_secs(7 * 24 * 3600) {
            return Err(bad(
                format!("{f}.restart.window"),
                "must be from 1s to 7days",
            ));
        }
    }
    if let Some(h) = &s.health {
        let given = [h.http.is_some(), h.tcp.is_some(), h.command.is_some()]
            .iter()
            .filter(|g| **g)
            .count();
        if given != 1 {
            return Err(bad(
                format!("{f}.health"),
                "give exactly one of http, tcp or command",
            ));
        }
        let port = h
            .http
            .as_ref()
            .map(|c| (&c.port, "http.port"))
            .or(h.tcp.as_ref().map(|c| (&c.port, "tcp.port")));
        if let Some((p, field)) = port {
            if !s.ports.contains(p) {
                return Err(bad(
                    format!("{f}.health.{field}"),
                    format!(
                        "{p:?} is not one of the stage's ports ({})",
                        if s.ports.is_empty() {
                            "it names none: add ports: [NAME]".to_string()
                        } else {
                            s.ports.join(", ")
                        }
                    ),
                ));
            }
        }
        if let Some(c) = &h.http {
            if !c.path.starts_with('/')
                || c.path.len() > MAX_HEALTH_PATH
                || c.path
                    .chars()
                    .any(|ch| ch.is_whitespace() || ch.is_control())
            {
                return Err(bad(
                    format!("{f}.health.http.path"),
                    format!("{:?} must start with / and have no spaces or control characters, at most {MAX_HEALTH_PATH} bytes", c.path),
                ));
            }
        }
        if let Some(c) = &h.command {
            if c.trim().is_empty() || c.len() > MAX_ENV_VALUE_BYTES || c.contains('\0') {
                return Err(bad(
                    format!("{f}.health.command"),
                    "must be a shell command, at most 32 KiB, without NUL",
                ));
            }
        }
        if h.interval < Duration::from_millis(100) || h.interval > Duration::from_secs(3600) {
            return Err(bad(
                format!("{f}.health.interval"),
                "must be from 100ms to 1h",
            ));
        }
        if h.timeout < Duration::from_millis(10) || h.timeout > h.interval {
            return Err(bad(
                format!("{f}.health.timeout"),
                "must be from 10ms to the interval",
            ));
        }
        if h.failures == 0 || h.failures > 100 {
            return Err(bad(
                format!("{f}.health.failures"),
                format!("{} is not from 1 to 100", h.failures),
            ));
        }
        if h.grace > Duration::from_secs(24 * 3600) {
            return Err(bad(format!("{f}.health.grace"), "at most 24h"));
        }
    }
    Ok(())
}

impl ResourcesSpec {
    /// Thousandths of a core.
    pub fn vcores_milli(&self) -> u64 {
        (self.vcores * 1000.0).round() as u64
    }

    /// (whole GPUs, share in thousandths): exactly one is non-zero when GPUs are asked.
    /// `node_labels` as an ask's label expression (`k=v,k2=v2`).
    pub fn node_label_expr(&self) -> String {
        self.node_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn gpu_split(&self) -> (u32, u32) {
        if self.gpus >= 1.0 {
            (self.gpus as u32, 0)
        } else {
            (0, (self.gpus * 1000.0).round() as u32)
        }
    }
}

fn check_resources(field: &str, r: &ResourcesSpec) -> Result<(), SpecError> {
    if r.vcores.is_nan() || r.vcores <= 0.0 || !r.vcores.is_finite() {
        return Err(bad(
            format!("{field}.vcores"),
            format!("must be above 0 (got {})", r.vcores),
        ));
    }
    // A share that rounds to no thousandths would mean no CPU limit at all.
    if r.vcores_milli() == 0 || r.vcores > 1e6 {
        return Err(bad(
            format!("{field}.vcores"),
            format!("must be from 0.001 to 1000000 (got {})", r.vcores),
        ));
    }
    if r.memory.as_u64() == 0 {
        return Err(bad(format!("{field}.memory"), "must be above 0"));
    }
    if r.memory.as_u64() < MIN_MEMORY_BYTES {
        return Err(bad(
            format!("{field}.memory"),
            format!("{} bytes; at least 1 MiB", r.memory.as_u64()),
        ));
    }
    if r.gpus < 0.0 || !r.gpus.is_finite() {
        return Err(bad(
            format!("{field}.gpus"),
            format!("must not be negative (got {})", r.gpus),
        ));
    }
    if r.gpus > 1.0 && r.gpus.fract() != 0.0 {
        return Err(bad(
            format!("{field}.gpus"),
            "above 1, GPUs are whole devices (2, 4...); shares are below 1",
        ));
    }
    if r.gpus > 0.0 && r.gpus < 1.0 && r.gpu_memory.is_none() {
        return Err(bad(
            format!("{field}.gpu_memory"),
            "a GPU share needs a GPU-memory quota",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_without_instances_runs_one_task_and_without_resources_gets_the_defaults() {
        let s = JobSpec::parse(
            "name: d\nstages:\n  - name: a\n    command: 'true'\n  - name: b\n    instances: 3\n    command: 'true'\n  - name: c\n    command: 'true'\n    resources: { vcores: 0.5, memory: 64MiB }\n",
            "yaml",
        )
        .unwrap();
        assert_eq!(s.stages[0].instances, Some(1));
        let r = s.stages[0].resources.as_ref().unwrap();
        assert_eq!(
            (r.vcores, r.memory, r.gpus),
            (DEFAULT_VCORES, DEFAULT_MEMORY, 0.0)
        );
        assert_eq!(s.stages[1].instances, Some(3));
        assert_eq!(
            s.stages[1].resources.as_ref().unwrap().memory,
            ByteSize::gib(1)
        );
        assert_eq!(s.stages[2].instances, Some(1));
        assert_eq!(
            s.stages[2].resources.as_ref().unwrap().memory,
            ByteSize::mib(64)
        );
        // What the defaults made reads back as it is.
        assert_eq!(JobSpec::parse(&s.to_yaml(), "yaml").unwrap(), s);
        // Roles have no defaults: each names its own.
        let e = JobSpec::parse(
            "name: d\nstages:\n  - name: t\n    framework: pytorch\n    command: 'true'\n    roles:\n      worker: { instances: 2 }\n",
            "yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("resources"), "{e}");
    }

    #[test]
    fn the_example_job_specs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        for f in [
            "jobs/gpu.yaml",
            "jobs/over-quota.yaml",
            "pipeline/pipeline.yaml",
        ] {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            let spec = JobSpec::parse(&text, "yaml").unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!spec.stages.is_empty(), "{f}");
        }
    }

    const PIPELINE: &str = r#"
name: mnist-pipeline
queue: root.research
priority: 0
max_attempts: 2
stages:
  - name: preprocess
    instances: 4
    command: python3 prep.py --shard $WEFT_TASK_INDEX
    resources: { vcores: 1, memory: 1GiB }
    max_retries: 2
    max_runtime: 10m
  - name: train
    after: [preprocess]
    framework: tensorflow
    gang: true
    roles:
      ps:     { instances: 1, resources: { vcores: 1, memory: 2GiB } }
      worker: { instances: 2, resources: { vcores: 2, memory: 4GiB, gpus: 1 } }
    command: python3 train.py
  - name: evaluate
    after: [train]
    instances: 1
    command: python3 eval.py
    resources: { vcores: 0.5, memory: 512MiB, gpus: 0.25, gpu_memory: 10GiB }
"#;

    #[test]
    fn design_example_parses() {
        let s = JobSpec::parse(PIPELINE, "yaml").unwrap();
        assert_eq!(s.queue, "root.research");
        assert_eq!(s.stages[0].max_runtime, Some(Duration::from_secs(600)));
        let shapes = s.task_shapes();
        assert_eq!(shapes.len(), 4);
        let worker = shapes.iter().find(|t| t.role == Some("worker")).unwrap();
        assert_eq!(worker.resources.gpu_split(), (1, 0));
        assert_eq!(worker.field, "stages[1].roles.worker.resources");
        assert_eq!(shapes[3].resources.gpu_split(), (0, 250));
        assert_eq!(shapes[3].resources.vcores_milli(), 500);
    }

    #[test]
    fn toml_is_the_same_model() {
        let t = r#"
name = "sweep"
[[stages]]
name = "run"
instances = 8
command = "python3 sweep.py"
resources = { vcores = 1, memory = "256MiB" }
"#;
        let s = JobSpec::parse(t, "toml").unwrap();
        assert_eq!(s.queue, "root");
        assert_eq!(s.stages[0].instances, Some(8));
    }

    fn err(text: &str) -> String {
        JobSpec::parse(text, "yaml").unwrap_err().to_string()
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = |stages: &str| format!("name: j\nstages:\n{stages}");
        let ok = "  - name: a\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n";
        assert!(err("name: j\nstagez: []\n").contains("unknown field `stagez`"));
        assert_eq!(
            err("name: j\nstages: []\n"),
            "stages: a job needs at least one stage"
        );
        assert_eq!(
            err(&base(&format!("{ok}  - name: b\n    after: [c]\n    instances: 1\n    command: x\n    resources: {{ vcores: 1, memory: 1GiB }}\n"))),
            "stages[1].after: unknown stage \"c\""
        );
        assert_eq!(
            err(&base("  - name: a\n    after: [b]\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n  - name: b\n    after: [a]\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n")),
            "stages.after: a cycle: a -> b -> a"
        );
        assert_eq!(
            err(&base("  - name: a\n    instances: 1\n    command: x\n    resources: { vcores: -1, memory: 1GiB }\n")),
            "stages[0].resources.vcores: must be above 0 (got -1)"
        );
        assert_eq!(
            err(&base("  - name: a\n    instances: 0\n    command: x\n    resources: { vcores: 1, memory: 1GiB }\n")),
            "stages[0].instances: must be at least 1"
        );
        assert_eq!(
            err(&base("  - name: a\n    instances: 1\n    command: x\n    resources: { vcores: 1, memory: 1GiB, gpus: 0.5 }\n")),
            "stages[0].resources.gpu_memory: a GPU share needs a GPU-memory quota"
        );
        assert_eq!(
            err(&base(&format!("{ok}{ok}"))),
            "stages[1].name: a is used by two stages"
        );
        assert_eq!(
            err(&base("  - name: t\n    framework: tensorflow\n    gang: true\n    command: x\n    roles:\n      boss: { instances: 1, resources: { vcores: 1, memory: 1GiB } }\n")),
            "stages[0].roles.boss: not a tensorflow role (expected one of chief, ps, worker, evaluator)"
        );
        assert_eq!(
            err(&base("  - name: t\n    framework: pytorch\n    command: x\n    instances: 2\n    resources: { vcores: 1, memory: 1GiB }\n")),
            "stages[0].gang: distributed training (framework) stages must be gang: true"
        );
        let ports = |p: &str| {
            err(&base(&format!(
                "  - name: a\n    instances: 1\n    command: x\n    ports: {p}\n    resources: {{ vcores: 1, memory: 1GiB }}\n"
            )))
        };
        assert_eq!(
            ports("[http, Grpc]"),
            "stages[0].ports[1]: \"Grpc\" must be 1-32 lowercase letters, digits or '_', starting with a letter"
        );
        assert_eq!(
            ports("[http, http]"),
            "stages[0].ports[1]: http is named twice"
        );
        assert_eq!(
            ports(&format!(
                "[{}]",
                (0..17)
                    .map(|i| format!("p{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            "stages[0].ports: 17 ports; at most 16"
        );
        assert!(JobSpec::parse("x", "json")
            .unwrap_err()
            .to_string()
            .starts_with("spec_format:"));
    }
    #[test]
    fn sizes_and_counts_are_bounded_and_the_bound_is_named() {
        let stage = |name: &str, after: &str, extra: &str| {
            format!("  - name: {name}\n    after: [{after}]\n    instances: 1\n    command: x\n    resources: {{ vcores: 1, memory: 1GiB }}\n{extra}")
        };
        let job = |stages: String| format!("name: j\nstages:\n{stages}");
        // The most stages, chained: accepted; one more: refused.
        let chain = |n: usize| {
            (0..n)
                .map(|i| {
                    let after = if i == 0 {
                        String::new()
                    } else {
                        format!("s{}", i - 1)
                    };
                    stage(&format!("s{i}"), &after, "")
                })
                .collect::<String>()
        };
        JobSpec::parse(&job(chain(MAX_STAGES)), "yaml").unwrap();
        assert_eq!(
            err(&job(chain(MAX_STAGES + 1))),
            "stages: 257 stages; at most 256"
        );
        // A cycle closing the longest chain is found (by a walk with its own
        // stack) and named from where it starts.
        let mut looped = chain(MAX_STAGES - 1);
        looped = looped.replacen("after: []", &format!("after: [s{}]", MAX_STAGES - 2), 1);
        let e = err(&job(looped));
        assert!(
            e.starts_with("stages.after: a cycle: s0 -> s254 -> s253 -> "),
            "{e}"
        );
        assert!(e.ends_with(" -> s2 -> s1 -> s0"), "{e}");
        assert_eq!(e.matches(" -> ").count(), MAX_STAGES - 1, "{e}");
        let one = |extra: &str, head: &str| job(format!("{head}{}", stage("a", "", extra)));
        assert_eq!(
            err(&format!("priority: 1001\n{}", one("", ""))),
            "priority: 1001 is above the highest, 1000"
        );
        assert_eq!(
            err(&one("", "").replace("instances: 1", "instances: 100001")),
            "stages[0].instances: 100001 tasks; at most 100000 in a stage"
        );
        assert_eq!(
            err(&one("", "").replace("vcores: 1,", "vcores: 0.0004,")),
            "stages[0].resources.vcores: must be from 0.001 to 1000000 (got 0.0004)"
        );
        assert_eq!(
            err(&one("", "").replace("memory: 1GiB", "memory: 512KiB")),
            "stages[0].resources.memory: 524288 bytes; at least 1 MiB"
        );
        let big = "v".repeat(MAX_ENV_VALUE_BYTES + 1);
        assert_eq!(
            err(&one(&format!("    env: {{ BIG: {big} }}\n"), "")),
            "stages[0].env.BIG: 32769 bytes; a value is at most 32768 bytes, without NUL"
        );
        let many: String = (0..=MAX_ENV_VARS).map(|i| format!("V{i}: x, ")).collect();
        assert_eq!(
            err(&one(&format!("    env: {{ {many} }}\n"), "")),
            "stages[0].env: 257 variables; at most 256"
        );
        let roles = "  - name: t\n    command: x\n    roles:\n      a: { instances: 60000, resources: { vcores: 1, memory: 1GiB } }\n      b: { instances: 60000, resources: { vcores: 1, memory: 1GiB } }\n";
        assert_eq!(
            err(&job(roles.to_string())),
            "stages[0].roles: 120000 tasks; at most 100000 in a stage"
        );
        let huge = format!("# {}\n{}", "x".repeat(MAX_SPEC_BYTES), one("", ""));
        assert_eq!(
            JobSpec::parse(&huge, "toml").unwrap_err().to_string(),
            format!("spec: {} bytes; at most 1048576", huge.len())
        );
    }

    const SERVICE: &str = "name: serve\nkind: service\nstages:\n  - name: web\n    replicas: 3\n    command: 'python3 -m http.server $WEFT_PORT_HTTP'\n    ports: [http]\n    resources: { vcores: 0.2, memory: 64MiB }\n    health: { http: { port: http, path: /healthz }, interval: 1s, timeout: 500ms, failures: 2, grace: 5s }\n    restart: { policy: on-failure, backoff: 200ms, max_backoff: 5s, limit: 5, window: 1m }\n";

    #[test]
    fn a_service_keeps_replicas_with_a_health_check_and_restart_policy_spread_by_default() {
        let s = JobSpec::parse(SERVICE, "yaml").unwrap();
        assert_eq!(s.kind, JobKind::Service);
        let st = &s.stages[0];
        assert!(st.is_service());
        assert_eq!((st.replicas, st.instances), (Some(3), None));
        assert_eq!(st.placement(), PlacementSpec::Spread);
        let h = st.health.as_ref().unwrap();
        assert_eq!(h.http.as_ref().unwrap().path, "/healthz");
        assert_eq!(
            (h.interval, h.timeout, h.failures, h.grace),
            (
                Duration::from_secs(1),
                Duration::from_millis(500),
                2,
                Duration::from_secs(5)
            )
        );
        let r = st.restart();
        assert_eq!(r.policy, RestartPolicy::OnFailure);
        assert_eq!((r.backoff, r.limit), (Duration::from_millis(200), 5));
        assert_eq!(s.task_shapes()[0].instances, 3);
        // Defaults, and a batch stage's placement.
        let d = JobSpec::parse(
            "name: d\nkind: service\nstages:\n  - name: web\n    replicas: 1\n    command: 'sleep 1000'\n    placement: pack\n",
            "yaml",
        )
        .unwrap();
        assert_eq!(d.stages[0].placement(), PlacementSpec::Pack);
        assert_eq!(d.stages[0].restart(), RestartSpec::default());
        assert_eq!(
            d.stages[0].resources.as_ref().unwrap().memory,
            DEFAULT_MEMORY
        );
        let b = JobSpec::parse(
            "name: b\nstages:\n  - name: a\n    command: 'true'\n",
            "yaml",
        )
        .unwrap();
        assert_eq!(
            (b.kind, b.stages[0].placement()),
            (JobKind::Batch, PlacementSpec::Pack)
        );
        // Read back as written.
        assert_eq!(JobSpec::parse(&s.to_yaml(), "yaml").unwrap(), s);
    }

    /// The specs the docs show parse as they are.
    #[test]
    fn the_docs_service_specs_parse() {
        for doc in ["../README.md", "../docs/app-master.md"] {
            let text =
                std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_string() + doc)
                    .unwrap();
            let mut found = 0;
            for block in text.split("```yaml\n").skip(1) {
                let yaml = block.split("```").next().unwrap();
                if yaml.contains("kind: service") {
                    let s = JobSpec::parse(yaml, "yaml")
                        .unwrap_or_else(|e| panic!("{doc}: {e}\n{yaml}"));
                    assert_eq!(s.kind, JobKind::Service);
                    found += 1;
                }
            }
            assert!(found > 0, "{doc} shows no service");
        }
    }

    #[test]
    fn a_bad_service_names_its_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("kind: service\n", "kind: batch\n", "stages[0].replicas"),
            ("replicas: 3", "replicas: 0", "stages[0].replicas"),
            ("replicas: 3", "replicas: 3\n    instances: 2", "stages[0]"),
            (
                "replicas: 3",
                "replicas: 3\n    gang: true",
                "stages[0].gang",
            ),
            ("replicas: 3", "replicas: 100001", "stages[0].replicas"),
            (
                "port: http, path",
                "port: grpc, path",
                "stages[0].health.http.port",
            ),
            (
                "path: /healthz",
                "path: 'no slash'",
                "stages[0].health.http.path",
            ),
            (
                "{ http: {",
                "{ tcp: { port: http }, http: {",
                "stages[0].health",
            ),
            ("interval: 1s", "interval: 1ms", "stages[0].health.interval"),
            ("timeout: 500ms", "timeout: 2s", "stages[0].health.timeout"),
            ("failures: 2", "failures: 0", "stages[0].health.failures"),
            ("limit: 5", "limit: 0", "stages[0].restart.limit"),
            (
                "max_backoff: 5s",
                "max_backoff: 100ms",
                "stages[0].restart.max_backoff",
            ),
            ("window: 1m", "window: 10ms", "stages[0].restart.window"),
            ("policy: on-failure", "policy: sometimes", "spec"),
        ];
        for (from, to, field) in cases {
            assert!(SERVICE.contains(from), "{from}");
            let e = JobSpec::parse(&SERVICE.replacen(from, to, 1), "yaml").unwrap_err();
            assert_eq!(e.field, *field, "{to}: {e}");
        }
        // Only a service's stage takes health or restart; a service needs
        // replicas.
        let e = JobSpec::parse(
            "name: b\nstages:\n  - name: a\n    command: 'true'\n    health: { tcp: { port: x } }\n",
            "yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "stages[0].health", "{e}");
        let e = JobSpec::parse(
            "name: b\nkind: service\nstages:\n  - name: a\n    command: 'true'\n",
            "yaml",
        )
        .unwrap_err();
        assert_eq!(e.field, "kind", "{e}");
    }
}
