//! Event counters for the metrics: NBD errors replied (by errno, server-wide
//! and per export), handshake failures (by reason), TLS handshakes. Each
//! event costs a relaxed atomic increment or two; the server-wide counters
//! live as long as the process, an export's [`ErrorCounts`] as long as its
//! disk.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use scratchd_proto::Errno;

/// Error replies sent by the whole server.
static ERRORS: ErrorCounts = ErrorCounts::new();

/// Error replies sent, by errno: the server's, and each export's, which
/// its registry keeps beside the export's other counters and hands to every
/// connection that opens it ([`crate::OpenExport::errors`]). It lives in
/// `scratchd_store` so that registries below the server can keep one; it is
/// re-exported here, where it always was.
pub use scratchd_store::errors::ErrorCounts;

/// Why a handshake ended without transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client sent nothing for the handshake timeout.
    Timeout,
    /// Bad magic, malformed option or flags: not an NBD client, or a broken one.
    Malformed,
    /// The client closed or reset the connection mid-handshake.
    ClientGone,
    /// An export was refused (policy, budget, unknown or bad name).
    Refused,
    /// The TLS handshake failed (bad or untrusted certificate, not TLS).
    Tls,
    /// Anything else (a socket error).
    Other,
}

impl HandshakeFailure {
    /// Every reason, in the order of [`HANDSHAKE_FAILURES`].
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Malformed,
        HandshakeFailure::ClientGone,
        HandshakeFailure::Refused,
        HandshakeFailure::Tls,
        HandshakeFailure::Other,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::ClientGone => "client_gone",
            HandshakeFailure::Refused => "refused",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Other => "other",
        }
    }

    /// The reason a handshake error stands for.
    pub fn of(e: &io::Error) -> HandshakeFailure {
        if e.get_ref().is_some_and(|inner| inner.is::<TlsFailed>()) {
            return HandshakeFailure::Tls;
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeFailure::Timeout,
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => HandshakeFailure::Malformed,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => HandshakeFailure::ClientGone,
            _ => HandshakeFailure::Other,
        }
    }
}

static HANDSHAKE_FAILURES: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
static TLS_COMPLETED: AtomicU64 = AtomicU64::new(0);
static TLS_FAILED: AtomicU64 = AtomicU64::new(0);

/// Marks a handshake error as a TLS failure (see [`HandshakeFailure::of`]).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub struct TlsFailed(pub io::Error);

/// An error reply with `errno` was sent for a request on the export
/// whose counters are `export`.
pub fn error_replied(errno: Errno, export: &ErrorCounts) {
    // NBD's error values are Linux errno numbers, which the counts use.
    ERRORS.add(errno as u32);
    export.add(errno as u32);
}

/// A handshake ended without transmission, for `why`.
pub fn handshake_failed(why: HandshakeFailure) {
    let i = HandshakeFailure::ALL.iter().position(|&r| r == why);
    if let Some(i) = i {
        HANDSHAKE_FAILURES[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A TLS handshake completed (`true`) or failed.
pub fn tls_handshake(ok: bool) {
    let counter = if ok { &TLS_COMPLETED } else { &TLS_FAILED };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Error replies the whole server sent so far, by errno name (`ENOSPC`).
pub fn errors() -> Vec<(&'static str, u64)> {
    ERRORS.by_errno()
}

/// Failed handshakes so far, by reason.
pub fn handshake_failures() -> Vec<(&'static str, u64)> {
    HandshakeFailure::ALL
        .iter()
        .zip(&HANDSHAKE_FAILURES)
        .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
        .collect()
}

/// TLS handshakes so far: (completed, failed).
pub fn tls_handshakes() -> (u64, u64) {
    (
        TLS_COMPLETED.load(Ordering::Relaxed),
        TLS_FAILED.load(Ordering::Relaxed),
    )
}

/// The symbolic name of an NBD errno.
pub fn errno_name(errno: Errno) -> &'static str {
    match errno {
        Errno::Perm => "EPERM",
        Errno::Io => "EIO",
        Errno::NoMem => "ENOMEM",
        Errno::Inval => "EINVAL",
        Errno::NoSpc => "ENOSPC",
        Errno::Overflow => "EOVERFLOW",
        Errno::NotSup => "ENOTSUP",
        Errno::Shutdown => "ESHUTDOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_are_classified() {
        let of = |kind| HandshakeFailure::of(&io::Error::from(kind));
        assert_eq!(of(io::ErrorKind::WouldBlock), HandshakeFailure::Timeout);
        assert_eq!(of(io::ErrorKind::InvalidData), HandshakeFailure::Malformed);
        assert_eq!(
            of(io::ErrorKind::UnexpectedEof),
            HandshakeFailure::ClientGone
        );
        assert_eq!(of(io::ErrorKind::Other), HandshakeFailure::Other);
        let tls = io::Error::other(TlsFailed(io::ErrorKind::InvalidData.into()));
        assert_eq!(HandshakeFailure::of(&tls), HandshakeFailure::Tls);
    }

    #[test]
    fn errors_are_counted_by_errno_for_the_server_and_the_export() {
        let before = errors();
        let (export, other) = (ErrorCounts::new(), ErrorCounts::new());
        error_replied(Errno::NoSpc, &export);
        error_replied(Errno::NoSpc, &export);
        error_replied(Errno::Inval, &export);
        let after = errors();
        let count = |v: &[(&str, u64)], name| v.iter().find(|e| e.0 == name).unwrap().1;
        assert!(count(&after, "ENOSPC") >= count(&before, "ENOSPC") + 2);
        let mine = export.by_errno();
        assert_eq!(mine.len(), Errno::ALL.len());
        assert_eq!((count(&mine, "ENOSPC"), count(&mine, "EINVAL")), (2, 1));
        assert_eq!(count(&mine, "EIO"), 0);
        assert!(other.by_errno().iter().all(|(_, n)| *n == 0));
    }
}
