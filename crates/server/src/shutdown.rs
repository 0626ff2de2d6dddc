//! Graceful shutdown: stop taking work, finish what is in flight, close.
//!
//! Every connection registers its socket here. Shutdown makes each one's
//! reading side end (`shutdown(SHUT_RD)`), so a thread blocked in `read`
//! wakes up; requests already received are still answered (those parsed
//! after shutdown began get `ESHUTDOWN`, options `ERR_SHUTDOWN`), in-flight
//! requests finish, and the connection closes. The caller then waits, with
//! a deadline, for every connection to be gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use scratchd_store::sync;

use crate::transport::Control;

#[derive(Default)]
pub struct Shutdown {
    started: AtomicBool,
    live: Mutex<Live>,
    /// Signalled whenever a connection goes away.
    gone: Condvar,
}

#[derive(Default)]
struct Live {
    next_id: u64,
    connections: HashMap<u64, Control>,
}

/// Keeps a connection registered while it lives.
pub struct Registration<'a> {
    shutdown: &'a Shutdown,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shutdown.lock().connections.remove(&self.id);
        self.shutdown.gone.notify_all();
    }
}

impl Shutdown {
    fn lock(&self) -> MutexGuard<'_, Live> {
        sync::lock(&self.live)
    }

    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Registers a connection's socket until the returned guard drops. A
    /// connection arriving after shutdown began is told to stop at once.
    pub fn register(&self, control: Control) -> Registration<'_> {
        let mut live = self.lock();
        if self.is_started() {
            control.stop_reading();
        }
        let id = live.next_id;
        live.next_id += 1;
        live.connections.insert(id, control);
        Registration { shutdown: self, id }
    }

    /// Starts shutting down and waits up to `deadline` for every connection
    /// to finish; returns how many were still open at the deadline.
    pub fn begin(&self, deadline: Duration) -> usize {
        let mut live = self.lock();
        self.started.store(true, Ordering::Release);
        for c in live.connections.values() {
            c.stop_reading();
        }
        let until = Instant::now() + deadline;
        while !live.connections.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            live = sync::wait_timeout(&self.gone, live, left).0;
        }
        live.connections.len()
    }
}

/// The connections of one export, so that an operator can end them all
/// (`scratchd ctl drop`). A registry hands one out with each
/// [`OpenExport`](crate::OpenExport); the connection joins it for as long as
/// it transmits.
#[derive(Default)]
pub struct Members {
    /// Set by [`Members::disconnect`]: a connection joining later is told
    /// to stop at once.
    closed: AtomicBool,
    live: Mutex<Live>,
}

/// Keeps a connection in its export's [`Members`] while it lives.
pub struct Membership {
    members: Arc<Members>,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        sync::lock(&self.members.live).connections.remove(&self.id);
    }
}

impl Members {
    /// Adds a connection's socket until the returned guard drops.
    pub fn join(self: &Arc<Self>, control: Control) -> Membership {
        let mut live = sync::lock(&self.live);
        if self.closed.load(Ordering::Acquire) {
            control.stop_reading();
        }
        let id = live.next_id;
        live.next_id += 1;
        live.connections.insert(id, control);
        Membership {
            members: self.clone(),
            id,
        }
    }

    /// Ends every connection, now and to come, as a graceful shutdown does:
    /// reading stops, requests already received are answered, the
    /// connection closes. Returns how many were open.
    pub fn disconnect(&self) -> usize {
        let live = sync::lock(&self.live);
        self.closed.store(true, Ordering::Release);
        for c in live.connections.values() {
            c.stop_reading();
        }
        live.connections.len()
    }
}
