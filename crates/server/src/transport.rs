//! The byte streams a connection runs over.
//!
//! A connection reads on one thread and writes from several (its own, and
//! workers finishing requests), so a transport is split into independent
//! read and write halves up front. Unix and TCP sockets are cloned; stdio
//! (`-s`) is a socket on standard input (inetd-style, cloned like any
//! other) or a pipe pair (stdin and stdout). A TLS transport can provide the same
//! two halves over a shared session.
//!
//! The write half of a socket never blocks: [`WriteHalf::try_write`] sends
//! what fits now (`MSG_DONTWAIT`), so a worker thread shared by every
//! connection can never be held by one client that stopped reading; the
//! connection decides who waits for the rest (see [`crate::replies`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{self, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::identity::Identity;

/// Send buffer asked for on Unix sockets (memory is used only while replies
/// are queued).
const UNIX_SEND_BUFFER: usize = 2 * 1024 * 1024;

pub struct Transport {
    pub reader: Box<dyn Read + Send>,
    pub writer: WriteHalf,
    /// Who is on the other end, for logs.
    pub peer: String,
    /// What the transport proves about the peer, for ownership of exports.
    pub identity: Identity,
    /// The socket beneath, for timeouts and shutdown.
    pub control: Control,
}

/// A handle on a transport's socket, for what is neither reading nor
/// writing: read timeouts, and ending the reading side at shutdown.
pub enum Control {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// stdio: no socket to control.
    None,
}

impl Control {
    /// Sets or clears the read timeout (a no-op without a socket).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Control::Unix(s) => s.set_read_timeout(timeout),
            Control::Tcp(s) => s.set_read_timeout(timeout),
            Control::None => Ok(()),
        }
    }

    /// Another descriptor for the socket (for a TLS session); `None` without
    /// one.
    pub fn socket(&self) -> Option<io::Result<OwnedFd>> {
        match self {
            Control::Unix(s) => Some(s.try_clone().map(OwnedFd::from)),
            Control::Tcp(s) => Some(s.try_clone().map(OwnedFd::from)),
            Control::None => None,
        }
    }

    /// Ends both directions: a client that stopped reading its replies is
    /// cut off, and the connection's thread wakes from any read.
    pub fn cut(&self) {
        let _ = match self {
            Control::Unix(s) => s.shutdown(net::Shutdown::Both),
            Control::Tcp(s) => s.shutdown(net::Shutdown::Both),
            Control::None => Ok(()),
        };
    }

    /// Turns TCP keepalive on: probes after `idle` without traffic, then
    /// every `idle / 6` (at least 1 s), and the connection ends after 6
    /// unanswered probes (so about twice `idle` after the peer vanished).
    /// Sent data that stays unacknowledged for twice `idle` ends it too
    /// (`TCP_USER_TIMEOUT`): a peer that vanished while replies were in
    /// flight would otherwise be retried for a quarter of an hour. Other
    /// transports have no such thing.
    pub fn set_keepalive(&self, idle: Duration) -> io::Result<()> {
        let Control::Tcp(s) = self else {
            return Ok(());
        };
        use rustix::net::sockopt;
        let idle = idle.max(Duration::from_secs(1));
        sockopt::set_socket_keepalive(s, true)?;
        sockopt::set_tcp_keepidle(s, idle)?;
        sockopt::set_tcp_keepintvl(s, (idle / 6).max(Duration::from_secs(1)))?;
        sockopt::set_tcp_keepcnt(s, 6)?;
        let user_timeout_ms = (idle * 2).as_millis().min(u128::from(u32::MAX)) as u32;
        sockopt::set_tcp_user_timeout(s, user_timeout_ms)?;
        Ok(())
    }

    /// Waits until the socket can take more bytes, at most `timeout`; false
    /// when the time ran out. Without a socket, it can always.
    pub fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        match self {
            Control::Unix(s) => wait_writable(s.as_fd(), timeout),
            Control::Tcp(s) => wait_writable(s.as_fd(), timeout),
            Control::None => Ok(true),
        }
    }

    /// Makes the connection's next read see end of stream (after whatever is
    /// already buffered), so its thread finishes up and closes.
    pub fn stop_reading(&self) {
        let _ = match self {
            Control::Unix(s) => s.shutdown(net::Shutdown::Read),
            Control::Tcp(s) => s.shutdown(net::Shutdown::Read),
            Control::None => Ok(()),
        };
    }

    pub fn try_clone(&self) -> io::Result<Control> {
        Ok(match self {
            Control::Unix(s) => Control::Unix(s.try_clone()?),
            Control::Tcp(s) => Control::Tcp(s.try_clone()?),
            Control::None => Control::None,
        })
    }
}

/// The socket's read timeout is what tells the input buffer that a client
/// went idle.
impl crate::input::ReadTimeout for Control {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        Control::set_read_timeout(self, timeout)
    }
}

impl Transport {
    pub fn unix(stream: UnixStream) -> io::Result<Self> {
        // A 1 MiB READ reply then fits the socket in one go, instead of the
        // thread sleeping and waking several times per reply. (Only for Unix
        // sockets: on TCP a fixed size would switch off buffer autotuning.)
        // The kernel caps it at net.core.wmem_max; failure only costs speed.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, UNIX_SEND_BUFFER);
        let identity = Identity::of_unix_peer(&stream);
        Ok(Transport {
            reader: Box::new(stream.try_clone()?),
            writer: WriteHalf::Socket(OwnedFd::from(stream.try_clone()?)),
            peer: match &identity {
                Identity::Unix(c) => format!("unix:uid={},pid={}", c.uid, c.pid),
                _ => "unix".to_owned(),
            },
            identity,
            control: Control::Unix(stream),
        })
    }

    pub fn tcp(stream: TcpStream) -> io::Result<Self> {
        // Replies are small and latency-bound; never let Nagle hold them.
        stream.set_nodelay(true)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".to_owned());
        Ok(Transport {
            reader: Box::new(stream.try_clone()?),
            writer: WriteHalf::Socket(OwnedFd::from(stream.try_clone()?)),
            peer,
            // Nothing over plain TCP proves who the peer is.
            identity: Identity::Anonymous,
            control: Control::Tcp(stream),
        })
    }

    /// The connection on standard input, for `-s` (one connection,
    /// inetd-style). When standard input is a socket (inetd, xinetd,
    /// systemd `Accept=yes`, libnbd's `connect_command`), replies go back on
    /// that same socket and it is handled like an accepted client: timeouts,
    /// shutdown, and the peer's address in the logs. Otherwise (a pipe),
    /// requests come from stdin and replies go to stdout.
    pub fn stdio() -> io::Result<Self> {
        let stdin = io::stdin();
        if let Some(t) = Self::socket(stdin.as_fd())? {
            return Ok(t);
        }
        let dup = |fd: BorrowedFd| -> io::Result<File> {
            let owned: OwnedFd = fd.try_clone_to_owned()?;
            Ok(File::from(owned))
        };
        Ok(Transport {
            reader: Box::new(dup(stdin.as_fd())?),
            // Blocking writes: `-s` serves one client, so there is nobody
            // else for it to hold up.
            writer: WriteHalf::Stream(Box::new(dup(io::stdout().as_fd())?)),
            peer: "stdio".to_owned(),
            identity: Identity::Anonymous,
            control: Control::None,
        })
    }

    /// A transport over a copy of `fd` if it is a connected Unix or TCP
    /// stream socket; `None` for anything else.
    fn socket(fd: BorrowedFd<'_>) -> io::Result<Option<Self>> {
        use rustix::fs::{fstat, FileType};
        use rustix::net::{sockopt, AddressFamily, SocketType};
        if FileType::from_raw_mode(fstat(fd)?.st_mode) != FileType::Socket
            || sockopt::socket_type(fd)? != SocketType::STREAM
        {
            return Ok(None);
        }
        let family = rustix::net::getsockname(fd)?.address_family();
        let owned = fd.try_clone_to_owned()?;
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
        if family == AddressFamily::UNIX {
            Self::unix(UnixStream::from(owned)).map(Some)
        } else if family == AddressFamily::INET || family == AddressFamily::INET6 {
            Self::tcp(TcpStream::from(owned)).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The writing side of a transport.
pub enum WriteHalf {
    /// A socket, written without ever blocking.
    Socket(OwnedFd),
    /// Any other stream (stdout for `-s`), written with blocking writes.
    Stream(Box<dyn Write + Send>),
    /// A TLS session over a socket, written without ever blocking.
    Tls(crate::tls::TlsWriter),
}

impl WriteHalf {
    /// Writes as much of `buf` as the socket takes now; `WouldBlock` when
    /// it takes nothing. A [`WriteHalf::Stream`] blocks instead.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Socket(fd) => {
                let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
                loop {
                    match rustix::net::send(&*fd, buf, flags) {
                        Err(rustix::io::Errno::INTR) => {}
                        r => return r.map_err(io::Error::from),
                    }
                }
            }
            WriteHalf::Stream(w) => {
                let n = w.write(buf)?;
                w.flush()?;
                Ok(n)
            }
            WriteHalf::Tls(t) => t.try_write(buf),
        }
    }

    /// Sends what an earlier write left inside the transport (TLS records);
    /// `WouldBlock` when some of it remains.
    pub fn try_flush(&mut self) -> io::Result<()> {
        match self {
            WriteHalf::Tls(t) => t.try_flush(),
            _ => Ok(()),
        }
    }

    /// Whether an earlier write left bytes inside the transport.
    pub fn pending(&self) -> bool {
        match self {
            WriteHalf::Tls(t) => t.pending(),
            _ => false,
        }
    }

    /// Waits until the socket can take more, at most `timeout`; false when
    /// the time ran out.
    pub fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        match self {
            WriteHalf::Socket(fd) => wait_writable(fd.as_fd(), timeout),
            WriteHalf::Tls(t) => wait_writable(t.socket(), timeout),
            WriteHalf::Stream(_) => Ok(true),
        }
    }

    /// Writes all of `buf`, waiting for the socket as needed, but never
    /// longer than `stall` without progress (the client stopped reading).
    pub fn write_all(&mut self, mut buf: &[u8], stall: Duration) -> io::Result<()> {
        while !buf.is_empty() {
            match self.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_writable(stall)? {
                        return Err(stalled(stall));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        loop {
            match self.try_flush() {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_writable(stall)? {
                        return Err(stalled(stall));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits until `fd` can be written, at most `timeout`; false when the time
/// ran out.
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::OUT,
    )];
    // A day stands for "forever": the caller waits again if it must.
    let timeout = timeout.min(Duration::from_secs(86_400));
    let timeout = rustix::event::Timespec::try_from(timeout).unwrap_or_default();
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
            Ok(n) => return Ok(n > 0),
        }
    }
}

/// The error for a client that has not read any of its replies for `stall`.
pub fn stalled(stall: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "client read none of its replies for {} s",
            stall.as_secs_f32()
        ),
    )
}
