//! Shared cgroupfs plumbing: finding the hierarchies in `/proc/self/mountinfo`,
//! reading and writing control files, killing what a `cgroup.procs` lists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The cgroup hierarchies mounted on this machine.
#[derive(Debug, Clone, Default)]
pub struct Mounts {
    /// The unified (v2) hierarchy, if mounted.
    pub v2: Option<PathBuf>,
    /// v1 hierarchies: mount point and the controllers bound to it.
    pub v1: Vec<(PathBuf, Vec<String>)>,
}

impl Mounts {
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
    }

    /// Parses mountinfo text: `... mountpoint ... - fstype source superopts`.
    pub fn parse(text: &str) -> Self {
        let mut m = Mounts::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split_whitespace().nth(4) else {
                continue;
            };
            let mut r = right.split_whitespace();
            let (fstype, _src, opts) = (r.next(), r.next(), r.next().unwrap_or(""));
            let point = PathBuf::from(unescape(point));
            match fstype {
                Some("cgroup2") if m.v2.is_none() => m.v2 = Some(point),
                Some("cgroup") => {
                    let ctrls = opts
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_string)
                        .collect();
                    m.v1.push((point, ctrls));
                }
                _ => {}
            }
        }
        m
    }

    /// Mount point of the v1 hierarchy carrying `controller`.
    pub fn v1_controller(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(_, c)| c.iter().any(|x| x == controller))
            .map(|(p, _)| p.as_path())
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| Error::io("writing", path, e))
}

pub fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

pub fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// Value of `key` in a flat-keyed file (`memory.events`, `memory.oom_control`).
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

pub fn procs(dir: &Path) -> Vec<i32> {
    read(&dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating cgroup", dir, e))
}

/// Removes a cgroup directory, retrying while its last processes finish exiting.
pub fn rmdir(dir: &Path) -> Result<()> {
    let mut last = None;
    for attempt in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(if attempt < 10 { 2 } else { 20 }));
    }
    Err(Error::io("removing cgroup", dir, last.expect("loop ran")))
}

/// Child directory names of `dir` (the container groups under a parent).
pub fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

pub fn signal(pids: &[i32], sig: nix::sys::signal::Signal) {
    for &p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// SIGKILLs what `dir/cgroup.procs` lists until it is empty; returns what is
/// left after the attempts run out (about two seconds).
pub fn kill_until_empty(dir: &Path) -> Vec<i32> {
    for attempt in 0..200 {
        let left = procs(dir);
        if left.is_empty() {
            return left;
        }
        signal(&left, nix::sys::signal::Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(if attempt < 20 { 1 } else { 10 }));
    }
    procs(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
31 25 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/my\\040pids rw - cgroup cgroup rw,pids
";

    #[test]
    fn parses_hybrid_mountinfo() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            m.v1_controller("memory"),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(
            m.v1_controller("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            m.v1_controller("pids"),
            Some(Path::new("/sys/fs/cgroup/my pids"))
        );
        assert_eq!(
            m.v1_controller("systemd"),
            None,
            "named hierarchies are not controllers"
        );
        assert_eq!(m.v1_controller("freezer"), None);
    }

    #[test]
    fn parses_pure_v2() {
        let m = Mounts::parse(
            "35 24 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
        );
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(m.v1.is_empty());
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(2));
        assert_eq!(keyed(events, "oom"), Some(3));
        assert_eq!(keyed(events, "missing"), None);
        let oom_control = "oom_kill_disable 1\nunder_oom 1\noom_kill 0\n";
        assert_eq!(keyed(oom_control, "under_oom"), Some(1));
    }
}
