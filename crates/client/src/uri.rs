//! Where an export lives: [`Target`], parsed from libnbd-style URIs.
//!
//! Accepted forms (the subset of the NBD URI spec, `doc/uri.md` of the NBD
//! project, that scratchd can serve):
//! - `nbd://host[:port]/export` — TCP, port 10809 by default; an IPv6 host
//!   is written in brackets, `nbd://[::1]:10809/x`;
//! - `nbd+unix:///export?socket=PATH` — a Unix socket;
//! - `nbds://…` and `nbds+unix://…` — the same with TLS (STARTTLS), which
//!   needs `tls-certificates=DIR`: `DIR/ca-cert.pem` checks the server, and
//!   `DIR/client-cert.pem` with `client-key.pem`, when present, identify the
//!   client (libnbd's and nbdkit's layout).
//!
//! The export name is the path after the first `/`, percent-decoded; an
//! empty one is the default export. Other schemes (vsock, ssh) are refused
//! with [`UriError::Scheme`]. Query parameters other than `socket` and
//! `tls-certificates` are ignored, as libnbd does for those it does not
//! know.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// A URI that names no export this client can reach.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UriError {
    #[error("{uri:?} is not an NBD URI (it must start with nbd:// or nbd+unix://)")]
    NotNbd { uri: String },
    #[error("{uri:?}: nbds URIs need ?tls-certificates=DIR (with ca-cert.pem)")]
    TlsWithoutCertificates { uri: String },
    #[error("{uri:?}: scheme {scheme:?} is not supported (use nbd or nbd+unix)")]
    Scheme { uri: String, scheme: String },
    #[error("{uri:?}: {reason}")]
    Malformed { uri: String, reason: &'static str },
}

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// A host name or IP address (without brackets) and a port.
    Tcp {
        host: String,
        port: u16,
    },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// An export on a server: what a client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: Address,
    /// The export name; "" asks for the server's default export.
    pub export: String,
    /// TLS, with the certificates in this directory; `None`: plaintext.
    pub tls: Option<PathBuf>,
}

impl Target {
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> Target {
        Target {
            address: Address::Unix(socket.into()),
            export: export.into(),
            tls: None,
        }
    }

    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> Target {
        Target {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    /// Parses an `nbd://` or `nbd+unix://` URI (see the module docs).
    pub fn parse(uri: &str) -> Result<Target, UriError> {
        let malformed = |reason| UriError::Malformed {
            uri: uri.to_owned(),
            reason,
        };
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(UriError::NotNbd { uri: uri.into() });
        };
        let (unix, tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            s if s.starts_with("nbd") => {
                return Err(UriError::Scheme {
                    uri: uri.into(),
                    scheme: scheme.into(),
                })
            }
            _ => return Err(UriError::NotNbd { uri: uri.into() }),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or(malformed("bad percent-encoding in the export"))?;
        let socket = query_param(query, "socket")
            .map(|s| percent_decode(s).ok_or(malformed("bad percent-encoding in socket=")))
            .transpose()?;
        let address = if unix {
            if !authority.is_empty() {
                return Err(malformed("nbd+unix URIs take no host"));
            }
            Address::Unix(
                socket
                    .ok_or(malformed("nbd+unix needs ?socket=PATH"))?
                    .into(),
            )
        } else {
            if socket.is_some() {
                return Err(malformed("socket= belongs to nbd+unix URIs"));
            }
            tcp_address(authority).map_err(malformed)?
        };
        let tls = match tls {
            false => None,
            true => Some(
                query_param(query, "tls-certificates")
                    .map(|s| {
                        percent_decode(s)
                            .ok_or(malformed("bad percent-encoding in tls-certificates="))
                    })
                    .transpose()?
                    .ok_or_else(|| UriError::TlsWithoutCertificates { uri: uri.into() })?
                    .into(),
            ),
        };
        Ok(Target {
            address,
            export,
            tls,
        })
    }
}

impl std::str::FromStr for Target {
    type Err = UriError;

    fn from_str(s: &str) -> Result<Self, UriError> {
        Target::parse(s)
    }
}

/// The URI form, with the export name percent-encoded where needed.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        let s = if self.tls.is_some() { "s" } else { "" };
        let certs = self
            .tls
            .as_ref()
            .map(|d| percent_encode(&d.to_string_lossy()));
        match (&self.address, certs) {
            (Address::Unix(path), certs) => {
                let path = percent_encode(&path.to_string_lossy());
                write!(f, "nbd{s}+unix:///{export}?socket={path}")?;
                match certs {
                    Some(c) => write!(f, "&tls-certificates={c}"),
                    None => Ok(()),
                }
            }
            (tcp, Some(c)) => write!(f, "nbd{s}://{tcp}/{export}?tls-certificates={c}"),
            (tcp, None) => write!(f, "nbd://{tcp}/{export}"),
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn tcp_address(authority: &str) -> Result<Address, &'static str> {
    // Credentials (`user@`) are meaningless without TLS; drop them.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd URIs need a host");
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| "the port is not a number 0-65535")?,
    };
    Ok(Address::Tcp {
        host: host.to_owned(),
        port,
    })
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Target, UriError> {
        Target::parse(s)
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(
            parse("nbd://example.com/build-1"),
            Ok(Target::tcp("example.com", DEFAULT_PORT, "build-1"))
        );
        assert_eq!(
            parse("nbd://10.0.0.1:10810"),
            Ok(Target::tcp("10.0.0.1", 10810, ""))
        );
        assert_eq!(parse("nbd://h/"), Ok(Target::tcp("h", DEFAULT_PORT, "")));
        assert_eq!(
            parse("NBD://[::1]:99/a%20b/c"),
            Ok(Target::tcp("::1", 99, "a b/c"))
        );
        assert_eq!(
            parse("nbd://[fe80::1]/x"),
            Ok(Target::tcp("fe80::1", DEFAULT_PORT, "x"))
        );
        assert_eq!(
            parse("nbd://user@h:1/x?tls=off#frag"),
            Ok(Target::tcp("h", 1, "x"))
        );
    }

    #[test]
    fn unix_uris() {
        assert_eq!(
            parse("nbd+unix:///disk?socket=/tmp/s.sock"),
            Ok(Target::unix("/tmp/s.sock", "disk"))
        );
        assert_eq!(
            parse("nbd+unix://?socket=/run/a%20b&other=1"),
            Ok(Target::unix("/run/a b", ""))
        );
        assert_eq!(
            parse("nbd+unix:///?other=1&socket=rel.sock"),
            Ok(Target::unix("rel.sock", ""))
        );
    }

    #[test]
    fn tls_uris() {
        let mut t = Target::tcp("h", 1, "x");
        t.tls = Some("/etc/pki/nbd".into());
        assert_eq!(
            parse("nbds://h:1/x?tls-certificates=/etc/pki/nbd"),
            Ok(t.clone())
        );
        assert_eq!(Target::parse(&t.to_string()), Ok(t));
        let mut u = Target::unix("/s", "");
        u.tls = Some("/c".into());
        assert_eq!(
            parse("nbds+unix:///?socket=/s&tls-certificates=/c"),
            Ok(u.clone())
        );
        assert_eq!(Target::parse(&u.to_string()), Ok(u));
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(
            parse("nbds://h/x"),
            Err(UriError::TlsWithoutCertificates { .. })
        ));
        assert!(matches!(
            parse("nbds+unix:///x?socket=/s"),
            Err(UriError::TlsWithoutCertificates { .. })
        ));
        assert!(matches!(
            parse("nbd+vsock://1/x"),
            Err(UriError::Scheme { .. })
        ));
        assert!(matches!(parse("http://h/x"), Err(UriError::NotNbd { .. })));
        assert!(matches!(parse("/tmp/sock"), Err(UriError::NotNbd { .. })));
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd:///x",
            "nbd://h:port/x",
            "nbd://h:70000/x",
            "nbd://[::1/x",
            "nbd://[::1]x/y",
            "nbd://h/%zz",
            "nbd://h/x?socket=/s",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, UriError::Malformed { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(parse("nbd+unix:///x")
            .unwrap_err()
            .to_string()
            .contains("socket=PATH"));
    }

    #[test]
    fn display_round_trips() {
        for t in [
            Target::unix("/tmp/my sock", "a b"),
            Target::tcp("::1", 5, "disk/1"),
            Target::tcp("host", DEFAULT_PORT, ""),
        ] {
            assert_eq!(parse(&t.to_string()), Ok(t.clone()), "{t}");
        }
        assert_eq!(Target::tcp("::1", 5, "x").to_string(), "nbd://[::1]:5/x");
    }
}
