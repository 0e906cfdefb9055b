//! TCP addresses with QEMU's InetSocketAddress options: `numeric`, `to`, `ipv4`, `ipv6`,
//! `keep-alive` and `mptcp`, applied as QEMU applies them to a listener and to a
//! connection.
//!
//! Sockets are made with socket2 because std and tokio cannot ask for the MPTCP protocol.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};

/// The options of an InetSocketAddress besides host and port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InetOptions {
    /// The host is an address literal, not a name to look up (listeners only: QEMU's
    /// connect path looks every host up).
    pub numeric: bool,
    /// A listener takes the first free port from `port` up to this one.
    pub to: Option<u16>,
    /// QEMU's `ipv4`: `Some(true)` asks for IPv4 (alone, unless `ipv6` is on too),
    /// `Some(false)` rules it out; `None` leaves it to `ipv6`. Both off is an error.
    pub ipv4: Option<bool>,
    /// QEMU's `ipv6`, read like `ipv4`. A connection limited to IPv6 reaches an IPv4
    /// address as IPv4-mapped IPv6.
    pub ipv6: Option<bool>,
    /// SO_KEEPALIVE on the connection; on a listener, Linux passes it on to the
    /// connections it accepts.
    pub keep_alive: bool,
    /// Multipath TCP instead of TCP.
    pub mptcp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Any,
    V4,
    V6,
}

impl InetOptions {
    /// The address family the flags allow, as QEMU reads them: one flag on (or the other
    /// off) picks a family, both on or neither given allow either, both off is an error.
    fn family(&self) -> io::Result<Family> {
        match (self.ipv4, self.ipv6) {
            (Some(false), Some(false)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Cannot disable IPv4 and IPv6 at same time",
            )),
            (Some(true), Some(true)) | (None, None) => Ok(Family::Any),
            (_, Some(true)) | (Some(false), _) => Ok(Family::V6),
            (Some(true), _) | (_, Some(false)) => Ok(Family::V4),
        }
    }

    /// Check the flags without using them (an address given before the socket is made).
    pub fn validate(&self) -> io::Result<()> {
        self.family().map(|_| ())
    }

    fn socket_for(&self, addr: &SocketAddr) -> io::Result<Socket> {
        let protocol = if self.mptcp {
            Protocol::MPTCP
        } else {
            Protocol::TCP
        };
        let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, Some(protocol))?;
        if self.keep_alive {
            socket.set_keepalive(true)?;
        }
        Ok(socket)
    }
}

fn resolution_error(host: &str, port: u16, e: &io::Error) -> io::Error {
    // std prefixes getaddrinfo's text with its own words; QEMU shows gai_strerror alone.
    let text = e.to_string();
    let cause = text
        .strip_prefix("failed to lookup address information: ")
        .unwrap_or(&text);
    io::Error::new(
        e.kind(),
        format!("address resolution failed for {host}:{port}: {cause}"),
    )
}

fn family_error(host: &str, port: u16) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!(
            "address resolution failed for {host}:{port}: Address family for hostname not supported"
        ),
    )
}

/// The addresses a listener binds: looked up unless `numeric`, of the allowed family.
fn listen_addrs(host: &str, port: u16, opts: &InetOptions) -> io::Result<Vec<SocketAddr>> {
    let family = opts.family()?;
    let found: Vec<SocketAddr> = if opts.numeric {
        let ip: IpAddr = host.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("address resolution failed for {host}:{port}: Name or service not known"),
            )
        })?;
        vec![SocketAddr::new(ip, port)]
    } else {
        (host, port)
            .to_socket_addrs()
            .map_err(|e| resolution_error(host, port, &e))?
            .collect()
    };
    let kept: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        })
        .collect();
    if kept.is_empty() {
        return Err(family_error(host, port));
    }
    Ok(kept)
}

/// Bind a listener as QEMU does: the first address and port (from `port` up to `to`) that
/// is free, with QEMU's texts. Blocks on name lookup; call it where that is allowed.
pub fn listen(host: &str, port: u16, opts: &InetOptions) -> io::Result<TcpListener> {
    let last_port = opts.to.unwrap_or(port).max(port);
    let mut last_error = None;
    for port in port..=last_port {
        for addr in listen_addrs(host, port, opts)? {
            let socket = opts.socket_for(&addr)?;
            socket.set_reuse_address(true)?;
            let bound = socket
                .bind(&SockAddr::from(addr))
                .and_then(|()| socket.listen(128));
            match bound {
                Ok(()) => return Ok(socket.into()),
                Err(e) => last_error = Some(e),
            }
        }
    }
    let e = last_error.unwrap_or_else(|| io::ErrorKind::AddrNotAvailable.into());
    Err(io::Error::new(
        e.kind(),
        format!(
            "Failed to find an available port: {}",
            crate::socket::os_text(&e)
        ),
    ))
}

/// Connect as QEMU does: every address the host resolves to, in turn, of the allowed
/// family (an IPv4 address reached as IPv4-mapped IPv6 when only IPv6 is allowed).
pub async fn connect(
    host: &str,
    port: u16,
    opts: &InetOptions,
) -> io::Result<tokio::net::TcpStream> {
    let family = opts.family()?;
    let found = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| resolution_error(host, port, &e))?;
    let addrs: Vec<SocketAddr> = found
        .filter_map(|a| match (family, a) {
            (Family::Any, a) => Some(a),
            (Family::V4, a) => a.is_ipv4().then_some(a),
            (Family::V6, SocketAddr::V4(v4)) => Some(SocketAddr::new(
                IpAddr::V6(v4.ip().to_ipv6_mapped()),
                v4.port(),
            )),
            (Family::V6, a) => Some(a),
        })
        .collect();
    let mut last_error = family_error(host, port);
    for addr in addrs {
        let socket = opts.socket_for(&addr)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(ipv4: Option<bool>, ipv6: Option<bool>) -> io::Result<Family> {
        InetOptions {
            ipv4,
            ipv6,
            ..InetOptions::default()
        }
        .family()
    }

    #[test]
    fn families_follow_qemu() {
        assert_eq!(flags(None, None).unwrap(), Family::Any);
        assert_eq!(flags(Some(true), Some(true)).unwrap(), Family::Any);
        assert_eq!(flags(Some(true), None).unwrap(), Family::V4);
        assert_eq!(flags(None, Some(false)).unwrap(), Family::V4);
        assert_eq!(flags(None, Some(true)).unwrap(), Family::V6);
        assert_eq!(flags(Some(false), None).unwrap(), Family::V6);
        assert_eq!(
            flags(Some(false), Some(false)).unwrap_err().to_string(),
            "Cannot disable IPv4 and IPv6 at same time"
        );
    }

    #[test]
    fn numeric_refuses_names_and_the_family_filters() {
        let numeric = InetOptions {
            numeric: true,
            ..InetOptions::default()
        };
        assert_eq!(
            listen_addrs("localhost", 0, &numeric)
                .unwrap_err()
                .to_string(),
            "address resolution failed for localhost:0: Name or service not known"
        );
        let v6 = InetOptions {
            ipv6: Some(true),
            ..InetOptions::default()
        };
        assert_eq!(
            listen_addrs("127.0.0.1", 0, &v6).unwrap_err().to_string(),
            "address resolution failed for 127.0.0.1:0: Address family for hostname not supported"
        );
    }

    #[test]
    fn a_listener_takes_the_next_free_port_up_to_to() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let only_taken = InetOptions {
            to: Some(port),
            ..InetOptions::default()
        };
        assert_eq!(
            listen("127.0.0.1", port, &only_taken)
                .unwrap_err()
                .to_string(),
            "Failed to find an available port: Address already in use"
        );
        let range = InetOptions {
            to: Some(port.saturating_add(20)),
            ..InetOptions::default()
        };
        let next = listen("127.0.0.1", port, &range).unwrap();
        let got = next.local_addr().unwrap().port();
        assert!(got > port && got <= port + 20, "{got}");
    }

    #[tokio::test]
    async fn keep_alive_and_mptcp_reach_the_socket() {
        let listener = listen(
            "127.0.0.1",
            0,
            &InetOptions {
                mptcp: true,
                ..InetOptions::default()
            },
        );
        // The kernel may lack MPTCP (then QEMU fails the same way); where it has it, the
        // listener's socket is an MPTCP one.
        let listener = match listener {
            Ok(l) => {
                let socket = Socket::from(l);
                assert_eq!(socket.protocol().unwrap(), Some(Protocol::MPTCP));
                TcpListener::from(socket)
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT), "{e}");
                TcpListener::bind("127.0.0.1:0").unwrap()
            }
        };
        let port = listener.local_addr().unwrap().port();
        let stream = connect(
            "127.0.0.1",
            port,
            &InetOptions {
                keep_alive: true,
                ..InetOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(socket2::SockRef::from(&stream).keepalive().unwrap());
        let kept = listen(
            "127.0.0.1",
            0,
            &InetOptions {
                keep_alive: true,
                ..InetOptions::default()
            },
        )
        .unwrap();
        let port = kept.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = kept.accept().unwrap();
        assert!(socket2::SockRef::from(&accepted).keepalive().unwrap());
    }
}
