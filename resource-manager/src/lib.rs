//! Weft's resource manager.
//!
//! Owns the cluster's truth (nodes, queues, applications, containers) as a state
//! machine replicated with Raft, runs the scheduler on the leader and serves
//! `ClientService`, `ResourceTracker` and `ApplicationMasterService`
//! (see `weft_proto::v1`). Built in stages: the wire format is fixed in
//! `weft-proto`; the replicated state and services land here next.

pub use weft_proto::v1 as proto;
