//! Who is at the other end of a connection, as far as its transport can
//! prove it.
//!
//! The identity is read once, when the connection is accepted, from
//! something the client cannot forge over that transport: on a Unix socket
//! the kernel's record of the connecting process (`SO_PEERCRED`, taken at
//! `connect` time, so it stays that process's credentials even if the socket
//! is passed on); with TLS (not built yet) the client certificate the
//! handshake verified. Plain TCP and stdio prove nothing, so their peers are
//! [`Identity::Anonymous`]. Registries decide what an identity is allowed
//! to see (scratch disks belong to the identity that made them).

use std::fmt;
use std::os::fd::AsFd;

/// A connection's proven identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A process on this host, by its credentials when it connected.
    Unix(Credentials),
    /// A TLS client by its verified certificate. Nothing makes one yet: the
    /// TLS transport will, once it exists.
    Certificate(Fingerprint),
    /// Nothing is known about the peer (plain TCP, stdio).
    Anonymous,
}

/// A Unix-socket peer's credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// For logs only: the process may be gone, and its number reused.
    pub pid: i32,
}

/// SHA-256 of a client certificate (DER).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Identity {
    /// The credentials of the process at the other end of the Unix socket
    /// `sock`; anonymous when the kernel cannot tell (which Linux always can).
    pub fn of_unix_peer(sock: impl AsFd) -> Identity {
        match rustix::net::sockopt::socket_peercred(sock) {
            Ok(c) => Identity::Unix(Credentials {
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
                pid: c.pid.as_raw_nonzero().get(),
            }),
            Err(_) => Identity::Anonymous,
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Unix(c) => write!(f, "uid {} gid {} pid {}", c.uid, c.gid, c.pid),
            Identity::Certificate(fp) => write!(f, "certificate {fp}"),
            Identity::Anonymous => f.write_str("anonymous"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_peer_is_the_connecting_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let Identity::Unix(c) = Identity::of_unix_peer(&a) else {
            panic!("no credentials on a socket pair")
        };
        assert_eq!(c.uid, rustix::process::getuid().as_raw());
        assert_eq!(c.gid, rustix::process::getgid().as_raw());
        assert_eq!(c.pid, std::process::id() as i32);
    }

    #[test]
    fn identities_read_well_in_logs() {
        let fp = Fingerprint([0xab; 32]);
        assert!(Identity::Certificate(fp)
            .to_string()
            .starts_with("certificate sha256:abab"));
        assert_eq!(Identity::Anonymous.to_string(), "anonymous");
    }
}
