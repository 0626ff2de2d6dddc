//! Event counters for the metrics: NBD errors replied (by errno, server-wide
//! and per export), handshake failures (by reason), TLS handshakes. Each
//! event costs a relaxed atomic increment or two, never a lock. The
//! server-wide counters ([`ServerCounters`]) belong to the server instance
//! (its [`ServerContext`](crate::ServerContext)), so two servers in one
//! process count apart; an export's [`ErrorCounts`] live as long as its
//! disk. A connection charges both through one [`ErrorSink`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use scratchd_proto::Errno;

use crate::error::ConnectionError;

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
    /// Every reason, in the order [`ServerCounters`] counts them.
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
            E::TimedOut(_) | E::HandshakeDeadline(_) => HandshakeFailure::Timeout,
            E::Handshake(_)
            | E::StartTls(_)
            | E::Request(_)
            | E::AbsurdPayload(_)
            | E::TooManyOptions(_)
            | E::Corrupt(_) => HandshakeFailure::Malformed,
            E::Closed | E::Lost(_) => HandshakeFailure::ClientGone,
            E::Tls(_) => HandshakeFailure::Tls,
            E::Io(_) => HandshakeFailure::Other,
        }
    }
}

/// The counters of one server: error replies by errno, failed handshakes
/// by reason, TLS handshakes. Shared (by `Arc`) by its connections and the
/// requests they hand to the worker pool; read by the operator's side
/// (`ctl`, `--metrics`).
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Error replies sent by the whole server.
    errors: ErrorCounts,
    /// Indexed like [`HandshakeFailure::ALL`].
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    tls_completed: AtomicU64,
    tls_failed: AtomicU64,
}

impl ServerCounters {
    /// A handshake ended without transmission, for `why`.
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        let i = HandshakeFailure::ALL.iter().position(|&r| r == why);
        if let Some(i) = i {
            self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A TLS handshake completed (`true`) or failed.
    pub fn tls_handshake(&self, ok: bool) {
        let counter = if ok {
            &self.tls_completed
        } else {
            &self.tls_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Error replies the whole server sent so far, by errno name (`ENOSPC`).
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.errors.by_errno()
    }

    /// Failed handshakes so far, by reason.
    pub fn handshake_failures(&self) -> Vec<(&'static str, u64)> {
        HandshakeFailure::ALL
            .iter()
            .zip(&self.handshake_failures)
            .map(|(r, n)| (r.name(), n.load(Ordering::Relaxed)))
            .collect()
    }

    /// TLS handshakes so far: (completed, failed).
    pub fn tls_handshakes(&self) -> (u64, u64) {
        (
            self.tls_completed.load(Ordering::Relaxed),
            self.tls_failed.load(Ordering::Relaxed),
        )
    }
}

/// Where one connection's error replies are counted: its server's counts
/// and its export's. One per connection, made when transmission starts, so
/// that a request handed to the worker pool carries one handle to both,
/// shared with its own connection only.
#[derive(Debug)]
pub struct ErrorSink {
    server: Arc<ServerCounters>,
    export: Arc<ErrorCounts>,
}

impl ErrorSink {
    pub fn new(server: Arc<ServerCounters>, export: Arc<ErrorCounts>) -> ErrorSink {
        ErrorSink { server, export }
    }

    /// An error reply with `errno` was sent.
    pub fn error_replied(&self, errno: Errno) {
        // NBD's error values are Linux errno numbers, which the counts use.
        self.server.errors.add(errno as u32);
        self.export.add(errno as u32);
    }
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
        let server = Arc::new(ServerCounters::default());
        let (export, other) = (Arc::new(ErrorCounts::new()), ErrorCounts::new());
        let sink = ErrorSink::new(server.clone(), export.clone());
        sink.error_replied(Errno::NoSpc);
        sink.error_replied(Errno::NoSpc);
        sink.error_replied(Errno::Inval);
        let count = |v: &[(&str, u64)], name| v.iter().find(|e| e.0 == name).unwrap().1;
        let all = server.errors();
        assert_eq!((count(&all, "ENOSPC"), count(&all, "EINVAL")), (2, 1));
        let mine = export.by_errno();
        assert_eq!(mine.len(), Errno::ALL.len());
        assert_eq!((count(&mine, "ENOSPC"), count(&mine, "EINVAL")), (2, 1));
        assert_eq!(count(&mine, "EIO"), 0);
        assert!(other.by_errno().iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn two_servers_count_apart() {
        let (one, two) = (ServerCounters::default(), ServerCounters::default());
        one.handshake_failed(HandshakeFailure::Tls);
        one.tls_handshake(false);
        two.tls_handshake(true);
        let tls = |c: &ServerCounters| c.handshake_failures()[4];
        assert_eq!((tls(&one), tls(&two)), (("tls", 1), ("tls", 0)));
        assert_eq!(
            (one.tls_handshakes(), two.tls_handshakes()),
            ((0, 1), (1, 0))
        );
    }
}
