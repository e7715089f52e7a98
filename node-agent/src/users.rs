//! Tasks run as their user (`containers.run_as_user`): the user a
//! container's token names (its application's, signed by the RM), looked up
//! on this node; its uid, gid and supplementary groups are set in the
//! container's first process before exec, after it joined its cgroups (which
//! takes root), and its work dir and logs belong to it. Root runs a task
//! only in the queues `containers.root_queues` lists.

use std::ffi::CString;

use serde::{Deserialize, Serialize};

use crate::config::ContainersConfig;
use crate::error::{Error, Result};

/// Who a container's processes run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<u32>,
}

/// Whether this agent may switch users (it runs as root).
pub fn can_switch() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Who a container of `user` in `queue` runs as on `node`: None when tasks
/// run as the agent's user; a refusal naming the user when it does not
/// exist here, or is root outside the queues allowed it.
pub fn resolve(
    cfg: &ContainersConfig,
    user: &str,
    queue: &str,
    node: &str,
) -> Result<Option<RunAs>> {
    if !cfg.run_as_user {
        return Ok(None);
    }
    if user.is_empty() {
        return Err(Error::PermissionDenied(
            "the container token names no user, and this node runs tasks as their users (an older resource manager?)".into(),
        ));
    }
    let found = nix::unistd::User::from_name(user).map_err(|e| {
        Error::FailedPrecondition(format!("user {user}: looking it up on node {node}: {e}"))
    })?;
    let Some(u) = found else {
        return Err(Error::FailedPrecondition(format!(
            "user {user} does not exist on node {node}, which runs tasks as their users: create it there, or submit as a user it has"
        )));
    };
    if u.uid.is_root() && !cfg.root_queues.iter().any(|q| q == queue) {
        return Err(Error::PermissionDenied(format!(
            "user {user} is root: node {node} runs root's tasks only in queues {:?}, not {queue}",
            cfg.root_queues
        )));
    }
    let name = CString::new(user).map_err(|_| Error::invalid("user", "holds a NUL byte"))?;
    let groups = nix::unistd::getgrouplist(&name, u.gid)
        .map_err(|e| {
            Error::FailedPrecondition(format!("user {user}: its groups on node {node}: {e}"))
        })?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(Some(RunAs {
        name: user.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
    }))
}

/// Makes `path` (a container's dir or file) the user's, readable by it
/// alone (`mode`).
pub fn give(path: &std::path::Path, who: &RunAs, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid))
        .map_err(|e| Error::io("giving to its user", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting the mode of", path, e))
}

/// Makes `cmd`'s process drop to `who` before exec: supplementary groups,
/// then gid, then uid (after the closures registered before, such as
/// joining the cgroups, which need root).
pub fn drop_on_exec(cmd: &mut std::process::Command, who: &RunAs) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = who.groups.clone();
    let (uid, gid) = (who.uid, who.gid);
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_resolved_or_refused_by_name() {
        let mut cfg = ContainersConfig::default();
        assert_eq!(
            resolve(&cfg, "", "root", "n1").unwrap(),
            None,
            "off by default"
        );
        cfg.run_as_user = true;
        let e = resolve(&cfg, "no-such-user-weft", "root", "n1").unwrap_err();
        assert!(
            e.to_string()
                .contains("user no-such-user-weft does not exist on node n1"),
            "{e}"
        );
        assert!(resolve(&cfg, "", "root", "n1").is_err());
        let e = resolve(&cfg, "root", "root.team", "n1").unwrap_err();
        assert!(
            e.to_string().contains("runs root's tasks only in queues"),
            "{e}"
        );
        cfg.root_queues = vec!["root.ops".into()];
        let r = resolve(&cfg, "root", "root.ops", "n1").unwrap().unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        let n = resolve(&cfg, "nobody", "root.team", "n1").unwrap().unwrap();
        assert_eq!(n.uid, 65534);
        assert!(n.groups.contains(&n.gid));
    }
}
