//! [`Client`]: one export over one or more connections, as a
//! [`BlockDevice`].
//!
//! The client opens the first connection and negotiates; when the server
//! advertises `CAN_MULTI_CONN` it opens up to [`Options::connections`] in
//! all, each negotiated the same way, and spreads requests over them round
//! robin. (Without multi-conn, the spec gives no guarantee that a write on
//! one connection is seen by a read on another, so one connection it is.)
//!
//! Requests larger than the server's maximum payload are split; the pieces
//! go out pipelined across the connections, at most [`WINDOW`] per
//! connection per call, so a huge read does not allocate the whole range
//! in reply buffers at once.
//!
//! What the server did not advertise is handled here rather than sent:
//! writes to a read-only export fail with EPERM, trim without `SEND_TRIM`
//! and flush without `SEND_FLUSH` succeed as no-ops (both are hints or
//! promises the server cannot keep anyway), zeroing without
//! `SEND_WRITE_ZEROES` writes zeros, FUA without `SEND_FUA` becomes a
//! flush, extents without `base:allocation` are one data extent.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use scratchd_proto::consts::*;
use scratchd_proto::negotiation::ReplyMode;
use scratchd_proto::snapshots::{SnapshotAnswer, SnapshotRequest};
use scratchd_proto::TransmissionFlags as F;
use scratchd_store::{
    check_range, push_extent, BlockDevice, Capabilities, Extent, ExtentKind, ZeroFlags,
};
use tracing::debug;

use crate::connection::{Callback, Connection, Reply, Request, Settings, Ticket};
use crate::error::Error;
use crate::handshake::{greet, negotiate, start_tls, ExportInfo, Replies, Wanted};
use crate::transport::Stream;
use crate::uri::{Address, Target};

/// Pieces of one split request in flight at once, per connection.
pub const WINDOW: usize = 4;

/// Longest TRIM, WRITE_ZEROES, CACHE or BLOCK_STATUS range sent in one
/// request: these carry no payload, but compact headers have 32-bit lengths
/// and servers handle huge ranges unevenly.
const MAX_RANGE: u64 = 1 << 30;

/// How to connect.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections to open when the server allows multi-conn (at least 1).
    pub connections: usize,
    /// The richest reply framing to ask for.
    pub replies: Replies,
    /// Select `base:allocation`, so that extents come from the server.
    pub block_status: bool,
    /// Requests in flight per connection; more callers wait for a slot.
    pub max_in_flight: usize,
    /// A request not answered within this time fails with `TimedOut`, and
    /// its connection is closed (so are requests waiting for a slot or a
    /// write to go out). `None`: wait as long as the server lives.
    pub request_timeout: Option<Duration>,
    /// Limit on connecting and negotiating.
    pub handshake_timeout: Option<Duration>,
    /// If the export's disk is made by this connection, it starts as this
    /// snapshot (scratchd's `OPT_SCRATCHD_FROM`; other servers refuse).
    pub from: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connections: 1,
            replies: Replies::Extended,
            block_status: true,
            max_in_flight: 64,
            request_timeout: None,
            handshake_timeout: Some(Duration::from_secs(30)),
            from: None,
        }
    }
}

/// Negotiated sockets, not yet in transmission: for handing to the kernel's
/// nbd driver (which speaks simple replies only: negotiate them with
/// [`Replies::Simple`]).
#[derive(Debug)]
pub struct Handshaken {
    pub info: ExportInfo,
    /// One per connection; all negotiated alike.
    pub streams: Vec<Stream>,
}

impl Handshaken {
    /// The raw sockets.
    /// The sockets; `None` when they carry TLS, which the kernel cannot
    /// take over.
    pub fn into_fds(self) -> Option<Vec<OwnedFd>> {
        self.streams.into_iter().map(Stream::into_fd).collect()
    }
}

/// An NBD export, reached over one or more connections; usable from many
/// threads at once.
pub struct Client {
    info: ExportInfo,
    /// The server's address, for messages.
    address: String,
    connections: Vec<Connection>,
    /// Round-robin position.
    next: AtomicUsize,
    /// [`Options::request_timeout`], for those who wait on its behalf.
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("info", &self.info)
            .field("connections", &self.connections.len())
            .finish()
    }
}

impl Client {
    /// Connects to the export a URI names, with default [`Options`].
    pub fn connect(uri: &str) -> Result<Client, Error> {
        Client::connect_with(&Target::parse(uri)?, &Options::default())
    }

    /// Connects to `target`: handshake, then transmission on every
    /// connection.
    pub fn connect_with(target: &Target, options: &Options) -> Result<Client, Error> {
        let Handshaken { info, streams } = Client::handshake_only(target, options)?;
        let address = target.address.to_string();
        let settings = Settings {
            mode: info.mode,
            base_allocation: info.base_allocation,
            max_in_flight: options.max_in_flight.max(1),
            timeout: options.request_timeout,
        };
        let connections = streams
            .into_iter()
            .map(|s| Connection::start(s, settings))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|source| Error::Io {
                address: address.clone(),
                source,
            })?;
        Ok(Client {
            info,
            address,
            connections,
            next: AtomicUsize::new(0),
            timeout: options.request_timeout,
        })
    }

    /// Connects and negotiates every connection, and stops there.
    pub fn handshake_only(target: &Target, options: &Options) -> Result<Handshaken, Error> {
        let (info, first) = open(target, options)?;
        let wanted = match info.multi_conn() {
            true => options.connections.max(1),
            false => 1,
        };
        if wanted < options.connections {
            debug!(export = target.export, "no multi-conn: one connection");
        }
        let mut streams = vec![first];
        for index in 1..wanted {
            let (other, stream) = open(target, options)?;
            if other != info {
                return Err(Error::Inconsistent {
                    address: target.address.to_string(),
                    index,
                });
            }
            streams.push(stream);
        }
        Ok(Handshaken { info, streams })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Connections in use (1 unless the server allows multi-conn).
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Why a connection to the server broke, once one has (the server went
    /// away, the network failed): requests on it fail from then on. For
    /// callers that hold a client for long and want to say so.
    pub fn lost(&self) -> Option<String> {
        self.connections.iter().find_map(Connection::lost)
    }

    /// Disconnects every connection cleanly (DISC); dropping the client
    /// does the same, without the errors.
    pub fn close(mut self) -> io::Result<()> {
        let mut result = Ok(());
        for c in &mut self.connections {
            let r = c.disconnect();
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Reads `len` bytes at `offset` into a new buffer (for callers that
    /// want to own the data: no copy when one request suffices).
    pub fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_range(self.info.size, offset, len as u64)?;
        if len > 0 && len <= self.info.max_payload() as usize {
            return Ok(self
                .submit(CMD_READ, 0, offset, len as u64, &[])?
                .wait()?
                .data);
        }
        let mut buf = vec![0; len];
        self.read(offset, &mut buf)?;
        Ok(buf)
    }

    /// Requests sent on every connection and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.connections.iter().map(Connection::in_flight).sum()
    }

    /// [`Options::request_timeout`].
    pub fn request_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Closes every connection at once, failing whatever is in flight: for
    /// a waiter that gave up on the server.
    pub(crate) fn abort(&self) {
        self.connections.iter().for_each(Connection::abort);
    }

    /// Sends one request carrying `payload` (at most the maximum payload)
    /// without waiting for its reply, which goes to `call` (see
    /// [`Connection::submit_then`]).
    pub(crate) fn submit_then(
        &self,
        command: u16,
        offset: u64,
        payload: &[u8],
        call: Callback,
    ) -> io::Result<()> {
        let request = Request {
            command,
            flags: 0,
            offset,
            len: payload.len() as u64,
            payload,
        };
        self.pick().submit_then(&request, call)
    }

    fn pick(&self) -> &Connection {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.connections[i % self.connections.len()]
    }

    fn submit(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> io::Result<Ticket> {
        self.pick().submit(&Request {
            command,
            flags,
            offset,
            len,
            payload,
        })
    }

    /// Sends `[offset, offset + len)` in pieces of at most `max` bytes,
    /// `submit` making each request, and hands each reply to `finish` in
    /// order, keeping a bounded window in flight.
    fn pipelined(
        &self,
        offset: u64,
        len: u64,
        max: u64,
        mut submit: impl FnMut(u64, u64) -> io::Result<Ticket>,
        mut finish: impl FnMut(u64, Reply) -> io::Result<()>,
    ) -> io::Result<()> {
        let window = WINDOW * self.connections.len();
        let mut queue: VecDeque<(u64, Ticket)> = VecDeque::new();
        for (piece, piece_len) in pieces(offset, len, max) {
            if queue.len() == window {
                if let Some((at, ticket)) = queue.pop_front() {
                    finish(at, ticket.wait()?)?;
                }
            }
            queue.push_back((piece, submit(piece, piece_len)?));
        }
        while let Some((at, ticket)) = queue.pop_front() {
            finish(at, ticket.wait()?)?;
        }
        Ok(())
    }

    /// A command without payload over a range, split at [`MAX_RANGE`].
    fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        self.pipelined(
            offset,
            len,
            MAX_RANGE,
            |at, n| self.submit(command, flags, at, n, &[]),
            |_, _| Ok(()),
        )
    }

    fn writable(&self) -> io::Result<()> {
        match self.info.read_only() {
            true => Err(io::Error::from_raw_os_error(libc::EPERM)),
            false => Ok(()),
        }
    }

    /// The FUA flag when the server takes it; otherwise whether a flush
    /// must follow.
    fn fua(&self, fua: bool) -> (u16, bool) {
        match (fua, self.info.has(F::SEND_FUA)) {
            (true, true) => (CMD_FLAG_FUA, false),
            (true, false) => (0, true),
            (false, _) => (0, false),
        }
    }

    fn flush_if(&self, needed: bool) -> io::Result<()> {
        if needed {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes_by_writing(&self, offset: u64, len: u64, flags: u16) -> io::Result<()> {
        let max = u64::from(self.info.max_payload());
        let zeros = vec![0u8; len.min(max) as usize];
        self.pipelined(
            offset,
            len,
            max,
            |at, n| self.submit(CMD_WRITE, flags, at, n, &zeros[..n as usize]),
            |_, _| Ok(()),
        )
    }

    /// One BLOCK_STATUS round: appends extents from `offset` on and returns
    /// how many bytes they cover (at most `len`, at least 1).
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<Extent>,
        first: usize,
    ) -> io::Result<u64> {
        let reply = self
            .submit(CMD_BLOCK_STATUS, 0, offset, len.min(MAX_RANGE), &[])?
            .wait()?;
        let mut covered = 0;
        for d in reply.extents {
            let n = d.len.min(len - covered);
            let kind = match d.status & STATE_ZERO {
                0 => ExtentKind::Data,
                _ => ExtentKind::Hole,
            };
            push_extent(out, first, n, kind);
            covered += n;
            if covered == len {
                break;
            }
        }
        if covered == 0 {
            debug!(offset, len, "block status covered nothing");
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(covered)
    }
}

impl BlockDevice for Client {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.info.read_only(),
            durable_flush: self.info.has(F::SEND_FLUSH),
            trim: self.info.has(F::SEND_TRIM),
            fast_zero: self.info.has(F::SEND_WRITE_ZEROES) && self.info.has(F::SEND_FAST_ZERO),
            multi_conn: self.info.multi_conn(),
            may_block: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.info.size, offset, buf.len() as u64)?;
        let max = u64::from(self.info.max_payload());
        let filled = &mut *buf;
        self.pipelined(
            offset,
            filled.len() as u64,
            max,
            |at, n| self.submit(CMD_READ, 0, at, n, &[]),
            |at, reply| {
                let start = (at - offset) as usize;
                filled[start..start + reply.data.len()].copy_from_slice(&reply.data);
                Ok(())
            },
        )
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        check_range(self.info.size, offset, data.len() as u64)?;
        self.writable()?;
        let (flags, then_flush) = self.fua(fua);
        let max = u64::from(self.info.max_payload());
        self.pipelined(
            offset,
            data.len() as u64,
            max,
            |at, n| {
                let start = (at - offset) as usize;
                self.submit(CMD_WRITE, flags, at, n, &data[start..start + n as usize])
            },
            |_, _| Ok(()),
        )?;
        self.flush_if(then_flush && !data.is_empty())
    }

    /// With multi-conn, a flush on one connection covers writes completed
    /// on all of them (the spec's promise behind `CAN_MULTI_CONN`).
    fn flush(&self) -> io::Result<()> {
        if !self.info.has(F::SEND_FLUSH) {
            return Ok(());
        }
        self.submit(CMD_FLUSH, 0, 0, 0, &[])?.wait().map(drop)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        check_range(self.info.size, offset, len)?;
        self.writable()?;
        if !self.info.has(F::SEND_TRIM) || len == 0 {
            return Ok(());
        }
        let (flags, then_flush) = self.fua(fua);
        self.ranged(CMD_TRIM, flags, offset, len)?;
        self.flush_if(then_flush)
    }

    fn zero(&self, offset: u64, len: u64, zf: ZeroFlags, fua: bool) -> io::Result<()> {
        check_range(self.info.size, offset, len)?;
        self.writable()?;
        let native = self.info.has(F::SEND_WRITE_ZEROES);
        if zf.fast && !(native && self.info.has(F::SEND_FAST_ZERO)) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if len == 0 {
            return Ok(());
        }
        let (mut flags, then_flush) = self.fua(fua);
        if !native {
            self.write_zeroes_by_writing(offset, len, flags)?;
            return self.flush_if(then_flush);
        }
        if !zf.may_trim {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if zf.fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)?;
        self.flush_if(then_flush)
    }

    /// From `base:allocation`: a run reads as zeros (a hole here) when the
    /// server sets its ZERO bit; an unallocated run without it may hold
    /// anything, so it counts as data.
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        check_range(self.info.size, offset, len)?;
        let first = out.len();
        if self.info.base_allocation.is_none() || self.info.mode == ReplyMode::Simple {
            push_extent(out, first, len, ExtentKind::Data);
            return Ok(());
        }
        let mut pos = offset;
        while pos < offset + len {
            pos += self.block_status(pos, offset + len - pos, out, first)?;
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.info.size, offset, len)?;
        if !self.info.has(F::SEND_CACHE) || len == 0 {
            return Ok(());
        }
        self.ranged(CMD_CACHE, 0, offset, len)
    }
}

/// Connects and negotiates one connection.
fn open(target: &Target, options: &Options) -> Result<(ExportInfo, Stream), Error> {
    let (mut stream, no_zeroes) = greeted(target, options)?;
    let address = target.address.to_string();
    let want = Wanted {
        replies: options.replies,
        block_status: options.block_status,
        from: options.from.as_deref(),
    };
    let info = negotiate(&mut stream, &address, &target.export, no_zeroes, &want)?;
    Ok((info, stream))
}

/// Sends one of scratchd's snapshot requests to the server `target` names
/// (its export name is not used), over a connection of its own with the
/// same TLS and identity as any other; the server's answer.
///
/// # Errors
///
/// When the server cannot be reached, or refuses (no such disk or
/// snapshot, a name in use, no room; a server without snapshots answers
/// `ERR_UNSUP`).
pub fn snapshot_request(
    target: &Target,
    options: &Options,
    request: &SnapshotRequest,
) -> Result<SnapshotAnswer, Error> {
    let (mut stream, _) = greeted(target, options)?;
    crate::handshake::snapshot_request(&mut stream, &target.address.to_string(), request)
}

/// A connection to `target`'s server, greeted (and in TLS when the target
/// asks for it), ready for options; and whether the server lets the client
/// skip the zeros of the EXPORT_NAME reply.
fn greeted(target: &Target, options: &Options) -> Result<(Stream, bool), Error> {
    let address = target.address.to_string();
    let mut stream =
        Stream::connect(&target.address, options.handshake_timeout).map_err(|source| {
            Error::Connect {
                address: address.clone(),
                source,
            }
        })?;
    stream
        .set_timeouts(options.handshake_timeout)
        .map_err(|source| Error::Io {
            address: address.clone(),
            source,
        })?;
    let no_zeroes = greet(&mut stream, &address, &target.export)?;
    if let Some(dir) = &target.tls {
        start_tls(&mut stream, &address, &target.export)?;
        let host = match &target.address {
            Address::Tcp { host, .. } => host.as_str(),
            Address::Unix(_) => "localhost",
        };
        let tls = crate::tls::config(dir)
            .and_then(|config| crate::tls::TlsStream::connect(config, host, stream))
            .map_err(|source| Error::Tls {
                address: address.clone(),
                source,
            })?;
        stream = Stream::Tls(tls);
    }
    Ok((stream, no_zeroes))
}

/// `[offset, offset + len)` in consecutive pieces of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let n = (end - pos).min(max);
        let piece = (pos, n);
        pos += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(
            pieces(10, 25, 10).collect::<Vec<_>>(),
            [(10, 10), (20, 10), (30, 5)]
        );
        assert_eq!(pieces(0, 0, 10).count(), 0);
        assert_eq!(pieces(5, 3, 10).collect::<Vec<_>>(), [(5, 3)]);
    }
}
