//! Session-level fuzzing on the stable toolchain: many connections send
//! seeded, reproducible, randomly mutated but length-consistent handshakes
//! and requests to a real server, while a healthy client beside them writes
//! and verifies its own data.
//!
//! What must hold, whatever the mutation:
//! - the server never dies and never stalls the healthy client;
//! - every option gets well-framed replies echoing it and ending in exactly
//!   one final reply (ACK or error), unless the session was broken on
//!   purpose (bad option magic, bad client flags, EXPORT_NAME of a refused
//!   name, ABORT), in which case the server closes;
//! - every request with a correct magic gets exactly one reply (one simple
//!   reply, or chunks with its cookie ending in one DONE), well framed for
//!   the negotiated mode: READ data and holes exactly cover the range,
//!   extended chunks echo the offset, errors carry a known errno and a
//!   message that fits its chunk;
//! - a request with a bad magic closes the connection;
//! - every scratch disk the sessions made is gone after they end.
//!
//! `SESSION_FUZZ_ITERS` (default 400) sets the number of sessions,
//! `SESSION_FUZZ_SEED` the base seed; a failure names the seed and session
//! index that reproduce it (`SESSION_FUZZ_SEED=S SESSION_FUZZ_ONLY=I`).
//! The client side is written from the protocol text, like `wire.rs`, not
//! from the server's codec.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{eventually, run, stdout, Json, Server};
use crate::wire::*;

/// Size of each session's scratch disk.
const DISK: u64 = 1 << 20;
/// Longest READ or WRITE the sessions send with data.
const MAX_IO: u64 = 64 << 10;
/// The healthy client's slowest acceptable round trip, generous for a
/// loaded 2-core machine (it is normally a few milliseconds).
const HEALTHY_WITHIN: Duration = Duration::from_secs(3);
/// How long a session waits for any one reply.
const REPLY_WITHIN: Duration = Duration::from_secs(10);

const REP_FLAG_ERROR: u32 = 1 << 31;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_BLOCK_STATUS_EXT: u16 = 6;
/// Errors a server may send (NBD's numbers).
const ERRNOS: [u32; 8] = [1, 5, 12, 22, 28, 75, 95, 108];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// splitmix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with probability `1/n`.
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Flips, sets or clears a few bytes of `b` (its length stays).
    fn mutate(&mut self, b: &mut [u8]) {
        if b.is_empty() {
            return;
        }
        for _ in 0..1 + self.below(3) {
            let i = self.below(b.len() as u64) as usize;
            b[i] = match self.below(4) {
                0 => b[i] ^ (1 << self.below(8)),
                1 => 0,
                2 => 0xff,
                _ => self.next() as u8,
            };
        }
    }
}

/// A session's view of its socket: reads that report a close instead of
/// panicking.
struct Peer {
    s: UnixStream,
}

/// How a read ended when it did not get its bytes.
#[derive(Debug)]
enum Gone {
    Closed,
    Other(String),
}

impl Peer {
    fn read(&mut self, n: usize) -> Result<Vec<u8>, Gone> {
        let mut b = vec![0; n];
        match self.s.read_exact(&mut b) {
            Ok(()) => Ok(b),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                Err(Gone::Closed)
            }
            Err(e) => Err(Gone::Other(format!("read: {e}"))),
        }
    }

    fn send(&mut self, b: &[u8]) -> Result<(), String> {
        match self.s.write_all(b) {
            Ok(()) => Ok(()),
            // The server may close first (e.g. on a bad magic it saw in
            // an earlier message); reads will tell.
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                Ok(())
            }
            Err(e) => Err(format!("write: {e}")),
        }
    }

    /// The server must close without another byte.
    fn expect_closed(&mut self, what: &str) -> Result<(), String> {
        let mut buf = [0u8; 64];
        match self.s.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{what}: {n} more bytes instead of a close")),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("{what}: no close: {e}")),
        }
    }
}

fn closed_early(what: &str) -> impl Fn(Gone) -> String + '_ {
    move |g| match g {
        Gone::Closed => format!("{what}: the server closed the connection"),
        Gone::Other(e) => format!("{what}: {e}"),
    }
}

/// What one option's answer told the session.
struct Answer {
    acked: bool,
    meta_contexts: usize,
}

/// Reads option replies to `option` until the final one.
fn read_option_answer(p: &mut Peer, option: u32) -> Result<Answer, String> {
    let what = format!("reply to option {option}");
    let mut meta_contexts = 0;
    loop {
        let h = p.read(20).map_err(closed_early(&what))?;
        if be64(&h, 0) != OPTION_REPLY_MAGIC {
            return Err(format!("{what}: bad magic {h:02x?}"));
        }
        let (echoed, kind, len) = (be32(&h, 8), be32(&h, 12), be32(&h, 16));
        if echoed != option {
            return Err(format!("{what}: echoes option {echoed}"));
        }
        if len > 64 << 10 {
            return Err(format!("{what}: {len}-byte reply"));
        }
        let data = p.read(len as usize).map_err(closed_early(&what))?;
        match kind {
            REP_ACK if len == 0 => {
                return Ok(Answer {
                    acked: true,
                    meta_contexts,
                })
            }
            REP_ACK => return Err(format!("{what}: ACK with {len} bytes")),
            k if k & REP_FLAG_ERROR != 0 => {
                if std::str::from_utf8(&data).is_err() {
                    return Err(format!("{what}: error message is not UTF-8"));
                }
                return Ok(Answer {
                    acked: false,
                    meta_contexts,
                });
            }
            REP_SERVER if matches!(option, OPT_LIST) => {
                if data.len() < 4 || be32(&data, 0) as usize > data.len() - 4 {
                    return Err(format!("{what}: bad SERVER reply {data:02x?}"));
                }
            }
            REP_INFO if matches!(option, OPT_INFO | OPT_GO) => {
                if data.len() < 2 {
                    return Err(format!("{what}: INFO without a type"));
                }
            }
            REP_META_CONTEXT if matches!(option, OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT) => {
                if data.len() < 4 {
                    return Err(format!("{what}: short META_CONTEXT reply"));
                }
                meta_contexts += 1;
            }
            k => return Err(format!("{what}: unexpected reply type {k:#x}")),
        }
    }
}

/// A random option other than EXPORT_NAME and GO (which end negotiation),
/// with a payload that is well formed before mutation.
fn random_option(rng: &mut Rng, name: &str) -> (u32, Vec<u8>) {
    match rng.below(10) {
        0 => (OPT_LIST, Vec::new()),
        1 => {
            let infos: Vec<u16> = (0..rng.below(4)).map(|_| rng.below(5) as u16).collect();
            (OPT_INFO, info_request(name, &infos))
        }
        2 => (OPT_STRUCTURED_REPLY, Vec::new()),
        3 => (OPT_EXTENDED_HEADERS, Vec::new()),
        4 => (
            OPT_SET_META_CONTEXT,
            meta_request(name, &["base:allocation"]),
        ),
        5 => (OPT_LIST_META_CONTEXT, meta_request(name, &["base:"])),
        6 => (OPT_STARTTLS, Vec::new()),
        7 => (OPT_PEEK_EXPORT, Vec::new()),
        8 => {
            let (option, n) = (12 + rng.below(1000) as u32, rng.below(32) as usize);
            (option, rng.bytes(n))
        }
        _ => (OPT_ABORT, Vec::new()),
    }
}

/// One request and what its reply must look like.
#[derive(Debug, Clone)]
struct Req {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
    /// Bytes after the header (WRITE data, or what PAYLOAD_LEN announces).
    payload: usize,
    /// Which bytes of a READ replies have covered.
    covered: Vec<bool>,
    errored: bool,
}

fn random_request(rng: &mut Rng, mode: Mode, cookie: u64) -> Req {
    let kind = match rng.below(16) {
        0..=3 => CMD_READ,
        4..=7 => CMD_WRITE,
        8 => CMD_FLUSH,
        9 => CMD_TRIM,
        10 => CMD_CACHE,
        11 => CMD_WRITE_ZEROES,
        12 | 13 => CMD_BLOCK_STATUS,
        _ => 8 + rng.below(40) as u16,
    };
    let flags = match rng.below(4) {
        0 => rng.below(1 << 6) as u16,
        _ => 0,
    };
    let (offset, len) = match rng.below(8) {
        // Past the end, or absurdly long (never with data).
        0 => (DISK - rng.below(4096), rng.below(3 * 4096)),
        1 => (rng.next(), rng.next() >> rng.below(64)),
        _ => {
            let offset = rng.below(DISK);
            (offset, rng.below((DISK - offset).min(MAX_IO) + 1))
        }
    };
    let extended = mode == Mode::Extended;
    let len = if extended { len } else { len & 0xffff_ffff };
    let carries = kind == CMD_WRITE || (extended && flags & FLAG_PAYLOAD_LEN != 0);
    // A payload is sent in full, so only short ones are sent at all.
    let len = if carries { len.min(MAX_IO) } else { len };
    Req {
        flags,
        kind,
        cookie,
        offset,
        len,
        payload: if carries { len as usize } else { 0 },
        covered: Vec::new(),
        errored: false,
    }
}

fn header(mode: Mode, r: &Req) -> Vec<u8> {
    let m = match mode {
        Mode::Extended => Msg::new().u32(EXT_REQUEST_MAGIC),
        _ => Msg::new().u32(REQUEST_MAGIC),
    }
    .u16(r.flags)
    .u16(r.kind)
    .u64(r.cookie)
    .u64(r.offset);
    match mode {
        Mode::Extended => m.u64(r.len).0,
        _ => m.u32(r.len as u32).0,
    }
}

/// Reads replies until every request in `pending` has had its final one;
/// returns how many were errors.
fn read_replies(
    p: &mut Peer,
    mode: Mode,
    pending: &mut HashMap<u64, Req>,
) -> Result<usize, String> {
    let mut errors = 0;
    while !pending.is_empty() {
        let magic = p.read(4).map_err(closed_early("reply"))?;
        let magic = be32(&magic, 0);
        match magic {
            SIMPLE_REPLY_MAGIC if mode != Mode::Extended => {
                let rest = p.read(12).map_err(closed_early("simple reply"))?;
                let (error, cookie) = (be32(&rest, 0), be64(&rest, 4));
                let Some(r) = pending.remove(&cookie) else {
                    return Err(format!("simple reply to cookie {cookie:#x}, not pending"));
                };
                errors += usize::from(error != 0);
                if error != 0 && !ERRNOS.contains(&error) {
                    return Err(format!("{r:?}: unknown error {error}"));
                }
                if r.kind == CMD_READ {
                    if mode != Mode::Simple {
                        return Err(format!("{r:?}: simple reply to a structured READ"));
                    }
                    if error == 0 {
                        p.read(r.len as usize).map_err(closed_early("READ data"))?;
                    }
                }
            }
            CHUNK_MAGIC if mode == Mode::Structured => {
                let rest = p.read(16).map_err(closed_early("chunk"))?;
                let h = [&magic.to_be_bytes()[..], &rest].concat();
                let (flags, kind, cookie) = (be16(&h, 4), be16(&h, 6), be64(&h, 8));
                let len = u64::from(be32(&h, 16));
                errors += chunk(p, pending, flags, kind, cookie, None, len)?;
            }
            EXT_CHUNK_MAGIC if mode == Mode::Extended => {
                let rest = p.read(28).map_err(closed_early("chunk"))?;
                let h = [&magic.to_be_bytes()[..], &rest].concat();
                let (flags, kind, cookie) = (be16(&h, 4), be16(&h, 6), be64(&h, 8));
                let (offset, len) = (be64(&h, 16), be64(&h, 24));
                errors += chunk(p, pending, flags, kind, cookie, Some(offset), len)?;
            }
            m => return Err(format!("reply magic {m:#x} in {mode:?} mode")),
        }
    }
    Ok(errors)
}

/// Checks one chunk against its request; removes the request on DONE.
/// Returns 1 for a final error reply.
fn chunk(
    p: &mut Peer,
    pending: &mut HashMap<u64, Req>,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: Option<u64>,
    len: u64,
) -> Result<usize, String> {
    let Some(r) = pending.get_mut(&cookie) else {
        return Err(format!(
            "chunk type {kind:#x} for cookie {cookie:#x}, not pending"
        ));
    };
    if flags & !CHUNK_DONE != 0 {
        return Err(format!("{r:?}: chunk flags {flags:#x}"));
    }
    if offset.is_some_and(|o| o != r.offset) {
        return Err(format!("{r:?}: extended chunk offset {offset:?}"));
    }
    if len > MAX_IO + 4096 {
        return Err(format!("{r:?}: {len}-byte chunk"));
    }
    let data = p
        .read(len as usize)
        .map_err(closed_early("chunk payload"))?;
    let done = flags & CHUNK_DONE != 0;
    let cover = |r: &mut Req, at: u64, n: u64| -> Result<(), String> {
        if r.kind != CMD_READ || at < r.offset || at + n > r.offset + r.len {
            return Err(format!("{r:?}: data chunk at {at}+{n}"));
        }
        if r.covered.is_empty() {
            r.covered = vec![false; r.len as usize];
        }
        let span = &mut r.covered[(at - r.offset) as usize..][..n as usize];
        if span.iter().any(|&c| c) {
            return Err(format!("{r:?}: chunks overlap at {at}"));
        }
        span.fill(true);
        Ok(())
    };
    match kind {
        CHUNK_NONE if data.is_empty() && done => {}
        CHUNK_OFFSET_DATA if data.len() > 8 => cover(r, be64(&data, 0), len - 8)?,
        CHUNK_OFFSET_HOLE if data.len() == 12 => {
            cover(r, be64(&data, 0), u64::from(be32(&data, 8)))?
        }
        CHUNK_BLOCK_STATUS | CHUNK_BLOCK_STATUS_EXT if r.kind == CMD_BLOCK_STATUS => {
            let ok = if kind == CHUNK_BLOCK_STATUS {
                data.len() >= 12 && (data.len() - 4) % 8 == 0
            } else {
                data.len() >= 24 && u64::from(be32(&data, 4)) * 16 == len - 8
            };
            if !ok {
                return Err(format!("{r:?}: malformed block status {data:02x?}"));
            }
        }
        CHUNK_ERROR | CHUNK_ERROR_OFFSET if data.len() >= 6 => {
            let (errno, msg) = (be32(&data, 0), be16(&data, 4) as usize);
            let tail = if kind == CHUNK_ERROR_OFFSET { 8 } else { 0 };
            if !ERRNOS.contains(&errno) || msg + tail > data.len() - 6 {
                return Err(format!("{r:?}: malformed error chunk {data:02x?}"));
            }
            r.errored = true;
        }
        k => {
            return Err(format!(
                "{r:?}: chunk type {k:#x} with {len} bytes, done {done}"
            ))
        }
    }
    if done {
        let r = pending.remove(&cookie).expect("pending");
        let whole = r.covered.iter().all(|&c| c) && r.covered.len() as u64 == r.len;
        if r.kind == CMD_READ && !r.errored && r.len > 0 && !whole {
            return Err(format!("{r:?}: READ reply does not cover the range"));
        }
        return Ok(usize::from(r.errored));
    }
    Ok(0)
}

/// What the sessions did, for the summary line.
#[derive(Default)]
struct Tally {
    transmitting: AtomicUsize,
    requests: AtomicUsize,
    error_replies: AtomicUsize,
    closed_on_purpose: AtomicUsize,
}

impl Tally {
    fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One session; `Err` says which rule the server broke.
fn session(sock: &Path, seed: u64, index: usize, tally: &Tally) -> Result<(), String> {
    let result = session_steps(sock, seed, index, tally);
    if result.as_ref().is_ok_and(|closed| *closed) {
        Tally::add(&tally.closed_on_purpose, 1);
    }
    result.map(|_| ())
}

/// [`session`]; `Ok(true)` when the server closed as it had to.
fn session_steps(sock: &Path, seed: u64, index: usize, tally: &Tally) -> Result<bool, String> {
    let mut rng = Rng(seed);
    let s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(REPLY_WITHIN)).unwrap();
    let mut p = Peer { s };
    let g = p.read(18).map_err(closed_early("greeting"))?;
    if be64(&g, 0) != NBDMAGIC || be64(&g, 8) != IHAVEOPT {
        return Err(format!("bad greeting {g:02x?}"));
    }
    let offered = be16(&g, 16);
    let mut client = u32::from(FIXED_NEWSTYLE | (offered & NO_ZEROES));
    if rng.one_in(25) {
        let mut b = client.to_be_bytes();
        rng.mutate(&mut b);
        client = u32::from_be_bytes(b);
    }
    p.send(&client.to_be_bytes())?;
    if client & u32::from(FIXED_NEWSTYLE) == 0
        || client & !u32::from(FIXED_NEWSTYLE | NO_ZEROES) != 0
    {
        return p.expect_closed("bad client flags").map(|()| true);
    }
    let no_zeroes = client & u32::from(NO_ZEROES) != 0;
    // Mostly this session's own build; sometimes a name the policy refuses.
    let name = if rng.one_in(12) {
        "bad name!".to_owned()
    } else {
        format!("fuzz-{index}")
    };
    let (mut structured, mut extended) = (false, false);
    for _ in 0..rng.below(6) {
        let (option, payload) = random_option(&mut rng, &name);
        let mut bytes = option_bytes(option, &payload);
        let bad_magic = rng.one_in(40);
        if bad_magic {
            rng.mutate(&mut bytes[..8]);
        } else if rng.one_in(3) {
            rng.mutate(&mut bytes[16..]);
        } else if rng.one_in(8) {
            // Data where none (or less) is due, its length declared.
            let mut longer = payload.clone();
            let n = 1 + rng.below(16) as usize;
            longer.extend_from_slice(&rng.bytes(n));
            bytes = option_bytes(option, &longer);
        }
        p.send(&bytes)?;
        if bad_magic && be64(&bytes, 0) != IHAVEOPT {
            return p.expect_closed("bad option magic").map(|()| true);
        }
        let answer = read_option_answer(&mut p, option)?;
        match option {
            OPT_ABORT => return p.expect_closed("after ABORT").map(|()| true),
            OPT_STRUCTURED_REPLY => structured |= answer.acked,
            OPT_EXTENDED_HEADERS => extended |= answer.acked,
            OPT_SET_META_CONTEXT
                if answer.acked && !(structured || extended) && answer.meta_contexts > 0 =>
            {
                return Err("meta contexts before structured replies".into());
            }
            _ => {}
        }
    }
    let refused = name.contains(' ');
    let export_size = if !extended && rng.one_in(6) {
        p.send(&option_bytes(OPT_EXPORT_NAME, name.as_bytes()))?;
        if refused {
            return p
                .expect_closed("EXPORT_NAME of a refused name")
                .map(|()| true);
        }
        let reply = p
            .read(if no_zeroes { 10 } else { 134 })
            .map_err(closed_early("EXPORT_NAME reply"))?;
        be64(&reply, 0)
    } else {
        let infos: Vec<u16> = (0..rng.below(3)).map(|_| rng.below(4) as u16).collect();
        p.send(&option_bytes(OPT_GO, &info_request(&name, &infos)))?;
        let answer = read_option_answer(&mut p, OPT_GO)?;
        if refused == answer.acked {
            return Err(format!("GO of {name:?}: acked {}", answer.acked));
        }
        if refused {
            return Ok(false);
        }
        DISK
    };
    if export_size != DISK {
        return Err(format!("export of {export_size} bytes"));
    }
    let mode = if extended {
        Mode::Extended
    } else if structured {
        Mode::Structured
    } else {
        Mode::Simple
    };
    Tally::add(&tally.transmitting, 1);
    let mut cookie = rng.next() & !0xffff;
    for _ in 0..1 + rng.below(4) {
        let mut pending = HashMap::new();
        let mut out = Vec::new();
        for _ in 0..1 + rng.below(12) {
            cookie += 1;
            let r = random_request(&mut rng, mode, cookie);
            out.extend_from_slice(&header(mode, &r));
            out.extend_from_slice(&rng.bytes(r.payload));
            pending.insert(cookie, r);
        }
        Tally::add(&tally.requests, pending.len());
        // Send from another thread: a batch of READs may fill the socket
        // both ways.
        let mut writer = p.s.try_clone().unwrap();
        let sender = std::thread::spawn(move || writer.write_all(&out));
        let errors = read_replies(&mut p, mode, &mut pending)?;
        Tally::add(&tally.error_replies, errors);
        sender
            .join()
            .unwrap()
            .map_err(|e| format!("send requests: {e}"))?;
    }
    match rng.below(3) {
        0 => {
            let mut r = random_request(&mut rng, mode, cookie + 1);
            r.kind = CMD_DISC;
            r.payload = 0;
            r.flags = 0;
            p.send(&header(mode, &r))?;
            p.expect_closed("after DISC").map(|()| true)
        }
        1 => {
            let r = random_request(&mut rng, mode, cookie + 1);
            let mut h = header(mode, &r);
            h[rng.below(4) as usize] ^= 1 << rng.below(8);
            p.send(&h)?;
            p.expect_closed("request with a bad magic").map(|()| true)
        }
        _ => Ok(false),
    }
}

/// Writes and reads back its own data on its own build until `stop`;
/// returns its slowest round trip.
fn healthy_client(sock: PathBuf, stop: Arc<AtomicBool>) -> Duration {
    let s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = s;
    let g = crate::util::read_n(&mut s, 18);
    let client = u32::from(FIXED_NEWSTYLE | (be16(&g, 16) & NO_ZEROES));
    crate::util::send(&mut s, &client.to_be_bytes());
    Mode::Structured.negotiate(&mut s);
    let mut c = Conn::go(s, Mode::Structured, "healthy");
    let mut slowest = Duration::ZERO;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let data = crate::util::random_bytes(16 << 10, i);
        let offset = ((i * 16) << 10) % DISK;
        let start = Instant::now();
        c.write(i * 2, offset, &data);
        assert_eq!(c.read(i * 2 + 1, offset, 16 << 10), data, "healthy data");
        slowest = slowest.max(start.elapsed());
    }
    c.disconnect();
    slowest
}

/// Export names the server lists.
fn listed(server: &Server) -> Vec<String> {
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    let j = Json::parse(&stdout(&out));
    (0..j.len("exports"))
        .map(|i| j.get(&format!("exports.{i}.export-name")).to_owned())
        .collect()
}

#[test]
fn mutated_sessions_are_answered_by_the_spec_beside_a_healthy_client() {
    crate::util::require("nbdinfo");
    let sessions: usize = env_or("SESSION_FUZZ_ITERS", 400);
    let base: u64 = env_or("SESSION_FUZZ_SEED", 0x5e55_10f0);
    let only: Option<usize> = std::env::var("SESSION_FUZZ_ONLY")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut server = Server::start(&["tmpdisk", "size=1M", "type=none"]);
    let stop = Arc::new(AtomicBool::new(false));
    let healthy = {
        let (sock, stop) = (server.sock.clone(), stop.clone());
        std::thread::spawn(move || healthy_client(sock, stop))
    };
    let next = AtomicUsize::new(0);
    let tally = Tally::default();
    let started = Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut failures = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= sessions || (only.is_some() && i > 0) {
                            return failures;
                        }
                        let index = only.unwrap_or(i);
                        let seed = base ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                        if let Err(e) = session(&server.sock, seed, index, &tally) {
                            failures.push(format!(
                                "SESSION_FUZZ_SEED={base} SESSION_FUZZ_ONLY={index}: {e}"
                            ));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("session worker"))
            .collect()
    });
    stop.store(true, Ordering::Relaxed);
    let slowest = healthy.join().expect("the healthy client");
    server.assert_alive();
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    eprintln!(
        "session fuzz: {sessions} sessions in {:?}: {} reached transmission, {} requests \
         ({} answered with an error), {} closed by the server as they had to be; \
         healthy client's slowest round trip {slowest:?}",
        started.elapsed(),
        n(&tally.transmitting),
        n(&tally.requests),
        n(&tally.error_replies),
        n(&tally.closed_on_purpose),
    );
    assert!(
        failures.is_empty(),
        "{} sessions failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        slowest < HEALTHY_WITHIN,
        "healthy client stalled for {slowest:?}"
    );
    // Every disk the sessions made goes with their last connection.
    eventually(
        "every scratch disk to be destroyed",
        Duration::from_secs(10),
        || listed(&server).is_empty(),
    );
}
