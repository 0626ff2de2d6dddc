//! The handshake deadline: a client must finish its whole handshake (the
//! greeting, every option, a TLS handshake) within
//! [`ServerContext::handshake_timeout`](crate::ServerContext) of being
//! accepted.
//!
//! A read timeout alone is no deadline: a client that sends one byte just
//! before each timeout runs out keeps its connection, and its thread and
//! slot, for as long as it likes, before it has proved anything. So one
//! watchdog thread for the whole process holds every handshake's deadline
//! and cuts the socket of a client still haggling when its time is up; the
//! connection's thread then wakes from whatever read or TLS step it was in.
//! Only the handshake pays for this (one queue entry, taken and dropped
//! once per connection); transmission never sees it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_store::sync;

use crate::transport::Control;

/// One handshake being watched: its socket until the handshake ends (or
/// the watchdog cut it).
struct Watched {
    /// `Some` while the handshake runs; taken by whichever comes first, the
    /// connection finishing or the watchdog cutting.
    control: Mutex<Option<Control>>,
}

/// An entry of the watchdog's queue, earliest deadline first.
struct Entry {
    at: Instant,
    watched: Arc<Watched>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// The process's watchdog: deadlines and the thread that enforces them.
struct Watchdog {
    queue: Mutex<BinaryHeap<Reverse<Entry>>>,
    /// Signalled when an entry arrives (it may be the earliest).
    arrived: Condvar,
}

/// A handshake under the watchdog; [`HandshakeDeadline::finish`] ends the
/// watch.
pub struct HandshakeDeadline {
    watched: Arc<Watched>,
    limit: Duration,
}

impl HandshakeDeadline {
    /// Watches the handshake on `control`, which must end within `limit`.
    /// Without a watchdog thread (it could not start), the per-read
    /// timeout is all there is, as before.
    pub fn start(control: Control, limit: Duration) -> Self {
        let watched = Arc::new(Watched {
            control: Mutex::new(Some(control)),
        });
        if let Some(dog) = watchdog() {
            sync::lock(&dog.queue).push(Reverse(Entry {
                at: Instant::now() + limit,
                watched: watched.clone(),
            }));
            dog.arrived.notify_one();
        }
        HandshakeDeadline { watched, limit }
    }

    /// The handshake ended (either way): stops watching, and gives the
    /// socket's extra descriptor back at once. False when the watchdog had
    /// cut the connection already: the deadline passed.
    pub fn finish(&self) -> bool {
        sync::lock(&self.watched.control).take().is_some()
    }

    /// The deadline this handshake had.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl Drop for HandshakeDeadline {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Starts the watchdog thread now (it also starts on first use), so that
/// a server's threads are all there before its first client.
pub fn start() {
    watchdog();
}

/// The watchdog, started on first use; `None` if its thread cannot start.
fn watchdog() -> Option<&'static Watchdog> {
    static DOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();
    *DOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            queue: Mutex::new(BinaryHeap::new()),
            arrived: Condvar::new(),
        }));
        let started = thread::Builder::new()
            .name("handshake deadlines".to_owned())
            .spawn(move || dog.run());
        match started {
            Ok(_) => Some(dog),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the handshake watchdog");
                None
            }
        }
    })
}

impl Watchdog {
    fn run(&self) {
        let mut queue = sync::lock(&self.queue);
        loop {
            let now = Instant::now();
            match queue.peek() {
                None => queue = sync::wait(&self.arrived, queue),
                Some(Reverse(first)) if first.at > now => {
                    let left = first.at - now;
                    queue = sync::wait_timeout(&self.arrived, queue, left).0;
                }
                Some(_) => {
                    let Some(Reverse(due)) = queue.pop() else {
                        continue;
                    };
                    let control = sync::lock(&due.watched.control).take();
                    if let Some(control) = control {
                        control.cut();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_handshake_past_its_deadline_is_cut_even_while_bytes_trickle_in() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let control = Control::Unix(server.try_clone().unwrap());
        let deadline = HandshakeDeadline::start(control, Duration::from_millis(300));
        let started = Instant::now();
        let reader = thread::spawn(move || {
            let mut server = server;
            let mut byte = [0u8; 1];
            // Reads one byte at a time, as a handshake read would, until
            // the stream ends.
            while server.read(&mut byte).unwrap_or(0) == 1 {}
        });
        // A byte every 50 ms: no read ever waits long.
        while !reader.is_finished() && started.elapsed() < Duration::from_secs(5) {
            use std::io::Write;
            let _ = client.write_all(b"x");
            thread::sleep(Duration::from_millis(50));
        }
        reader.join().unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "cut early: {took:?}");
        assert!(took < Duration::from_secs(3), "not cut: {took:?}");
        assert!(!deadline.finish(), "the deadline passed");
    }

    #[test]
    fn a_finished_handshake_is_left_alone() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let control = Control::Unix(server.try_clone().unwrap());
        let deadline = HandshakeDeadline::start(control, Duration::from_millis(100));
        assert!(deadline.finish(), "in time");
        thread::sleep(Duration::from_millis(300));
        use std::io::Write;
        client.write_all(b"still open").unwrap();
        let mut got = [0u8; 10];
        (&server).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still open");
    }
}
