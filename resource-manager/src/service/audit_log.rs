//! The audit log (`audit_log = "/var/log/weft/audit.jsonl"` in a member's
//! config): one JSON line for every write this member was asked for through
//! ClientService (submissions, kills, drains, queue and membership changes,
//! tokens), whether it was done, refused or failed: when, which member, who
//! (user, how recognised, token accessor), from where, what, on what, and
//! the outcome with its reason.
//!
//! Lines go through a channel to a thread of their own that appends them
//! (file mode 0600, `O_APPEND`): a request never waits on the disk. Lines
//! still queued when the process is killed are lost; a line that cannot be
//! written is said in the member's log.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

use serde::Serialize;
use tonic::Status;

use super::auth::{Method, Who};

/// What one write was, filled in as its handler learns it.
#[derive(Debug, Clone)]
pub struct Note {
    pub action: &'static str,
    pub from: Option<SocketAddr>,
    pub who: Option<Who>,
    /// What it acted on: an application, node, member, user or token.
    pub target: String,
    /// Its command was handed to raft: from then on, an error may come
    /// though the command is (or will be) applied.
    pub proposed: bool,
}

impl Note {
    pub fn new<T>(action: &'static str, req: &tonic::Request<T>) -> Note {
        Note {
            action,
            from: weft_common::net::remote_addr(req),
            who: None,
            target: String::new(),
            proposed: false,
        }
    }
}

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub at: String,
    pub at_ms: u64,
    pub member: u64,
    pub user: Option<&'a str>,
    /// token, certificate, member or none (ACLs off).
    pub method: Option<&'static str>,
    pub accessor: Option<&'a str>,
    pub from: Option<String>,
    pub action: &'static str,
    pub target: &'a str,
    /// ok, refused (unauthenticated or not allowed) or failed.
    pub outcome: &'static str,
    /// The gRPC code of a refusal or failure.
    pub code: Option<String>,
    pub reason: Option<&'a str>,
}

/// Where a member's audit lines go (nowhere when not configured).
#[derive(Clone, Default)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<String>>,
    member: u64,
}

impl AuditLog {
    /// Appends to `path` (created 0600 if missing) from a thread of its own.
    pub fn open(path: &Path, member: u64) -> std::io::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        let (tx, rx) = mpsc::channel::<String>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("weft-audit".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                while let Ok(line) = rx.recv() {
                    let mut batch = vec![line];
                    batch.extend(rx.try_iter());
                    let written = batch
                        .iter()
                        .try_for_each(|l| writeln!(out, "{l}"))
                        .and_then(|()| out.flush());
                    if let Err(e) = written {
                        tracing::error!(file = %shown, error = %e, lines = batch.len(), "audit log: write failed");
                    }
                }
            })?;
        Ok(AuditLog {
            tx: Some(tx),
            member,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Writes the line of `note` ended with `result`.
    pub fn record<T>(&self, note: &Note, result: &Result<T, Status>) {
        let Some(tx) = &self.tx else {
            return;
        };
        // A member that is not the leader (or while none is known) did
        // nothing but send the caller on: the leader writes the line of
        // what it does. Once proposed, though, a lost leadership or a
        // timeout says nothing of the command's fate: `unknown`.
        if let Err(s) = result {
            if !note.proposed
                && s.code() == tonic::Code::Unavailable
                && s.message().starts_with("not the leader")
            {
                return;
            }
        }
        let now = super::now_ms();
        let (outcome, code, reason) = match result {
            Ok(_) => ("ok", None, None),
            Err(s) => (
                match s.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => "refused",
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded if note.proposed => {
                        "unknown"
                    }
                    _ => "failed",
                },
                Some(format!("{:?}", s.code())),
                Some(s.message()),
            ),
        };
        let who = note.who.as_ref();
        let line = Line {
            at: humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(now),
            )
            .to_string(),
            at_ms: now,
            member: self.member,
            user: who.map(|w| w.user.as_str()),
            method: who.map(|w| w.method_name()),
            accessor: who.and_then(|w| match &w.method {
                Method::Token { accessor } => Some(accessor.as_str()),
                _ => None,
            }),
            from: note.from.map(|a| a.to_string()),
            action: note.action,
            target: &note.target,
            outcome,
            code,
            reason,
        };
        let _ = tx.send(serde_json::to_string(&line).expect("a line serialises"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, 2).unwrap();
        let mut note = Note::new("kill_application", &tonic::Request::new(()));
        note.target = "app-000001".into();
        note.who = Some(Who {
            user: "bob".into(),
            admin: false,
            method: Method::Token {
                accessor: "026a45b7c21d92b1".into(),
            },
        });
        log.record::<()>(&note, &Err(Status::permission_denied("user bob may not")));
        log.record(&note, &Ok(()));
        drop(log);
        let mut text = String::new();
        for _ in 0..100 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["outcome"], "refused");
        assert_eq!(lines[0]["code"], "PermissionDenied");
        assert_eq!(lines[0]["user"], "bob");
        assert_eq!(lines[0]["accessor"], "026a45b7c21d92b1");
        assert_eq!(lines[0]["member"], 2);
        assert_eq!(lines[1]["outcome"], "ok");
        assert_eq!(lines[1]["target"], "app-000001");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
