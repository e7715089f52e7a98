//! Checks a StartContainer request field by field. Every refusal names the
//! field and says why, so the caller can fix the request.

use std::collections::BTreeMap;
use std::time::Duration;

use weft_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::model::{ContainerSpec, ResourceRequest};

/// Longest container id (it names a cgroup and directories).
pub const MAX_ID_LEN: usize = 128;

/// Longest `NAME=value` string of one environment variable: Linux's
/// MAX_ARG_STRLEN (32 pages) less the NUL; a longer one fails the exec.
pub const MAX_ENV_VAR_BYTES: usize = 128 * 1024 - 1;

/// Most bytes of environment and arguments together (Linux refuses an exec
/// past a quarter of the stack limit, 2 MiB with the usual 8 MiB).
pub const MAX_ENV_AND_ARGS_BYTES: usize = 1 << 20;

/// Most files a request may have written, and their bytes in all.
pub const MAX_FILES: usize = 16;
pub const MAX_FILES_BYTES: usize = 4 << 20;

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
        let bytes = k.len() + 1 + v.len();
        if bytes > MAX_ENV_VAR_BYTES {
            return Err(Error::invalid(
                "env",
                format!(
                    "{k} is {bytes} bytes with its name; a process environment holds at most {MAX_ENV_VAR_BYTES} per variable (hand larger data in files)"
                ),
            ));
        }
        env.insert(k, v);
    }
    let total: usize = env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        + req.command.len()
        + req.args.iter().map(|a| a.len() + 1).sum::<usize>();
    if total > MAX_ENV_AND_ARGS_BYTES {
        return Err(Error::invalid(
            "env",
            format!("the environment and arguments are {total} bytes in all; at most {MAX_ENV_AND_ARGS_BYTES} (hand larger data in files)"),
        ));
    }
    if req.files.len() > MAX_FILES {
        return Err(Error::invalid(
            "files",
            format!("{} files; at most {MAX_FILES}", req.files.len()),
        ));
    }
    let file_bytes: usize = req.files.values().map(Vec::len).sum();
    if file_bytes > MAX_FILES_BYTES {
        return Err(Error::invalid(
            "files",
            format!("{file_bytes} bytes in all; at most {MAX_FILES_BYTES}"),
        ));
    }
    if let Some(bad) = req.files.keys().find(|n| !file_name_ok(n)) {
        return Err(Error::invalid(
            "files",
            format!(
                "{bad:?} is not a plain file name (1-255 bytes, no '/' or NUL, not '.' or '..')"
            ),
        ));
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
    if !req.checkpoint_key.is_empty() && !checkpoint_key_ok(&req.checkpoint_key) {
        return Err(Error::invalid(
            "checkpoint_key",
            format!(
                "{:?} must be 1-{MAX_CHECKPOINT_KEY} bytes of at most 4 '/'-separated parts, each letters, digits, '-', '_' or '.', not '.' or '..'",
                req.checkpoint_key.chars().take(80).collect::<String>()
            ),
        ));
    }
    Ok(ContainerSpec {
        id,
        checkpoint_key: req.checkpoint_key,
        command: req.command,
        args: req.args,
        env,
        files: req.files.into_iter().collect(),
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

/// Longest checkpoint key.
pub const MAX_CHECKPOINT_KEY: usize = 256;

/// A relative path of a few plain parts: it cannot leave the application's
/// checkpoint directory.
fn checkpoint_key_ok(k: &str) -> bool {
    let parts: Vec<&str> = k.split('/').collect();
    k.len() <= MAX_CHECKPOINT_KEY
        && parts.len() <= 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn file_name_ok(n: &str) -> bool {
    !n.is_empty() && n.len() <= 255 && n != "." && n != ".." && !n.contains(['/', '\0'])
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
    fn a_checkpoint_key_cannot_leave_its_applications_directory() {
        for bad in ["../x", "a/../b", "/abs", "a//b", "a/b/c/d/e", "a b", "."] {
            let mut r = req();
            r.checkpoint_key = bad.into();
            assert!(err(r, 0).starts_with("checkpoint_key:"), "{bad}");
        }
        let mut r = req();
        r.checkpoint_key = "x".repeat(MAX_CHECKPOINT_KEY + 1);
        assert!(err(r, 0).starts_with("checkpoint_key:"));
        for good in ["train/0", "train/worker/3", "t.x-1_y"] {
            let mut r = req();
            r.checkpoint_key = good.into();
            assert_eq!(start_request(r, 0).unwrap().checkpoint_key, good);
        }
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

    #[test]
    fn what_an_exec_could_not_take_is_refused_by_name_and_files_take_the_rest() {
        // One variable past Linux's per-string limit: the exec would fail.
        let mut r = req();
        r.env
            .insert("SPEC".into(), "x".repeat(MAX_ENV_VAR_BYTES - 5));
        assert!(start_request(r, 0).is_ok(), "SPEC=... is exactly the limit");
        let mut r = req();
        r.env
            .insert("SPEC".into(), "x".repeat(MAX_ENV_VAR_BYTES - 4));
        let e = err(r, 0);
        assert!(
            e.starts_with("env: SPEC is 131072 bytes with its name") && e.contains("files"),
            "{e}"
        );
        // Many variables under the limit each, too many bytes in all.
        let mut r = req();
        for i in 0..9 {
            r.env.insert(format!("V{i}"), "x".repeat(120_000));
        }
        assert!(err(r, 0).starts_with("env: the environment and arguments are"));
        // The same bytes as files are fine, written under plain names only.
        let mut r = req();
        for i in 0..9 {
            r.files.insert(format!("part-{i}"), vec![b'x'; 120_000]);
        }
        let spec = start_request(r, 0).unwrap();
        assert_eq!(spec.files.len(), 9);
        for bad in ["", ".", "..", "a/b", "../etc"] {
            let mut r = req();
            r.files.insert(bad.into(), b"x".to_vec());
            assert!(err(r, 0).starts_with("files:"), "{bad:?}");
        }
        let mut r = req();
        r.files.insert("big".into(), vec![0; MAX_FILES_BYTES + 1]);
        assert!(err(r, 0).starts_with("files: 4194305 bytes in all; at most 4194304"));
        let mut r = req();
        for i in 0..=MAX_FILES {
            r.files.insert(format!("f{i}"), vec![]);
        }
        assert_eq!(err(r, 0), "files: 17 files; at most 16");
    }
}
