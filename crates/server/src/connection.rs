//! One client connection: the handshake, then the transmission loop.
//!
//! The handshake ([`Handshake`]) moves bytes for the option haggling that
//! `proto::negotiation::Negotiator` decides, and opens the export the
//! client picks. The loop reads like the protocol:
//! [`Transmission::next_request`] reads and checks one request and says what
//! to do with it (refuse it, run it, or end), and [`Transmission::dispatch`]
//! runs it on this thread (backends that never block) or hands it to the
//! worker pool. Requests are parsed in place from the input buffer
//! ([`crate::input`]); replies leave through the connection's [`ReplyQueue`]
//! ([`crate::replies`]), gathered so that a client with 32 requests in
//! flight gets 32 replies in one system call. Commands are executed in
//! [`crate::executor`]. Whatever ends a connection is a
//! [`ConnectionError`] ([`crate::error`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use scratchd_proto::consts::OptError;
use scratchd_proto::handshake::{
    self, ClientFlags, OptionHeader, OptionPayload, OPTION_HEADER_LEN,
};
use scratchd_proto::negotiation::{Negotiator, OpenVia, Opened, Session, Step, TlsPolicy};
use scratchd_proto::options;
use scratchd_proto::reply::{self, ReplyTo};
use scratchd_proto::request::{self, Command, RequestHeader, RequestPayload};
use scratchd_proto::{Codec, Errno};
use scratchd_store::BlockDevice;
use tracing::{debug, info, warn};

use crate::counters::{ErrorSink, HandshakeFailure};
use crate::deadline::HandshakeDeadline;
use crate::error::{Causes, ConnectionError};
use crate::executor::{self, PoolRequest, ReplyContext, Scratch};
use crate::export::{OpenExport, PeerCatalog};
use crate::identity::Identity;
use crate::input::{give_back_vec, Filled, Input, INPUT_BUFFER};
use crate::listener::ServerContext;
use crate::replies::ReplyQueue;
use crate::tls::TlsMode;
use crate::transport::{Control, Transport, WriteHalf};

/// A client must send each handshake message within this time (as in
/// qemu-nbd), so silent connections cannot pin threads forever; the
/// default of [`ServerContext::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Options a client may send before GO or EXPORT_NAME. A real client needs
/// a handful (nbdinfo --list: LIST, then INFO per export it shows); a client
/// looping on options only keeps its slot without ever opening anything.
pub const MAX_OPTIONS: usize = 64;
/// Buffers larger than this (grown by a huge request) are freed when the
/// connection waits for input; smaller ones are kept, so steady 1 MiB
/// traffic allocates nothing.
const KEEP_BUFFER: usize = 2 * 1024 * 1024;
/// Reply bytes a pooled request is expected to need besides READ data
/// (headers; BLOCK_STATUS descriptors are counted once the reply exists).
const REPLY_OVERHEAD: usize = 64;
/// Largest request (payload or READ length) of a backend that may block
/// that the connection's thread runs itself when it has nothing else to do
/// (see `Transmission::may_run_here`): the size of a gathered batch.
const RUN_HERE_MAX: usize = crate::replies::FLUSH_AT;

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
    log_end(&peer, &run(transport, ctx));
    drop(registration);
}

/// A clean end, a client gone or refused are worth a debug line; anything
/// else, an info line with every cause.
fn log_end(peer: &str, result: &Result<(), ConnectionError>) {
    let Err(e) = result else {
        return debug!(%peer, "connection closed");
    };
    match e.ending() {
        None => debug!(%peer, "connection closed"),
        Some(ConnectionError::Closed) => debug!(%peer, "client went away"),
        // A client that holds its slot without finishing its handshake is
        // what an attack on the connection limit looks like: worth a warning.
        Some(ConnectionError::HandshakeDeadline(_) | ConnectionError::TooManyOptions(_)) => {
            warn!(%peer, error = %Causes(e), "client dropped in its handshake")
        }
        Some(_) => info!(%peer, error = %Causes(e), "connection ended"),
    }
}

fn run(transport: Transport, ctx: &ServerContext) -> Result<(), ConnectionError> {
    let Transport {
        reader,
        mut writer,
        control,
        identity,
        ..
    } = transport;
    control.set_read_timeout(Some(ctx.handshake_timeout))?;
    let deadline = HandshakeDeadline::start(control.try_clone()?, ctx.handshake_timeout);
    let mut input = Input::new(reader);
    let shaken = Handshake {
        input: &mut input,
        writer: &mut writer,
        control: &control,
        peer: identity,
        ctx,
        refused: None,
    }
    .run();
    let shaken = match (deadline.finish(), shaken) {
        (true, shaken) => shaken,
        // Cut by the watchdog: whatever the handshake saw last (a closed
        // stream, usually) is not the reason.
        (false, _) => Err(ConnectionError::HandshakeDeadline(deadline.limit())),
    };
    if let Err(e) = &shaken {
        ctx.counters.handshake_failed(HandshakeFailure::of(e));
    }
    let Some((session, export)) = shaken? else {
        return Ok(());
    };
    input.watch_idle(Box::new(control.try_clone()?))?;
    // Only where connections may spin: else no second descriptor.
    if ctx.busy_polling.spins() {
        let socket = control.socket().transpose()?;
        if let Some(poll) = socket.and_then(|s| ctx.busy_polling.watch(s)) {
            input.busy_poll(poll);
        }
    }
    let _membership = match &export.members {
        Some(m) => Some(m.join(control.try_clone()?)),
        None => None,
    };
    info!(export = %session.export.name, mode = ?session.mode, "transmission started");
    let pooled = export.device.capabilities().may_block;
    let replies = ReplyQueue::new(writer, control, ctx.reply_timeout, pooled);
    // Borrowed by every request of the connection, shared with those on
    // the worker pool.
    let errors = Arc::new(ErrorSink::new(ctx.counters.clone(), export.errors.clone()));
    Transmission::new(input, replies, &session, &errors, export, ctx).run()
}

/// A connection in its handshake: the option haggling, until transmission
/// starts or the client leaves.
struct Handshake<'h> {
    input: &'h mut Input,
    writer: &'h mut WriteHalf,
    control: &'h Control,
    /// Who asks: the registry answers LIST, INFO and opens as that peer.
    peer: Identity,
    ctx: &'h ServerContext,
    /// The last export the registry refused this client.
    refused: Option<String>,
}

/// What the connection does after one option. (One per option, moved
/// once: the size of `Transmit` costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
enum Then {
    /// Read the next option.
    Next,
    /// Transmission starts.
    Transmit(Session, OpenExport),
    /// The client leaves (ABORT, a failed EXPORT_NAME, shutdown).
    Leave,
}

impl Handshake<'_> {
    /// Runs the option haggling until transmission starts (`Some`) or the
    /// client leaves (`None`). An export refused on the way is the reason
    /// for whatever ends the handshake after it: the client usually leaves,
    /// or errs, next.
    fn run(mut self) -> Result<Option<(Session, OpenExport)>, ConnectionError> {
        let end = self.negotiate();
        match (self.refused.take(), end) {
            (Some(export), Ok(None)) => Err(ConnectionError::Refused { export, then: None }),
            (Some(export), Err(e)) => Err(ConnectionError::Refused {
                export,
                then: Some(Box::new(e)),
            }),
            (_, end) => end,
        }
    }

    /// The greeting, then one option after another.
    fn negotiate(&mut self) -> Result<Option<(Session, OpenExport)>, ConnectionError> {
        let mut negotiator = self.greet()?;
        let mut out = Vec::new();
        let mut payload = Vec::new();
        for _ in 0..MAX_OPTIONS {
            out.clear();
            let Some(header) = self.read_option(&mut payload, &mut out)? else {
                continue;
            };
            let then = self.answer(&mut negotiator, header, &payload, &mut out)?;
            match then {
                Then::Next => self.send(&out)?,
                Then::Transmit(session, export) => {
                    self.send(&out)?;
                    return Ok(Some((session, export)));
                }
                Then::Leave => {
                    // The client may be gone already: a last answer is a courtesy.
                    let _ = self.send(&out);
                    return Ok(None);
                }
            }
        }
        Err(ConnectionError::TooManyOptions(MAX_OPTIONS))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        if bytes.is_empty() {
            return Ok(());
        }
        Ok(self.writer.write_all(bytes, self.ctx.handshake_timeout)?)
    }

    /// Sends the greeting, reads the client's flags, and sets up the
    /// negotiator for them and the server's TLS policy.
    fn greet(&mut self) -> Result<Negotiator, ConnectionError> {
        self.send(&handshake::greeting())?;
        let mut raw = [0u8; 4];
        self.input.read_exact(&mut raw)?;
        let ClientFlags { no_zeroes } = ClientFlags::from_bytes(&raw)?;
        let policy = match self.ctx.tls.as_ref().map(|t| t.mode) {
            None => TlsPolicy::Off,
            Some(TlsMode::On) => TlsPolicy::On,
            Some(TlsMode::Require) => TlsPolicy::Require,
        };
        Ok(Negotiator::with_tls(no_zeroes, policy))
    }

    /// Reads the next option header and its payload into `payload`. An
    /// over-size payload is skipped and refused right here (the refusal is
    /// sent; `None`).
    fn read_option(
        &mut self,
        payload: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Option<OptionHeader>, ConnectionError> {
        let mut raw = [0u8; OPTION_HEADER_LEN];
        self.input.read_exact(&mut raw)?;
        let header = OptionHeader::from_bytes(&raw)?;
        match header.payload_plan()? {
            OptionPayload::DrainAndRefuse => {
                self.input.discard(header.len as u64)?;
                let message = "option data is too long";
                options::put_option_error(out, header.option, OptError::TooBig, message);
                self.send(out)?;
                Ok(None)
            }
            OptionPayload::Read => {
                payload.resize(header.len as usize, 0);
                self.input.read_exact(payload)?;
                Ok(Some(header))
            }
        }
    }

    /// Lets the negotiator answer one option into `out`, and does what it
    /// asks for: TLS, or opening an export.
    fn answer(
        &mut self,
        negotiator: &mut Negotiator,
        header: OptionHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Then, ConnectionError> {
        if self.ctx.shutdown.is_started() {
            let message = "server is shutting down";
            options::put_option_error(out, header.option, OptError::Shutdown, message);
            return Ok(Then::Leave);
        }
        let catalog = PeerCatalog {
            exports: self.ctx.exports.as_ref(),
            peer: &self.peer,
        };
        match negotiator.handle(header.option, payload, &catalog, out) {
            Step::Continue => Ok(Then::Next),
            Step::Close => Ok(Then::Leave),
            Step::StartTls => {
                self.send(out)?;
                out.clear();
                self.start_tls()?;
                negotiator.tls_started();
                Ok(Then::Next)
            }
            Step::Open { name, via, from } => Ok(self.open(negotiator, name, from, &via, out)),
            Step::Snapshots(request) => {
                let result = self.ctx.exports.snapshots(&request, &self.peer);
                negotiator.finish_snapshots(&request, result, out);
                Ok(Then::Next)
            }
        }
    }

    /// Opens `name` for GO or EXPORT_NAME and lets the negotiator answer.
    fn open(
        &mut self,
        negotiator: &mut Negotiator,
        name: String,
        from: Option<String>,
        via: &OpenVia,
        out: &mut Vec<u8>,
    ) -> Then {
        let exports = &self.ctx.exports;
        let opened = match &from {
            Some(from) => exports.open_from(&name, &self.peer, from),
            None => exports.open(&name, &self.peer),
        };
        let (info, export) = match opened {
            Ok(e) => (Ok(e.info.clone()), Some(e)),
            Err(e) => {
                self.refused = Some(name);
                (Err(e), None)
            }
        };
        match (negotiator.finish_open(via, info, out), export) {
            (Opened::Transmit(session), Some(export)) => Then::Transmit(session, export),
            (Opened::Transmit(_), None) | (Opened::Continue, _) => Then::Next,
            (Opened::Close, _) => Then::Leave,
        }
    }

    /// Runs the TLS handshake on the connection's socket (STARTTLS was just
    /// acknowledged); from then on both halves go through the TLS session.
    /// A verified client certificate names the peer better than the socket
    /// does (which, over TCP, names nobody).
    fn start_tls(&mut self) -> Result<(), ConnectionError> {
        let tls = self
            .ctx
            .tls
            .as_ref()
            .ok_or(ConnectionError::StartTls("STARTTLS without TLS"))?;
        // The client may send nothing between STARTTLS and its TLS hello,
        // which it sends only after our ACK: buffered bytes are a confused
        // client.
        if !self.input.buffered().is_empty() {
            return Err(ConnectionError::StartTls("data after NBD_OPT_STARTTLS"));
        }
        let socket = self
            .control
            .socket()
            .ok_or(ConnectionError::StartTls("TLS needs a socket"))??;
        let accepted = tls.accept(socket);
        self.ctx.counters.tls_handshake(accepted.is_ok());
        let (reader, tls_writer, fingerprint) = accepted.map_err(ConnectionError::Tls)?;
        self.input.replace_reader(Box::new(reader));
        *self.writer = WriteHalf::Tls(tls_writer);
        debug!(client_certificate = fingerprint.is_some(), "TLS started");
        if let Some(fingerprint) = fingerprint {
            self.peer = Identity::Certificate(fingerprint);
        }
        Ok(())
    }
}

/// A connection in transmission: everything its loop keeps between requests.
struct Transmission<'a> {
    input: Input,
    replies: ReplyQueue,
    session: &'a Session,
    export: OpenExport,
    device: Arc<dyn BlockDevice>,
    /// Requests run on this thread (backends that never block), not on the
    /// worker pool.
    inline: bool,
    /// FLUSH and FUA wait for storage (see [`Self::may_run_here`]).
    durable: bool,
    /// Where error replies are counted; requests on the worker pool take
    /// a handle.
    errors: &'a Arc<ErrorSink>,
    cx: ReplyContext<'a>,
    header_len: usize,
    scratch: Scratch,
    /// Payloads too large for the input buffer (inline connections).
    big_payload: Vec<u8>,
    /// Requests read since the connection last waited for one: a client
    /// that sends one at a time waits for each reply (see
    /// [`crate::busy_poll`]).
    since_wait: u32,
    ctx: &'a ServerContext,
}

/// What the next request asks for.
enum Next {
    Execute(Request),
    /// Answer with an error without running it (its payload was skipped).
    Refuse {
        to: ReplyTo,
        errno: Errno,
        message: &'static str,
    },
    /// DISC, or a clean end of stream between requests.
    Disconnect,
}

/// A checked request whose payload (if any) is still to be received.
struct Request {
    cmd: Command,
    to: ReplyTo,
    payload_len: usize,
}

impl<'a> Transmission<'a> {
    fn new(
        input: Input,
        replies: ReplyQueue,
        session: &'a Session,
        errors: &'a Arc<ErrorSink>,
        export: OpenExport,
        ctx: &'a ServerContext,
    ) -> Self {
        let device = export.device.clone();
        Transmission {
            input,
            replies,
            session,
            inline: !device.capabilities().may_block,
            durable: device.capabilities().durable_flush,
            device,
            export,
            errors,
            cx: ReplyContext {
                mode: session.mode,
                base_allocation: session.base_allocation,
                errors,
            },
            header_len: request::request_len(session.mode),
            scratch: Scratch::default(),
            big_payload: Vec::new(),
            since_wait: 0,
            ctx,
        }
    }

    fn run(mut self) -> Result<(), ConnectionError> {
        let result = self.serve_requests();
        // DISC, EOF or error: whatever was answered goes out (unless the
        // client stopped reading), and the export is released only after
        // every request still running has finished.
        let flushed = match &result {
            Err(ConnectionError::TimedOut(_)) => Ok(()),
            _ => self.replies.flush(),
        };
        self.replies.wait_idle();
        self.replies.close();
        drop(self.export);
        result.and(flushed.map_err(ConnectionError::from))
    }

    fn serve_requests(&mut self) -> Result<(), ConnectionError> {
        loop {
            match self.next_request()? {
                Next::Execute(req) => self.dispatch(req)?,
                Next::Refuse { to, errno, message } => {
                    self.cx.errors.error_replied(errno);
                    reply::put_error(self.replies.batch(), self.cx.mode, to, errno, message)
                }
                Next::Disconnect => return Ok(()),
            }
            if self.replies.batch_is_full() {
                self.replies.flush()?;
            }
        }
    }

    /// Reads the next request header and checks it. A request that cannot
    /// run has its payload skipped here, so the stream stays in sync.
    fn next_request(&mut self) -> Result<Next, ConnectionError> {
        if !self.wait_for_header()? {
            return Ok(Next::Disconnect);
        }
        let header =
            RequestHeader::from_bytes(&self.input.buffered()[..self.header_len], self.cx.mode)
                .map_err(ConnectionError::Request)?;
        self.input.consume(self.header_len);
        self.since_wait += 1;
        let to = ReplyTo {
            cookie: header.cookie,
            offset: header.offset,
        };
        let payload_len = match header.payload_plan(self.cx.mode) {
            RequestPayload::None => 0,
            RequestPayload::Receive(n) => n as usize,
            RequestPayload::Discard(n) => {
                self.flush_before_waiting_for(n)?;
                self.input.discard(n)?;
                let refusal = refuse(to, Errno::Inval, "payload too large");
                log_refusal(&header, &refusal);
                return Ok(refusal);
            }
            RequestPayload::Disconnect => {
                return Err(ConnectionError::AbsurdPayload(header.length));
            }
        };
        self.flush_before_waiting_for(payload_len as u64)?;
        let refusal = if self.ctx.shutdown.is_started() {
            refuse(to, Errno::Shutdown, "server is shutting down")
        } else {
            match request::validate(&header, self.session) {
                Ok(Command::Disconnect) => return Ok(Next::Disconnect),
                Ok(cmd) => {
                    return Ok(Next::Execute(Request {
                        cmd,
                        to,
                        payload_len,
                    }))
                }
                Err(r) => refuse(to, r.errno, r.message),
            }
        };
        self.input.discard(payload_len as u64)?;
        log_refusal(&header, &refusal);
        Ok(refusal)
    }

    /// Makes sure a whole request header is buffered. Before waiting for
    /// the client, gathered replies are sent (so a burst of requests is
    /// answered in one write); after a while without input, buffers are
    /// given back. False on a clean end of stream.
    fn wait_for_header(&mut self) -> Result<bool, ConnectionError> {
        while self.input.buffered().len() < self.header_len {
            self.replies.flush()?;
            self.shrink_buffers();
            let requests_read = std::mem::take(&mut self.since_wait);
            match self
                .input
                .fill_request_or_idle(self.header_len, requests_read)?
            {
                Filled::Ready => {}
                Filled::End => return Ok(false),
                Filled::Idle => self.give_back_buffers(),
            }
        }
        Ok(true)
    }

    /// Sends the gathered replies if the rest of a request's `payload` is
    /// not here yet: the rest may be a while. The kernel's nbd driver, when
    /// a signal interrupts its send part-way, parks the request
    /// (`nsock->pending` in `nbd_send_cmd`, drivers/block/nbd.c) and
    /// finishes it on a later run of the block layer's queue; a client of
    /// its own may as well wait for a reply before sending more. Replies
    /// must not wait for that.
    fn flush_before_waiting_for(&mut self, payload: u64) -> io::Result<()> {
        if (self.input.buffered().len() as u64) < payload {
            self.replies.flush()?;
        }
        Ok(())
    }

    fn dispatch(&mut self, req: Request) -> Result<(), ConnectionError> {
        if self.inline {
            return self.execute_inline(req);
        }
        if self.may_run_here(&req) {
            if let Some(_slot) = self.ctx.workers.here() {
                return self.execute_inline(req);
            }
        }
        self.submit(req)
    }

    /// Whether a request for a backend that may block runs on this thread
    /// rather than a worker: the hand-off to a worker and back costs two
    /// thread wake-ups, most of a round trip when the client waits for each
    /// reply (queue depth 1, an fsync in a build). Only when nothing can be
    /// held up by it: no further request is already here, nothing of this
    /// connection is running or waiting to be sent (so the reply, sent
    /// without waiting, overtakes nothing), it is small, and it does not
    /// wait for durable storage (a real FLUSH or FUA takes far longer than
    /// the hand-off, and requests arriving meanwhile should not wait for it).
    fn may_run_here(&self, req: &Request) -> bool {
        // What the storage call touches: a TRIM or zeroing of gigabytes
        // has no payload but may take long on a file.
        let size = match req.cmd {
            Command::Read { len, .. } => u64::from(len),
            Command::Trim { len, .. }
            | Command::WriteZeroes { len, .. }
            | Command::Cache { len, .. } => len,
            _ => req.payload_len as u64,
        };
        let small = size <= RUN_HERE_MAX as u64;
        let waits_for_disk = self.durable
            && match req.cmd {
                Command::Flush => true,
                Command::Write { fua, .. }
                | Command::Trim { fua, .. }
                | Command::WriteZeroes { fua, .. } => fua,
                _ => false,
            };
        small
            && !waits_for_disk
            && self.input.buffered().len() <= req.payload_len
            && self.replies.is_idle()
    }

    /// Runs a request on this thread; its reply joins the gathered ones
    /// (sent before the thread next waits for the client; on a pooled
    /// connection, without waiting for it).
    fn execute_inline(&mut self, req: Request) -> Result<(), ConnectionError> {
        let Request {
            cmd,
            to,
            payload_len,
        } = req;
        if let (Command::Write { offset, fua, .. }, true) = (cmd, payload_len > INPUT_BUFFER) {
            let written = executor::write_in_place(
                self.device.as_ref(),
                (offset, payload_len, fua),
                &mut self.input,
                self.cx,
                to,
                self.replies.batch(),
            );
            if let Some(result) = written {
                return Ok(result?);
            }
        }
        let payload = receive(&mut self.input, &mut self.big_payload, payload_len)?;
        executor::execute(
            self.device.as_ref(),
            cmd,
            payload,
            self.cx,
            to,
            &mut self.replies.output(),
            &mut self.scratch,
        )?;
        if payload_len <= INPUT_BUFFER {
            self.input.consume(payload_len);
        }
        Ok(())
    }

    /// Hands a request to the worker pool, once its connection has room for
    /// it (see [`crate::replies`]).
    fn submit(&mut self, req: Request) -> Result<(), ConnectionError> {
        let Request {
            cmd,
            to,
            payload_len,
        } = req;
        let reply_len = match cmd {
            Command::Read { len, .. } => len as usize,
            _ => 0,
        };
        // Replies gathered so far (refusals) go first: the worker's may be quick.
        self.replies.flush()?;
        let ticket = self
            .replies
            .admit(payload_len + reply_len + REPLY_OVERHEAD)?;
        let payload = if payload_len <= INPUT_BUFFER {
            let payload = receive(&mut self.input, &mut self.big_payload, payload_len)?.to_vec();
            self.input.consume(payload_len);
            payload
        } else {
            // A large payload gets a buffer of its own, which moves to the job.
            let mut payload = vec![0; payload_len];
            self.input.read_exact(&mut payload)?;
            payload
        };
        let job = PoolRequest {
            device: self.device.clone(),
            cmd,
            mode: self.cx.mode,
            base_allocation: self.cx.base_allocation,
            errors: self.errors.clone(),
            to,
            payload,
            ticket,
        };
        self.ctx.workers.submit(move || job.run());
        Ok(())
    }

    /// Buffers grown by a huge request are not kept while waiting.
    fn shrink_buffers(&mut self) {
        self.replies.shrink(KEEP_BUFFER);
        if self.big_payload.capacity() > KEEP_BUFFER {
            self.big_payload = Vec::new();
        }
    }

    /// The client is idle: give the buffers' pages back to the system.
    fn give_back_buffers(&mut self) {
        self.replies.give_back();
        self.big_payload.clear();
        give_back_vec(&mut self.big_payload);
    }
}

fn refuse(to: ReplyTo, errno: Errno, message: &'static str) -> Next {
    Next::Refuse { to, errno, message }
}

/// Refused requests (over-size, out of range, bad flags, shutdown) are
/// logged at debug level: the client only sees an errno.
fn log_refusal(header: &RequestHeader, refusal: &Next) {
    if let Next::Refuse { errno, message, .. } = refusal {
        debug!(
            cookie = header.cookie,
            command = scratchd_proto::consts::command_name(header.kind),
            flags = header.flags,
            offset = header.offset,
            length = header.length,
            errno = *errno as u32,
            reason = message,
            "request refused"
        );
    }
}

/// Receives a payload of `len` bytes: left in the input buffer when it fits
/// there (the caller consumes it once used), else read into `big`.
fn receive<'b>(input: &'b mut Input, big: &'b mut Vec<u8>, len: usize) -> io::Result<&'b [u8]> {
    if len <= INPUT_BUFFER {
        if !input.fill(len)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        return Ok(&input.buffered()[..len]);
    }
    big.resize(len, 0);
    input.read_exact(big)?;
    Ok(big)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::io::{Read, Write};
    use std::time::Duration;

    use scratchd_proto::consts::*;

    use super::*;
    use crate::busy_poll::BusyPolling;
    use crate::testing::{
        connect, eventually, request, Peer, Setup, SimpleReply, TestDevice, DISK,
    };

    const EINVAL: u32 = 22;
    const ENOSPC: u32 = 28;

    fn ok(cookie: u64) -> SimpleReply {
        SimpleReply { error: 0, cookie }
    }

    fn failed(error: u32, cookie: u64) -> SimpleReply {
        SimpleReply { error, cookie }
    }

    /// A server over `device`, and a client of it in transmission.
    fn open(device: TestDevice) -> (Peer, std::thread::JoinHandle<()>, Arc<ServerContext>) {
        let ctx = Setup::single(Arc::new(device)).context();
        let (mut peer, served) = connect(&ctx);
        assert_eq!(peer.open("disk").0, DISK);
        (peer, served, ctx)
    }

    /// Sends DISC and checks that the server closes without another byte.
    fn disconnect(mut peer: Peer, served: std::thread::JoinHandle<()>) {
        peer.send(&request(CMD_DISC, 0, 99, 0, 0, &[]));
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
    }

    fn failures(ctx: &ServerContext, reason: &str) -> u64 {
        let all = ctx.counters.handshake_failures();
        all.iter().find(|(r, _)| *r == reason).unwrap().1
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_inline() {
        let (mut peer, served, _ctx) = open(TestDevice::new(false));
        let data = vec![0xab; 4096];
        let mut burst = request(CMD_WRITE, 0, 1, 8192, 4096, &data);
        burst.extend(request(CMD_READ, 0, 2, 8192, 4096, &[]));
        burst.extend(request(CMD_FLUSH, 0, 3, 0, 0, &[]));
        burst.extend(request(CMD_READ, 0, 4, 0, 16, &[]));
        peer.send(&burst);
        assert_eq!(peer.reply(), ok(1));
        assert_eq!(peer.reply(), ok(2));
        assert_eq!(peer.read_exact(4096), data);
        assert_eq!(peer.reply(), ok(3));
        assert_eq!(peer.reply(), ok(4));
        assert_eq!(peer.read_exact(16), [0; 16]);
        disconnect(peer, served);
    }

    /// A server whose connections busy-poll, with a limit no test reaches.
    fn busy_polled() -> Arc<ServerContext> {
        let mut setup = Setup::single(Arc::new(TestDevice::new(false)));
        setup.busy_polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        setup.context()
    }

    /// Reads of 16 bytes, each sent once the previous reply is read.
    fn lone_reads(peer: &mut Peer, cookies: std::ops::Range<u64>) {
        for cookie in cookies {
            peer.send(&request(CMD_READ, 0, cookie, 0, 16, &[]));
            assert_eq!(peer.reply(), ok(cookie));
            peer.read_exact(16);
        }
    }

    /// A client that sends one request and waits for its reply is spun
    /// for; one that sends several at once is not, even when they come as
    /// quickly, and it takes several lone requests to be spun for again.
    #[test]
    fn only_a_wait_after_a_lone_request_spins() {
        let ctx = busy_polled();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        let spins = || {
            let (caught, missed) = ctx.busy_polling.outcomes();
            caught + missed
        };
        // Pairs of requests: after each pair the server sleeps.
        for cookie in (0..10).step_by(2) {
            let mut two = request(CMD_READ, 0, cookie, 0, 16, &[]);
            two.extend(request(CMD_READ, 0, cookie + 1, 0, 16, &[]));
            peer.send(&two);
            for c in [cookie, cookie + 1] {
                assert_eq!(peer.reply(), ok(c));
                peer.read_exact(16);
            }
        }
        assert_eq!(spins(), 0, "spun for a client with two in flight");
        lone_reads(&mut peer, 10..30);
        // The pairs brought the score to the bottom; each lone request
        // that came quickly adds one, and waits spin from SPIN_AT: the
        // waits after requests 10 + SPIN_AT - 1 to 28 (the one after 29
        // still spins, for the DISC below).
        let spun = 20 - crate::busy_poll::SPIN_AT as u64;
        assert_eq!(ctx.busy_polling.outcomes(), (spun, 0));
        disconnect(peer, served);
    }

    /// The rest of a request (a payload sent after its header) is spun for
    /// on a connection whose requests come quickly, and only there.
    #[test]
    fn the_rest_of_a_payload_is_spun_for_where_requests_come_quickly() {
        let ctx = busy_polled();
        let split_write = |peer: &mut Peer, cookie| {
            peer.send(&request(CMD_WRITE, 0, cookie, 0, 4096, &[]));
            std::thread::sleep(Duration::from_millis(20));
            peer.send(&[7; 4096]);
            assert_eq!(peer.reply(), ok(cookie));
        };
        // A new connection is not spun for, its payloads neither.
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        split_write(&mut peer, 1);
        assert_eq!(ctx.busy_polling.outcomes(), (0, 0));
        disconnect(peer, served);
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        let lone = crate::busy_poll::SPIN_AT as u64 + 2;
        lone_reads(&mut peer, 0..lone);
        // The waits after reads SPIN_AT - 1 up to the last spin and catch
        // the next request (the last one, the write's header); then the
        // wait for the write's payload spins and catches it.
        split_write(&mut peer, 100);
        let spun = lone - (crate::busy_poll::SPIN_AT as u64 - 1);
        assert_eq!(ctx.busy_polling.outcomes(), (spun + 1, 0));
        disconnect(peer, served);
    }

    #[test]
    fn pooled_requests_are_each_answered_once_with_their_data() {
        let (mut peer, served, _ctx) = open(TestDevice::new(true));
        let data: Vec<u8> = (0..65536u32).map(|i| i as u8).collect();
        peer.send(&request(CMD_WRITE, 0, 1, 0, data.len() as u32, &data));
        assert_eq!(peer.reply(), ok(1));
        let mut burst = Vec::new();
        for cookie in 10..40 {
            burst.extend(request(CMD_FLUSH, 0, cookie, 0, 0, &[]));
        }
        peer.send(&burst);
        let answered: BTreeSet<u64> = (10..40).map(|_| peer.reply().cookie).collect();
        assert_eq!(answered, (10..40).collect());
        peer.send(&request(CMD_READ, 0, 2, 0, data.len() as u32, &[]));
        assert_eq!(peer.reply(), ok(2));
        assert_eq!(peer.read_exact(data.len()), data);
        disconnect(peer, served);
    }

    #[test]
    fn a_lone_request_of_a_blocking_backend_runs_on_the_connection_thread() {
        let device = Arc::new(TestDevice::new(true));
        let ctx = Setup::single(device.clone()).context();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        for cookie in 1..4 {
            peer.send(&request(CMD_WRITE, 0, cookie, 0, 512, &[7; 512]));
            assert_eq!(peer.reply(), ok(cookie));
            assert!(!device.gate().last_on_worker(), "request {cookie}");
        }
        peer.send(&request(CMD_READ, 0, 4, 0, 512, &[]));
        assert_eq!(peer.reply(), ok(4));
        assert_eq!(peer.read_exact(512), [7; 512]);
        assert!(!device.gate().last_on_worker());
        disconnect(peer, served);
    }

    #[test]
    fn long_or_durable_requests_go_to_the_pool_even_alone() {
        let mut device = TestDevice::new(true);
        device.durable = true;
        let device = Arc::new(device);
        let ctx = Setup::single(device.clone()).context();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        let on_worker = |peer: &mut Peer, req: Vec<u8>, cookie: u64| {
            peer.send(&req);
            assert_eq!(peer.reply(), ok(cookie));
            device.gate().last_on_worker()
        };
        let zero_all = request(CMD_WRITE_ZEROES, 0, 1, 0, DISK as u32, &[]);
        assert!(on_worker(&mut peer, zero_all, 1), "a long zeroing");
        let trim_all = request(CMD_TRIM, 0, 2, 0, DISK as u32, &[]);
        assert!(on_worker(&mut peer, trim_all, 2), "a long trim");
        let flush = request(CMD_FLUSH, 0, 3, 0, 0, &[]);
        assert!(on_worker(&mut peer, flush, 3), "a durable flush");
        let fua = request(CMD_WRITE, CMD_FLAG_FUA, 4, 0, 512, &[1; 512]);
        assert!(on_worker(&mut peer, fua, 4), "a durable FUA write");
        let plain = request(CMD_WRITE, 0, 5, 0, 512, &[1; 512]);
        assert!(!on_worker(&mut peer, plain, 5), "a small plain write");
        disconnect(peer, served);
    }

    #[test]
    fn requests_go_to_the_pool_while_another_is_running() {
        let device = Arc::new(TestDevice::new(true));
        let ctx = Setup {
            workers: 4,
            ..Setup::single(device.clone())
        }
        .context();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        device.gate().close();
        // Two at once: the first sees the second waiting, so both go to
        // workers; then one alone, while they still run: it must not hold
        // the connection's thread either, or the fourth is never read.
        let mut burst = request(CMD_FLUSH, 0, 1, 0, 0, &[]);
        burst.extend(request(CMD_FLUSH, 0, 2, 0, 0, &[]));
        peer.send(&burst);
        eventually("two running", || device.gate().inside() == 2);
        peer.send(&request(CMD_FLUSH, 0, 3, 0, 0, &[]));
        eventually("three running", || device.gate().inside() == 3);
        peer.send(&request(CMD_FLUSH, 0, 4, 0, 0, &[]));
        eventually("four running", || device.gate().inside() == 4);
        device.gate().open();
        let answered: BTreeSet<u64> = (1..5).map(|_| peer.reply().cookie).collect();
        assert_eq!(answered, (1..5).collect());
        disconnect(peer, served);
    }

    #[test]
    fn a_refused_request_has_its_payload_skipped_and_the_stream_stays_in_sync() {
        for pooled in [false, true] {
            let (mut peer, served, _ctx) = open(TestDevice::new(pooled));
            let mut burst = request(CMD_WRITE, 0, 1, DISK, 512, &[7; 512]);
            // A flag WRITE does not take.
            burst.extend(request(CMD_WRITE, CMD_FLAG_DF, 2, 0, 512, &[7; 512]));
            burst.extend(request(CMD_READ, 0, 3, 0, 512, &[]));
            peer.send(&burst);
            assert_eq!(peer.reply(), failed(ENOSPC, 1), "pooled: {pooled}");
            assert_eq!(peer.reply(), failed(EINVAL, 2));
            assert_eq!(peer.reply(), ok(3));
            assert_eq!(peer.read_exact(512), [0; 512]);
            disconnect(peer, served);
        }
    }

    #[test]
    fn an_oversize_payload_is_skipped_and_refused() {
        let (mut peer, served, _ctx) = open(TestDevice::new(false));
        let len = request::MAX_PAYLOAD + 1;
        peer.send(&request(CMD_WRITE, 0, 1, 0, len, &[]));
        // The client writes its payload while the server skips it.
        let mut writer = peer.0.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let chunk = vec![1u8; 1 << 20];
            let mut left = len as usize;
            while left > 0 {
                let n = left.min(chunk.len());
                writer.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
            writer
                .write_all(&request(CMD_FLUSH, 0, 2, 0, 0, &[]))
                .unwrap();
        });
        assert_eq!(peer.reply(), failed(EINVAL, 1));
        assert_eq!(peer.reply(), ok(2));
        sender.join().unwrap();
        disconnect(peer, served);
    }

    /// A client may send a WRITE's header and part of its payload, and the
    /// rest only later (see `flush_before_waiting_for`): the replies before
    /// it must not wait with it. Inline and pooled, for a payload received
    /// or one skipped.
    #[test]
    fn replies_leave_before_the_server_waits_for_the_rest_of_a_payload() {
        let oversize = request::MAX_PAYLOAD + 1;
        for may_block in [false, true] {
            for (len, answer) in [(4096, ok(2)), (oversize, failed(EINVAL, 2))] {
                let (mut peer, served, _ctx) = open(TestDevice::new(may_block));
                let mut burst = request(CMD_READ, 0, 1, 0, 512, &[]);
                burst.extend(request(CMD_WRITE, 0, 2, 0, len, &[7; 100]));
                peer.send(&burst);
                assert_eq!(peer.reply(), ok(1), "may_block {may_block}, len {len}");
                assert_eq!(peer.read_exact(512), [0; 512]);
                let rest = vec![7; len as usize - 100];
                let mut writer = peer.0.try_clone().unwrap();
                let sender = std::thread::spawn(move || writer.write_all(&rest).unwrap());
                assert_eq!(peer.reply(), answer);
                sender.join().unwrap();
                disconnect(peer, served);
            }
        }
    }

    #[test]
    fn an_absurd_payload_ends_the_connection() {
        let (mut peer, served, _ctx) = open(TestDevice::new(false));
        peer.send(&request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]));
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
    }

    #[test]
    fn a_storage_error_becomes_an_error_reply_charged_to_the_export() {
        let mut device = TestDevice::new(false);
        device.fail_writes = Some(ENOSPC as i32);
        let export = crate::SingleExport::new("disk".into(), None, Arc::new(device), false);
        let errors = export.errors();
        let ctx = Setup::new(Arc::new(export)).context();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        peer.send(&request(CMD_WRITE, 0, 1, 0, 512, &[1; 512]));
        assert_eq!(peer.reply(), failed(ENOSPC, 1));
        peer.send(&request(CMD_WRITE, 0, 2, DISK - 1, 512, &[1; 512]));
        assert_eq!(peer.reply(), failed(ENOSPC, 2));
        let counts = errors.by_errno();
        let enospc = counts.iter().find(|(name, _)| *name == "ENOSPC").unwrap().1;
        // The refusal (past the end) and the storage error both count.
        assert_eq!(enospc, 2);
        disconnect(peer, served);
    }

    #[test]
    fn no_more_requests_run_at_once_than_a_connection_may_have_in_flight() {
        let device = Arc::new(TestDevice::new(true));
        let ctx = Setup {
            workers: crate::replies::MAX_IN_FLIGHT + 8,
            ..Setup::single(device.clone())
        }
        .context();
        let (mut peer, served) = connect(&ctx);
        peer.open("disk");
        device.gate().close();
        let total = crate::replies::MAX_IN_FLIGHT as u64 + 20;
        let burst: Vec<u8> = (0..total)
            .flat_map(|cookie| request(CMD_FLUSH, 0, cookie, 0, 0, &[]))
            .collect();
        peer.send(&burst);
        let limit = crate::replies::MAX_IN_FLIGHT;
        eventually("the in-flight limit", || device.gate().inside() == limit);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(device.gate().most_inside(), limit);
        device.gate().open();
        let answered: BTreeSet<u64> = (0..total).map(|_| peer.reply().cookie).collect();
        assert_eq!(answered, (0..total).collect());
        disconnect(peer, served);
    }

    #[test]
    fn a_refused_export_ends_the_handshake_and_counts_as_refused() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        peer.option(OPT_EXPORT_NAME, b"nope");
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
        assert_eq!(failures(&ctx, "refused"), 1);
    }

    #[test]
    fn a_failed_go_keeps_negotiating() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        let go = |name: &str| {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&0u16.to_be_bytes());
            data
        };
        peer.option(OPT_GO, &go("nope"));
        let (option, reply_type, _) = peer.option_reply();
        assert_eq!((option, reply_type), (OPT_GO, OptError::Unknown as u32));
        peer.option(OPT_GO, &go("disk"));
        loop {
            let (_, reply_type, _) = peer.option_reply();
            if reply_type == REP_ACK {
                break;
            }
            assert_eq!(reply_type, REP_INFO);
        }
        peer.send(&request(CMD_FLUSH, 0, 5, 0, 0, &[]));
        assert_eq!(peer.reply(), ok(5));
        disconnect(peer, served);
    }

    #[test]
    fn a_client_that_is_not_nbd_is_counted_as_malformed() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        peer.send(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
        assert_eq!(failures(&ctx, "malformed"), 1);
    }

    #[test]
    fn a_client_gone_mid_handshake_is_counted_as_gone() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        peer.send(b"IHAVE");
        drop(peer);
        served.join().unwrap();
        assert_eq!(failures(&ctx, "client_gone"), 1);
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let ctx = Setup {
            handshake_timeout: Duration::from_millis(100),
            ..Setup::single(Arc::new(TestDevice::new(false)))
        }
        .context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
        assert_eq!(failures(&ctx, "timeout"), 1);
    }

    #[test]
    fn a_client_dripping_its_handshake_is_cut_at_the_deadline() {
        let ctx = Setup {
            handshake_timeout: Duration::from_millis(400),
            ..Setup::single(Arc::new(TestDevice::new(false)))
        }
        .context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        let started = std::time::Instant::now();
        // An option header one byte every 100 ms: each read is answered
        // well within the per-read timeout, the whole never ends.
        for byte in b"IHAVEOPT\0\0\0\x01\0\0\x10\0".iter().cycle() {
            if served.is_finished() || started.elapsed() > Duration::from_secs(5) {
                break;
            }
            let _ = peer.0.write_all(&[*byte]);
            std::thread::sleep(Duration::from_millis(100));
        }
        served.join().unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "not cut off: {took:?}");
        assert_eq!(failures(&ctx, "timeout"), 1);
    }

    #[test]
    fn a_client_that_never_stops_sending_options_is_dropped() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        let mut answered = 0;
        // An option nobody knows: one error reply each, 20 bytes and a
        // message.
        for _ in 0..MAX_OPTIONS + 10 {
            // The last ones find the connection closed.
            let _ = peer.0.write_all(b"IHAVEOPT\0\0\x77\x77\0\0\0\0");
            let mut header = [0u8; 20];
            if peer.0.read_exact(&mut header).is_err() {
                break;
            }
            let len = u32::from_be_bytes(header[16..].try_into().unwrap());
            peer.read_exact(len as usize);
            answered += 1;
        }
        assert_eq!(answered, MAX_OPTIONS);
        served.join().unwrap();
        assert_eq!(failures(&ctx, "malformed"), 1);
    }

    #[test]
    fn an_abort_closes_without_counting_a_failure() {
        let ctx = Setup::single(Arc::new(TestDevice::new(false))).context();
        let (mut peer, served) = connect(&ctx);
        peer.greet();
        peer.option(OPT_ABORT, &[]);
        assert_eq!(peer.option_reply().1, REP_ACK);
        assert_eq!(peer.read_to_end().unwrap(), b"");
        served.join().unwrap();
    }
}
