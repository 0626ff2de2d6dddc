//! Event counters for the metrics: NBD errors replied (by errno, server-wide
//! and per export), handshake failures (by reason), TLS handshakes. Each
//! event costs a relaxed atomic increment or two; the server-wide counters
//! live as long as the process, an export's [`ErrorCounts`] as long as its
//! disk.

use std::sync::atomic::{AtomicU64, Ordering};

use scratchd_proto::Errno;

use crate::error::ConnectionError;

/// Error replies sent by the whole server.
static ERRORS: ErrorCounts = ErrorCounts::new();

/// Error replies sent, by errno (indexed like [`Errno::ALL`]): the
/// server's, and each export's, which its registry keeps beside the
/// export's other counters and hands to every connection that opens it
/// ([`crate::OpenExport::errors`]). Connections of one export share its
/// atomics, never a lock.
#[derive(Debug)]
pub struct ErrorCounts([AtomicU64; Errno::ALL.len()]);

impl ErrorCounts {
    pub const fn new() -> ErrorCounts {
        ErrorCounts([const { AtomicU64::new(0) }; Errno::ALL.len()])
    }

    fn add(&self, errno: Errno) {
        if let Some(i) = Errno::ALL.iter().position(|&e| e == errno) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counts so far, by errno name (`ENOSPC`), every errno included.
    pub fn by_errno(&self) -> Vec<(&'static str, u64)> {
        Errno::ALL
            .iter()
            .zip(&self.0)
            .map(|(e, n)| (errno_name(*e), n.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Default for ErrorCounts {
    fn default() -> ErrorCounts {
        ErrorCounts::new()
    }
}

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
    pub fn of(e: &ConnectionError) -> HandshakeFailure {
        use ConnectionError as E;
        match e {
            E::Refused { .. } => HandshakeFailure::Refused,
            E::TimedOut(_) => HandshakeFailure::Timeout,
            E::Handshake(_)
            | E::StartTls(_)
            | E::Request(_)
            | E::AbsurdPayload(_)
            | E::Corrupt(_) => HandshakeFailure::Malformed,
            E::Closed | E::Lost(_) => HandshakeFailure::ClientGone,
            E::Tls(_) => HandshakeFailure::Tls,
            E::Io(_) => HandshakeFailure::Other,
        }
    }
}

static HANDSHAKE_FAILURES: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
static TLS_COMPLETED: AtomicU64 = AtomicU64::new(0);
static TLS_FAILED: AtomicU64 = AtomicU64::new(0);

/// An error reply with `errno` was sent for a request on the export
/// whose counters are `export`.
pub fn error_replied(errno: Errno, export: &ErrorCounts) {
    ERRORS.add(errno);
    export.add(errno);
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
    use scratchd_proto::handshake::HandshakeError;

    use super::*;

    #[test]
    fn handshake_errors_are_classified() {
        use std::io;
        let of = |kind| HandshakeFailure::of(&io::Error::from(kind).into());
        assert_eq!(of(io::ErrorKind::WouldBlock), HandshakeFailure::Timeout);
        assert_eq!(of(io::ErrorKind::TimedOut), HandshakeFailure::Timeout);
        assert_eq!(of(io::ErrorKind::InvalidData), HandshakeFailure::Malformed);
        assert_eq!(
            of(io::ErrorKind::UnexpectedEof),
            HandshakeFailure::ClientGone
        );
        assert_eq!(of(io::ErrorKind::BrokenPipe), HandshakeFailure::ClientGone);
        assert_eq!(of(io::ErrorKind::Other), HandshakeFailure::Other);
        let tls = ConnectionError::Tls(io::ErrorKind::InvalidData.into());
        assert_eq!(HandshakeFailure::of(&tls), HandshakeFailure::Tls);
        let bad = ConnectionError::Handshake(HandshakeError::NotFixedNewstyle);
        assert_eq!(HandshakeFailure::of(&bad), HandshakeFailure::Malformed);
        // A refusal is the reason, whatever ended the handshake after it.
        let refused = ConnectionError::Refused {
            export: "x".into(),
            then: Some(Box::new(ConnectionError::Closed)),
        };
        assert_eq!(HandshakeFailure::of(&refused), HandshakeFailure::Refused);
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
