//! Ports: the agent reports the ports of its range that are bound on the
//! node (by anything: its containers, system daemons, other users), so the
//! RM never hands one out, and refuses to start a container while a port it
//! was given is bound.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};

use crate::config::PortsConfig;
use crate::error::{Error, Result};

/// The ports in `range` bound on this node now (empty where they cannot be
/// read), IPv4 and IPv6: every listening TCP socket's and every bound UDP
/// socket's. A connection's local port blocks a server's bind just the
/// same (without SO_REUSEADDR, also in TIME_WAIT), so every TCP socket's
/// local port counts where one can be in `range`: where the node's
/// ephemeral range (`net.ipv4.ip_local_port_range`) overlaps it (outgoing
/// connections), and with `closing` (a container given ports ended
/// lately, and its server's connections may still be closing).
///
/// TCP comes from the kernel's sock_diag netlink interface, asked for
/// listening sockets only where that suffices: a walk of the listening
/// table alone, where
/// `/proc/net/tcp` walks the whole connection hash table (2^18 buckets on a
/// host of this size, about 3 ms a read however few sockets there are),
/// once per heartbeat. `/proc/net` where netlink is refused. Blocking:
/// call it off the async runtime.
pub fn in_use(range: &PortsConfig, closing: bool) -> Vec<u32> {
    let all_tcp = closing || ephemeral_overlaps(range);
    let tcp = match diag::tcp_ports(all_tcp) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "sock_diag refused; reading /proc/net/tcp");
            from_proc(&["/proc/net/tcp", "/proc/net/tcp6"], !all_tcp)
        }
    };
    let udp = from_proc(&["/proc/net/udp", "/proc/net/udp6"], false);
    let ports: BTreeSet<u16> = tcp
        .into_iter()
        .chain(udp)
        .filter(|p| (range.first..=range.last).contains(p))
        .collect();
    ports.into_iter().map(u32::from).collect()
}

/// Local ports of the `/proc/net` tables `files` (unreadable ones give
/// none).
fn from_proc(files: &[&str], listen_only: bool) -> Vec<u16> {
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| parse_proc_net(&text, listen_only))
        .collect()
}

/// Whether the node's ephemeral port range overlaps `range` (unreadable:
/// assumed so).
fn ephemeral_overlaps(range: &PortsConfig) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return true;
    };
    let mut f = text.split_whitespace().map(str::parse::<u16>);
    match (f.next(), f.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => lo <= range.last && range.first <= hi,
        _ => true,
    }
}

/// TCP sockets' local ports through sock_diag (`man 7 sock_diag`).
mod diag {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::{
        constants::{AF_INET, AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
        SockDiagMessage,
    };
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    /// Local ports of listening TCP sockets (`all`: of every TCP socket).
    pub fn tcp_ports(all: bool) -> std::io::Result<Vec<u16>> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let states = if all {
            StateFlags::all()
        } else {
            StateFlags::LISTEN
        };
        let mut ports = Vec::new();
        for (family, socket_id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            dump(&mut socket, family, states, socket_id, &mut ports)?;
        }
        Ok(ports)
    }

    fn dump(
        socket: &mut Socket,
        family: u8,
        states: StateFlags,
        socket_id: SocketId,
        ports: &mut Vec<u16>,
    ) -> std::io::Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0)?;
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        // A dump comes in datagrams of several messages each, up to a page
        // or so; the last message says Done. Bounded: a dump that goes on
        // past this many datagrams is cut (the kernel's tables are finite;
        // this guards a loop that could not end).
        let mut datagram = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            let n = socket.recv(&mut &mut datagram[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&datagram[at..n])
                    .map_err(|e| invalid(e.to_string()))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                        ports.push(r.header.socket_id.source_port);
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
        Err(invalid("sock_diag dump did not end".into()))
    }
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
    fn sock_diag_sees_listening_sockets_and_with_all_states_connections_too() {
        if let Err(e) = diag::tcp_ports(false) {
            println!("skipped: sock_diag refused here ({e}); the scan reads /proc/net/tcp");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap().port();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let client = std::net::TcpStream::connect(("127.0.0.1", server)).unwrap();
        let outgoing = client.local_addr().unwrap().port();
        let listening = diag::tcp_ports(false).unwrap();
        assert!(listening.contains(&server), "{listening:?}");
        if let Some(v6) = &v6 {
            let p = v6.local_addr().unwrap().port();
            assert!(listening.contains(&p), "IPv6 listener {p}: {listening:?}");
        }
        assert!(
            !listening.contains(&outgoing),
            "a connection's port {outgoing} is not listening: {listening:?}"
        );
        let all = diag::tcp_ports(true).unwrap();
        assert!(all.contains(&server) && all.contains(&outgoing), "{all:?}");
    }

    #[test]
    fn an_outgoing_connections_port_counts_where_the_ephemeral_range_overlaps() {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut f = text.split_whitespace().map(|v| v.parse::<u16>().unwrap());
        let (lo, hi) = (f.next().unwrap(), f.next().unwrap());
        assert!(ephemeral_overlaps(&PortsConfig {
            first: lo,
            last: lo
        }));
        assert!(ephemeral_overlaps(&PortsConfig { first: 1, last: hi }));
        if lo > 1025 {
            assert!(!ephemeral_overlaps(&PortsConfig {
                first: 1024,
                last: lo - 1
            }));
        }
        // A connection's local port (ephemeral) is in use for a range that
        // holds it.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let outgoing = client.local_addr().unwrap().port();
        let range = PortsConfig {
            first: outgoing,
            last: outgoing,
        };
        assert_eq!(in_use(&range, false), vec![outgoing as u32]);
    }

    #[test]
    fn a_closed_servers_port_in_time_wait_counts_while_containers_ports_linger() {
        // A server on a port of the range accepts a connection and closes
        // it first: its side goes to TIME_WAIT on the server's port, which
        // a new server binding without SO_REUSEADDR cannot take.
        // A port of the default range, below the ephemeral one (where
        // listening sockets alone are asked for unless ports linger).
        let listener = (0..200u16)
            .find_map(|i| {
                TcpListener::bind((
                    "127.0.0.1",
                    20_000 + (std::process::id() as u16 % 100) * 100 + i,
                ))
                .ok()
            })
            .expect("a free port in 20000-30000");
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (served, _) = listener.accept().unwrap();
        drop(listener);
        drop(served);
        // The client reads the FIN and closes too.
        let mut buf = [0u8; 1];
        use std::io::Read;
        let _ = (&client).read(&mut buf);
        drop(client);
        let range = PortsConfig {
            first: port,
            last: port,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while in_use(&range, true) != vec![port as u32] {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} in TIME_WAIT is not reported"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if ephemeral_overlaps(&range) {
            println!("the ephemeral range holds {port}: every scan walks all TCP sockets here");
        } else {
            assert_eq!(
                in_use(&range, false),
                Vec::<u32>::new(),
                "only listening sockets asked for"
            );
        }
    }

    #[test]
    fn a_bound_port_is_seen_and_refused() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let range = PortsConfig {
            first: port,
            last: port,
        };
        assert_eq!(in_use(&range, false), vec![port as u32]);
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
