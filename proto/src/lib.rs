//! Weft's wire format: every gRPC service and message, generated from the
//! `.proto` files beside this crate (`weft/v1/*.proto`).
//!
//! | service | served by | called by |
//! |---|---|---|
//! | [`v1::container_manager_server::ContainerManager`] | node agent | app master, RM |
//! | [`v1::resource_tracker_server::ResourceTracker`] | RM | node agent |
//! | [`v1::application_master_service_server::ApplicationMasterService`] | RM; a node agent on its Unix socket, passing calls on | app master |
//! | [`v1::agent_relay_server::AgentRelay`] | node agent, on its Unix socket | app master |
//! | [`v1::client_service_server::ClientService`] | RM | rmctl, client library |
//! | [`v1::raft_transport_server::RaftTransport`] | RM | RM peers |

/// Generated code of package `weft.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.v1");
}

/// Exit statuses Weft reports for kills it decided, so they never read like an
/// ordinary failure (which is the process's own code, 0..=255, or 128 + signal).
pub mod exit_codes {
    /// Killed because the container went over its memory quota.
    pub const OVER_MEMORY_QUOTA: i32 = -104;
    /// Stopped on request (StopContainer, application killed).
    pub const USER_REQUESTED: i32 = -105;
    /// Killed because the container went over its GPU memory quota.
    pub const OVER_GPU_MEMORY_QUOTA: i32 = -106;
    /// Killed because it ran past its wall-time limit.
    pub const WALL_TIME_EXCEEDED: i32 = -107;
    /// Stopped because the node agent shut down.
    pub const AGENT_SHUTDOWN: i32 = -108;
    /// The agent lost track of it (e.g. the agent died and found it at restart).
    pub const LOST: i32 = -109;
    /// Preempted by the scheduler.
    pub const PREEMPTED: i32 = -102;
    /// Its node was declared lost.
    pub const NODE_LOST: i32 = -100;
    /// The process could not be started at all.
    pub const LAUNCH_FAILED: i32 = -110;
    /// Killed by its own node, cut off from the resource manager for the
    /// RM's `node_expiry` (the RM may rerun it elsewhere).
    pub const FENCED: i32 = -111;
}

pub mod token;
