//! Scripted peers for the unit tests of the connection loop, the reply
//! queue and the executor: a client that speaks raw NBD bytes over one end
//! of a socket pair, a server started on the other end, and a device that
//! can be made to block, fail or stand in for a slow disk.
//!
//! The client builds its requests and parses replies by hand (from the
//! spec's numbers, not with `proto`'s codec), so that the server's encoder
//! and the test cannot agree on a mistake.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use scratchd_proto::consts::*;
use scratchd_store::{BlockDevice, Capabilities, Extent, MemoryDevice, ZeroFlags};

use crate::export::{Exports, SingleExport};
use crate::listener::{ConnectionLimit, ServerContext};
use crate::shutdown::Shutdown;
use crate::transport::Transport;
use crate::workers::WorkerPool;

/// Size of the test disks.
pub const DISK: u64 = 1 << 20;

/// A memory disk that can pose as a blocking backend (its requests then go
/// to the worker pool), fail its writes, and hold every call at a gate.
pub struct TestDevice {
    inner: MemoryDevice,
    may_block: bool,
    /// Writes fail with this OS error.
    pub fail_writes: Option<i32>,
    /// Reads fail with this OS error.
    pub fail_reads: Option<i32>,
    /// Poses as durable storage (`durable_flush`: FLUSH and FUA matter).
    pub durable: bool,
    gate: Gate,
}

/// Holds calls until opened, counting how many are held at once.
#[derive(Default)]
pub struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
    inside: AtomicUsize,
    most_inside: AtomicUsize,
    on_worker: AtomicBool,
}

impl Gate {
    pub fn close(&self) {
        *self.closed.lock().unwrap() = true;
    }

    pub fn open(&self) {
        *self.closed.lock().unwrap() = false;
        self.changed.notify_all();
    }

    /// Calls running on the device now.
    pub fn inside(&self) -> usize {
        self.inside.load(Ordering::SeqCst)
    }

    /// The most calls that ran on the device at once.
    pub fn most_inside(&self) -> usize {
        self.most_inside.load(Ordering::SeqCst)
    }

    /// Whether the last call that passed ran on a worker of the pool.
    pub fn last_on_worker(&self) -> bool {
        self.on_worker.load(Ordering::SeqCst)
    }

    fn pass<T>(&self, call: impl FnOnce() -> T) -> T {
        let worker = thread::current()
            .name()
            .is_some_and(|n| n.starts_with("worker-"));
        self.on_worker.store(worker, Ordering::SeqCst);
        let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_inside.fetch_max(now, Ordering::SeqCst);
        let mut closed = self.closed.lock().unwrap();
        while *closed {
            closed = self.changed.wait(closed).unwrap();
        }
        drop(closed);
        let r = call();
        self.inside.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl TestDevice {
    pub fn new(may_block: bool) -> TestDevice {
        TestDevice {
            inner: MemoryDevice::new(DISK).unwrap(),
            may_block,
            fail_writes: None,
            fail_reads: None,
            durable: false,
            gate: Gate::default(),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}

impl BlockDevice for TestDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            may_block: self.may_block,
            durable_flush: self.durable,
            ..self.inner.capabilities()
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.gate.pass(|| match self.fail_reads {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => self.inner.read(offset, buf),
        })
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.gate.pass(|| match self.fail_writes {
            Some(e) => Err(io::Error::from_raw_os_error(e)),
            None => self.inner.write(offset, data, fua),
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.gate.pass(|| self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.gate.pass(|| self.inner.trim(offset, len, fua))
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        self.gate.pass(|| self.inner.zero(offset, len, flags, fua))
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.extents(offset, len, out)
    }
}

/// What a test server is made of.
pub struct Setup {
    pub exports: Arc<dyn Exports>,
    pub workers: usize,
    pub handshake_timeout: Duration,
    pub reply_timeout: Duration,
    pub busy_polling: crate::busy_poll::BusyPolling,
}

impl Setup {
    /// One export named "disk" over `device`.
    pub fn single(device: Arc<dyn BlockDevice>) -> Setup {
        Setup::new(Arc::new(SingleExport::new(
            "disk".into(),
            None,
            device,
            false,
        )))
    }

    pub fn new(exports: Arc<dyn Exports>) -> Setup {
        Setup {
            exports,
            workers: 2,
            handshake_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            busy_polling: crate::busy_poll::BusyPolling::off(),
        }
    }

    pub fn context(self) -> Arc<ServerContext> {
        Arc::new(ServerContext {
            exports: self.exports,
            counters: Arc::default(),
            workers: WorkerPool::new(self.workers).unwrap(),
            shutdown: Shutdown::default(),
            connections: ConnectionLimit::new(None),
            reply_timeout: self.reply_timeout,
            handshake_timeout: self.handshake_timeout,
            tls: None,
            tcp_keepalive: None,
            busy_polling: self.busy_polling,
        })
    }
}

/// Serves one connection of `ctx` on a thread; the client end of it.
pub fn connect(ctx: &Arc<ServerContext>) -> (Peer, JoinHandle<()>) {
    let (client, server) = UnixStream::pair().unwrap();
    let transport = Transport::unix(server).unwrap();
    let ctx = ctx.clone();
    let served = thread::spawn(move || crate::connection::serve(transport, &ctx));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (Peer(client), served)
}

/// A simple reply: its error (0 for success) and cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// The client end of a test connection, speaking raw bytes.
pub struct Peer(pub UnixStream);

impl Peer {
    pub fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        self.0.read_exact(&mut buf).unwrap();
        buf
    }

    /// Reads until the server closes; what came before the end. A reset
    /// (the server closed with bytes of ours unread) is an end too.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut rest = Vec::new();
        match self.0.read_to_end(&mut rest) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(rest),
            r => r.map(|_| rest),
        }
    }

    /// Takes the greeting and sends the client flags (fixed newstyle, no
    /// zeroes).
    pub fn greet(&mut self) {
        let greeting = self.read_exact(18);
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        self.send(&3u32.to_be_bytes());
    }

    /// Sends one option request.
    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_exact(20);
        assert_eq!(h[..8], 0x0003_e889_0455_65a9u64.to_be_bytes());
        let word = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
        let data = self.read_exact(word(16) as usize);
        (word(8), word(12), data)
    }

    /// The whole handshake with EXPORT_NAME: the export's size and flags.
    pub fn open(&mut self, name: &str) -> (u64, u16) {
        self.greet();
        self.option(OPT_EXPORT_NAME, name.as_bytes());
        let r = self.read_exact(10);
        (
            u64::from_be_bytes(r[..8].try_into().unwrap()),
            u16::from_be_bytes(r[8..].try_into().unwrap()),
        )
    }

    /// Reads one simple reply header.
    pub fn reply(&mut self) -> SimpleReply {
        let r = self.read_exact(16);
        assert_eq!(r[..4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
        SimpleReply {
            error: u32::from_be_bytes(r[4..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(r[8..].try_into().unwrap()),
        }
    }
}

/// A compact request header and its payload, as a client sends them.
pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Waits up to 10 s for `cond`.
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A socket pair for a connection's replies: the client's end, and the
/// server's write half and control.
pub fn reply_socket() -> (
    UnixStream,
    crate::transport::WriteHalf,
    crate::transport::Control,
) {
    let (client, server) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let writer = crate::transport::WriteHalf::Socket(server.try_clone().unwrap().into());
    (client, writer, crate::transport::Control::Unix(server))
}
