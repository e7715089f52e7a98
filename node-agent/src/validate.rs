//! Checks a StartContainer request field by field. Every refusal names the
//! field and says why, so the caller can fix the request.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::model::{ContainerSpec, ResourceRequest};

/// Longest container id (it names a cgroup and directories).
pub const MAX_ID_LEN: usize = 128;

/// Shape checks that need no node state.
pub fn start_request(req: pb::StartContainerRequest, gpu_count: usize) -> Result<ContainerSpec> {
    let id = req.container_id;
    if id.is_empty() {
        return Err(Error::invalid("container_id", "must not be empty"));
    }
    if !container_id_ok(&id) {
        return Err(Error::invalid(
            "container_id",
            format!("{id:?} must be at most {MAX_ID_LEN} letters, digits, '-', '_' or '.', not starting with '.'"),
        ));
    }
    if req.command.trim().is_empty() {
        return Err(Error::invalid("command", "must not be empty"));
    }
    if req.command.contains('\0') || req.args.iter().any(|a| a.contains('\0')) {
        return Err(Error::invalid("command", "must not contain NUL bytes"));
    }
    let mut env = BTreeMap::new();
    for (k, v) in req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::invalid(
                "env",
                format!("{k:?} is not a valid variable name"),
            ));
        }
        if v.contains('\0') {
            return Err(Error::invalid(
                "env",
                format!("value of {k} contains a NUL byte"),
            ));
        }
        env.insert(k, v);
    }
    let r = req
        .resources
        .ok_or_else(|| Error::invalid("resources", "must be set (at least memory_bytes)"))?;
    if r.memory_bytes == 0 {
        return Err(Error::invalid(
            "resources.memory_bytes",
            "must be greater than zero",
        ));
    }
    if r.memory_bytes < MIN_MEMORY {
        return Err(Error::invalid(
            "resources.memory_bytes",
            format!(
                "{} is below the minimum of {MIN_MEMORY} bytes (1 MiB)",
                r.memory_bytes
            ),
        ));
    }
    let mut gpus = r.gpu_indices.clone();
    gpus.sort_unstable();
    gpus.dedup();
    if gpus.len() != r.gpu_indices.len() {
        return Err(Error::invalid("resources.gpu_indices", "lists a GPU twice"));
    }
    if let Some(bad) = gpus.iter().find(|&&i| i as usize >= gpu_count) {
        return Err(Error::invalid(
            "resources.gpu_indices",
            if gpu_count == 0 {
                format!("GPU {bad} does not exist: this node has no GPUs")
            } else {
                format!(
                    "GPU {bad} does not exist: this node has GPUs 0..={}",
                    gpu_count - 1
                )
            },
        ));
    }
    if r.gpu_share_milli > 0 && (r.gpu_share_milli > 1000 || gpus.len() != 1) {
        return Err(Error::invalid(
            "resources.gpu_share_milli",
            "a share is 1 to 1000 thousandths of exactly one GPU in resources.gpu_indices",
        ));
    }
    if r.gpu_memory_bytes > 0 && gpus.is_empty() {
        return Err(Error::invalid(
            "resources.gpu_memory_bytes",
            "a GPU memory quota needs at least one GPU in resources.gpu_indices",
        ));
    }
    Ok(ContainerSpec {
        id,
        command: req.command,
        args: req.args,
        env,
        resources: ResourceRequest {
            vcores_milli: r.vcores_milli,
            memory_bytes: r.memory_bytes,
            pids_limit: r.pids_limit,
            gpu_indices: gpus,
            gpu_memory_bytes: r.gpu_memory_bytes,
            gpu_share_milli: r.gpu_share_milli,
            max_runtime: (r.max_runtime_ms > 0).then(|| Duration::from_millis(r.max_runtime_ms)),
        },
    })
}

/// Smallest memory limit accepted: below it a process cannot even start.
pub const MIN_MEMORY: u64 = 1 << 20;

pub fn container_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> pb::StartContainerRequest {
        pb::StartContainerRequest {
            container_id: "c1".into(),
            command: "true".into(),
            resources: Some(pb::ContainerResources {
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn err(r: pb::StartContainerRequest, gpus: usize) -> String {
        start_request(r, gpus).unwrap_err().to_string()
    }

    #[test]
    fn good_request_passes() {
        let mut r = req();
        r.resources.as_mut().unwrap().gpu_indices = vec![1, 0];
        r.resources.as_mut().unwrap().max_runtime_ms = 1500;
        let s = start_request(r, 2).unwrap();
        assert_eq!(s.resources.gpu_indices, vec![0, 1]);
        assert_eq!(s.resources.max_runtime, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = req();
        r.command = " ".into();
        assert!(err(r, 0).starts_with("command: must not be empty"));
        let mut r = req();
        r.container_id = "../x".into();
        assert!(err(r, 0).starts_with("container_id:"));
        let mut r = req();
        r.resources.as_mut().unwrap().memory_bytes = 0;
        assert!(err(r, 0).starts_with("resources.memory_bytes: must be greater than zero"));
        let mut r = req();
        r.resources = None;
        assert!(err(r, 0).starts_with("resources:"));
        let mut r = req();
        r.resources.as_mut().unwrap().gpu_indices = vec![2];
        assert_eq!(
            err(r, 2),
            "resources.gpu_indices: GPU 2 does not exist: this node has GPUs 0..=1"
        );
        let mut r = req();
        r.resources.as_mut().unwrap().gpu_indices = vec![1, 1];
        assert!(err(r, 2).contains("twice"));
        let mut r = req();
        r.resources.as_mut().unwrap().gpu_memory_bytes = 5;
        assert!(err(r, 2).starts_with("resources.gpu_memory_bytes:"));
        let mut r = req();
        r.resources.as_mut().unwrap().gpu_indices = vec![0, 1];
        r.resources.as_mut().unwrap().gpu_share_milli = 500;
        assert!(err(r, 2).starts_with("resources.gpu_share_milli:"));
        let mut r = req();
        r.env.insert("A=B".into(), "x".into());
        assert!(err(r, 0).starts_with("env:"));
    }
}
