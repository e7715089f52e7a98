//! The replicated state machine: the cluster's truth as a pure function of the
//! raft log. Commands carry their own time and ids; applying one reads no clock
//! and no randomness, so every member computes the same state.
//!
//! By concern: [`command`] (commands and their encoding), [`model`] (what
//! the state holds), `apply` (one command at a time), `verify` (plan
//! verification, also used by the leader before it proposes), `invariants`,
//! `snapshot`, [`changes`] (which nodes changed, for the scheduler's view).

mod apply;
pub mod changes;
pub mod command;
mod invariants;
pub mod model;
mod snapshot;
mod verify;

pub use command::*;
pub use model::*;
pub use verify::{Refusal, Verdict};

#[cfg(test)]
pub(crate) mod tests;
