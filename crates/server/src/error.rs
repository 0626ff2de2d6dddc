//! Why a connection ended: one typed error for the whole connection path
//! (handshake and transmission), so that the counters and the log decide on
//! variants, not on `io::ErrorKind`s or message text.
//!
//! Socket errors are sorted into variants once, where they enter
//! ([`From<io::Error>`]); the protocol's own decoding errors keep their
//! types as the cause.

use std::error::Error;
use std::fmt;
use std::io;

use scratchd_proto::handshake::HandshakeError;
use scratchd_proto::DecodeError;

/// Why a connection ended before the client said goodbye.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The client closed the connection in the middle of a message (a
    /// close between messages is a clean end, not an error).
    #[error("the client closed the connection mid-message")]
    Closed,
    /// The connection was reset or its other end is gone.
    #[error("the connection was lost")]
    Lost(#[source] io::Error),
    /// The client sent nothing in time (handshake timeout), stopped reading
    /// its replies (`--reply-timeout`), or TCP gave up on it.
    #[error("the client timed out")]
    TimedOut(#[source] io::Error),
    /// The byte stream beneath is corrupt (a bad TLS record).
    #[error("the client's stream is corrupt")]
    Corrupt(#[source] io::Error),
    /// Any other socket error.
    #[error("socket error")]
    Io(#[source] io::Error),
    /// A handshake message that is not NBD (bad magic, flags, option length).
    #[error("malformed handshake")]
    Handshake(#[from] HandshakeError),
    /// STARTTLS used out of turn (bytes sent after it, no socket beneath).
    #[error("bad STARTTLS: {0}")]
    StartTls(&'static str),
    /// The client had not finished its handshake (TLS included) this long
    /// after it was accepted, and was cut off.
    #[error("the handshake did not finish within {0:?} of the connection; client dropped")]
    HandshakeDeadline(std::time::Duration),
    /// The client sent this many options without opening an export.
    #[error("{0} options without opening an export; client dropped")]
    TooManyOptions(usize),
    /// The TLS handshake failed (bad or untrusted certificate, not TLS).
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    /// A request header that does not decode (bad magic).
    #[error("malformed request")]
    Request(#[source] DecodeError),
    /// A request announcing a payload too long to be anything but a broken
    /// or hostile client.
    #[error("request payload of {0} bytes is beyond any sane size")]
    AbsurdPayload(u64),
    /// The handshake ended without transmission after an export was refused
    /// (the client left, or failed, with the refusal as its reason):
    /// `then` is how it ended, when that was an error.
    #[error("export {export:?} was refused")]
    Refused {
        export: String,
        #[source]
        then: Option<Box<ConnectionError>>,
    },
}

impl From<io::Error> for ConnectionError {
    fn from(e: io::Error) -> ConnectionError {
        use io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof => ConnectionError::Closed,
            ConnectionReset | ConnectionAborted | BrokenPipe => ConnectionError::Lost(e),
            // A read timeout (`SO_RCVTIMEO`) says EAGAIN; a stalled client
            // or TCP giving up says ETIMEDOUT.
            WouldBlock | TimedOut => ConnectionError::TimedOut(e),
            InvalidData | InvalidInput => ConnectionError::Corrupt(e),
            _ => ConnectionError::Io(e),
        }
    }
}

impl ConnectionError {
    /// How the connection ended, a refusal that came before set aside.
    pub fn ending(&self) -> Option<&ConnectionError> {
        match self {
            ConnectionError::Refused { then, .. } => then.as_deref().and_then(Self::ending),
            e => Some(e),
        }
    }
}

/// An error and its causes, one after the other (`a: b: c`), for the log.
pub struct Causes<'a>(pub &'a dyn Error);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_are_sorted_by_kind() {
        let of = |kind| ConnectionError::from(io::Error::from(kind));
        assert!(matches!(
            of(io::ErrorKind::UnexpectedEof),
            ConnectionError::Closed
        ));
        assert!(matches!(
            of(io::ErrorKind::ConnectionReset),
            ConnectionError::Lost(_)
        ));
        assert!(matches!(
            of(io::ErrorKind::WouldBlock),
            ConnectionError::TimedOut(_)
        ));
        assert!(matches!(
            of(io::ErrorKind::InvalidData),
            ConnectionError::Corrupt(_)
        ));
        assert!(matches!(of(io::ErrorKind::Other), ConnectionError::Io(_)));
    }

    #[test]
    fn the_log_shows_every_cause() {
        let e = ConnectionError::Refused {
            export: "x".into(),
            then: Some(Box::new(ConnectionError::Tls(io::Error::other("bad cert")))),
        };
        assert_eq!(
            Causes(&e).to_string(),
            "export \"x\" was refused: TLS handshake failed: bad cert"
        );
        assert!(matches!(e.ending(), Some(ConnectionError::Tls(_))));
    }
}
