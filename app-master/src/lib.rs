//! Weft's application master: one per job attempt. It registers with the
//! resource manager, asks for containers, starts sub-tasks on the granted nodes
//! through their `ContainerManager`, retries failures and reports the job's end.
//! The job spec model and its checks live in `weft-spec` (shared with the RM,
//! which refuses bad specs at submit); the client loop that follows the RM
//! leader lives in `weft-common`. The wire format it speaks is `weft_proto::v1::application_master_service_client`
//! and `weft_proto::v1::container_manager_client`.

pub mod client;
pub mod health;
pub mod runner;

pub use weft_proto::v1 as proto;
