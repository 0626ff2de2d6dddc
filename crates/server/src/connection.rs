//! One client connection: the handshake, then the transmission loop.
//!
//! The connection's thread reads requests. Requests for backends that never
//! block run right here and their replies are gathered in one buffer, which
//! is written when no further request is already waiting in the input
//! buffer: a client with 32 requests in flight gets 32 replies in one system
//! call. Requests for backends that may block go to the worker pool, which
//! writes each reply when it completes, so replies leave out of order.
//!
//! A connection that has received nothing for `IDLE_AFTER` (2 s) gives the pages
//! of its buffers back to the system (they keep their addresses and fault
//! in again on use), so thousands of idle connections cost little more than
//! their threads' stacks.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scratchd_proto::consts::OptError;
use scratchd_proto::handshake::{
    self, ClientFlags, OptionHeader, OptionPayload, OPTION_HEADER_LEN,
};
use scratchd_proto::negotiation::{Negotiator, Opened, Session, Step};
use scratchd_proto::reply::{self, ReplyTo};
use scratchd_proto::request::{self, Command, RequestHeader, RequestPayload};
use scratchd_proto::{Codec, Errno};
use scratchd_store::BlockDevice;
use tracing::{debug, info};

use crate::executor::{self, send, Output, ReplyContext, Scratch, SharedWriter};
use crate::export::OpenExport;
use crate::listener::ServerContext;
use crate::transport::{Control, Transport};
use crate::workers::InFlight;

/// Input buffer size: holds dozens of small requests, so one read() serves many.
const INPUT_BUFFER: usize = 256 * 1024;
/// Gathered replies are written once they reach this size, even if more
/// requests are waiting, to keep memory and latency bounded.
const FLUSH_AT: usize = 256 * 1024;
/// Requests one connection may have on the worker pool at once.
const MAX_IN_FLIGHT: usize = 64;
/// A client must send each handshake message within this time (as in
/// qemu-nbd), so silent connections cannot pin threads forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After this long without a byte from the client, a connection in
/// transmission gives its buffers' pages back. Clients may stay idle, or
/// pause mid-request, for as long as they like.
const IDLE_AFTER: Duration = Duration::from_secs(2);
/// Buffers larger than this (grown by a huge request) are freed when the
/// connection goes idle; smaller ones are kept, so steady 1 MiB traffic
/// allocates nothing.
const KEEP_BUFFER: usize = 2 * 1024 * 1024;

/// Serves one client from greeting to close. Errors are logged, not returned:
/// one client's misbehaviour never concerns anyone else.
pub fn serve(transport: Transport, ctx: &ServerContext) {
    let peer = transport.peer.clone();
    debug!(%peer, "connection opened");
    let registration = match transport.control.try_clone() {
        Ok(control) => ctx.shutdown.register(control),
        Err(e) => {
            info!(%peer, error = %e, "connection dropped");
            return;
        }
    };
    match run(transport, ctx) {
        Ok(()) => debug!(%peer, "connection closed"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            debug!(%peer, "client went away")
        }
        Err(e) => info!(%peer, error = %e, "connection ended"),
    }
    drop(registration);
}

fn run(transport: Transport, ctx: &ServerContext) -> io::Result<()> {
    let Transport {
        reader,
        mut writer,
        control,
        ..
    } = transport;
    control.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut input = Input::new(reader);
    let Some((session, export)) = handshake(&mut input, &mut writer, ctx)? else {
        return Ok(());
    };
    input.watch_idle(control)?;
    info!(export = %session.export.name, mode = ?session.mode, "transmission started");
    transmission(input, writer, session, export, ctx)
}

fn handshake(
    input: &mut Input,
    writer: &mut Box<dyn Write + Send>,
    ctx: &ServerContext,
) -> io::Result<Option<(Session, OpenExport)>> {
    writer.write_all(&handshake::greeting())?;
    writer.flush()?;
    let mut raw = [0u8; 4];
    input.read_exact(&mut raw)?;
    let ClientFlags { no_zeroes } = ClientFlags::from_bytes(&raw).map_err(invalid_data)?;
    let mut negotiator = Negotiator::new(no_zeroes);
    let mut out = Vec::new();
    let mut payload = Vec::new();
    loop {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        input.read_exact(&mut raw)?;
        let header = OptionHeader::from_bytes(&raw).map_err(invalid_data)?;
        out.clear();
        match header.payload_plan().map_err(invalid_data)? {
            OptionPayload::DrainAndRefuse => {
                input.discard(header.len as u64)?;
                handshake::put_option_error(
                    &mut out,
                    header.option,
                    OptError::TooBig,
                    "option data is too long",
                );
                writer.write_all(&out)?;
                continue;
            }
            OptionPayload::Read => {
                payload.resize(header.len as usize, 0);
                input.read_exact(&mut payload)?;
            }
        }
        if ctx.shutdown.is_started() {
            handshake::put_option_error(
                &mut out,
                header.option,
                OptError::Shutdown,
                "server is shutting down",
            );
            let _ = writer.write_all(&out);
            return Ok(None);
        }
        let step = negotiator.handle(header.option, &payload, ctx.exports.as_ref(), &mut out);
        let opened = match step {
            Step::Continue => None,
            Step::Close => {
                let _ = writer.write_all(&out);
                return Ok(None);
            }
            Step::Open { name, via } => {
                let result = ctx.exports.open(&name);
                let (info, export) = match result {
                    Ok(e) => (Ok(e.info.clone()), Some(e)),
                    Err(e) => (Err(e), None),
                };
                match negotiator.finish_open(&via, info, &mut out) {
                    Opened::Transmit(session) => export.map(|e| (session, e)),
                    Opened::Continue => None,
                    Opened::Close => {
                        let _ = writer.write_all(&out);
                        return Ok(None);
                    }
                }
            }
        };
        writer.write_all(&out)?;
        writer.flush()?;
        if opened.is_some() {
            return Ok(opened);
        }
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

fn transmission(
    mut input: Input,
    writer: Box<dyn Write + Send>,
    session: Session,
    export: OpenExport,
    ctx: &ServerContext,
) -> io::Result<()> {
    let writer: SharedWriter = Arc::new(Mutex::new(writer));
    let device = export.device.clone();
    let inline = !device.capabilities().may_block;
    let cx = ReplyContext {
        mode: session.mode,
        base_allocation: session.base_allocation,
    };
    let header_len = request::request_len(session.mode);
    let in_flight = Arc::new(InFlight::new(MAX_IN_FLIGHT));
    let mut out: Vec<u8> = Vec::with_capacity(FLUSH_AT);
    let mut scratch = Scratch::default();
    let mut big_payload: Vec<u8> = Vec::new();

    let result = (|| -> io::Result<()> {
        loop {
            if input.buffered().len() < header_len {
                send(&writer, &mut out)?;
                // Buffers grown by a huge request are not kept while idle.
                if out.capacity() > KEEP_BUFFER {
                    out = Vec::with_capacity(FLUSH_AT);
                }
                if big_payload.capacity() > KEEP_BUFFER {
                    big_payload = Vec::new();
                }
                match input.fill_or_idle(header_len)? {
                    Filled::Ready => {}
                    Filled::End => return Ok(()), // clean EOF between requests
                    Filled::Idle => {
                        out.clear();
                        big_payload.clear();
                        give_back_vec(&mut out);
                        give_back_vec(&mut big_payload);
                        continue;
                    }
                }
            }
            let header = RequestHeader::from_bytes(&input.buffered()[..header_len], session.mode)
                .map_err(invalid_data)?;
            input.consume(header_len);
            let to = ReplyTo {
                cookie: header.cookie,
                offset: header.offset,
            };
            let payload_len = match header.payload_plan(session.mode) {
                RequestPayload::None => 0,
                RequestPayload::Receive(n) => n as usize,
                RequestPayload::Discard(n) => {
                    input.discard(n)?;
                    reply::put_error(&mut out, cx.mode, to, Errno::Inval, "payload too large");
                    continue;
                }
                RequestPayload::Disconnect => {
                    return Err(invalid_data(format!(
                        "request payload of {} bytes is beyond any sane size",
                        header.length
                    )));
                }
            };
            if ctx.shutdown.is_started() {
                input.discard(payload_len as u64)?;
                reply::put_error(
                    &mut out,
                    cx.mode,
                    to,
                    Errno::Shutdown,
                    "server is shutting down",
                );
                continue;
            }
            let cmd = match request::validate(&header, &session) {
                Ok(Command::Disconnect) => return Ok(()),
                Ok(cmd) => cmd,
                Err(refusal) => {
                    input.discard(payload_len as u64)?;
                    reply::put_error(&mut out, cx.mode, to, refusal.errno, refusal.message);
                    continue;
                }
            };
            // Small payloads are used in place from the input buffer. Large
            // ones go straight into storage that offers its memory, or else
            // into a buffer of their own.
            let in_buffer = payload_len <= INPUT_BUFFER;
            if let (false, true, Command::Write { offset, fua, .. }) = (in_buffer, inline, cmd) {
                let mut src = Payload {
                    input: &mut input,
                    left: payload_len,
                    failed: false,
                };
                match device.write_from(offset, payload_len, &mut src, fua) {
                    Some(Ok(())) => {
                        reply::put_ok(&mut out, cx.mode, to);
                        continue;
                    }
                    Some(Err(e)) if src.failed => return Err(e),
                    Some(Err(e)) => {
                        let left = src.left as u64;
                        input.discard(left)?;
                        executor::put_storage_error(&mut out, cx.mode, to, &e);
                        continue;
                    }
                    None => {}
                }
            }
            let payload: &[u8] = if in_buffer {
                if !input.fill(payload_len)? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                &input.buffered()[..payload_len]
            } else {
                big_payload.resize(payload_len, 0);
                input.read_exact(&mut big_payload)?;
                &big_payload
            };
            if inline {
                let mut output = Output {
                    buf: &mut out,
                    direct: Some(&writer),
                };
                executor::execute(
                    device.as_ref(),
                    cmd,
                    payload,
                    cx,
                    to,
                    &mut output,
                    &mut scratch,
                )?;
            } else {
                // Replies gathered so far go first: the worker's may be quick.
                send(&writer, &mut out)?;
                in_flight.acquire();
                let job = Job {
                    device: device.clone(),
                    writer: writer.clone(),
                    in_flight: in_flight.clone(),
                    // A large payload's buffer moves to the job as it is.
                    payload: if in_buffer {
                        payload.to_vec()
                    } else {
                        std::mem::take(&mut big_payload)
                    },
                };
                ctx.workers.submit(move || job.run(cmd, cx, to));
            }
            if in_buffer {
                input.consume(payload_len);
            }
            if out.len() >= FLUSH_AT {
                send(&writer, &mut out)?;
            }
        }
    })();
    // DISC, EOF or error: whatever was answered goes out, and the export is
    // released only after every request still running has finished.
    let flushed = send(&writer, &mut out);
    in_flight.wait_idle();
    drop(export);
    result.and(flushed)
}

/// A request running on the worker pool.
struct Job {
    device: Arc<dyn BlockDevice>,
    writer: SharedWriter,
    in_flight: Arc<InFlight>,
    payload: Vec<u8>,
}

impl Job {
    fn run(self, cmd: Command, cx: ReplyContext, to: ReplyTo) {
        let mut buf = Vec::new();
        let mut out = Output {
            buf: &mut buf,
            direct: None,
        };
        let mut scratch = Scratch::default();
        // Without a direct writer, execute cannot fail; a failed send means
        // the client is gone, which the connection notices on its next read.
        let _ = executor::execute(
            self.device.as_ref(),
            cmd,
            &self.payload,
            cx,
            to,
            &mut out,
            &mut scratch,
        );
        let _ = send(&self.writer, &mut buf);
        self.in_flight.release();
    }
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

/// A read buffer that lets the transmission loop parse requests in place.
struct Input {
    reader: Box<dyn Read + Send>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// In transmission: the socket, whose read timeout ([`IDLE_AFTER`])
    /// says the client has gone quiet; a timeout is then no error.
    idle: Option<IdleWatch>,
}

struct IdleWatch {
    control: Control,
    /// Whether the timeout is set: it is cleared once the connection is
    /// idle (nothing more to give back) and set again when bytes come.
    armed: bool,
}

/// What [`Input::fill_or_idle`] found.
enum Filled {
    Ready,
    /// End of stream, nothing buffered.
    End,
    /// Nothing came for [`IDLE_AFTER`] and nothing is buffered; the input
    /// buffer's pages were given back.
    Idle,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Gives the whole pages of a vector's spare capacity back to the system.
fn give_back_vec(v: &mut Vec<u8>) {
    let spare = v.spare_capacity_mut();
    // SAFETY: the spare capacity belongs to `v`, borrowed mutably, and
    // holds nothing the vector considers initialised.
    unsafe { give_back(spare.as_mut_ptr().cast(), spare.len()) }
}

/// Gives the whole pages inside `[start, start + len)` back to the system:
/// they keep their addresses, read as zeros, and fault in again when next
/// touched.
///
/// # Safety
/// The range must be memory the caller owns and may overwrite with zeros
/// (heap memory, which is private and anonymous), with no live references
/// into it.
unsafe fn give_back(start: *mut u8, len: usize) {
    let page = rustix::param::page_size();
    let first = (start as usize).next_multiple_of(page);
    let end = (start as usize + len) / page * page;
    if first < end {
        // SAFETY: whole pages within the caller's range (see above).
        // MADV_DONTNEED only makes them read as zeros; failure just keeps
        // them.
        let _ = unsafe {
            rustix::mm::madvise(
                first as *mut std::ffi::c_void,
                end - first,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
    }
}

impl Input {
    fn new(reader: Box<dyn Read + Send>) -> Self {
        Input {
            reader,
            buf: vec![0u8; INPUT_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            idle: None,
        }
    }

    /// From now on, a read timeout on `control` means the client is idle.
    fn watch_idle(&mut self, control: Control) -> io::Result<()> {
        control.set_read_timeout(Some(IDLE_AFTER))?;
        self.idle = Some(IdleWatch {
            control,
            armed: true,
        });
        Ok(())
    }

    /// Reads from the stream into `dst`, part of a message. Read timeouts
    /// while watching for idleness are no error: a client may pause
    /// mid-request.
    fn read_stream(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.reader.read(dst) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) && self.idle.is_some() => {}
                r => return r,
            }
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (≤ buffer size) bytes are buffered. Returns
    /// false on end of stream with nothing buffered; end of stream part-way
    /// through a message is an error.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        loop {
            match self.fill_or_idle(n)? {
                Filled::Ready => return Ok(true),
                Filled::End => return Ok(false),
                Filled::Idle => {}
            }
        }
    }

    /// [`fill`](Self::fill), but returns when the client has been idle for
    /// [`IDLE_AFTER`] with nothing buffered, having given back the buffer's
    /// pages, so that the caller can give back its own.
    fn fill_or_idle(&mut self, n: usize) -> io::Result<Filled> {
        debug_assert!(n <= self.buf.len());
        if self.end - self.start >= n {
            return Ok(Filled::Ready);
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < n {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) if self.end == self.start => return Ok(Filled::End),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => {
                    self.end += k;
                    self.rearm()?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Quiet mid-message: keep waiting.
                Err(e) if is_timeout(&e) && self.idle.is_some() && self.end > self.start => {}
                Err(e) if is_timeout(&e) && self.idle.is_some() => {
                    self.go_idle()?;
                    return Ok(Filled::Idle);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Filled::Ready)
    }

    /// Gives the (empty) buffer's pages back and stops the timeout until
    /// bytes come again.
    fn go_idle(&mut self) -> io::Result<()> {
        // SAFETY: the buffer is ours and holds nothing (`start == end`).
        unsafe { give_back(self.buf.as_mut_ptr(), self.buf.len()) };
        if let Some(watch) = &mut self.idle {
            watch.control.set_read_timeout(None)?;
            watch.armed = false;
        }
        Ok(())
    }

    fn rearm(&mut self) -> io::Result<()> {
        match &mut self.idle {
            Some(watch) if !watch.armed => {
                watch.control.set_read_timeout(Some(IDLE_AFTER))?;
                watch.armed = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Fills `dst` from the buffer first, then straight from the stream.
    fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let have = self.buffered().len().min(dst.len());
        dst[..have].copy_from_slice(&self.buffered()[..have]);
        self.consume(have);
        let mut at = have;
        while at < dst.len() {
            match self.read_stream(&mut dst[at..])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                k => at += k,
            }
        }
        Ok(())
    }

    /// Reads at most `dst.len()` bytes: buffered ones first, else straight
    /// from the stream.
    fn read_some(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.buffered().is_empty() {
            return self.read_stream(dst);
        }
        let n = self.buffered().len().min(dst.len());
        dst[..n].copy_from_slice(&self.buffered()[..n]);
        self.consume(n);
        Ok(n)
    }

    /// Reads and drops `n` bytes without holding more than the buffer.
    fn discard(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.buffered().is_empty() && !self.fill(1)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = (self.buffered().len() as u64).min(n);
            self.consume(k as usize);
            n -= k;
        }
        Ok(())
    }
}
