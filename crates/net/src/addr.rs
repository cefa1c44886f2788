//! A peer's address as an operator writes it: an IP address or a host
//! name, and a port.
//!
//! A host name is resolved each time a connection is opened (as etcd's
//! dialer does), never once at start, so a member whose name moves to
//! another IP (a rescheduled container, a replaced machine) is found at its
//! new address on the next reconnect. With peer TLS a member verifies the
//! server it connects to by the name it dialled: the host name when there
//! is one, else the IP ([`Host::server_name`]).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use tokio_rustls::rustls::pki_types::ServerName;

/// Addresses one resolution may give, at most (the rest are not tried).
pub const RESOLVED_ADDRS_MAX: usize = 8;

/// The host part of a [`PeerAddr`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name (lower case, checked by [`Host::parse`]).
    Name(String),
}

impl Host {
    /// An IP address (IPv6 with or without brackets) or a DNS host name:
    /// labels of letters, digits and hyphens, not starting or ending with a
    /// hyphen, at most 63 bytes each and 253 in all.
    pub fn parse(s: &str) -> Result<Host, String> {
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if bare.len() != s.len() {
            return Err(format!("{s:?} is not an IPv6 address"));
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("{s:?} is neither an IP address nor a host name"));
        }
        // A name of digits and dots only is an IP address gone wrong
        // ("10.0.0.256"), not a name.
        if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(format!("{s:?} is not a valid IP address"));
        }
        Ok(Host::Name(name.to_ascii_lowercase()))
    }

    /// The name a TLS peer's certificate must carry: the DNS name, or the
    /// IP address.
    pub fn server_name(&self) -> Result<ServerName<'static>, String> {
        match self {
            Host::Ip(ip) => Ok(ServerName::from(*ip)),
            Host::Name(name) => ServerName::try_from(name.clone())
                .map_err(|e| format!("{name:?} cannot name a TLS server: {e}")),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// A peer's address: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr {
    host: Host,
    port: u16,
}

impl PeerAddr {
    pub fn new(host: Host, port: u16) -> PeerAddr {
        PeerAddr { host, port }
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket address, when the host is an IP address.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }

    /// The socket addresses to try, in the resolver's order (an IP address
    /// is itself); at most [`RESOLVED_ADDRS_MAX`]. A name that resolves to
    /// nothing is an error that names it.
    pub async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        match &self.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => {
                let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), self.port))
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("resolving host {name:?}: {e}")))?
                    .take(RESOLVED_ADDRS_MAX)
                    .collect();
                if found.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("host {name:?} resolves to no address"),
                    ));
                }
                Ok(found)
            }
        }
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr {
            host: Host::Ip(a.ip()),
            port: a.port(),
        }
    }
}

impl FromStr for PeerAddr {
    type Err = String;

    /// `HOST:PORT` with a port other than 0.
    fn from_str(s: &str) -> Result<PeerAddr, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port (HOST:PORT)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        if port == 0 {
            return Err(format!("{s:?} has port 0"));
        }
        // An IPv6 address needs its brackets here: "::1:7001" is ambiguous.
        if host.contains(':') && !host.starts_with('[') {
            return Err(format!(
                "{s:?}: write an IPv6 address in brackets, [{host}]:{port}"
            ));
        }
        Ok(PeerAddr {
            host: Host::parse(host).map_err(|e| format!("{s:?}: {e}"))?,
            port,
        })
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ips_and_names() {
        let a: PeerAddr = "127.0.0.1:7001".parse().unwrap();
        assert_eq!(a.socket_addr(), Some(([127, 0, 0, 1], 7001).into()));
        assert_eq!(a.to_string(), "127.0.0.1:7001");
        let a: PeerAddr = "[::1]:7001".parse().unwrap();
        assert_eq!(a.host(), &Host::Ip("::1".parse().unwrap()));
        assert_eq!(a.to_string(), "[::1]:7001");
        let a: PeerAddr = "Infra-0.Example.com:2380".parse().unwrap();
        assert_eq!(a.host(), &Host::Name("infra-0.example.com".into()));
        assert_eq!(a.port(), 2380);
        assert_eq!(a.socket_addr(), None);
        assert_eq!(a.to_string(), "infra-0.example.com:2380");
        let a: PeerAddr = "localhost.:1".parse().unwrap();
        assert_eq!(a.host(), &Host::Name("localhost".into()));
        assert_eq!(
            PeerAddr::from(SocketAddr::from(([10, 0, 0, 1], 5))),
            "10.0.0.1:5".parse().unwrap()
        );
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            "127.0.0.1:x",
            ":7001",
            "::1:7001",
            "[::1:7001",
            "[host]:7001",
            "10.0.0.256:7001",
            "-a.example:7001",
            "a-.example:7001",
            "a..example:7001",
            "a_b:7001",
            "a b:7001",
            "http://a:7001",
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}.example:1", "a".repeat(64));
        assert!(long.parse::<PeerAddr>().is_err());
    }

    #[test]
    fn server_names() {
        assert_eq!(
            Host::parse("node-1.example")
                .unwrap()
                .server_name()
                .unwrap(),
            ServerName::try_from("node-1.example").unwrap()
        );
        assert_eq!(
            Host::parse("10.1.2.3").unwrap().server_name().unwrap(),
            ServerName::from("10.1.2.3".parse::<IpAddr>().unwrap())
        );
    }

    #[tokio::test]
    async fn resolves_localhost_and_reports_unknown_names() {
        let a: PeerAddr = "localhost:7001".parse().unwrap();
        let found = a.resolve().await.expect("localhost resolves");
        assert!(found
            .iter()
            .all(|s| s.ip().is_loopback() && s.port() == 7001));
        let ip: PeerAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(ip.resolve().await.unwrap(), vec![ip.socket_addr().unwrap()]);
        // The reserved top-level domain `.invalid` never resolves (RFC 6761).
        let e = "no-such-host.invalid:7001"
            .parse::<PeerAddr>()
            .unwrap()
            .resolve()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no-such-host.invalid"), "{e}");
    }
}
