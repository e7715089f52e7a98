//! Ports: the agent reports the ports of its range that are bound on the
//! node (by anything: its containers, system daemons, other users), so the
//! RM never hands one out, and refuses to start a container while a port it
//! was given is bound.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};

use crate::config::PortsConfig;
use crate::error::{Error, Result};

/// The ports in `range` bound on this node now: the local port of every
/// TCP socket (listening, or an outgoing connection's, which blocks a
/// server's bind just the same) and every bound UDP socket, IPv4 and IPv6,
/// from `/proc/net` (empty where it cannot be read). Blocking: call it off
/// the async runtime.
pub fn in_use(range: &PortsConfig) -> Vec<u32> {
    let mut ports = BTreeSet::new();
    for file in [
        "/proc/net/tcp",
        "/proc/net/tcp6",
        "/proc/net/udp",
        "/proc/net/udp6",
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            ports.extend(
                parse_proc_net(&text, false)
                    .into_iter()
                    .filter(|p| (range.first..=range.last).contains(p)),
            );
        }
    }
    ports.into_iter().map(u32::from).collect()
}

/// Local ports of a `/proc/net/{tcp,udp}[6]` table (TCP: listening ones).
fn parse_proc_net(text: &str, listen_only: bool) -> Vec<u16> {
    const TCP_LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            if listen_only && state != TCP_LISTEN {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// Checks that every port given to a container can be bound on the node
/// now (on all IPv4 addresses, as a task's server would). A bound one is a
/// transient refusal: the RM learns of it from the next heartbeat and gives
/// another.
pub fn check_free(ports: &[u32]) -> Result<()> {
    for &p in ports {
        let port = u16::try_from(p)
            .map_err(|_| Error::invalid("resources.ports", format!("{p} is not a port number")))?;
        if port == 0 {
            return Err(Error::invalid("resources.ports", "0 is not a port number"));
        }
        if let Err(e) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            return Err(Error::ResourceExhausted {
                field: "resources.ports",
                reason: format!("port {port} is in use on this node ({e})"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_give_listening_and_bound_ports() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:4E21 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_proc_net(tcp, true), vec![0x4E20]);
        assert_eq!(parse_proc_net(tcp, false), vec![0x4E20, 0x4E21]);
    }

    #[test]
    fn a_bound_port_is_seen_and_refused() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let range = PortsConfig {
            first: port,
            last: port,
        };
        assert_eq!(in_use(&range), vec![port as u32]);
        let e = check_free(&[port as u32]).unwrap_err();
        assert!(
            e.to_string().contains(&format!("port {port} is in use")),
            "{e}"
        );
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        drop(held);
        // Free again; another process on the machine may take an ephemeral
        // port for a moment (tests run beside each other), so look again
        // for a while before calling it a failure.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = check_free(&[port as u32]) {
            assert!(std::time::Instant::now() < deadline, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
