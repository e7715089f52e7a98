//! The replicated state machine: the cluster's truth as a pure function of the
//! raft log. Commands carry their own time and ids; applying one reads no clock
//! and no randomness, so every member computes the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the command encoding written into every entry.
pub const COMMAND_VERSION: u32 = 1;

/// One replicated command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    RegisterNode {
        node_id: String,
        address: String,
        vcores_milli: u64,
        memory_bytes: u64,
        gpus: Vec<Gpu>,
        labels: BTreeMap<String, String>,
        at_ms: u64,
    },
    SetNodeState {
        node_id: String,
        state: NodeState,
        at_ms: u64,
    },
    SubmitApplication {
        /// Client-chosen id making retried submissions idempotent (may be empty).
        request_id: String,
        name: String,
        queue: String,
        user: String,
        spec: String,
        spec_format: String,
        at_ms: u64,
    },
    KillApplication {
        app_id: String,
        at_ms: u64,
    },
}

/// What the raft log holds: a command plus who proposed it, so the proposer
/// (and only it) can answer its waiting caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    /// Raft id of the member that proposed it.
    pub origin: u64,
    /// The proposer's request number.
    pub request: u64,
    pub command: Command,
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("commands serialise")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let e: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if e.version != COMMAND_VERSION {
            return Err(format!(
                "command version {} (this member knows {COMMAND_VERSION})",
                e.version
            ));
        }
        Ok(e)
    }
}

/// The result of applying a command, handed back to its proposer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Submitted { app_id: String },
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Running,
    Unhealthy,
    Lost,
    Draining,
    Decommissioned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub address: String,
    pub vcores_milli: u64,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    pub registered_at_ms: u64,
    pub state_changed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    Submitted,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Killed,
}

impl AppState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            AppState::Succeeded | AppState::Failed | AppState::Killed
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub name: String,
    pub queue: String,
    pub user: String,
    pub state: AppState,
    pub spec: String,
    pub spec_format: String,
    pub submitted_at_ms: u64,
    pub finished_at_ms: u64,
    pub diagnostics: String,
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub apps: BTreeMap<String, App>,
    /// Number of the last application id handed out.
    pub app_seq: u64,
    /// Submission request id -> application id, for idempotent retries.
    pub submissions: BTreeMap<String, String>,
    /// RM group members: raft id -> address. Changed only by applied conf
    /// changes, and carried in snapshots so a new member learns everyone.
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
}

impl ClusterState {
    /// Applies one command. Deterministic: the same state and command give the
    /// same result on every member.
    pub fn apply(&mut self, cmd: &Command) -> Outcome {
        match cmd {
            Command::RegisterNode {
                node_id,
                address,
                vcores_milli,
                memory_bytes,
                gpus,
                labels,
                at_ms,
            } => {
                let registered_at_ms = self
                    .nodes
                    .get(node_id)
                    .map_or(*at_ms, |n| n.registered_at_ms);
                self.nodes.insert(
                    node_id.clone(),
                    Node {
                        id: node_id.clone(),
                        address: address.clone(),
                        vcores_milli: *vcores_milli,
                        memory_bytes: *memory_bytes,
                        gpus: gpus.clone(),
                        labels: labels.clone(),
                        state: NodeState::Running,
                        registered_at_ms,
                        state_changed_at_ms: *at_ms,
                    },
                );
                Outcome::Done
            }
            Command::SetNodeState {
                node_id,
                state,
                at_ms,
            } => match self.nodes.get_mut(node_id) {
                Some(n) => {
                    if n.state != *state {
                        n.state = *state;
                        n.state_changed_at_ms = *at_ms;
                    }
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("node_id: no node {node_id}")),
            },
            Command::SubmitApplication {
                request_id,
                name,
                queue,
                user,
                spec,
                spec_format,
                at_ms,
            } => {
                if !request_id.is_empty() {
                    if let Some(id) = self.submissions.get(request_id) {
                        return Outcome::Submitted { app_id: id.clone() };
                    }
                }
                self.app_seq += 1;
                let id = format!("app-{:06}", self.app_seq);
                self.apps.insert(
                    id.clone(),
                    App {
                        id: id.clone(),
                        name: name.clone(),
                        queue: queue.clone(),
                        user: user.clone(),
                        state: AppState::Submitted,
                        spec: spec.clone(),
                        spec_format: spec_format.clone(),
                        submitted_at_ms: *at_ms,
                        finished_at_ms: 0,
                        diagnostics: String::new(),
                    },
                );
                if !request_id.is_empty() {
                    self.submissions.insert(request_id.clone(), id.clone());
                }
                Outcome::Submitted { app_id: id }
            }
            Command::KillApplication { app_id, at_ms } => match self.apps.get_mut(app_id) {
                Some(a) if a.state.is_terminal() => Outcome::Done,
                Some(a) => {
                    a.state = AppState::Killed;
                    a.finished_at_ms = *at_ms;
                    a.diagnostics = "killed on request".into();
                    Outcome::Done
                }
                None => Outcome::Rejected(format!("application_id: no application {app_id}")),
            },
        }
    }

    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state serialises")
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(req: &str, at: u64) -> Command {
        Command::SubmitApplication {
            request_id: req.into(),
            name: "n".into(),
            queue: "root".into(),
            user: "u".into(),
            spec: "s".into(),
            spec_format: "yaml".into(),
            at_ms: at,
        }
    }

    #[test]
    fn submissions_get_sequential_ids_and_retries_are_idempotent() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&submit("r1", 10)),
            Outcome::Submitted {
                app_id: "app-000001".into()
            }
        );
        assert_eq!(
            s.apply(&submit("r2", 11)),
            Outcome::Submitted {
                app_id: "app-000002".into()
            }
        );
        assert_eq!(
            s.apply(&submit("r1", 12)),
            Outcome::Submitted {
                app_id: "app-000001".into()
            }
        );
        assert_eq!(s.apps.len(), 2);
        assert_eq!(
            s.apply(&submit("", 13)),
            Outcome::Submitted {
                app_id: "app-000003".into()
            }
        );
    }

    #[test]
    fn apply_is_deterministic_and_snapshots_round_trip() {
        let cmds = [
            submit("a", 1),
            Command::RegisterNode {
                node_id: "n1".into(),
                address: "h:1".into(),
                vcores_milli: 4000,
                memory_bytes: 1 << 30,
                gpus: vec![],
                labels: BTreeMap::new(),
                at_ms: 2,
            },
            Command::KillApplication {
                app_id: "app-000001".into(),
                at_ms: 3,
            },
            Command::SetNodeState {
                node_id: "n1".into(),
                state: NodeState::Draining,
                at_ms: 4,
            },
            Command::KillApplication {
                app_id: "app-999999".into(),
                at_ms: 5,
            },
        ];
        let (mut a, mut b) = (ClusterState::default(), ClusterState::default());
        let ra: Vec<Outcome> = cmds.iter().map(|c| a.apply(c)).collect();
        let rb: Vec<Outcome> = cmds.iter().map(|c| b.apply(c)).collect();
        assert_eq!(a, b);
        assert_eq!(ra, rb);
        assert_eq!(
            ra[4],
            Outcome::Rejected("application_id: no application app-999999".into())
        );
        assert_eq!(a.apps["app-000001"].state, AppState::Killed);
        assert_eq!(a.nodes["n1"].state, NodeState::Draining);
        assert_eq!(ClusterState::from_snapshot(&a.to_snapshot()).unwrap(), a);
    }

    #[test]
    fn envelope_round_trip_and_version_check() {
        let e = Envelope {
            version: COMMAND_VERSION,
            origin: 2,
            request: 7,
            command: submit("x", 1),
        };
        assert_eq!(Envelope::decode(&e.encode()).unwrap(), e);
        let mut v2 = e.clone();
        v2.version = 99;
        assert!(Envelope::decode(&v2.encode())
            .unwrap_err()
            .contains("version 99"));
    }
}
