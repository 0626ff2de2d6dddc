//! The byte streams a connection runs over.
//!
//! A connection reads on one thread and writes from several (its own, and
//! workers finishing requests), so a transport is split into independent
//! read and write halves up front. Unix and TCP sockets are cloned; stdio
//! (`-s`) is naturally two descriptors. A TLS transport can provide the same
//! two halves over a shared session.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
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
    /// Sets or clears the read timeout (a no-op where the stream has none).
    pub set_read_timeout: Box<dyn Fn(Option<Duration>) -> io::Result<()> + Send>,
}

impl Transport {
    pub fn unix(stream: UnixStream) -> io::Result<Self> {
        // A 1 MiB READ reply then fits the socket in one go, instead of the
        // thread sleeping and waking several times per reply. (Only for Unix
        // sockets: on TCP a fixed size would switch off buffer autotuning.)
        // The kernel caps it at net.core.wmem_max; failure only costs speed.
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, UNIX_SEND_BUFFER);
        let writer = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok(Transport {
            reader: Box::new(stream),
            writer: Box::new(writer),
            peer: "unix".to_owned(),
            set_read_timeout: Box::new(move |t| control.set_read_timeout(t)),
        })
    }

    pub fn tcp(stream: TcpStream) -> io::Result<Self> {
        // Replies are small and latency-bound; never let Nagle hold them.
        stream.set_nodelay(true)?;
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp".to_owned());
        let writer = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok(Transport {
            reader: Box::new(stream),
            writer: Box::new(writer),
            peer,
            set_read_timeout: Box::new(move |t| control.set_read_timeout(t)),
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
            set_read_timeout: Box::new(|_| Ok(())),
        })
    }
}
