//! Runs validated requests against a backend: every command is executed
//! here, and nowhere else.
//!
//! A reply is built in an [`Output`] (see [`crate::replies`]): appended to
//! the buffer the connection gathers replies in, or, for a large READ on an
//! inline connection, sent straight from storage to the socket after what
//! was gathered. Nothing is sent until a reply is complete or storage has
//! delivered its first bytes, so a READ that fails early is rolled back and
//! answered with a clean error, in every framing.
//!
//! Three entry points, by where the request runs:
//! - [`execute`]: the connection's own thread (inline backends) or a worker;
//! - [`write_in_place`]: a WRITE too large for the input buffer, received
//!   straight from the socket into storage that offers its memory;
//! - [`PoolRequest::run`]: a request on the worker pool, whose reply is
//!   posted with its [`Ticket`].

use std::io::{self, Read};
use std::sync::Arc;

use scratchd_proto::consts::{STATE_HOLE, STATE_ZERO};
use scratchd_proto::negotiation::ReplyMode;
use scratchd_proto::reply::{self, Descriptor, ReplyTo};
use scratchd_proto::request::Command;
use scratchd_proto::Errno;
use scratchd_store::{BlockDevice, Extent, ExtentKind, ZeroFlags};

use crate::counters::ErrorSink;
use crate::input::Input;
use crate::replies::{Output, Ticket};

/// Reads at least this long are first checked for holes (with structured
/// replies), so sparse regions go out as 12-byte OFFSET_HOLE chunks instead
/// of zeros. Shorter reads skip the check: it would cost more than it saves.
const HOLE_SCAN_MIN: u32 = 64 * 1024;

/// Single-chunk READ replies at least this long go straight from storage to
/// the socket when the backend offers its memory, skipping the reply buffer.
const DIRECT_READ_MIN: u32 = 128 * 1024;

/// Longest range one BLOCK_STATUS answer describes (the spec lets a server
/// answer less than asked); keeps every compact descriptor within 32 bits and
/// bounds the work per request.
const MAX_STATUS_RANGE: u64 = (1 << 32) - 4096;

/// Most descriptors in one reply, as the spec recommends.
const MAX_DESCRIPTORS: usize = 1 << 20;

/// Per-connection state reused across requests, so steady-state requests
/// allocate nothing.
#[derive(Default)]
pub struct Scratch {
    extents: Vec<Extent>,
    descriptors: Vec<Descriptor>,
}

/// What a connection needs to know to answer a request.
#[derive(Clone, Copy)]
pub struct ReplyContext<'e> {
    pub mode: ReplyMode,
    pub base_allocation: Option<u32>,
    /// The server's and the export's error counters, charged with each
    /// error reply.
    pub errors: &'e ErrorSink,
}

/// Runs `cmd` and appends (or sends) its reply. Storage errors become error
/// replies; an `Err` means the socket failed part-way through a reply sent
/// directly, and the connection must close.
pub fn execute(
    dev: &dyn BlockDevice,
    cmd: Command,
    payload: &[u8],
    cx: ReplyContext,
    to: ReplyTo,
    out: &mut Output,
    scratch: &mut Scratch,
) -> io::Result<()> {
    let mark = out.buf.len();
    let mut answer = Responder {
        dev,
        mode: cx.mode,
        to,
        out,
        scratch,
    };
    // READ and BLOCK_STATUS build their own replies; the rest answer "ok".
    let answers_itself = matches!(cmd, Command::Read { .. } | Command::BlockStatus { .. });
    let result = match cmd {
        Command::Read { offset, len, df } => match answer.read(offset, len, df) {
            Err(ReadError::Socket(e)) => return Err(e),
            Err(ReadError::Storage(e)) => Err(e),
            Ok(()) => Ok(()),
        },
        Command::Write { offset, fua, .. } => dev.write(offset, payload, fua),
        Command::Flush => dev.flush(),
        Command::Trim { len: 0, .. }
        | Command::Cache { len: 0, .. }
        | Command::WriteZeroes { len: 0, .. } => Ok(()),
        Command::Trim { offset, len, fua } => dev.trim(offset, len, fua),
        Command::Cache { offset, len } => dev.cache(offset, len),
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            let flags = ZeroFlags {
                may_trim: !no_hole,
                fast,
            };
            dev.zero(offset, len, flags, fua)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match cx.base_allocation {
            Some(context_id) => answer.block_status(offset, len, req_one, context_id),
            // validate() refuses BLOCK_STATUS without a context already.
            None => Err(io::Error::from_raw_os_error(Errno::Inval as i32)),
        },
        // The connection handles DISC itself; it has no reply.
        Command::Disconnect => return Ok(()),
    };
    let buf = &mut *answer.out.buf;
    match result {
        Ok(()) if !answers_itself => reply::put_ok(buf, cx.mode, to),
        Ok(()) => {}
        Err(e) => {
            buf.truncate(mark);
            put_storage_error(buf, cx, to, &e);
        }
    }
    Ok(())
}

/// Appends the error reply for a failed storage call, and counts it.
pub fn put_storage_error(out: &mut Vec<u8>, cx: ReplyContext, to: ReplyTo, e: &io::Error) {
    let errno = Errno::from_os_error(e.raw_os_error());
    cx.errors.error_replied(errno);
    reply::put_error(out, cx.mode, to, errno, &e.to_string());
}

enum ReadError {
    /// Storage failed before any of the reply was sent: answer with an error.
    Storage(io::Error),
    /// The socket failed mid-reply: the connection is lost.
    Socket(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Storage(e)
    }
}

/// Appends `len` bytes read at `offset` to `out`, copying once from storage
/// that offers its memory, or reading into the buffer otherwise.
fn read_into(dev: &dyn BlockDevice, offset: u64, len: u32, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    let mut append = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        Ok(())
    };
    if let Some(result) = dev.read_to(offset, len as usize, &mut append) {
        return result;
    }
    out.resize(start + len as usize, 0);
    dev.read(offset, &mut out[start..])
}

/// One request being answered: the backend, how the reply is framed, and
/// where it goes.
struct Responder<'r, 'o> {
    dev: &'r dyn BlockDevice,
    mode: ReplyMode,
    to: ReplyTo,
    out: &'r mut Output<'o>,
    scratch: &'r mut Scratch,
}

impl Responder<'_, '_> {
    fn read(&mut self, offset: u64, len: u32, df: bool) -> Result<(), ReadError> {
        let (mode, to) = (self.mode, self.to);
        if len == 0 && mode != ReplyMode::Simple {
            reply::put_ok(self.out.buf, mode, to);
            return Ok(());
        }
        if mode == ReplyMode::Simple || df || len < HOLE_SCAN_MIN {
            return self.read_one_chunk(offset, len);
        }
        let extents = &mut self.scratch.extents;
        extents.clear();
        self.dev.extents(offset, len as u64, extents)?;
        if let [Extent {
            kind: ExtentKind::Data,
            ..
        }] = extents[..]
        {
            return self.read_one_chunk(offset, len);
        }
        let mut at = offset;
        let n = extents.len();
        for (i, e) in extents.iter().enumerate() {
            // Extents exactly cover the range, so each fits in the read's u32.
            let elen = e.len as u32;
            let last = i + 1 == n;
            match e.kind {
                ExtentKind::Hole => reply::put_read_hole(self.out.buf, mode, to, at, elen, last),
                ExtentKind::Data => {
                    reply::put_read_data(self.out.buf, mode, to, at, elen, last);
                    read_into(self.dev, at, elen, self.out.buf)?;
                }
            }
            at += e.len;
        }
        Ok(())
    }

    /// One data chunk (or simple reply) for the whole range, sent straight
    /// from storage to the socket when it is large and storage allows, else
    /// gathered.
    fn read_one_chunk(&mut self, offset: u64, len: u32) -> Result<(), ReadError> {
        let out = &mut *self.out;
        let mark = out.buf.len();
        reply::put_read_data(out.buf, self.mode, self.to, offset, len, true);
        let Some(direct) = out.direct.filter(|_| len >= DIRECT_READ_MIN) else {
            return Ok(read_into(self.dev, offset, len, out.buf)?);
        };
        let mut w = direct.lock();
        // Earlier gathered replies and this header go first, on the first
        // slice: until then nothing is sent, so a storage error can still be
        // answered.
        let mut socket_error = None;
        let mut pending = Some(&mut *out.buf);
        let mut send = |bytes: &[u8]| {
            let r = match pending.take() {
                Some(head) => w.write_all(head).and_then(|_| w.write_all(bytes)),
                None => w.write_all(bytes),
            };
            r.inspect_err(|e| socket_error = Some(io::Error::new(e.kind(), e.to_string())))
        };
        let Some(result) = self.dev.read_to(offset, len as usize, &mut send) else {
            drop(w);
            return Ok(read_into(self.dev, offset, len, out.buf)?);
        };
        let started = pending.is_none();
        drop(w);
        match (result, socket_error) {
            (_, Some(e)) => Err(ReadError::Socket(e)),
            (Ok(()), None) => {
                out.buf.clear();
                Ok(())
            }
            (Err(e), None) if !started => {
                out.buf.truncate(mark);
                Err(ReadError::Storage(e))
            }
            (Err(e), None) => Err(ReadError::Socket(io::Error::new(
                e.kind(),
                format!("storage failed mid-reply: {e}"),
            ))),
        }
    }

    fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        req_one: bool,
        context_id: u32,
    ) -> io::Result<()> {
        let Scratch {
            extents,
            descriptors,
        } = &mut *self.scratch;
        extents.clear();
        self.dev
            .extents(offset, len.min(MAX_STATUS_RANGE), extents)?;
        let keep = if req_one { 1 } else { MAX_DESCRIPTORS };
        descriptors.clear();
        descriptors.extend(extents.iter().take(keep).map(|e| Descriptor {
            len: e.len,
            status: match e.kind {
                ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
                ExtentKind::Data => 0,
            },
        }));
        reply::put_block_status(self.out.buf, self.mode, self.to, context_id, descriptors);
        Ok(())
    }
}

/// Runs an inline WRITE whose payload is too large for the input buffer,
/// receiving it from `input` straight into storage that offers its memory,
/// and appends the reply to `out`. `None`: the backend offers no memory
/// (nothing was read; the caller receives the payload into a buffer). An
/// `Err` means the connection failed mid-payload.
pub fn write_in_place(
    dev: &dyn BlockDevice,
    (offset, len, fua): (u64, usize, bool),
    input: &mut Input,
    cx: ReplyContext,
    to: ReplyTo,
    out: &mut Vec<u8>,
) -> Option<io::Result<()>> {
    let mut src = Payload {
        input,
        left: len,
        failed: false,
    };
    let result = dev.write_from(offset, len, &mut src, fua)?;
    Some(match result {
        Ok(()) => {
            reply::put_ok(out, cx.mode, to);
            Ok(())
        }
        Err(e) if src.failed => Err(e),
        // Storage refused: skip what it did not take, so the stream stays
        // in sync, and answer with the error.
        Err(e) => {
            let left = src.left as u64;
            src.input
                .discard(left)
                .map(|()| put_storage_error(out, cx, to, &e))
        }
    })
}

/// A WRITE payload read straight from the connection by storage; remembers
/// how much is left and whether the connection failed.
struct Payload<'a> {
    input: &'a mut Input,
    left: usize,
    failed: bool,
}

impl Read for Payload<'_> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let want = dst.len().min(self.left);
        let r = self.input.read_some(&mut dst[..want]);
        match &r {
            Ok(0) if want > 0 => self.failed = true,
            Ok(n) => self.left -= n,
            Err(_) => self.failed = true,
        }
        r
    }
}

/// A request running on the worker pool.
pub struct PoolRequest {
    pub device: Arc<dyn BlockDevice>,
    pub cmd: Command,
    pub mode: ReplyMode,
    pub base_allocation: Option<u32>,
    /// Its connection's error counters (see [`ReplyContext::errors`]).
    pub errors: Arc<ErrorSink>,
    pub to: ReplyTo,
    pub payload: Vec<u8>,
    /// Room reserved for it on its connection, and the way its reply goes.
    pub ticket: Ticket,
}

impl PoolRequest {
    pub fn run(self) {
        let mut buf = Vec::new();
        let mut out = Output {
            buf: &mut buf,
            direct: None,
        };
        let cx = ReplyContext {
            mode: self.mode,
            base_allocation: self.base_allocation,
            errors: &self.errors,
        };
        // Without a direct writer, execute cannot fail.
        let _ = execute(
            self.device.as_ref(),
            self.cmd,
            &self.payload,
            cx,
            self.to,
            &mut out,
            &mut Scratch::default(),
        );
        // The payload's memory goes back before the reply may wait.
        drop(self.payload);
        self.ticket.post(buf);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::time::Duration;

    use scratchd_proto::consts::*;
    use scratchd_store::MemoryDevice;

    use super::*;
    use crate::counters::ErrorCounts;
    use crate::replies::ReplyQueue;
    use crate::testing::{reply_socket, TestDevice};

    const EIO: u32 = 5;
    const TO: ReplyTo = ReplyTo {
        cookie: 7,
        offset: 0,
    };

    fn cx(mode: ReplyMode, errors: &ErrorSink) -> ReplyContext<'_> {
        ReplyContext {
            mode,
            base_allocation: Some(1),
            errors,
        }
    }

    /// Runs `cmd` with its reply gathered in `buf`.
    fn run(dev: &dyn BlockDevice, cmd: Command, payload: &[u8], cx: ReplyContext) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut out = Output {
            buf: &mut buf,
            direct: None,
        };
        execute(dev, cmd, payload, cx, TO, &mut out, &mut Scratch::default()).unwrap();
        buf
    }

    fn simple(error: u32) -> Vec<u8> {
        let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&error.to_be_bytes());
        r.extend_from_slice(&TO.cookie.to_be_bytes());
        r
    }

    fn sink() -> ErrorSink {
        ErrorSink::new(Arc::default(), Arc::default())
    }

    fn count(errors: &ErrorCounts, name: &str) -> u64 {
        errors.by_errno().iter().find(|e| e.0 == name).unwrap().1
    }

    #[test]
    fn a_write_then_a_read_answer_with_simple_replies() {
        let (dev, errors) = (MemoryDevice::new(1 << 20).unwrap(), sink());
        let cx = cx(ReplyMode::Simple, &errors);
        let write = Command::Write {
            offset: 4096,
            len: 4,
            fua: false,
        };
        assert_eq!(run(&dev, write, b"data", cx), simple(0));
        let read = Command::Read {
            offset: 4096,
            len: 4,
            df: false,
        };
        let mut expected = simple(0);
        expected.extend_from_slice(b"data");
        assert_eq!(run(&dev, read, &[], cx), expected);
    }

    #[test]
    fn a_failed_read_is_rolled_back_to_an_error_reply_and_counted() {
        let mut dev = TestDevice::new(false);
        dev.fail_reads = Some(EIO as i32);
        let (server, export) = (Arc::default(), Arc::new(ErrorCounts::new()));
        let errors = ErrorSink::new(server, export.clone());
        let mut buf = b"earlier".to_vec();
        let mut out = Output {
            buf: &mut buf,
            direct: None,
        };
        let read = Command::Read {
            offset: 0,
            len: 4096,
            df: false,
        };
        let cx = cx(ReplyMode::Simple, &errors);
        execute(&dev, read, &[], cx, TO, &mut out, &mut Scratch::default()).unwrap();
        let mut expected = b"earlier".to_vec();
        expected.extend(simple(EIO));
        assert_eq!(buf, expected);
        assert_eq!(count(&export, "EIO"), 1);
    }

    #[test]
    fn a_large_inline_read_goes_straight_to_the_socket_after_what_was_gathered() {
        let dev = MemoryDevice::new(1 << 20).unwrap();
        let len = DIRECT_READ_MIN as usize;
        dev.write(0, &vec![5; len], false).unwrap();
        let (mut client, writer, control) = reply_socket();
        let mut replies = ReplyQueue::new(writer, control, Duration::from_secs(10), false);
        replies.batch().extend_from_slice(b"earlier");
        let errors = sink();
        let read = Command::Read {
            offset: 0,
            len: len as u32,
            df: false,
        };
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; 7 + 16 + len];
            client.read_exact(&mut got).unwrap();
            got
        });
        let cx = cx(ReplyMode::Simple, &errors);
        execute(
            &dev,
            read,
            &[],
            cx,
            TO,
            &mut replies.output(),
            &mut Scratch::default(),
        )
        .unwrap();
        assert!(replies.batch().is_empty(), "nothing left to gather");
        let got = reader.join().unwrap();
        assert_eq!(&got[..7], b"earlier");
        assert_eq!(got[7..23], simple(0));
        assert!(got[23..].iter().all(|&b| b == 5));
    }

    #[test]
    fn a_sparse_structured_read_answers_with_a_hole_chunk() {
        let (dev, errors) = (MemoryDevice::new(1 << 20).unwrap(), sink());
        let read = Command::Read {
            offset: 0,
            len: HOLE_SCAN_MIN,
            df: false,
        };
        let r = run(&dev, read, &[], cx(ReplyMode::Structured, &errors));
        // Structured reply header (20 bytes), offset and hole size.
        assert_eq!(r.len(), 20 + 12);
        assert_eq!(r[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([r[4], r[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(r[28..], HOLE_SCAN_MIN.to_be_bytes());
    }

    #[test]
    fn block_status_with_req_one_describes_one_extent() {
        let (dev, errors) = (MemoryDevice::new(1 << 20).unwrap(), sink());
        dev.write(65536, &[1; 4096], false).unwrap();
        let status = |req_one| Command::BlockStatus {
            offset: 0,
            len: 1 << 20,
            req_one,
        };
        let cx = cx(ReplyMode::Structured, &errors);
        // Header (20), context id (4), then 8 bytes per descriptor.
        assert_eq!(run(&dev, status(true), &[], cx).len(), 20 + 4 + 8);
        assert_eq!(run(&dev, status(false), &[], cx).len(), 20 + 4 + 3 * 8);
    }

    #[test]
    fn a_pool_request_posts_its_reply_and_frees_its_room() {
        let (mut client, writer, control) = reply_socket();
        let replies = ReplyQueue::new(writer, control, Duration::from_secs(10), true);
        let job = PoolRequest {
            device: Arc::new(MemoryDevice::new(1 << 20).unwrap()),
            cmd: Command::Flush,
            mode: ReplyMode::Simple,
            base_allocation: None,
            errors: Arc::new(sink()),
            to: TO,
            payload: Vec::new(),
            ticket: replies.admit(100).unwrap(),
        };
        std::thread::spawn(move || job.run());
        replies.wait_idle();
        let mut got = [0; 16];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got[..], simple(0));
    }

    #[test]
    fn a_large_write_is_received_straight_into_storage_that_offers_its_memory() {
        let dev = MemoryDevice::new(1 << 20).unwrap();
        let mut payload = vec![3u8; 300_000];
        payload.extend_from_slice(b"NEXT");
        let mut input = Input::new(Box::new(Cursor::new(payload)));
        let errors = sink();
        let cx = cx(ReplyMode::Simple, &errors);
        let mut out = Vec::new();
        let written = write_in_place(&dev, (0, 300_000, false), &mut input, cx, TO, &mut out);
        written.expect("memory offers its memory").unwrap();
        assert_eq!(out, simple(0));
        let mut back = vec![0; 300_000];
        dev.read(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 3));
        // The next message is left in place.
        assert!(input.fill(4).unwrap());
        assert_eq!(input.buffered(), b"NEXT");
        // A backend without memory of its own gets nothing read.
        let mut input = Input::new(Box::new(Cursor::new(vec![3u8; 8])));
        let none = write_in_place(
            &TestDevice::new(false),
            (0, 8, false),
            &mut input,
            cx,
            TO,
            &mut out,
        );
        assert!(none.is_none());
        let mut all = [0; 8];
        input.read_exact(&mut all).unwrap();
    }
}
