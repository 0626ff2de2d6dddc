//! What can go wrong, in two layers.
//!
//! - [`enum@Error`]: connecting and the handshake. Typed, with the export and
//!   address named, and the underlying error as `source`: a refused export
//!   name is [`Error::Refused`] with the server's `NBD_REP_ERR_*` code and
//!   message.
//! - Requests (read, write, ...) speak `std::io::Error`, like every
//!   [`BlockDevice`](scratchd_store::BlockDevice). An error the server
//!   sends becomes the matching errno ([`nbd_error`]: EPERM, EIO, ENOSPC,
//!   ...), so `raw_os_error()` works for front ends that hand errnos on
//!   (FUSE, a proxy). A connection that breaks gives every request waiting
//!   on it [`ErrorKind::ConnectionAborted`] carrying [`Lost`], a request
//!   that outlives the timeout [`ErrorKind::TimedOut`]; [`errno`] turns any
//!   of them into one number.

use std::io::{self, ErrorKind};

use scratchd_proto::consts::OptError;
use scratchd_proto::handshake::HandshakeError;
use thiserror::Error;

use crate::uri::UriError;

/// A failure to connect to an export or to negotiate with its server.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Uri(#[from] UriError),
    #[error("cannot connect to {address}")]
    Connect { address: String, source: io::Error },
    /// The connection failed during the handshake.
    #[error("I/O error during the NBD handshake with {address}")]
    Io { address: String, source: io::Error },
    /// The peer's handshake messages are not NBD fixed newstyle.
    #[error("{address} does not speak the NBD handshake")]
    Handshake {
        address: String,
        source: HandshakeError,
    },
    /// The server answered an option with an error: the export does not
    /// exist, needs TLS, the server is shutting down, ...
    #[error("{address} refused export {export:?} ({option}: {}){}", code_name(*.code), message_suffix(.message))]
    Refused {
        address: String,
        export: String,
        /// The option refused (`GO`, `EXPORT_NAME`).
        option: &'static str,
        /// The `NBD_REP_ERR_*` reply type.
        code: u32,
        /// The server's explanation, possibly empty.
        message: String,
    },
    /// TLS could not be set up (certificates, or the TLS handshake).
    #[error("TLS with {address} failed")]
    Tls { address: String, source: io::Error },
    /// The server sent something the protocol does not allow.
    #[error("{address} broke the NBD protocol: {reason}")]
    Protocol { address: String, reason: String },
    /// The server's answer to a snapshot request (scratchd's own options)
    /// is not one.
    #[error("{address} sent a malformed answer to a snapshot request")]
    SnapshotAnswer {
        address: String,
        source: scratchd_proto::snapshots::SnapshotReplyError,
    },
    /// A further connection for multi-conn saw a different export.
    #[error("connection {index} to {address} saw a different export (size or flags changed)")]
    Inconsistent { address: String, index: usize },
}

impl Error {
    /// The server's refusal code, when it refused the export.
    pub fn refusal(&self) -> Option<OptError> {
        match self {
            Error::Refused { code, .. } => OptError::from_code(*code),
            _ => None,
        }
    }
}

fn code_name(code: u32) -> String {
    match OptError::from_code(code) {
        Some(e) => e.name().to_owned(),
        None => format!("error {code:#x}"),
    }
}

/// The longest part of a server's message an error shows: the message is
/// the server's to choose, up to the option reply's bound (16 MiB).
const MAX_MESSAGE_SHOWN: usize = 1024;

/// The server's message after an error's text, if it has one.
fn message_suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {}", shown(message))
    }
}

/// A server's message as errors and logs show it: clipped, its control
/// characters escaped, so that a hostile server can neither flood a log
/// line nor drive the terminal that prints it. Every message of a server
/// that errors or logs show goes through here.
pub(crate) fn shown(message: &str) -> String {
    let mut shown = String::new();
    for (i, c) in message.chars().enumerate() {
        if i == MAX_MESSAGE_SHOWN {
            shown.push_str("...");
            break;
        }
        match c.is_control() {
            true => shown.extend(c.escape_default()),
            false => shown.push(c),
        }
    }
    shown
}

/// For callers that want one error type: refusals of a name become
/// `NotFound`, of policy `PermissionDenied`, the rest keep their source's
/// kind or become `InvalidData`/`Other`.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Uri(_) => ErrorKind::InvalidInput,
            Error::Connect { source, .. }
            | Error::Io { source, .. }
            | Error::Tls { source, .. } => source.kind(),
            Error::Refused { .. } => match e.refusal() {
                Some(OptError::Unknown) => ErrorKind::NotFound,
                Some(OptError::Policy) | Some(OptError::TlsReqd) => ErrorKind::PermissionDenied,
                _ => ErrorKind::Other,
            },
            Error::Handshake { .. }
            | Error::Protocol { .. }
            | Error::SnapshotAnswer { .. }
            | Error::Inconsistent { .. } => ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// Why a connection stopped carrying requests; the payload of the
/// `ConnectionAborted` errors its waiting requests get.
#[derive(Debug, Clone, Error)]
#[error("NBD connection lost: {0}")]
pub struct Lost(pub String);

pub(crate) fn lost(reason: &str) -> io::Error {
    io::Error::new(ErrorKind::ConnectionAborted, Lost(reason.to_owned()))
}

pub(crate) fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        ErrorKind::TimedOut,
        format!("NBD {what} got no reply within the request timeout; connection closed"),
    )
}

/// The `io::Error` for NBD error number `code` from a reply. NBD's numbers
/// are Linux's, but are mapped through `libc` so that the host's values
/// come out; numbers NBD does not define become EIO, as the spec asks.
pub fn nbd_error(code: u32) -> io::Error {
    io::Error::from_raw_os_error(nbd_errno(code))
}

fn nbd_errno(code: u32) -> i32 {
    match code {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// One errno for any error this crate's requests return, for front ends
/// that must give the kernel a number: the raw OS error when there is one,
/// ETIMEDOUT for a timeout, EIO for a lost connection and anything else.
pub fn errno(e: &io::Error) -> i32 {
    match (e.raw_os_error(), e.kind()) {
        (Some(n), _) => n,
        (None, ErrorKind::TimedOut) => libc::ETIMEDOUT,
        (None, ErrorKind::InvalidInput) => libc::EINVAL,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_errors_become_errnos() {
        let cases = [
            (1, libc::EPERM, ErrorKind::PermissionDenied),
            (5, libc::EIO, ErrorKind::Other),
            (12, libc::ENOMEM, ErrorKind::OutOfMemory),
            (22, libc::EINVAL, ErrorKind::InvalidInput),
            (28, libc::ENOSPC, ErrorKind::Other),
            (95, libc::EOPNOTSUPP, ErrorKind::Unsupported),
        ];
        for (code, errno_, kind) in cases {
            let e = nbd_error(code);
            assert_eq!(e.raw_os_error(), Some(errno_), "{code}");
            if kind != ErrorKind::Other {
                assert_eq!(e.kind(), kind, "{code}");
            }
            assert_eq!(errno(&e), errno_);
        }
        assert_eq!(nbd_error(75).raw_os_error(), Some(libc::EOVERFLOW));
        assert_eq!(nbd_error(108).raw_os_error(), Some(libc::ESHUTDOWN));
        // Unknown numbers, and Linux errnos NBD does not define, are EIO.
        for code in [0, 2, 13, 999, u32::MAX] {
            assert_eq!(nbd_error(code).raw_os_error(), Some(libc::EIO), "{code}");
        }
    }

    #[test]
    fn client_side_failures_have_errnos_too() {
        assert_eq!(errno(&lost("server closed")), libc::EIO);
        assert_eq!(lost("x").kind(), ErrorKind::ConnectionAborted);
        assert!(lost("gone").to_string().contains("gone"));
        assert_eq!(errno(&timed_out("READ")), libc::ETIMEDOUT);
        assert_eq!(
            errno(&io::Error::from(ErrorKind::InvalidInput)),
            libc::EINVAL
        );
    }

    #[test]
    fn refusals_name_the_export_and_the_code() {
        let e = Error::Refused {
            address: "unix:/s".into(),
            export: "build-9".into(),
            option: "GO",
            code: OptError::Unknown as u32,
            message: "no such export".into(),
        };
        assert_eq!(
            e.to_string(),
            "unix:/s refused export \"build-9\" (GO: ERR_UNKNOWN): no such export"
        );
        assert_eq!(e.refusal(), Some(OptError::Unknown));
        assert_eq!(io::Error::from(e).kind(), ErrorKind::NotFound);
        let e = Error::Refused {
            address: "h:1".into(),
            export: "".into(),
            option: "GO",
            code: 0x8000_0100,
            message: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "h:1 refused export \"\" (GO: error 0x80000100)"
        );
    }
}
