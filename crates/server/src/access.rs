//! Who may connect over TCP: address ranges (`--allow CIDR`) and a limit
//! of connections per peer address (`--max-connections-per-peer`).
//!
//! Both are checked right after `accept`, before the connection costs a
//! thread (see [`crate::listener::ConnectionLimit`]). Unix-socket clients
//! are not subject to them: file permissions guard a Unix socket, and all
//! its clients share one "address".
//!
//! Addresses are compared as IPv4 where they are IPv4: a listener on `::`
//! sees IPv4 clients as `::ffff:a.b.c.d`, which `--allow 10.0.0.0/8` must
//! match, and which counts as the same peer as `a.b.c.d`.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;

use scratchd_store::sync;

/// An address range: an address and how many of its leading bits a peer's
/// address must share (`10.0.0.0/8`, `fd00::/8`; a bare address is a
/// range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not a [`Cidr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or ADDRESS/PREFIX (e.g. 10.0.0.0/8, 2001:db8::/32)")]
    Syntax(String),
    #[error("{text:?}: prefix length {prefix} is longer than {max} bits")]
    PrefixTooLong { text: String, prefix: u8, max: u8 },
    #[error("{text:?} has bits set past its /{prefix}; did you mean {network}/{prefix}?")]
    HostBits {
        text: String,
        prefix: u8,
        network: IpAddr,
    },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| syntax())?)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = bits(addr);
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(CidrError::PrefixTooLong {
                text: text.to_owned(),
                prefix,
                max,
            });
        }
        let network = mask(addr, prefix);
        if network != addr {
            // 10.1.2.3/8 is most likely a typo for /32 or for 10.0.0.0/8.
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                prefix,
                network,
            });
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this range (an IPv4-mapped IPv6 address counts
    /// as the IPv4 address it carries, both ways).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let own = canonical(self.addr);
        // `::ffff:0:0/96` and the like: compare in the mapped form.
        let prefix = match (self.addr, own) {
            (IpAddr::V6(_), IpAddr::V4(_)) => self.prefix.saturating_sub(96),
            _ => self.prefix,
        };
        match (own, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, prefix) == mask(own, prefix)
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `ip` with every bit past the first `prefix` cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Connections open per peer address, for `--max-connections-per-peer`:
/// one builder host (or a runaway client) cannot take every connection
/// slot of a shared server. Touched at accept and close only.
pub struct PeerCounts {
    max: usize,
    /// Open connections per (canonical) address; an address leaves the
    /// map with its last connection, so the map is as large as the number
    /// of peers connected now.
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerCounts {
    pub fn new(max: usize) -> Self {
        PeerCounts {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Counts one more connection from `ip`; false (and nothing counted)
    /// when it already has the most it may.
    pub fn take(&self, ip: IpAddr) -> bool {
        let mut open = sync::lock(&self.open);
        let n = open.entry(canonical(ip)).or_insert(0);
        if *n >= self.max {
            if *n == 0 {
                open.remove(&canonical(ip));
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `ip`, counted by [`PeerCounts::take`], closed.
    pub fn give_back(&self, ip: IpAddr) {
        let mut open = sync::lock(&self.open);
        let ip = canonical(ip);
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_contain_their_addresses_only() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.255.1.2")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(net.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!net.contains(ip("::1")));
        let host = cidr("127.0.0.1");
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));
        assert!(cidr("0.0.0.0/0").contains(ip("192.0.2.7")));
        assert!(!cidr("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn malformed_ranges_say_what_is_wrong() {
        for bad in ["", "10.0.0", "10.0.0.0/", "10.0.0.0/x", "host/8", "/8"] {
            assert!(
                matches!(bad.parse::<Cidr>(), Err(CidrError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::PrefixTooLong { max: 32, .. })
        ));
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn peers_are_counted_up_to_the_limit() {
        let counts = PeerCounts::new(2);
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        assert!(counts.take(a));
        assert!(counts.take(ip("::ffff:127.0.0.1")), "the same peer");
        assert!(!counts.take(a), "third from one peer");
        assert!(counts.take(b), "another peer");
        counts.give_back(a);
        assert!(counts.take(a), "room again after a close");
        for _ in 0..2 {
            counts.give_back(a);
        }
        counts.give_back(b);
        assert!(sync::lock(&counts.open).is_empty(), "nothing left behind");
        let none = PeerCounts::new(0);
        assert!(!none.take(a));
        assert!(sync::lock(&none.open).is_empty());
    }
}
