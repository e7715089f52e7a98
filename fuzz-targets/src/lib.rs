//! What each fuzz target does with its input. A target returns normally for
//! any input, refusals included; a panic (or an abort, a hang, unbounded
//! memory) is a finding. `fuzz/` runs these under libFuzzer (cargo-fuzz);
//! this crate's test runs them over every seed and every regression input
//! checked in under `fuzz/`.

use prost::Message;
use weft_proto::v1 as pb;
use weft_resource_manager::fsm::{ClusterState, Envelope};

/// Job spec parsing and checking, YAML and TOML (the first byte picks the
/// format), as the RM does at submit and the master at start.
pub fn spec(data: &[u8]) {
    let Some((&format, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = if format % 2 == 0 { "yaml" } else { "toml" };
    if let Ok(spec) = weft_spec::JobSpec::parse(text, format) {
        // What parsed passes its own checks, and its own AM resources
        // give a usable ask.
        spec.validate().expect("a parsed spec is valid");
        if let Some(am) = &spec.am {
            let _ = (am.gpu_split(), am.node_label_expr());
        }
    }
}

/// The replicated command decoder and the state machine: each line is an
/// envelope; those that decode are applied in order to one state, which
/// must then survive a snapshot round trip unchanged. A panic here would
/// stop every member at the same entry.
pub fn commands(data: &[u8]) {
    let mut state = ClusterState::default();
    for line in data.split(|b| *b == b'\n').take(64) {
        if let Ok(env) = Envelope::decode(line) {
            state.apply(&env.command);
        }
    }
    let snap = state.to_snapshot();
    let back = ClusterState::from_snapshot(&snap).expect("a state's own snapshot reads back");
    assert_eq!(
        back.to_snapshot(),
        snap,
        "a snapshot round trip changes nothing"
    );
}

/// Snapshot decoding (what a member installs from the leader or reads at
/// start): anything that decodes encodes back to something that decodes
/// to the same.
pub fn snapshot(data: &[u8]) {
    if let Ok(state) = ClusterState::from_snapshot(data) {
        let snap = state.to_snapshot();
        let again = ClusterState::from_snapshot(&snap).expect("re-encoded snapshot reads back");
        assert_eq!(again.to_snapshot(), snap);
    }
}

/// Validation of gRPC requests as they arrive (protobuf bytes): the first
/// byte picks the request: node registration, an application master's
/// Allocate, an agent's StartContainer, a job submission's spec.
pub fn requests(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(r) = pb::RegisterNodeRequest::decode(rest) {
                let _ = weft_resource_manager::service::tracker::check_registration(&r);
            }
        }
        1 => {
            if let Ok(r) = pb::AllocateRequest::decode(rest) {
                let _ = weft_resource_manager::service::am::check_sizes(&r);
            }
        }
        2 => {
            if let Ok(r) = pb::StartContainerRequest::decode(rest) {
                let _ = weft_node_agent::validate::start_request(r, 8);
            }
        }
        _ => {
            if let Ok(r) = pb::SubmitApplicationRequest::decode(rest) {
                let _ = weft_spec::JobSpec::parse(&r.spec, &r.spec_format);
            }
        }
    }
}

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus test and `fuzz/`.
pub const TARGETS: [(&str, Target); 4] = [
    ("spec", spec),
    ("commands", commands),
    ("snapshot", snapshot),
    ("requests", requests),
];
