//! One connection in transmission: many requests in flight from many
//! threads, replies dispatched by cookie in whatever order they come.
//!
//! Three parts share a connection:
//! - callers ([`Connection::submit`]) register a request in the table of
//!   pending requests under the state lock (waiting while `max_in_flight`
//!   are out), then write it under the writer lock, and get a [`Ticket`];
//! - one reply thread per connection reads reply headers, finds the pending
//!   request by cookie, reads the payload straight into that request's
//!   buffer (a READ's data) or decodes it (holes, block status, errors),
//!   and on the last chunk sends the outcome to the ticket's channel and
//!   frees its slot;
//! - [`Ticket::wait`] blocks on that channel, with the request timeout if
//!   one is set.
//!
//! While it reads a payload, the reply thread holds the pending request
//! outside the table, so no lock is held across socket I/O and callers can
//! keep registering requests.
//!
//! Failure: whatever ends the reply thread (the server closed, an I/O error,
//! a protocol violation, [`Closer::close`] after a write failed or a
//! request timed out) marks the connection lost and sends every pending
//! request an error, all under the state lock; a request registered later
//! fails at once. So no caller waits forever for a reply that cannot come.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use scratchd_proto::codec::{Codec, Reader};
use scratchd_proto::consts::*;
use scratchd_proto::negotiation::ReplyMode;
use scratchd_proto::reply::{
    reply_header_len, ChunkPayload, Descriptor, ReplyHeader, EXTENDED_REPLY_LEN,
};
use scratchd_proto::request::{RequestHeader, EXTENDED_REQUEST_LEN};
use scratchd_store::sync::{lock, wait_until};
use tracing::debug;

use crate::error::{lost, nbd_error, timed_out};
use crate::transport::{Closer, ReadHalf, Stream, WriteHalf};

/// Longest non-data chunk payload accepted: a block-status reply of the
/// spec's 2^20 extended descriptors, and then some.
const MAX_CHUNK: u64 = 17 << 20;

/// Payloads up to this size are copied behind the request header and sent
/// with one write; longer ones are written after it.
const COALESCE: usize = 64 * 1024;

/// Buffer of the reply thread: headers and small chunks in one read.
const READ_BUFFER: usize = 64 * 1024;

/// One request to send. `payload` is a WRITE's data (empty otherwise).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u64,
    pub payload: &'a [u8],
}

/// A successful reply: a READ's data, a BLOCK_STATUS's descriptors.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub data: Vec<u8>,
    pub extents: Vec<Descriptor>,
}

/// How a connection is run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub mode: ReplyMode,
    pub base_allocation: Option<u32>,
    pub max_in_flight: usize,
    pub timeout: Option<Duration>,
}

pub(crate) struct Connection {
    shared: Arc<Shared>,
    writer: Mutex<WriteHalf>,
    reader: Option<JoinHandle<()>>,
    timeout: Option<Duration>,
}

/// What callers and the reply thread share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a slot frees up or the connection is lost.
    room: Condvar,
    closer: Closer,
    settings: Settings,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Requests sent and not yet answered, including the one the reply
    /// thread may be holding outside `pending`.
    in_flight: usize,
    next_cookie: u64,
    /// Why the connection stopped, once it has.
    lost: Option<String>,
}

/// A request waiting for (the rest of) its reply.
struct Pending {
    command: u16,
    offset: u64,
    len: u64,
    /// A READ's buffer, filled by data and hole chunks.
    data: Vec<u8>,
    /// READ bytes received so far.
    covered: u64,
    extents: Vec<Descriptor>,
    /// The first error the server reported; later chunks still get read.
    error: Option<u32>,
    done: Done,
}

/// What a request's outcome is handed to, on the reply thread.
pub(crate) type Callback = Box<dyn FnOnce(io::Result<Reply>) + Send>;

/// Where a request's outcome goes: a [`Ticket`] that someone waits on, or
/// a callback for a request nobody waits for (write-behind). A callback
/// runs on the reply thread (or on the thread that finds the connection
/// lost), with no lock of the connection held; it must not block.
pub(crate) enum Done {
    Ticket(Sender<io::Result<Reply>>),
    Call(Callback),
}

impl Done {
    fn send(self, outcome: io::Result<Reply>) {
        match self {
            // The caller may have timed out and gone; nothing to tell then.
            Done::Ticket(tx) => {
                let _ = tx.send(outcome);
            }
            Done::Call(call) => call(outcome),
        }
    }
}

impl Connection {
    /// Starts transmission on a negotiated stream.
    pub fn start(stream: Stream, settings: Settings) -> io::Result<Connection> {
        stream.set_timeouts(None)?;
        stream.set_write_timeout(settings.timeout)?;
        let (read_half, write_half, closer) = stream.split()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                in_flight: 0,
                next_cookie: 1,
                lost: None,
            }),
            room: Condvar::new(),
            closer,
            settings,
        });
        let replies = ReplyThread {
            shared: shared.clone(),
            input: BufReader::with_capacity(READ_BUFFER, read_half),
            scratch: Vec::new(),
        };
        let reader = thread::Builder::new()
            .name("nbd-replies".into())
            .spawn(move || replies.run())?;
        Ok(Connection {
            shared,
            writer: Mutex::new(write_half),
            reader: Some(reader),
            timeout: settings.timeout,
        })
    }

    /// Sends `request`; the reply comes through the returned ticket.
    pub fn submit(&self, request: &Request) -> io::Result<Ticket> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let cookie = self.register(request, Done::Ticket(tx))?;
        self.send(cookie, request)?;
        Ok(Ticket {
            rx,
            command: request.command,
            timeout: self.timeout,
            shared: self.shared.clone(),
        })
    }

    /// Sends `request` and returns once it is written to the socket; its
    /// outcome goes to `call`, exactly once: with the reply, or with an
    /// error when the connection is lost first. When sending fails, the
    /// error is returned and `call` is not called (or called with the lost
    /// connection's error, if the reply thread got to it first; either
    /// way, once).
    pub fn submit_then(&self, request: &Request, call: Callback) -> io::Result<()> {
        let cookie = self.register(request, Done::Call(call))?;
        self.send(cookie, request)
    }

    /// Closes the connection: every request in flight fails.
    pub fn abort(&self) {
        self.shared.closer.close();
    }

    /// Requests on this connection still waiting for a reply.
    pub fn in_flight(&self) -> usize {
        lock(&self.shared.state).in_flight
    }

    /// Why the connection stopped carrying requests, once it has.
    pub fn lost(&self) -> Option<String> {
        lock(&self.shared.state).lost.clone()
    }

    /// Takes a slot and a cookie for `request`.
    fn register(&self, request: &Request, done: Done) -> io::Result<u64> {
        let shared = &self.shared;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut state = lock(&shared.state);
        loop {
            if let Some(reason) = &state.lost {
                return Err(lost(reason));
            }
            if state.in_flight < shared.settings.max_in_flight {
                break;
            }
            state = match wait_until(&shared.room, state, deadline) {
                Ok(state) => state,
                Err(state) => {
                    drop(state);
                    shared.closer.close();
                    return Err(timed_out("request (waiting for a free slot)"));
                }
            };
        }
        let cookie = state.next_cookie;
        state.next_cookie = state.next_cookie.wrapping_add(1);
        state.in_flight += 1;
        let data = match request.command {
            CMD_READ => vec![0; request.len as usize],
            _ => Vec::new(),
        };
        state.pending.insert(
            cookie,
            Pending {
                command: request.command,
                offset: request.offset,
                len: request.len,
                data,
                covered: 0,
                extents: Vec::new(),
                error: None,
                done,
            },
        );
        Ok(cookie)
    }

    /// Writes the request; a failed write leaves the stream out of step,
    /// so it ends the connection (the reply thread then fails every
    /// pending request, this one included).
    fn send(&self, cookie: u64, request: &Request) -> io::Result<()> {
        let header = RequestHeader {
            flags: request.flags,
            kind: request.command,
            cookie,
            offset: request.offset,
            length: request.len,
        };
        let coalesce = request.payload.len() <= COALESCE;
        let inline = if coalesce { request.payload.len() } else { 0 };
        let mut buf = Vec::with_capacity(EXTENDED_REQUEST_LEN + inline);
        header.encode(self.shared.settings.mode, &mut buf);
        if coalesce {
            buf.extend_from_slice(request.payload);
        }
        let mut writer = lock(&self.writer);
        let mut result = writer.0.write_all(&buf);
        if result.is_ok() && !coalesce {
            result = writer.0.write_all(request.payload);
        }
        drop(writer);
        result.map_err(|e| {
            self.shared.closer.close();
            lost(&format!("sending a request failed: {e}"))
        })
    }

    /// Sends DISC (when the connection still works) and closes it; the
    /// reply thread ends. Nothing can be pending: callers borrow the
    /// connection while they wait.
    pub fn disconnect(&mut self) -> io::Result<()> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let alive = lock(&self.shared.state).lost.is_none();
        let result = if alive {
            let mut buf = Vec::new();
            RequestHeader {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            }
            .encode(self.shared.settings.mode, &mut buf);
            lock(&self.writer).0.write_all(&buf)
        } else {
            Ok(())
        };
        self.shared.closer.close();
        let _ = reader.join();
        result
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

/// A request sent and not yet waited for.
pub(crate) struct Ticket {
    rx: Receiver<io::Result<Reply>>,
    command: u16,
    timeout: Option<Duration>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// The request's outcome. After the request timeout the connection is
    /// closed: a server that does not answer one request is not trusted
    /// with the others, and a late reply could not be told apart.
    pub fn wait(self) -> io::Result<Reply> {
        let gone = || lost("the reply thread ended");
        match self.timeout {
            None => self.rx.recv().unwrap_or_else(|_| Err(gone())),
            Some(timeout) => match self.rx.recv_timeout(timeout) {
                Ok(result) => result,
                Err(RecvTimeoutError::Timeout) => {
                    self.shared.closer.close();
                    Err(timed_out(command_name(self.command)))
                }
                Err(RecvTimeoutError::Disconnected) => Err(gone()),
            },
        }
    }
}

impl Shared {
    /// Takes the pending request `cookie` out of the table.
    fn take(&self, cookie: u64) -> Option<Pending> {
        lock(&self.state).pending.remove(&cookie)
    }

    fn put_back(&self, cookie: u64, pending: Pending) {
        lock(&self.state).pending.insert(cookie, pending);
    }

    /// Frees the request's slot and hands it its outcome.
    fn complete(&self, pending: Pending) {
        let (done, outcome) = pending.outcome();
        let mut state = lock(&self.state);
        state.in_flight -= 1;
        drop(state);
        self.room.notify_one();
        done.send(outcome);
    }

    /// Marks the connection lost and fails every pending request.
    fn fail_all(&self, reason: &str) {
        let mut state = lock(&self.state);
        state.lost = Some(reason.to_owned());
        state.in_flight = 0;
        let pending: Vec<Pending> = state.pending.drain().map(|(_, p)| p).collect();
        drop(state);
        self.room.notify_all();
        if !pending.is_empty() {
            debug!(reason, requests = pending.len(), "failing pending requests");
        }
        for p in pending {
            p.done.send(Err(lost(reason)));
        }
    }
}

impl Pending {
    /// Where the outcome goes, and the outcome.
    fn outcome(self) -> (Done, io::Result<Reply>) {
        let outcome = if let Some(code) = self.error {
            Err(nbd_error(code))
        } else if self.command == CMD_READ && self.covered != self.len {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(Reply {
                data: self.data,
                extents: self.extents,
            })
        };
        (self.done, outcome)
    }

    fn fail(self, reason: &str) {
        self.done.send(Err(lost(reason)));
    }

    /// Where `len` bytes at `offset` land in a READ's buffer.
    fn place(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, String> {
        let start = offset.checked_sub(self.offset);
        match start {
            Some(start) if start.checked_add(len).is_some_and(|end| end <= self.len) => {
                Ok(start as usize..(start + len) as usize)
            }
            _ => Err(format!(
                "read chunk {offset}+{len} outside the request {}+{}",
                self.offset, self.len
            )),
        }
    }
}

/// The thread that reads every reply of one connection.
struct ReplyThread {
    shared: Arc<Shared>,
    input: BufReader<ReadHalf>,
    /// Payloads of non-data chunks.
    scratch: Vec<u8>,
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl ReplyThread {
    fn run(mut self) {
        let reason = loop {
            if let Err(reason) = self.next_reply() {
                break reason;
            }
        };
        debug!(reason, "NBD connection ended");
        // Writers must not go on sending into a stream nobody reads.
        self.shared.closer.close();
        self.shared.fail_all(&reason);
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
            _ => format!("reading a reply: {e}"),
        })
    }

    /// Reads one reply (a simple reply or one chunk) and dispatches it.
    fn next_reply(&mut self) -> Result<(), String> {
        let header = self.header()?;
        let cookie = header.cookie();
        let mut pending = self
            .shared
            .take(cookie)
            .ok_or_else(|| format!("reply for unknown cookie {cookie:#x}"))?;
        match self.apply(&header, &mut pending) {
            Ok(()) if header.is_done() => self.shared.complete(pending),
            Ok(()) => self.shared.put_back(cookie, pending),
            Err(reason) => {
                pending.fail(&reason);
                return Err(reason);
            }
        }
        Ok(())
    }

    fn header(&mut self) -> Result<ReplyHeader, String> {
        let mut raw = [0u8; EXTENDED_REPLY_LEN];
        self.read_exact(&mut raw[..4])?;
        let magic = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let len = reply_header_len(magic).ok_or(format!("bad reply magic {magic:#x}"))?;
        self.read_exact(&mut raw[4..len])?;
        let header = ReplyHeader::from_bytes(&raw[..len]).map_err(|e| e.to_string())?;
        let allowed = matches!(
            (self.shared.settings.mode, &header),
            (ReplyMode::Simple, ReplyHeader::Simple { .. })
                | (ReplyMode::Structured, ReplyHeader::Simple { .. })
                | (ReplyMode::Structured, ReplyHeader::Structured { .. })
                | (ReplyMode::Extended, ReplyHeader::Extended { .. })
        );
        if !allowed {
            return Err(format!("{header:?} does not fit the negotiated framing"));
        }
        Ok(header)
    }

    fn apply(&mut self, header: &ReplyHeader, pending: &mut Pending) -> Result<(), String> {
        match *header {
            ReplyHeader::Simple { error, .. } => self.simple(error, pending),
            ReplyHeader::Structured { kind, length, .. } => {
                self.chunk(kind, length.into(), header.is_done(), pending)
            }
            ReplyHeader::Extended { kind, length, .. } => {
                self.chunk(kind, length, header.is_done(), pending)
            }
        }
    }

    fn simple(&mut self, error: u32, pending: &mut Pending) -> Result<(), String> {
        if error != 0 {
            pending.error.get_or_insert(error);
            return Ok(());
        }
        if pending.command != CMD_READ {
            return Ok(());
        }
        if self.shared.settings.mode != ReplyMode::Simple {
            return Err("simple reply to a READ with structured replies on".into());
        }
        let mut data = std::mem::take(&mut pending.data);
        let read = self.read_exact(&mut data);
        pending.data = data;
        read?;
        pending.covered = pending.len;
        Ok(())
    }

    fn chunk(
        &mut self,
        kind: u16,
        length: u64,
        done: bool,
        pending: &mut Pending,
    ) -> Result<(), String> {
        if kind == REPLY_TYPE_OFFSET_DATA && pending.command == CMD_READ {
            return self.read_data(length, pending);
        }
        if length > MAX_CHUNK {
            return Err(format!("chunk of type {kind} has {length} bytes"));
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(length as usize, 0);
        let read = self.read_exact(&mut scratch);
        let applied = read.and_then(|()| {
            let payload = ChunkPayload::decode(kind, &mut Reader::new(&scratch))
                .map_err(|e| format!("chunk of type {kind}: {e}"))?;
            apply_payload(payload, done, pending, self.shared.settings.base_allocation)
        });
        self.scratch = scratch;
        applied
    }

    /// An OFFSET_DATA chunk, read straight into the request's buffer.
    fn read_data(&mut self, length: u64, pending: &mut Pending) -> Result<(), String> {
        let Some(len) = length.checked_sub(8) else {
            return Err("OFFSET_DATA chunk shorter than its offset".into());
        };
        let mut offset = [0u8; 8];
        self.read_exact(&mut offset)?;
        let range = pending.place(u64::from_be_bytes(offset), len)?;
        let mut data = std::mem::take(&mut pending.data);
        let read = self.read_exact(&mut data[range]);
        pending.data = data;
        read?;
        pending.covered += len;
        Ok(())
    }
}

/// Applies a decoded non-data chunk to its request.
fn apply_payload(
    payload: ChunkPayload,
    done: bool,
    pending: &mut Pending,
    base_allocation: Option<u32>,
) -> Result<(), String> {
    let command = pending.command;
    match payload {
        ChunkPayload::None if done => {}
        ChunkPayload::OffsetHole { offset, len } if command == CMD_READ => {
            let range = pending.place(offset, len.into())?;
            pending.data[range].fill(0);
            pending.covered += u64::from(len);
        }
        ChunkPayload::BlockStatus {
            context_id,
            descriptors,
        } if command == CMD_BLOCK_STATUS => {
            if Some(context_id) == base_allocation {
                pending.extents = descriptors;
            }
        }
        ChunkPayload::BlockStatusExt {
            context_id,
            descriptors,
        } if command == CMD_BLOCK_STATUS => {
            if Some(context_id) == base_allocation {
                pending.extents = descriptors
                    .into_iter()
                    .map(|d| Descriptor {
                        len: d.len,
                        status: d.status as u32,
                    })
                    .collect();
            }
        }
        ChunkPayload::Error { error, message }
        | ChunkPayload::ErrorOffset { error, message, .. } => {
            debug!(
                error,
                reason = %crate::error::shown(&message),
                command = command_name(command),
                "server error"
            );
            // Zero is no error; the spec calls it a protocol error, but
            // the request failed all the same.
            pending
                .error
                .get_or_insert(if error == 0 { 5 } else { error });
        }
        // Unknown error chunks have the error layout; the spec says to
        // treat them as errors even when their type is not understood.
        ChunkPayload::Unknown { kind, .. } if kind & 0x8000 != 0 => {
            pending.error.get_or_insert(5);
        }
        other => {
            return Err(format!(
                "unexpected chunk {other:?} for {}",
                command_name(command)
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
