//! Container logs: reading stdout/stderr from an offset (following a running
//! container), and retention of ended containers' logs by age and disk budget.
//! Logs live in `<work_dir>/logs/<container id>/{stdout,stderr}`, apart from
//! the work directory, so they outlive it; an agent restart keeps them and the
//! retention rules still apply (by file age) to logs no record knows.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tracing::{debug, info};
use weft_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::validate;

/// Copies an ended container's logs (`log_dir`'s stdout and stderr) to
/// `<dir>/<id>/`: each stream whole, or its last `max` bytes with
/// `<stream>.start` holding the offset they start at. Built in a fresh
/// directory of a random name and renamed into place (an earlier copy moved
/// aside first), so a reader sees all of one copy or none. The sources are
/// opened without following links (a task owns its log directory and could
/// put a link there to a file only root may read); what is written is
/// owner read-write, group read (0640, directories 0750): the logs may hold
/// secrets, and the store is shared.
pub fn aggregate(dir: &Path, max: u64, log_dir: &Path, id: &str) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if !validate::container_id_ok(id) {
        return Err(std::io::Error::other(format!(
            "{id:?} is not a container id"
        )));
    }
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new().prefix(".weft-").tempdir_in(dir)?;
    for name in ["stdout", "stderr"] {
        let src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(log_dir.join(name));
        let mut src = match src {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(std::io::Error::other(format!(
                    "{}: a symbolic link, not the container's log",
                    log_dir.join(name).display()
                )))
            }
            Err(e) => return Err(e),
        };
        let meta = src.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!(
                "{}: not a regular file",
                log_dir.join(name).display()
            )));
        }
        let start = meta.len().saturating_sub(max);
        src.seek(SeekFrom::Start(start))?;
        let create = |p: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(p)
        };
        let mut out = create(&tmp.path().join(name))?;
        std::io::copy(&mut src.take(max), &mut out)?;
        out.sync_all()?;
        if start > 0 {
            use std::io::Write;
            create(&tmp.path().join(format!("{name}.start")))?
                .write_all(start.to_string().as_bytes())?;
        }
    }
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o750))?;
    let dest = dir.join(id);
    // An earlier copy (an agent that restarted after the end): aside, then
    // replaced, then removed.
    let old = if std::fs::symlink_metadata(&dest).is_ok() {
        let aside = tempfile::Builder::new()
            .prefix(".weft-old-")
            .tempdir_in(dir)?;
        std::fs::rename(&dest, aside.path().join("x"))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(tmp.keep(), &dest)?;
    drop(old);
    Ok(())
}

/// Largest chunk sent in one message.
pub const CHUNK: usize = 64 * 1024;
/// How often a follower looks for new output.
pub const FOLLOW_POLL: Duration = Duration::from_millis(100);

fn file_name(stream: pb::LogStream) -> &'static str {
    match stream {
        pb::LogStream::Stdout => "stdout",
        pb::LogStream::Stderr => "stderr",
    }
}

/// Opens a container's log for reading; the returned channel yields chunks
/// until the end (or, with `follow`, until the container ended and all its
/// output was sent). Errors come before the stream starts.
pub async fn read(
    mgr: &Manager,
    id: &str,
    stream: pb::LogStream,
    offset: u64,
    follow: bool,
) -> Result<mpsc::Receiver<Result<pb::LogChunk, tonic::Status>>> {
    if !validate::container_id_ok(id) {
        return Err(Error::invalid(
            "container_id",
            format!("{id:?} is not a valid container id"),
        ));
    }
    let permit = mgr.log_stream_permit()?;
    let path = mgr.logs_root().join(id).join(file_name(stream));
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(format!(
                "{id} (no logs: it never ran on this node, or its logs passed their retention)"
            ))
        } else {
            Error::io("opening log", &path, e)
        }
    })?;
    let container = mgr.get(id);
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        // Held while the stream is served.
        let _permit = permit;
        let mut pos = offset;
        if let Err(e) = file.seek(std::io::SeekFrom::Start(offset)).await {
            let _ = tx
                .send(Err(tonic::Status::internal(format!("seeking log: {e}"))))
                .await;
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Done is read before the file, so output written before the end
            // is never missed.
            let ended = container.as_ref().is_none_or(|c| c.record().is_done());
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx
                        .send(Err(tonic::Status::internal(format!("reading log: {e}"))))
                        .await;
                    return;
                }
            };
            if n > 0 {
                let chunk = pb::LogChunk {
                    offset: pos,
                    data: buf[..n].to_vec(),
                };
                pos += n as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the reader went away
                }
                continue;
            }
            if !follow || ended {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_POLL) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}

/// One log directory and what retention needs to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDir {
    pub id: String,
    pub bytes: u64,
    /// When its container ended (or, unknown to the agent, the last write).
    pub ended: SystemTime,
}

/// Which ended containers' logs to remove: those older than `retention`, then
/// the oldest until the rest fit in `budget`. Pure, for testing.
pub fn to_remove(
    mut dirs: Vec<LogDir>,
    now: SystemTime,
    retention: Duration,
    budget: u64,
) -> Vec<String> {
    dirs.sort_by_key(|d| d.ended);
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for d in dirs {
        if now.duration_since(d.ended).unwrap_or_default() > retention {
            out.push(d.id);
        } else {
            keep.push(d);
        }
    }
    let mut total: u64 = keep.iter().map(|d| d.bytes).sum();
    for d in keep {
        if total <= budget {
            break;
        }
        total -= d.bytes;
        out.push(d.id);
    }
    out
}

fn dir_size_and_mtime(dir: &Path) -> (u64, SystemTime) {
    let mut bytes = 0;
    let mut newest = SystemTime::UNIX_EPOCH;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                bytes += m.len();
                if let Ok(t) = m.modified() {
                    newest = newest.max(t);
                }
            }
        }
    }
    (bytes, newest)
}

/// Applies retention once: removes the chosen log directories and forgets
/// their containers. Returns the removed ids.
pub async fn sweep(mgr: &Manager) -> Vec<String> {
    let root: PathBuf = mgr.logs_root().to_path_buf();
    let known: Vec<(String, bool, Option<SystemTime>)> = mgr
        .list(true)
        .into_iter()
        .map(|r| (r.spec.id.clone(), r.is_done(), r.finished_at))
        .collect();
    let cfg = mgr.logs_config().clone();
    let removed = crate::manager::blocking(move || {
        let mut dirs = Vec::new();
        for id in crate::driver::cgroupfs::subdirs(&root) {
            let (bytes, mtime) = dir_size_and_mtime(&root.join(&id));
            let ended = match known.iter().find(|k| k.0 == id) {
                Some((_, false, _)) => continue, // still running: never removed
                Some((_, true, Some(t))) => *t,
                _ => mtime,
            };
            dirs.push(LogDir { id, bytes, ended });
        }
        let ids = to_remove(
            dirs,
            SystemTime::now(),
            cfg.retention,
            cfg.disk_budget.as_u64(),
        );
        for id in &ids {
            let _ = std::fs::remove_dir_all(root.join(id));
        }
        ids
    })
    .await;
    for id in &removed {
        mgr.forget(id);
    }
    if !removed.is_empty() {
        info!(count = removed.len(), "removed logs past retention");
    } else {
        debug!("log retention: nothing to remove");
    }
    removed
}

/// Removes the checkpoints of applications none of whose containers runs
/// here and in which nothing changed for the retention (with a shared
/// `checkpoint_dir`, of applications idle that long everywhere). Returns
/// the applications whose checkpoints went.
pub async fn sweep_checkpoints(mgr: &Manager) -> Vec<String> {
    let (root, retention) = mgr.checkpoints();
    let root = root.to_path_buf();
    let running: std::collections::HashSet<String> = mgr
        .list(false)
        .into_iter()
        .map(|r| r.application_id)
        .collect();
    let removed = crate::manager::blocking(move || {
        remove_stale_checkpoints(&root, &running, retention, SystemTime::now())
    })
    .await;
    if !removed.is_empty() {
        info!(applications = ?removed, "removed checkpoints past retention");
    }
    removed
}

/// The work of [`sweep_checkpoints`]: removes the applications' directories
/// under `root` that are not `running` and in which nothing changed for
/// `retention` before `now`; returns them.
pub fn remove_stale_checkpoints(
    root: &Path,
    running: &std::collections::HashSet<String>,
    retention: std::time::Duration,
    now: SystemTime,
) -> Vec<String> {
    let mut out = Vec::new();
    for app in crate::driver::cgroupfs::subdirs(root) {
        if running.contains(&app) {
            continue;
        }
        let dir = root.join(&app);
        // The newest change: the application's directory or a task's
        // (saving a checkpoint by rename changes its task's).
        let mut newest = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .unwrap_or(now);
        for task in crate::driver::cgroupfs::subdirs(&dir) {
            let (_, t) = dir_size_and_mtime(&dir.join(task));
            newest = newest.max(t);
        }
        if now.duration_since(newest).unwrap_or_default() >= retention {
            let _ = std::fs::remove_dir_all(&dir);
            out.push(app);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn checkpoints_go_once_idle_for_the_retention_and_never_while_their_application_runs_here() {
        use std::time::{Duration, SystemTime};
        let tmp = tempfile::tempdir().unwrap();
        for (app, task) in [("app-000001", "train+0"), ("app-000002", "work+3")] {
            std::fs::create_dir_all(tmp.path().join(app).join(task)).unwrap();
            std::fs::write(tmp.path().join(app).join(task).join("step"), "7").unwrap();
        }
        let running: std::collections::HashSet<String> = ["app-000002".to_string()].into();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        // Fresh: nothing goes.
        assert!(super::remove_stale_checkpoints(tmp.path(), &running, day, now).is_empty());
        // A day later: the idle one goes, the running one stays.
        let gone = super::remove_stale_checkpoints(tmp.path(), &running, day, now + day);
        assert_eq!(gone, vec!["app-000001".to_string()]);
        assert!(!tmp.path().join("app-000001").exists());
        assert!(tmp.path().join("app-000002/work+3/step").exists());
    }

    #[test]
    fn aggregation_copies_each_stream_whole_or_its_tail_with_where_it_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let (logs, store) = (tmp.path().join("logs"), tmp.path().join("store"));
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::create_dir_all(&store).unwrap();
        let out: Vec<u8> = (0..100u8).collect();
        std::fs::write(logs.join("stdout"), &out).unwrap();
        std::fs::write(logs.join("stderr"), b"short").unwrap();
        aggregate(&store, 40, &logs, "c1-7").unwrap();
        let d = store.join("c1-7");
        assert_eq!(std::fs::read(d.join("stdout")).unwrap(), out[60..].to_vec());
        assert_eq!(
            std::fs::read_to_string(d.join("stdout.start")).unwrap(),
            "60"
        );
        assert_eq!(std::fs::read(d.join("stderr")).unwrap(), b"short");
        assert!(!d.join("stderr.start").exists());
        // Again (an agent restarted after the end): replaced whole.
        std::fs::write(logs.join("stdout"), b"new").unwrap();
        aggregate(&store, 40, &logs, "c1-7").unwrap();
        assert_eq!(std::fs::read(d.join("stdout")).unwrap(), b"new");
        assert!(!d.join("stdout.start").exists());
        // No temporary left, and a bad id refused.
        assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
        assert!(aggregate(&store, 40, &logs, "../x").is_err());
        // Owner read-write, group read: the store is shared.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("stdout")), 0o640);
        assert_eq!(mode(&d), 0o750);
        // A task's link in place of its log is not followed.
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        std::fs::remove_file(logs.join("stdout")).unwrap();
        std::os::unix::fs::symlink(&secret, logs.join("stdout")).unwrap();
        let e = aggregate(&store, 40, &logs, "c1-8").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!store.join("c1-8").exists());
        assert_eq!(
            std::fs::read_dir(&store).unwrap().count(),
            1,
            "a temporary left"
        );
    }

    use super::*;

    #[test]
    fn retention_by_age_then_budget() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = |id: &str, bytes, age_s| LogDir {
            id: id.into(),
            bytes,
            ended: t0 - Duration::from_secs(age_s),
        };
        let dirs = vec![
            d("old", 10, 7200),
            d("a", 100, 30),
            d("b", 100, 20),
            d("c", 100, 10),
        ];
        // One hour retention drops "old"; budget 250 then drops the oldest ("a").
        assert_eq!(
            to_remove(dirs.clone(), t0, Duration::from_secs(3600), 250),
            vec!["old", "a"]
        );
        assert_eq!(
            to_remove(dirs.clone(), t0, Duration::from_secs(3600), 1000),
            vec!["old"]
        );
        assert!(to_remove(dirs, t0, Duration::from_secs(86400), 1000).is_empty());
    }
}
