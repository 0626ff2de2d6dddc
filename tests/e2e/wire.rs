//! A tiny NBD client for raw-socket tests, and a scripted server
//! ([`ScriptedServer`]) for tests of our binary as a client.
//!
//! Both are written from the protocol text (`docs/protocol-notes.md`,
//! `/work/shared/nbd-protocol.md`), deliberately without the server's
//! `scratchd-proto` crate, so they check that crate instead of sharing its
//! mistakes. Every `expect_*` helper reads exactly the bytes the reply must
//! have and panics, naming the field, on anything else.

#![allow(dead_code)] // each test module uses a different part of this

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{read_n, send, Server};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const CHUNK_MAGIC: u32 = 0x668e_33ef;
pub const EXT_CHUNK_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server) and client flags.
pub const FIXED_NEWSTYLE: u16 = 1;
pub const NO_ZEROES: u16 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = 0x8000_0001;
pub const ERR_POLICY: u32 = 0x8000_0002;
pub const ERR_INVALID: u32 = 0x8000_0003;
pub const ERR_UNKNOWN: u32 = 0x8000_0006;
pub const ERR_TOO_BIG: u32 = 0x8000_0009;
pub const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

pub const INFO_EXPORT: u16 = 0;

/// Transmission flags.
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_DF: u16 = 1 << 7;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1 << 0;
pub const FLAG_DF: u16 = 1 << 2;
pub const FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const CHUNK_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// How long a server may take to hang up on a client it should drop.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Big-endian message builder: `Msg::new().u32(1).bytes(b"x").0`.
#[derive(Default)]
pub struct Msg(pub Vec<u8>);

impl Msg {
    pub fn new() -> Self {
        Msg(Vec::new())
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Asserts that the peer closes the stream without sending another byte,
/// and does so within [`CLOSE_WITHIN`]. A reset counts as a close: Linux
/// reports ECONNRESET on a Unix socket whose peer closed with unread data.
pub fn expect_closed(s: &mut UnixStream, what: &str) {
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{what}: expected the server to close, got {n} more bytes {:02x?}",
            &buf[..n]
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            panic!("{what}: server did not close the connection within {CLOSE_WITHIN:?}")
        }
        Err(e) => panic!("{what}: unexpected read error {e}"),
    }
    assert!(
        start.elapsed() < CLOSE_WITHIN,
        "{what}: close took {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------- handshake

/// Connects and checks the greeting; returns the stream (the client flags
/// are not sent yet) and the server's handshake flags.
pub fn greeted(server: &Server) -> (UnixStream, u16) {
    let mut s = server.connect();
    let g = read_n(&mut s, 18);
    assert_eq!(be64(&g, 0), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&g, 8), IHAVEOPT, "greeting IHAVEOPT");
    let flags = be16(&g, 16);
    assert_ne!(
        flags & FIXED_NEWSTYLE,
        0,
        "server must offer fixed newstyle"
    );
    (s, flags)
}

/// Greeting done and client flags sent (FIXED_NEWSTYLE, and NO_ZEROES if
/// offered): ready for options.
pub fn negotiating(server: &Server) -> UnixStream {
    let (mut s, flags) = greeted(server);
    let client = u32::from(FIXED_NEWSTYLE | (flags & NO_ZEROES));
    send(&mut s, &client.to_be_bytes());
    s
}

pub fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    Msg::new()
        .u64(IHAVEOPT)
        .u32(option)
        .u32(data.len() as u32)
        .bytes(data)
        .0
}

pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    send(s, &option_bytes(option, data));
}

#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub fn read_option_reply(s: &mut UnixStream) -> OptReply {
    let h = read_n(s, 20);
    assert_eq!(
        be64(&h, 0),
        OPTION_REPLY_MAGIC,
        "option reply magic in {h:02x?}"
    );
    let len = be32(&h, 16);
    assert!(len <= 64 * 1024, "option reply of {len} bytes");
    OptReply {
        option: be32(&h, 8),
        kind: be32(&h, 12),
        data: read_n(s, len as usize),
    }
}

/// Reads one reply to `option` that must be of type `kind`; returns its data.
pub fn expect_option_reply(s: &mut UnixStream, option: u32, kind: u32) -> Vec<u8> {
    let r = read_option_reply(s);
    assert_eq!(r.option, option, "option echoed in {r:?}");
    assert_eq!(
        r.kind,
        kind,
        "reply type to option {option}: expected {kind:#x}, got {:#x} ({:?})",
        r.kind,
        String::from_utf8_lossy(&r.data)
    );
    r.data
}

/// Reads an error reply; returns its message, which must be UTF-8.
pub fn expect_option_error(s: &mut UnixStream, option: u32, err: u32) -> String {
    let data = expect_option_reply(s, option, err);
    String::from_utf8(data).expect("error message must be UTF-8")
}

/// Sends an option that takes no data and expects a plain ACK.
pub fn ack_option(s: &mut UnixStream, option: u32) {
    send_option(s, option, &[]);
    assert!(
        expect_option_reply(s, option, REP_ACK).is_empty(),
        "ACK carries no data"
    );
}

/// INFO/GO data: u32 name length, name, u16 count, count × u16 info type.
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut m = Msg::new()
        .u32(name.len() as u32)
        .bytes(name.as_bytes())
        .u16(infos.len() as u16);
    for &i in infos {
        m = m.u16(i);
    }
    m.0
}

/// Meta-context data: export name, then u32 count of u32-length queries.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut m = Msg::new()
        .u32(name.len() as u32)
        .bytes(name.as_bytes())
        .u32(queries.len() as u32);
    for q in queries {
        m = m.u32(q.len() as u32).bytes(q.as_bytes());
    }
    m.0
}

/// What GO/INFO said about an export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

/// Reads INFO/GO replies up to the final ACK: INFO replies (INFO_EXPORT is
/// required), then ACK. Any error reply fails the test.
pub fn expect_export_info(s: &mut UnixStream, option: u32) -> ExportInfo {
    let mut export = None;
    loop {
        let r = read_option_reply(s);
        assert_eq!(r.option, option, "option echoed in {r:?}");
        match r.kind {
            REP_INFO => {
                assert!(r.data.len() >= 2, "REP_INFO without a type");
                if be16(&r.data, 0) == INFO_EXPORT {
                    assert_eq!(r.data.len(), 12, "INFO_EXPORT length");
                    export = Some(ExportInfo {
                        size: be64(&r.data, 2),
                        flags: be16(&r.data, 10),
                    });
                }
            }
            REP_ACK => {
                assert!(r.data.is_empty(), "ACK carries no data");
                let e = export.expect("ACK without NBD_INFO_EXPORT");
                assert_ne!(e.flags & 1, 0, "HAS_FLAGS must be set");
                return e;
            }
            k => panic!(
                "option {option} failed: reply {k:#x} {:?}",
                String::from_utf8_lossy(&r.data)
            ),
        }
    }
}

/// Sends GO for `name` (no info requests) and reads its successful answer.
pub fn go(s: &mut UnixStream, name: &str) -> ExportInfo {
    send_option(s, OPT_GO, &info_request(name, &[]));
    expect_export_info(s, OPT_GO)
}

// ------------------------------------------------------------- transmission

/// How replies are framed, fixed by the options negotiated before GO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing negotiated: compact requests, simple replies.
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: compact requests, structured chunks.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: extended requests and chunks.
    Extended,
}

pub const MODES: [Mode; 3] = [Mode::Simple, Mode::Structured, Mode::Extended];

impl Mode {
    /// Sends the option that turns this mode on (nothing for Simple).
    pub fn negotiate(self, s: &mut UnixStream) {
        match self {
            Mode::Simple => {}
            Mode::Structured => ack_option(s, OPT_STRUCTURED_REPLY),
            Mode::Extended => ack_option(s, OPT_EXTENDED_HEADERS),
        }
    }
}

/// One structured or extended reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    /// The header's offset field (extended chunks only).
    pub offset: Option<u64>,
    pub payload: Vec<u8>,
}

/// A connection in transmission phase.
pub struct Conn {
    pub s: UnixStream,
    pub mode: Mode,
    pub export: ExportInfo,
}

impl Conn {
    /// Handshake, the options of `mode`, then GO to the default export.
    pub fn open(server: &Server, mode: Mode) -> Conn {
        let mut s = negotiating(server);
        mode.negotiate(&mut s);
        let export = go(&mut s, "");
        Conn { s, mode, export }
    }

    /// Sends GO for `name` on a stream still negotiating, whose options for
    /// `mode` were already acknowledged, and enters transmission.
    pub fn go(mut s: UnixStream, mode: Mode, name: &str) -> Conn {
        let export = go(&mut s, name);
        Conn { s, mode, export }
    }

    /// A second handle on the same connection (e.g. for a reader thread).
    pub fn try_clone(&self) -> Conn {
        Conn {
            s: self.s.try_clone().expect("clone socket"),
            mode: self.mode,
            export: self.export,
        }
    }

    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// A request header in this connection's framing. Compact headers carry
    /// only 32 bits of length.
    pub fn header(&self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let m = match self.mode {
            Mode::Extended => Msg::new().u32(EXT_REQUEST_MAGIC),
            _ => Msg::new().u32(REQUEST_MAGIC),
        };
        let m = m.u16(flags).u16(kind).u64(cookie).u64(offset);
        match self.mode {
            Mode::Extended => m.u64(len).0,
            _ => {
                m.u32(u32::try_from(len).expect("compact length fits 32 bits"))
                    .0
            }
        }
    }

    /// Sends a request without payload.
    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) {
        let h = self.header(flags, kind, cookie, offset, len);
        send(&mut self.s, &h);
    }

    /// A complete WRITE request (header and data) in this framing.
    pub fn write_bytes(&self, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        let flags = if self.mode == Mode::Extended {
            FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let mut b = self.header(flags, CMD_WRITE, cookie, offset, data.len() as u64);
        b.extend_from_slice(data);
        b
    }

    pub fn send_write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let b = self.write_bytes(cookie, offset, data);
        send(&mut self.s, &b);
    }

    /// Reads a 16-byte simple reply: (error, cookie).
    pub fn read_simple(&mut self) -> (u32, u64) {
        let r = read_n(&mut self.s, 16);
        assert_eq!(
            be32(&r, 0),
            SIMPLE_REPLY_MAGIC,
            "simple reply magic in {r:02x?}"
        );
        (be32(&r, 4), be64(&r, 8))
    }

    pub fn read_chunk(&mut self) -> Chunk {
        let extended = self.mode == Mode::Extended;
        let h = read_n(&mut self.s, if extended { 32 } else { 20 });
        let magic = if extended {
            EXT_CHUNK_MAGIC
        } else {
            CHUNK_MAGIC
        };
        assert_eq!(
            be32(&h, 0),
            magic,
            "chunk magic in {h:02x?} ({:?})",
            self.mode
        );
        let (offset, len) = if extended {
            (Some(be64(&h, 16)), be64(&h, 24))
        } else {
            (None, u64::from(be32(&h, 16)))
        };
        assert!(len <= 64 << 20, "chunk of {len} bytes");
        let flags = be16(&h, 4);
        assert_eq!(
            flags & !CHUNK_DONE,
            0,
            "unnegotiated chunk flags {flags:#x}"
        );
        Chunk {
            flags,
            kind: be16(&h, 6),
            cookie: be64(&h, 8),
            offset,
            payload: read_n(&mut self.s, len as usize),
        }
    }

    /// Expects the final chunk of a request: header fields as given, DONE set.
    fn expect_final_chunk(&mut self, cookie: u64, offset: u64, kind: u16) -> Chunk {
        let c = self.read_chunk();
        assert_eq!(c.cookie, cookie, "cookie echoed in {c:?}");
        assert_eq!(c.kind, kind, "chunk type in {c:?}");
        assert_eq!(c.flags, CHUNK_DONE, "final chunk must have DONE: {c:?}");
        if let Some(o) = c.offset {
            assert_eq!(
                o, offset,
                "extended chunk offset must echo the request's: {c:?}"
            );
        }
        c
    }

    /// Expects success without data for the request (`cookie`, `offset`):
    /// a simple reply with error 0, or a NONE chunk with DONE and no payload.
    pub fn expect_ok(&mut self, cookie: u64, offset: u64) {
        match self.mode {
            Mode::Simple => assert_eq!(self.read_simple(), (0, cookie), "simple success reply"),
            _ => {
                let c = self.expect_final_chunk(cookie, offset, CHUNK_NONE);
                assert!(c.payload.is_empty(), "NONE chunk with payload {c:?}");
            }
        }
    }

    /// Expects the request to fail with `errno`: a simple reply carrying it,
    /// or one ERROR chunk (0x8001) with DONE, the errno and a well-formed
    /// message. No data follows either.
    pub fn expect_error(&mut self, cookie: u64, offset: u64, errno: u32) {
        match self.mode {
            Mode::Simple => {
                let (err, c) = self.read_simple();
                assert_eq!((err, c), (errno, cookie), "simple reply (error, cookie)");
            }
            _ => {
                let c = self.expect_final_chunk(cookie, offset, CHUNK_ERROR);
                let p = &c.payload;
                assert!(p.len() >= 6, "ERROR chunk too short: {c:?}");
                assert_eq!(be32(p, 0), errno, "errno in ERROR chunk {c:?}");
                // The spec bounds the message by the chunk ("no more than
                // header length - 6") rather than tying the two together.
                let msg_len = be16(p, 4) as usize;
                assert!(
                    msg_len <= p.len() - 6,
                    "ERROR message runs past the chunk: {c:?}"
                );
                std::str::from_utf8(&p[6..6 + msg_len]).expect("ERROR message must be UTF-8");
            }
        }
    }

    /// Sends READ and returns the data, checking the framing: one simple
    /// reply, or data/hole chunks that exactly cover the range, then DONE.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, u64::from(len));
        self.expect_data(cookie, offset, len)
    }

    pub fn expect_data(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let len = len as usize;
        if self.mode == Mode::Simple {
            assert_eq!(self.read_simple(), (0, cookie), "simple READ reply");
            return read_n(&mut self.s, len);
        }
        let mut data = vec![0u8; len];
        let mut covered = vec![false; len];
        loop {
            let c = self.read_chunk();
            assert_eq!(c.cookie, cookie, "cookie echoed in chunk");
            if let Some(o) = c.offset {
                assert_eq!(o, offset, "extended chunk offset must echo the request's");
            }
            let (at, n) = match c.kind {
                CHUNK_OFFSET_DATA => {
                    assert!(c.payload.len() > 8, "OFFSET_DATA without data");
                    (be64(&c.payload, 0), c.payload.len() - 8)
                }
                CHUNK_OFFSET_HOLE => {
                    assert_eq!(c.payload.len(), 12, "OFFSET_HOLE length");
                    (be64(&c.payload, 0), be32(&c.payload, 8) as usize)
                }
                CHUNK_NONE => {
                    assert!(
                        c.payload.is_empty() && c.flags == CHUNK_DONE,
                        "bad NONE {c:?}"
                    );
                    (offset, 0)
                }
                k => panic!("READ failed: chunk type {k:#x} payload {:02x?}", c.payload),
            };
            assert!(at >= offset, "chunk starts before the request");
            let rel = (at - offset) as usize;
            assert!(rel + n <= len, "chunk runs past the request");
            assert!(!covered[rel..rel + n].iter().any(|&b| b), "chunks overlap");
            covered[rel..rel + n].fill(true);
            if c.kind == CHUNK_OFFSET_DATA {
                data[rel..rel + n].copy_from_slice(&c.payload[8..]);
            }
            if c.flags & CHUNK_DONE != 0 {
                break;
            }
        }
        assert!(
            covered.iter().all(|&b| b),
            "READ reply does not cover the range"
        );
        data
    }

    /// Reads one success reply without data, for any request: returns its
    /// cookie and (extended chunks) its offset. For replies that may come in
    /// any order.
    pub fn read_any_ok(&mut self) -> (u64, Option<u64>) {
        match self.mode {
            Mode::Simple => {
                let (err, cookie) = self.read_simple();
                assert_eq!(err, 0, "error reply to cookie {cookie:#x}");
                (cookie, None)
            }
            _ => {
                let c = self.read_chunk();
                assert_eq!(
                    (c.kind, c.flags),
                    (CHUNK_NONE, CHUNK_DONE),
                    "success chunk {c:?}"
                );
                assert!(c.payload.is_empty(), "NONE chunk with payload {c:?}");
                (c.cookie, c.offset)
            }
        }
    }

    /// WRITE and wait for its success reply.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send_write(cookie, offset, data);
        self.expect_ok(cookie, offset);
    }

    /// Sends DISC and expects the server to close without a reply.
    pub fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0xd15c, 0, 0);
        expect_closed(&mut self.s, "after NBD_CMD_DISC");
    }
}

// ---------------------------------------------------------- scripted server

/// An option reply as a server sends it: magic, option, type, length, data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    Msg::new()
        .u64(OPTION_REPLY_MAGIC)
        .u32(option)
        .u32(kind)
        .u32(data.len() as u32)
        .bytes(data)
        .0
}

/// What a [`ScriptedServer`] does when a client has sent an option.
pub struct Answer {
    /// Sent as they are: option replies, or anything else.
    pub bytes: Vec<u8>,
    /// Hang up after sending them; otherwise wait for the next option.
    pub hang_up: bool,
}

/// A scripted NBD server, for tests of our binary as a client (the
/// mirror of the client above, and like it written from the protocol
/// text): on a Unix socket of its own it greets each connection (fixed
/// newstyle, no zeroes), takes the client's flags, and answers each option
/// with what its script gives for it, until the script hangs up or the
/// client does. It notes every option asked, so that a test can tell an
/// answer refused from a request never sent.
pub struct ScriptedServer {
    _dir: tempfile::TempDir,
    pub sock: PathBuf,
    asked: Arc<Mutex<Vec<u32>>>,
    accepting: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl ScriptedServer {
    /// Listens, answering each option with `script`.
    pub fn start(script: impl Fn(u32) -> Answer + Send + Sync + 'static) -> ScriptedServer {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("scripted.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let asked = Arc::default();
        let stop = Arc::<AtomicBool>::default();
        let script = Arc::new(script);
        let (noted, stopped) = (Arc::clone(&asked), Arc::clone(&stop));
        let accepting = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let (script, noted) = (Arc::clone(&script), Arc::clone(&noted));
                // A client that fails the script's way is no error here.
                std::thread::spawn(move || {
                    let _ = serve_script(client?, &*script, &noted);
                    std::io::Result::Ok(())
                });
            }
        });
        ScriptedServer {
            _dir: dir,
            sock,
            asked,
            accepting: Some(accepting),
            stop,
        }
    }

    /// The URI of export `name` on it.
    pub fn uri_for(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// The options asked so far, over every connection.
    pub fn asked(&self) -> Vec<u32> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees the stop.
        let _ = UnixStream::connect(&self.sock);
        if let Some(accepting) = self.accepting.take() {
            let _ = accepting.join();
        }
    }
}

/// One connection of a [`ScriptedServer`].
fn serve_script(
    mut s: UnixStream,
    script: &(dyn Fn(u32) -> Answer + Sync),
    asked: &Mutex<Vec<u32>>,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let greeting = Msg::new()
        .u64(NBDMAGIC)
        .u64(IHAVEOPT)
        .u16(FIXED_NEWSTYLE | NO_ZEROES);
    s.write_all(&greeting.0)?;
    let mut client_flags = [0; 4];
    s.read_exact(&mut client_flags)?;
    loop {
        // An option: IHAVEOPT, its number, its length, its data (skipped).
        let mut header = [0; 16];
        s.read_exact(&mut header)?;
        let (option, len) = (be32(&header, 8), be32(&header, 12));
        std::io::copy(&mut (&mut s).take(u64::from(len)), &mut std::io::sink())?;
        asked.lock().unwrap().push(option);
        let answer = script(option);
        s.write_all(&answer.bytes)?;
        if answer.hang_up {
            return Ok(());
        }
    }
}
