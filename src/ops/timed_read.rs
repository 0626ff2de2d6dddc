//! Reading a whole request within a deadline, for the control socket and
//! the metrics endpoint: each serves one client at a time on one thread, so
//! a per-read timeout would let a client sending a byte just before each
//! timeout hold it (and everyone else out) indefinitely.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A socket whose read timeout can be set.
pub trait ReadTimeout {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl ReadTimeout for &TcpStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl ReadTimeout for &UnixStream {
    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// Reads from a socket until `until`; a read past it fails with
/// `TimedOut`.
pub struct Timed<S> {
    socket: S,
    until: Instant,
}

impl<S: Read + ReadTimeout> Timed<S> {
    /// Reads from `socket` for at most `limit` from now.
    pub fn new(socket: S, limit: Duration) -> Self {
        Timed {
            socket,
            until: Instant::now() + limit,
        }
    }
}

impl<S: Read + ReadTimeout> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request did not arrive in time",
            ));
        }
        self.socket.set_timeout(left)?;
        match self.socket.read(buf) {
            // The socket's timeout, which ends at the deadline, ran out
            // (EAGAIN): the deadline passed while reading.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request did not arrive in time",
                ))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_dripped_request_fails_at_the_deadline() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let dripper = std::thread::spawn(move || {
            // One byte every 50 ms, each well within any per-read timeout.
            while client.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut all = Vec::new();
        let err = Timed::new(&server, Duration::from_millis(300))
            .read_to_end(&mut all)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(!all.is_empty(), "bytes came meanwhile");
        drop(server);
        dripper.join().unwrap();
    }
}
