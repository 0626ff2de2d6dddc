//! The byte streams a connection runs over.
//!
//! A connection reads on one thread and writes from several (its own, and
//! workers finishing requests), so a transport is split into independent
//! read and write halves up front. Unix and TCP sockets are cloned; stdio
//! (`-s`) is naturally two descriptors. A TLS transport can provide the same
//! two halves over a shared session.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{self, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Send buffer asked for on Unix sockets (memory is used only while replies
/// are queued).
const UNIX_SEND_BUFFER: usize = 2 * 1024 * 1024;

pub struct Transport {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Who is on the other end, for logs.
    pub peer: String,
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

impl Transport {
    pub fn unix(stream: UnixStream) -> io::Result<Self> {
        // A 1 MiB READ reply then fits the socket in one go, instead of the
        // thread sleeping and waking several times per reply. (Only for Unix
        // sockets: on TCP a fixed size would switch off buffer autotuning.)
        // The kernel caps it at net.core.wmem_max; failure only costs speed.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, UNIX_SEND_BUFFER);
        Ok(Transport {
            reader: Box::new(stream.try_clone()?),
            writer: Box::new(stream.try_clone()?),
            peer: "unix".to_owned(),
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
            writer: Box::new(stream.try_clone()?),
            peer,
            control: Control::Tcp(stream),
        })
    }

    /// The process's stdin and stdout, for `-s` (one connection, inetd-style).
    pub fn stdio() -> io::Result<Self> {
        let dup = |fd: BorrowedFd| -> io::Result<File> {
            let owned: OwnedFd = fd.try_clone_to_owned()?;
            Ok(File::from(owned))
        };
        Ok(Transport {
            reader: Box::new(dup(io::stdin().as_fd())?),
            writer: Box::new(dup(io::stdout().as_fd())?),
            peer: "stdio".to_owned(),
            control: Control::None,
        })
    }
}
