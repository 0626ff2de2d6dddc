//! [`WriteBehind`]: a [`Client`] whose writes are acknowledged once they
//! are on their way to the server, not when the server answers.
//!
//! A build waits on every write its file system sends down (the journal
//! above all, a few times per fsync); on a scratch disk none of those
//! waits buys anything, since nothing on it must outlive the build. Here a
//! write returns as soon as its request is written to the socket, and its
//! reply is handled on the connection's reply thread.
//!
//! What keeps that safe:
//! - **A bounded window**: at most [`Window::requests`] writes and
//!   [`Window::bytes`] bytes in flight per disk; a write beyond either
//!   waits for room. What a failure can leave unwritten, and what the
//!   server holds for this disk, stays bounded.
//! - **Order**: a read, trim, zeroing or extent query of a range waits for
//!   the writes in flight that overlap it, and so does an overlapping
//!   write before it is sent (the server may reorder requests, and with
//!   multi-conn they go over different connections). Reads wait rather
//!   than being served from a copy of the data in flight: nothing is
//!   copied (the request went to the socket from the caller's buffer), a
//!   read of what was just written is rare below a page cache, and the
//!   rest of the read must come from the server anyway.
//! - **Errors are latched**: the first write the server refuses (or that a
//!   lost connection takes down) is logged and kept, with its errno; every
//!   later write, trim, zeroing and flush fails with it, and so does
//!   [`WriteBehind::drain`] (close). Nothing fails silently: a build whose
//!   write was lost learns of it at its next write or fsync.
//! - **Flush**: on a durable export (the server advertises `SEND_FLUSH`) a
//!   flush, and a FUA write, first waits for every write in flight; on a
//!   scratch disk there is nothing to make durable and it does not wait,
//!   only reports a latched error.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use scratchd_proto::consts::CMD_WRITE;
use scratchd_proto::TransmissionFlags as F;
use scratchd_store::sync::{lock, wait_until};
use scratchd_store::{check_range, BlockDevice, Capabilities, Extent, ZeroFlags};
use tracing::{debug, error};

use crate::client::Client;
use crate::connection::Reply;
use crate::error::{errno, timed_out};

/// How much may be in flight per disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Bytes of writes acknowledged and not yet answered.
    pub bytes: u64,
    /// Writes acknowledged and not yet answered (a write larger than the
    /// server's maximum payload counts once per piece).
    pub requests: usize,
}

impl Default for Window {
    /// 8 MiB and 64 requests: eight of the loop device's 1 MiB requests,
    /// and one connection's [`crate::Options::max_in_flight`] of small
    /// ones. Queue-depth-1 writes and the install phase keep far fewer in
    /// flight (docs/PERFORMANCE.md, issue 21); the bound is for floods.
    fn default() -> Self {
        Window {
            bytes: 8 << 20,
            requests: 64,
        }
    }
}

/// The write a latched error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latched {
    pub errno: i32,
    pub offset: u64,
    pub len: u64,
}

/// Counters for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Writes in flight now.
    pub requests: usize,
    /// Bytes in flight now.
    pub bytes: u64,
    /// The most writes ever in flight at once.
    pub peak_requests: usize,
    /// The most bytes ever in flight at once.
    pub peak_bytes: u64,
    /// Writes acknowledged before their reply, in all.
    pub behind: u64,
}

/// A [`Client`] with write-behind (see the module docs).
pub struct WriteBehind {
    client: Arc<Client>,
    shared: Arc<Shared>,
    /// Whether the export promises durability (`SEND_FLUSH`): then flush
    /// and FUA wait for what is in flight.
    durable: bool,
    /// The client's request timeout, for waits on the window.
    timeout: Option<Duration>,
}

/// What writers and the reply threads' callbacks share.
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a write in flight completes.
    changed: Condvar,
    window: Window,
}

#[derive(Default)]
struct State {
    /// Writes in flight by id: their `(offset, len)`.
    writes: HashMap<u64, (u64, u64)>,
    bytes: u64,
    next_id: u64,
    latched: Option<Latched>,
    stats: Stats,
}

impl State {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len.max(1));
        self.writes
            .values()
            .any(|&(o, l)| o < end && offset < o + l.max(1))
    }

    fn latched(&self) -> io::Result<()> {
        match self.latched {
            Some(l) => Err(io::Error::from_raw_os_error(l.errno)),
            None => Ok(()),
        }
    }
}

/// One write in flight; its slot in the window is given back on drop,
/// whether or not its outcome ever came (the connection drops the callback
/// unsent when it refuses the request outright).
struct InFlight {
    shared: Arc<Shared>,
    id: u64,
}

impl InFlight {
    fn finish(self, outcome: io::Result<Reply>) {
        if let Err(e) = outcome {
            self.shared.latch(self.id, &e);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        if let Some((_, len)) = state.writes.remove(&self.id) {
            state.bytes -= len;
            state.stats.requests = state.writes.len();
            state.stats.bytes = state.bytes;
        }
        drop(state);
        self.shared.changed.notify_all();
    }
}

impl Shared {
    /// Keeps the first error of a write acknowledged early; logs each.
    fn latch(&self, id: u64, e: &io::Error) {
        let mut state = lock(&self.state);
        let Some(&(offset, len)) = state.writes.get(&id) else {
            return;
        };
        let errno = errno(e);
        match state.latched {
            None => {
                state.latched = Some(Latched { errno, offset, len });
                error!(offset, len, errno, error = %e,
                    "a write acknowledged early failed on the server; the disk fails every later write and flush");
            }
            Some(_) => debug!(offset, len, error = %e, "another write failed"),
        }
    }
}

impl WriteBehind {
    /// Write-behind on `client` within `window` (at least one request and
    /// one byte).
    pub fn new(client: Arc<Client>, window: Window) -> WriteBehind {
        let durable = client.info().has(F::SEND_FLUSH);
        let timeout = client.request_timeout();
        let window = Window {
            bytes: window.bytes.max(1),
            requests: window.requests.max(1),
        };
        WriteBehind {
            client,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                window,
            }),
            durable,
            timeout,
        }
    }

    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    pub fn window(&self) -> Window {
        self.shared.window
    }

    pub fn stats(&self) -> Stats {
        lock(&self.shared.state).stats
    }

    /// The latched error's write, if a write acknowledged early failed.
    pub fn latched(&self) -> Option<Latched> {
        lock(&self.shared.state).latched
    }

    /// Waits for every write in flight; then the latched error, if any.
    /// What closing the disk must do before it disconnects.
    pub fn drain(&self) -> io::Result<()> {
        let state = self.wait_until(|s| s.writes.is_empty())?;
        state.latched()
    }

    /// Waits, under the state lock, until `ready` holds; with the client's
    /// request timeout, a wait that outlasts it closes the connections
    /// (whose replies would be too late to trust) and fails.
    fn wait_until(&self, ready: impl Fn(&State) -> bool) -> io::Result<MutexGuard<'_, State>> {
        let shared = &self.shared;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut state = lock(&shared.state);
        while !ready(&state) {
            state = match wait_until(&shared.changed, state, deadline) {
                Ok(state) => state,
                Err(state) => {
                    drop(state);
                    self.client.abort();
                    return Err(timed_out("WRITE (write-behind)"));
                }
            };
        }
        Ok(state)
    }

    /// Waits until no write in flight overlaps the range.
    fn settle(&self, offset: u64, len: u64) -> io::Result<()> {
        self.wait_until(|s| !s.overlaps(offset, len)).map(drop)
    }

    /// Takes room in the window for a piece once nothing in flight
    /// overlaps it; fails with the latched error instead.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<InFlight> {
        let window = self.shared.window;
        let mut state = self.wait_until(|s| {
            s.latched.is_some()
                || (s.writes.len() < window.requests
                    && (s.writes.is_empty() || s.bytes + len <= window.bytes)
                    && !s.overlaps(offset, len))
        })?;
        state.latched()?;
        let id = state.next_id;
        state.next_id += 1;
        state.writes.insert(id, (offset, len));
        state.bytes += len;
        let stats = &mut state.stats;
        stats.requests += 1;
        stats.bytes += len;
        stats.peak_requests = stats.peak_requests.max(stats.requests);
        stats.peak_bytes = stats.peak_bytes.max(stats.bytes);
        stats.behind += 1;
        Ok(InFlight {
            shared: self.shared.clone(),
            id,
        })
    }

    /// A write that returns once every piece is on its way.
    fn write_behind(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let max = self.client.info().max_payload() as usize;
        for (i, chunk) in data.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            let slot = self.reserve(at, chunk.len() as u64)?;
            self.client.submit_then(
                CMD_WRITE,
                at,
                chunk,
                Box::new(move |outcome| slot.finish(outcome)),
            )?;
        }
        Ok(())
    }

    /// Before anything that must see or follow earlier writes of a range.
    fn before_change(&self, offset: u64, len: u64) -> io::Result<()> {
        lock(&self.shared.state).latched()?;
        self.settle(offset, len)
    }
}

impl BlockDevice for WriteBehind {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.client.capabilities()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.settle(offset, buf.len() as u64)?;
        self.client.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        check_range(self.size(), offset, data.len() as u64)?;
        if self.capabilities().read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if data.is_empty() {
            return lock(&self.shared.state).latched();
        }
        if fua && self.durable {
            // Durable on return: after everything before it.
            self.flush()?;
            self.client.write(offset, data, true)?;
            return lock(&self.shared.state).latched();
        }
        self.write_behind(offset, data)
    }

    /// Waits for what is in flight only where the export is durable.
    fn flush(&self) -> io::Result<()> {
        if !self.durable {
            return lock(&self.shared.state).latched();
        }
        self.drain()?;
        self.client.flush()?;
        lock(&self.shared.state).latched()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        check_range(self.size(), offset, len)?;
        self.before_change(offset, len)?;
        self.client.trim(offset, len, fua)
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        check_range(self.size(), offset, len)?;
        self.before_change(offset, len)?;
        self.client.zero(offset, len, flags, fua)
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.settle(offset, len)?;
        self.client.extents(offset, len, out)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.client.cache(offset, len)
    }

    fn deferred_error(&self) -> io::Result<()> {
        lock(&self.shared.state).latched()
    }

    fn writes_behind(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("client", &self.client)
            .field("window", &self.shared.window)
            .field("durable", &self.durable)
            .finish()
    }
}
