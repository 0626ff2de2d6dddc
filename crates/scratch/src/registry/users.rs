//! Who holds a disk, as far as `scratchd ctl drop` needs to know: each
//! user (a connection) leaves a way to end it, and dropping the disk calls
//! them all.
//!
//! The registry does not know what a user is: the exports layer hands in a
//! closure that ends one connection as a graceful shutdown does, and says
//! how many connections that ended (none if the connection was not yet, or
//! no longer, transmitting), so that `ctl drop` reports what it closed. A
//! user that arrives after the disk was dropped (it opened the disk just
//! before) is ended as soon as it leaves its stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use scratchd_store::sync;

/// Ends one user; how many connections that closed.
type Stop = Box<dyn FnOnce() -> usize + Send + Sync>;

/// The users of one disk.
#[derive(Default)]
pub(super) struct Users {
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    /// Set by [`Users::disconnect`]: users joining later are ended at once.
    closed: bool,
    next_id: u64,
    stops: HashMap<u64, Stop>,
}

/// Keeps one user's stop in its disk's [`Users`] while the user lives.
pub(super) struct User {
    users: Arc<Users>,
    id: u64,
}

impl Drop for User {
    fn drop(&mut self) {
        let stop = sync::lock(&self.users.live).stops.remove(&self.id);
        drop(stop);
    }
}

impl Users {
    /// Adds a user, ended by `stop`, until the returned guard drops.
    pub(super) fn join(self: &Arc<Self>, stop: Stop) -> User {
        let mut live = sync::lock(&self.live);
        let id = live.next_id;
        live.next_id += 1;
        if live.closed {
            drop(live);
            // Dropped before it joined: nobody waits for the count.
            stop();
        } else {
            live.stops.insert(id, stop);
        }
        User {
            users: self.clone(),
            id,
        }
    }

    /// Ends every user, now and to come; returns how many connections
    /// that closed.
    pub(super) fn disconnect(&self) -> usize {
        let stops: Vec<Stop> = {
            let mut live = sync::lock(&self.live);
            live.closed = true;
            live.stops.drain().map(|(_, stop)| stop).collect()
        };
        // Outside the lock: a stop may take locks of its own.
        stops.into_iter().map(|stop| stop()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn disconnect_ends_present_users_and_later_ones_at_once() {
        let ended = Arc::new(AtomicUsize::new(0));
        let stop = || -> Stop {
            let ended = ended.clone();
            Box::new(move || {
                ended.fetch_add(1, Ordering::SeqCst);
                1
            })
        };
        let users = Arc::new(Users::default());
        let (a, b) = (users.join(stop()), users.join(stop()));
        drop(b);
        assert_eq!(users.disconnect(), 1, "a user gone is not ended");
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        let late = users.join(stop());
        assert_eq!(ended.load(Ordering::SeqCst), 2, "ended as it joins");
        assert_eq!(users.disconnect(), 0);
        drop((a, late));
    }
}
