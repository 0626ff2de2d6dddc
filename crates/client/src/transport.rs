//! The byte streams a connection runs over: Unix and TCP sockets.
//!
//! The handshake runs on a whole [`Stream`]; transmission then splits it
//! ([`Stream::split`]) into a read half for the connection's reply thread, a
//! write half for whoever sends a request, and a [`Closer`] that wakes the
//! reader by shutting the socket down. For plain sockets the halves are two
//! handles of one socket.
//!
//! With TLS ([`crate::tls`]), [`Stream::Tls`] wraps the socket in a rustls
//! client session after STARTTLS; its halves share that session behind a
//! lock, taken only to encrypt or decrypt, never while waiting on the
//! socket. The kernel cannot take over a TLS session, so such a stream has
//! no file descriptor to hand over.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::uri::Address;

/// A connected socket to an NBD server.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A TLS session over a Unix or TCP stream.
    Tls(crate::tls::TlsStream),
}

impl Stream {
    /// Connects to `address`; TCP tries every address the host resolves to
    /// (each for at most `timeout`) and disables Nagle (requests are small
    /// and latency-bound).
    pub fn connect(address: &Address, timeout: Option<Duration>) -> io::Result<Stream> {
        match address {
            Address::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Address::Tcp { host, port } => {
                let mut last = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    let connected = match timeout {
                        Some(t) => TcpStream::connect_timeout(&addr, t),
                        None => TcpStream::connect(addr),
                    };
                    match connected {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "host resolves to no address")
                }))
            }
        }
    }

    /// Bounds every blocking read and write (`None`: wait forever).
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.socket().set_timeouts(timeout),
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    /// Bounds blocking writes only: the reply thread must be free to wait
    /// for replies as long as requests are slow.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.socket().set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tcp(s) => s.set_write_timeout(timeout),
        }
    }

    /// A read half, a write half and a closer for one connection.
    pub fn split(self) -> io::Result<(ReadHalf, WriteHalf, Closer)> {
        match self {
            Stream::Tls(t) => t.split(),
            Stream::Unix(s) => {
                let reader = s.try_clone()?;
                let closer = s.try_clone()?;
                Ok((
                    ReadHalf(Box::new(reader)),
                    WriteHalf(Box::new(s)),
                    Closer(Stream::Unix(closer)),
                ))
            }
            Stream::Tcp(s) => {
                let reader = s.try_clone()?;
                let closer = s.try_clone()?;
                Ok((
                    ReadHalf(Box::new(reader)),
                    WriteHalf(Box::new(s)),
                    Closer(Stream::Tcp(closer)),
                ))
            }
        }
    }

    /// The socket itself, for handing to the kernel (nbd netlink attach);
    /// `None` for a TLS stream, whose session the kernel cannot take over.
    pub fn into_fd(self) -> Option<OwnedFd> {
        match self {
            Stream::Unix(s) => Some(s.into()),
            Stream::Tcp(s) => Some(s.into()),
            Stream::Tls(_) => None,
        }
    }

    /// Another handle on the socket beneath.
    pub(crate) fn try_clone_socket(&self) -> io::Result<Stream> {
        match self {
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Tls(t) => t.socket().try_clone_socket(),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Tls(t) => t.socket().shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the reply thread reads from.
pub struct ReadHalf(pub(crate) Box<dyn Read + Send>);

/// What requests are written to (behind the connection's lock).
pub struct WriteHalf(pub(crate) Box<dyn Write + Send>);

/// Ends a connection from any thread: the reply thread's blocked read
/// returns, and later writes fail.
#[derive(Debug)]
pub struct Closer(pub(crate) Stream);

impl Closer {
    /// Shuts both directions down; errors (already closed) do not matter.
    pub fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}
