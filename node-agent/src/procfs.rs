//! Reading processes from `/proc`: the process tree, RSS, command lines. Used by
//! every driver for diagnostics and by the procfs driver for enforcement.
//! Everything here blocks on file reads: call it from a blocking thread.

use std::collections::HashMap;

/// What the agent needs from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub session: i32,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident pages.
    pub rss_pages: u64,
    /// Start time in clock ticks after boot (tells a reused pid apart).
    pub start_time: u64,
}

/// One process as shown in a diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSample {
    pub pid: i32,
    pub command_line: String,
    pub rss_bytes: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name sits in parentheses
/// and may itself hold spaces and parentheses, so fields are counted from the
/// last ')'.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).and_then(|s| s.parse::<i64>().ok());
    Some(Stat {
        pid,
        ppid: field(4)? as i32,
        session: field(6)? as i32,
        cpu_ticks: (field(14)? + field(15)?) as u64,
        start_time: field(22)? as u64,
        rss_pages: field(24)?.max(0) as u64,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True when `pid` is a zombie (dead, not yet reaped) or gone.
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            t.rfind(')')
                .map(|i| t[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Every pid in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// `root` and all its descendants (by parent links), from one scan of `/proc`.
pub fn tree(root: i32) -> Vec<Stat> {
    let stats: Vec<Stat> = all_pids().into_iter().filter_map(stat).collect();
    tree_of(root, &stats)
}

/// `root` and its descendants among `stats`.
pub fn tree_of(root: i32, stats: &[Stat]) -> Vec<Stat> {
    let mut children: HashMap<i32, Vec<&Stat>> = HashMap::new();
    let mut by_pid = HashMap::new();
    for s in stats {
        children.entry(s.ppid).or_default().push(s);
        by_pid.insert(s.pid, s);
    }
    let mut out = Vec::new();
    let Some(r) = by_pid.get(&root) else {
        return out;
    };
    let mut stack = vec![*r];
    while let Some(s) = stack.pop() {
        out.push(*s);
        if let Some(kids) = children.get(&s.pid) {
            stack.extend(kids.iter().copied());
        }
    }
    out
}

/// Whether the process's environment holds exactly the entry `marker`
/// (`NAME=value`). Processes inherit it, so it finds members of a container that
/// left its process tree.
pub fn environ_has(pid: i32, marker: &[u8]) -> bool {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => env.split(|b| *b == 0).any(|kv| kv == marker),
        Err(_) => false,
    }
}

/// Every live pid whose environment holds `marker`.
pub fn pids_with_marker(marker: &[u8]) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && environ_has(p, marker))
        .collect()
}

/// The command line of `pid`, arguments joined by spaces, at most `max` chars.
pub fn command_line(pid: i32, max: usize) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut s: String = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if s.is_empty() {
        // Kernel threads and zombies have no command line; show the name.
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            s = format!("[{}]", comm.trim());
        }
    }
    if s.chars().count() > max {
        s = s.chars().take(max.saturating_sub(3)).collect::<String>() + "...";
    }
    s
}

/// Clock ticks per second (the unit of `/proc/<pid>/stat`'s CPU times).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

/// The `n` biggest processes by RSS among `pids`, biggest first.
pub fn top_processes(pids: &[i32], n: usize) -> Vec<ProcessSample> {
    let page = page_size();
    let mut v: Vec<ProcessSample> = pids
        .iter()
        .filter_map(|&p| stat(p))
        .map(|s| ProcessSample {
            pid: s.pid,
            command_line: String::new(),
            rss_bytes: s.rss_pages * page,
        })
        .collect();
    v.sort_by(|a, b| b.rss_bytes.cmp(&a.rss_bytes).then(a.pid.cmp(&b.pid)));
    v.truncate(n);
    for s in &mut v {
        s.command_line = command_line(s.pid, 160);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_tricky_name() {
        let line = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 987654 10000000 321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.ppid, 17);
        assert_eq!(s.session, 4242);
        assert_eq!(s.cpu_ticks, 300);
        assert_eq!(s.start_time, 987654);
        assert_eq!(s.rss_pages, 321);
    }

    #[test]
    fn own_process_is_found() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.rss_pages > 0);
        assert!(tree(s.ppid).iter().any(|t| t.pid == me));
        assert!(!command_line(me, 1000).is_empty());
    }

    #[test]
    fn tree_follows_parent_links() {
        let st = |pid, ppid| Stat {
            pid,
            ppid,
            session: 1,
            cpu_ticks: 0,
            rss_pages: 0,
            start_time: 0,
        };
        let all = [st(1, 0), st(10, 1), st(11, 10), st(12, 11), st(20, 1)];
        let mut t: Vec<i32> = tree_of(10, &all).iter().map(|s| s.pid).collect();
        t.sort();
        assert_eq!(t, vec![10, 11, 12]);
        assert!(tree_of(99, &all).is_empty());
    }
}
