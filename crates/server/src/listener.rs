//! Listening sockets and accept loops.
//!
//! Each accepted client gets a thread of its own: a connection's work is a
//! tight read–execute–reply loop, and a blocking thread with a small stack
//! does that with fewer system calls and wake-ups than an async runtime.
//! Requests that may block run on the shared worker pool instead (see
//! [`crate::workers`]), so threads never multiply per request.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use tracing::{error, info, warn};

use crate::access::{Cidr, PeerCounts};
use crate::connection;
use crate::counters::ServerCounters;
use crate::export::Exports;
use crate::shutdown::Shutdown;
use crate::transport::Transport;
use crate::workers::WorkerPool;

/// Stack for connection threads: their buffers live on the heap.
const CONNECTION_STACK: usize = 512 * 1024;

/// What every connection of a server shares.
pub struct ServerContext {
    pub exports: Arc<dyn Exports>,
    /// This server's event counters (errors replied, failed handshakes,
    /// TLS handshakes), for `ctl` and the metrics.
    pub counters: Arc<ServerCounters>,
    pub workers: WorkerPool,
    /// Every live connection, for a graceful stop.
    pub shutdown: Shutdown,
    pub connections: ConnectionLimit,
    /// A client that reads none of its replies for this long, while some
    /// wait for it, is cut off (see [`crate::replies`]).
    pub reply_timeout: std::time::Duration,
    /// A client must finish its whole handshake (TLS included) within
    /// this of being accepted, so neither silent nor dripping connections
    /// can pin threads and slots ([`crate::deadline`];
    /// [`crate::connection::DEFAULT_HANDSHAKE_TIMEOUT`] unless configured).
    pub handshake_timeout: std::time::Duration,
    /// STARTTLS, when `--tls` is on or required.
    pub tls: Option<crate::tls::TlsConfig>,
    /// TCP keepalive: a peer that vanished without closing (a builder
    /// powered off, a cut network) is probed after this long without
    /// traffic and its connection ended when it does not answer; `None`: off.
    pub tcp_keepalive: Option<std::time::Duration>,
    /// Spinning for a client's next request before sleeping
    /// ([`crate::busy_poll`]).
    pub busy_polling: crate::busy_poll::BusyPolling,
}

/// Who may connect, and how many connections may be open at once. Each
/// holds a thread and its buffers, so a flood of clients must not be able
/// to take them without bound; a client past a limit, or from a TCP address
/// outside `--allow`, is closed as soon as it is accepted (before the
/// handshake, so it costs no thread) and a warning is logged.
pub struct ConnectionLimit {
    max: Option<usize>,
    live: AtomicUsize,
    /// TCP peers must be in one of these ranges (empty: any peer).
    allow: Vec<Cidr>,
    /// At most this many connections per TCP peer address.
    per_peer: Option<PeerCounts>,
    /// Connections served since the start, for metrics.
    accepted: AtomicU64,
    /// Connections closed at accept (address or limit), for metrics.
    refused: AtomicU64,
}

impl ConnectionLimit {
    /// `None`: no limit.
    pub fn new(max: Option<usize>) -> Self {
        ConnectionLimit {
            max,
            live: AtomicUsize::new(0),
            allow: Vec::new(),
            per_peer: None,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Connections accepted and served since the start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at accept since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Only TCP peers in `allow` are served (all when it is empty).
    pub fn with_allow(mut self, allow: Vec<Cidr>) -> Self {
        self.allow = allow;
        self
    }

    /// At most `max` connections at once per TCP peer address (`None`: no
    /// limit). Unix-socket clients are not counted per peer.
    pub fn with_max_per_peer(mut self, max: Option<usize>) -> Self {
        self.per_peer = max.map(PeerCounts::new);
        self
    }
}

/// One connection's place within [`ConnectionLimit`] (and its peer's),
/// given back on drop.
struct ConnectionSlot {
    ctx: Arc<ServerContext>,
    /// The TCP peer counted in [`ConnectionLimit::per_peer`].
    peer: Option<IpAddr>,
}

/// Why a connection was closed at accept.
enum Refused {
    NotAllowed,
    TooMany(usize),
    TooManyFromPeer(usize),
}

impl ConnectionSlot {
    /// A place for a client from `ip` (`None`: not TCP).
    fn take(ctx: &Arc<ServerContext>, ip: Option<IpAddr>) -> Result<Self, Refused> {
        let limit = &ctx.connections;
        if let Some(ip) = ip {
            if !limit.allow.is_empty() && !limit.allow.iter().any(|c| c.contains(ip)) {
                return Err(Refused::NotAllowed);
            }
        }
        let max = limit.max.unwrap_or(usize::MAX);
        limit
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refused::TooMany(max))?;
        // Counted: from here on, dropping the slot gives back what it took.
        let mut slot = ConnectionSlot {
            ctx: ctx.clone(),
            peer: None,
        };
        if let (Some(counts), Some(ip)) = (&limit.per_peer, ip) {
            if !counts.take(ip) {
                return Err(Refused::TooManyFromPeer(counts.max()));
            }
            slot.peer = Some(ip);
        }
        Ok(slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let limit = &self.ctx.connections;
        if limit.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            give_heap_back();
        }
        if let (Some(counts), Some(ip)) = (&limit.per_peer, self.peer) {
            counts.give_back(ip);
        }
    }
}

/// With the last client gone, hands the allocator's free pages back to the
/// kernel. glibc keeps what connection threads freed in its arenas: after
/// 400 connections wrote 8 MiB each, 20 MiB stayed resident in an idle
/// server (`bench/load.py`); trimmed, RSS is back to its value at start.
fn give_heap_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only releases free memory
    // of glibc's own arenas, under their locks, so any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Removes the socket file at `path` if nobody listens on it; true if it
/// did. A connection attempt tells a dead socket (`ECONNREFUSED`) from a
/// live server, which keeps its socket.
fn remove_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let dead = || {
        std::os::unix::net::UnixStream::connect(path)
            .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
    };
    if is_socket && dead() && std::fs::remove_file(path).is_ok() {
        warn!(
            "removed the stale socket {} of a server that is gone",
            path.display()
        );
        return true;
    }
    false
}

pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    /// Inherited through systemd socket activation; the socket file (if any)
    /// belongs to systemd.
    InheritedUnix(UnixListener),
}

impl Listener {
    /// Listens on a Unix socket at `path`. A socket file left there by a
    /// server that died without removing it (`kill -9`, a crash) is
    /// replaced; one that a live server still listens on, or any other kind
    /// of file, is an error (`AddrInUse`).
    pub fn unix(path: &Path) -> io::Result<Self> {
        let bound = match UnixListener::bind(path) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && remove_stale_socket(path) => {
                UnixListener::bind(path)
            }
            bound => bound,
        };
        let l = bound.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        Ok(Listener::Unix(l, path.to_owned()))
    }

    /// Binds `addr:port`; without an address, every interface (IPv6 socket
    /// accepting IPv4 too, or IPv4 alone where IPv6 is missing).
    pub fn tcp(addr: Option<&str>, port: u16) -> io::Result<Vec<Self>> {
        let bind = |a: &str| {
            TcpListener::bind((a, port))
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}:{port}: {e}")))
        };
        match addr {
            Some(a) => Ok(vec![Listener::Tcp(bind(a)?)]),
            None => match bind("::") {
                Ok(l) => Ok(vec![Listener::Tcp(l)]),
                Err(_) => Ok(vec![Listener::Tcp(bind("0.0.0.0")?)]),
            },
        }
    }

    /// Listeners passed by systemd (`LISTEN_PID`/`LISTEN_FDS`), if any.
    pub fn from_systemd() -> io::Result<Vec<Self>> {
        let pid_matches = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            == Some(std::process::id());
        let count = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<RawFd>().ok())
            .unwrap_or(0);
        if !pid_matches || count <= 0 {
            return Ok(Vec::new());
        }
        // Children (e.g. the --run command) must not think the sockets are theirs.
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        let mut out = Vec::new();
        for fd in 3..3 + count {
            // SAFETY: only asks whether `fd` is open; the borrow ends at once.
            let open = rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok();
            if !open {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("LISTEN_FDS={count} names descriptor {fd}, which is not open"),
                ));
            }
            // SAFETY: `fd` is open, systemd hands it to this process, and
            // nothing else in it has taken ownership of it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
            let local = rustix::net::getsockname(&owned)?;
            if local.address_family() == rustix::net::AddressFamily::UNIX {
                out.push(Listener::InheritedUnix(UnixListener::from(owned)));
            } else {
                out.push(Listener::Tcp(TcpListener::from(owned)));
            }
        }
        Ok(out)
    }

    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a: SocketAddr| a.port()),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
            Listener::InheritedUnix(_) => "unix (socket activation)".to_owned(),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp".to_owned(),
            },
        }
    }

    /// Accepts clients until the process exits, one thread each.
    pub fn spawn(self, ctx: Arc<ServerContext>) -> io::Result<()> {
        let name = self.describe();
        crate::deadline::start();
        info!(listener = %name, "listening");
        thread::Builder::new()
            .name(format!("accept {name}"))
            .spawn(move || loop {
                match self.accept() {
                    Ok((t, ip)) => spawn_connection(t, ip, ctx.clone()),
                    Err(e) => {
                        warn!(listener = %name, error = %e, "accept failed");
                        // EMFILE and friends: don't spin while they last.
                        thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            })?;
        Ok(())
    }

    /// The next client, and its address if it came over TCP.
    fn accept(&self) -> io::Result<(Transport, Option<IpAddr>)> {
        match self {
            Listener::Unix(l, _) | Listener::InheritedUnix(l) => {
                Ok((Transport::unix(l.accept()?.0)?, None))
            }
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept()?;
                Ok((Transport::tcp(stream)?, Some(addr.ip())))
            }
        }
    }
}

/// Serves `transport` (from TCP address `ip`, if any) on a thread of its
/// own, or closes it at once when its address is not allowed or a
/// connection limit is reached.
pub fn spawn_connection(transport: Transport, ip: Option<IpAddr>, ctx: Arc<ServerContext>) {
    let slot = match ConnectionSlot::take(&ctx, ip) {
        Ok(slot) => {
            ctx.connections.accepted.fetch_add(1, Ordering::Relaxed);
            slot
        }
        Err(refused) => {
            ctx.connections.refused.fetch_add(1, Ordering::Relaxed);
            let peer = &transport.peer;
            match refused {
                Refused::NotAllowed => {
                    warn!(%peer, "address not in --allow; client closed")
                }
                Refused::TooMany(limit) => {
                    warn!(%peer, limit, "too many connections; client closed")
                }
                Refused::TooManyFromPeer(limit) => warn!(
                    %peer,
                    limit,
                    "too many connections from this address; client closed"
                ),
            }
            return;
        }
    };
    if let Some(idle) = ctx.tcp_keepalive {
        if let Err(e) = transport.control.set_keepalive(idle) {
            warn!(peer = %transport.peer, error = %e, "cannot set TCP keepalive");
        }
    }
    let spawned = thread::Builder::new()
        .name("connection".to_owned())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            connection::serve(transport, &slot.ctx);
        });
    if let Err(e) = spawned {
        error!(error = %e, "cannot start a connection thread; client dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        // A socket whose server is gone: the file stays, nobody listens.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = Listener::unix(&path).expect("a stale socket is replaced");
        // Now a server listens there: a second one must not steal it.
        let err = Listener::unix(&path).err().expect("a live socket is kept");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(live);
        // A regular file is never removed.
        let file = dir.path().join("file");
        std::fs::write(&file, b"data").unwrap();
        let err = Listener::unix(&file).err().expect("a file is kept");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }
}
