//! Tasks run as their users (`containers.run_as_user`): two users' tasks on
//! one node, each with its own uid; neither can read the other's
//! environment, work dir or logs; a user missing on the node, or root
//! outside the queues allowed it, is refused at start.

use std::time::Duration;

use weft_proto::v1 as pb;

use crate::harness::*;

/// The `Uid:` line of /proc/PID/status: real, effective, saved, fs.
fn uids(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn two_users_tasks_run_as_themselves_and_cannot_read_each_other() {
    if !is_root() {
        eprintln!("skipped: needs root (it sets the tasks' uids)");
        return;
    }
    let mut agent = TestAgent::start("users", |c| {
        c.containers.run_as_user = true;
        c.containers.keep_work_dirs = false;
    })
    .await;

    // nobody's task: a secret in its environment, its work dir and its log.
    let mut a = spec(
        "a",
        "echo log-secret-a; echo file-secret-a > secret; id -u > uid; sleep 30",
        32 * MIB,
    );
    a.env.insert("SECRET_A".into(), "env-secret-a".into());
    // As the RM hands a master its application token.
    a.files.insert("weft-app-token".into(), b"00ff".to_vec());
    let sa = agent
        .client
        .start_container(signed_as(a, "nobody", "root.team"))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    // Its process, once the shell runs (and wrote its uid).
    let a_dir = std::path::PathBuf::from(&sa.work_dir);
    let mut a_pid = 0;
    for _ in 0..100 {
        let st = agent
            .client
            .get_container_status(pb::GetContainerStatusRequest {
                container_id: "a".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let wrote = std::fs::read_to_string(a_dir.join("uid")).is_ok_and(|t| t.ends_with('\n'));
        if st.pid != 0 && wrote {
            a_pid = st.pid;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(a_pid, 0, "a never ran");
    assert_eq!(uids(a_pid), "65534 65534 65534 65534");
    assert_eq!(
        std::fs::read_to_string(a_dir.join("uid")).unwrap().trim(),
        "65534"
    );
    let meta = std::fs::metadata(&a_dir).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (65534, 0o700)
    );
    let token = std::fs::metadata(a_dir.join("weft-app-token")).unwrap();
    assert_eq!(
        (token.uid(), token.permissions().mode() & 0o777),
        (65534, 0o600)
    );
    let a_log = agent.work_dir().join("logs").join("a").join("stdout");
    let a_log = if a_log.exists() {
        a_log
    } else {
        // Wherever the agent keeps it: found by its content.
        find_file_containing(&agent.work_dir(), "log-secret-a").expect("a's log")
    };
    assert_eq!(std::fs::metadata(&a_log).unwrap().uid(), 65534);

    // daemon's task tries to read all three of nobody's, and says what it got.
    let b = spec(
        "b",
        &format!(
            "id -u; \
             if cat /proc/{a_pid}/environ >/dev/null 2>&1; then echo environ-READ; else echo environ-denied; fi; \
             if ls {dir} >/dev/null 2>&1; then echo workdir-LISTED; else echo workdir-denied; fi; \
             if cat {dir}/secret >/dev/null 2>&1; then echo file-READ; else echo file-denied; fi; \
             if cat {log} >/dev/null 2>&1; then echo log-READ; else echo log-denied; fi",
            dir = a_dir.display(),
            log = a_log.display()
        ),
        32 * MIB,
    );
    agent
        .client
        .start_container(signed_as(b, "daemon", "root.team"))
        .await
        .unwrap();
    let end = wait_end(&mut agent.client, "b", Duration::from_secs(20)).await;
    assert_eq!(end.state(), pb::ContainerState::Succeeded, "{end:?}");
    let out = read_log(&mut agent.client, "b", pb::LogStream::Stdout, 0, false).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "1",
            "environ-denied",
            "workdir-denied",
            "file-denied",
            "log-denied"
        ],
        "daemon's task reached nobody's: {out}"
    );
    // The agent (root) still reads nobody's log for its user.
    let a_out = read_log(&mut agent.client, "a", pb::LogStream::Stdout, 0, false).await;
    assert!(a_out.contains("log-secret-a"), "{a_out}");

    // A user this node does not have: refused at start, naming it.
    let e = agent
        .client
        .start_container(signed_as(
            spec("c", "true", 16 * MIB),
            "no-such-user-weft",
            "root",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(
        e.message()
            .contains("user no-such-user-weft does not exist on node"),
        "{e}"
    );
    // Root, in a queue not allowed it.
    let e = agent
        .client
        .start_container(signed_as(spec("d", "true", 16 * MIB), "root", "root.team"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("runs root's tasks only in queues"),
        "{e}"
    );

    stop(&mut agent.client, "a", 100).await;
    agent.shutdown().await;
}

fn find_file_containing(dir: &std::path::Path, needle: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file_containing(&p, needle) {
                return Some(f);
            }
        } else if std::fs::read_to_string(&p).is_ok_and(|t| t.contains(needle)) {
            return Some(p);
        }
    }
    None
}
