//! A member's disk: full (the member exits saying why, the group goes on,
//! and once there is room again it catches up) or corrupted (refused at
//! start, naming the file).

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use crate::cluster::Cluster;

const SPEC: &str = "name: job\nqueue: root\nstages:\n  - name: run\n    instances: 1\n    command: 'true'\n    resources: { vcores: 1, memory: 64MiB }\n";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A tmpfs of `size` mounted on a new directory; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs: {st}");
        SmallDisk { dir }
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![7u8; 1 << 20];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(nix::libc::ENOSPC), "{e}");
                return path;
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// One member's data dir is on a disk that fills up while the group takes
/// submissions: that member exits (code 70) with a message naming its data
/// dir and the cause, every submission is still acknowledged by the other
/// two, and once there is room the member restarts and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_disk_fills_exits_saying_why_and_the_group_goes_on() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs for a full disk needs root");
        return;
    }
    let disk = SmallDisk::mount("64m");
    let mut cluster = Cluster::prepare(3, 1000, "");
    let full = 2;
    cluster.members[full].dir = disk.dir.path().join("rm3");
    for i in 0..3 {
        cluster.spawn(i);
    }
    let client = cluster.client();
    client.submit(SPEC, "yaml", "ann").await.unwrap();
    let filler = disk.fill();
    // Each submission is acknowledged; the full member fails at its next
    // write of the log.
    let mut acked = Vec::new();
    for i in 0..30 {
        let id = client
            .submit(SPEC, "yaml", "ann")
            .await
            .unwrap_or_else(|e| panic!("submission {i} failed: {e}"));
        acked.push(id);
    }
    let status = cluster
        .wait_exit(full, Duration::from_secs(20))
        .expect("the member with a full disk exits");
    assert_eq!(status.code(), Some(70), "{status:?}");
    let log = cluster.log_text(full);
    let fatal = log
        .lines()
        .find(|l| l.starts_with("resource-manager: fatal:"))
        .unwrap_or_else(|| panic!("no fatal line in its log:\n{log}"));
    let dir = cluster.members[full].dir.display().to_string();
    assert!(
        fatal.contains(&dir) && fatal.contains("No space left on device"),
        "{fatal}"
    );
    // The group goes on without it.
    let more = client.submit(SPEC, "yaml", "ann").await.unwrap();
    acked.push(more);

    // Room again: it restarts from its data dir and catches up.
    std::fs::remove_file(filler).unwrap();
    cluster.spawn(full);
    let target = cluster.leader_commit().await;
    let caught_up = cluster.wait_applied(full, target).await;
    assert!(caught_up.applied_index >= target);
    let apps = crate::failover::all_app_ids(&client).await;
    for id in &acked {
        assert_eq!(apps.iter().filter(|a| *a == id).count(), 1, "{id}");
    }
}

/// A stopped member's data dir is corrupted (sled's file overwritten): the
/// member refuses to start, exit code non-zero, naming the file and what to
/// do; the other two go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_data_dir_is_refused_naming_the_file() {
    let mut cluster = Cluster::start(3, 1000);
    let client = cluster.client();
    client.submit(SPEC, "yaml", "ann").await.unwrap();
    let victim = (cluster.leader().await + 1) % 3;
    let target = cluster.leader_commit().await;
    cluster.wait_applied(victim, target).await;
    assert!(cluster.terminate(victim).success());
    let db = cluster.members[victim].dir.join("db");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0xff;
    }
    std::fs::write(&db, bytes).unwrap();
    cluster.spawn(victim);
    let status = cluster
        .wait_exit(victim, Duration::from_secs(20))
        .expect("a member on a corrupted data dir does not start");
    assert!(!status.success(), "{status:?}");
    let log = cluster.log_text(victim);
    let refusal = log
        .lines()
        .find(|l| l.contains("refusing the data dir"))
        .unwrap_or_else(|| panic!("no refusal in its log:\n{log}"));
    assert!(
        // sled says the file is corrupted, or reads it as a torn write and
        // drops what follows, which the member's log marker tells.
        refusal.contains(&db.display().to_string())
            && (refusal.contains("holds corrupted data") || refusal.contains("lost data")),
        "{refusal}"
    );
    client.submit(SPEC, "yaml", "ann").await.unwrap();
}
