//! Busy-polling for the next request before a connection sleeps.
//!
//! A client that waits for each reply before sending its next request
//! (queue depth 1: an fsync in a build, a loop device's flush) sends that
//! request a few microseconds after our reply reached it. A connection
//! thread that blocks in `read` for it pays a sleep and a wake-up each
//! time: the scheduler's path in and out, on a virtual machine often the
//! largest part of the round trip. Watching the socket for a short while
//! first catches the request on a running CPU instead.
//!
//! Spinning burns CPU, so it is bounded four ways:
//! - **by the client's pattern**: only a wait after a lone request spins,
//!   and a wait after several lowers the score below like a late request.
//!   A client with many requests in flight (a queue depth of 32) is not
//!   waiting on a round trip: its next requests come by themselves (a
//!   server that keeps up with it still often reads them one at a time,
//!   but now and then finds several), and spinning for them would only
//!   cost CPU per request;
//! - **per wait**: at most [`BusyPolling::limit`] (`--busy-poll`, default
//!   [`DEFAULT_LIMIT`]; 0 turns it off);
//! - **per connection**: only while its requests come quickly, each after
//!   the client read our replies (else it is pipelining). Each such
//!   request that comes within the limit of the wait's start raises the
//!   connection's score by one, each later one lowers it by four, and a
//!   wait spins only at a score of at least half the most. So spinning
//!   lasts only while more than four in five requests come quickly: a
//!   client that spreads its requests over several connections (nbdfuse's
//!   four, say), whose each connection sees a mix of quick and slow ones,
//!   is soon not spun for, and one that falls idle costs one missed spin
//!   (its next request, late, lowers the score);
//! - **per server**: at most [`Spinners`]' slots at once (one fewer than
//!   the CPUs), so spinning connections never take every CPU from the
//!   clients and workers they wait for. A connection that finds no slot
//!   free sleeps.
//!
//! The rest of a request whose header came alone is spun for the same
//! way (a client may send a header and its payload apart), on a
//! connection spun for, without moving its score.
//!
//! The spin only watches: the read that follows is the ordinary one, so
//! whatever the spin decides, no byte is read differently (TLS included).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// The default spin before a connection sleeps. The gap it must cover is
/// the reply's way to the client, the client's own wake-up and turnaround,
/// and the request's way back: on a 2-CPU virtual machine, 40-90 µs over a
/// Unix socket and more over TCP loopback, so 50 µs caught most Unix
/// requests and few TCP ones; 200 µs also leaves room for a fast network
/// (docs/PERFORMANCE.md, "Busy-polling").
pub const DEFAULT_LIMIT: Duration = Duration::from_micros(200);

/// The longest spin `--busy-poll` takes. A sleep and wake-up cost tens of
/// microseconds: a spin far longer than that only burns a CPU, and a
/// connection falling idle would burn this much each time.
pub const MAX_LIMIT: Duration = Duration::from_millis(100);

/// The server's busy-polling: how long a wait may spin, the slots every
/// connection's spinning shares, and what the spins caught.
#[derive(Clone, Debug)]
pub struct BusyPolling {
    limit: Duration,
    spinners: Arc<Spinners>,
}

impl BusyPolling {
    /// Spins of at most `limit` (zero: off), at most one fewer at once than
    /// the CPUs this process may use.
    pub fn new(limit: Duration) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_spinners(limit, cpus.saturating_sub(1))
    }

    /// Spins of at most `limit`, at most `spinners` at once.
    pub fn with_spinners(limit: Duration, spinners: usize) -> Self {
        BusyPolling {
            limit,
            spinners: Arc::new(Spinners {
                max: spinners,
                now: AtomicUsize::new(0),
                caught: AtomicU64::new(0),
                missed: AtomicU64::new(0),
            }),
        }
    }

    pub fn off() -> Self {
        Self::with_spinners(Duration::ZERO, 0)
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// Waits that spun so far: (the request came during the spin, it did
    /// not). For the metrics: many misses mean the limit is too short for
    /// these clients, and the CPU spent on them is wasted.
    pub fn outcomes(&self) -> (u64, u64) {
        (
            self.spinners.caught.load(Ordering::Relaxed),
            self.spinners.missed.load(Ordering::Relaxed),
        )
    }

    /// Whether any connection may spin: on, and more than one CPU.
    pub fn spins(&self) -> bool {
        !self.limit.is_zero() && self.spinners.max > 0
    }

    /// A connection's busy-polling on `socket`; `None` where no connection
    /// may spin (see [`spins`](Self::spins)).
    pub fn watch(&self, socket: OwnedFd) -> Option<BusyPoll> {
        self.spins().then(|| BusyPoll {
            socket,
            limit: self.limit,
            spinners: self.spinners.clone(),
            waiting_since: None,
            score: 0,
        })
    }
}

/// The slots for spinning, shared by every connection, and the outcomes.
#[derive(Debug)]
struct Spinners {
    max: usize,
    now: AtomicUsize,
    caught: AtomicU64,
    missed: AtomicU64,
}

impl Spinners {
    fn take(&self) -> Option<SpinSlot<'_>> {
        self.now
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinSlot(self))
    }
}

struct SpinSlot<'a>(&'a Spinners);

impl Drop for SpinSlot<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Release);
    }
}

/// What one wait's spin did.
#[derive(Debug, PartialEq, Eq)]
pub enum Spin {
    /// The request came while spinning: no sleep.
    Caught,
    /// The limit passed first; the connection sleeps as without spinning.
    Missed,
    /// Not spun: this connection is not spun for (its requests come late,
    /// several at a time or before it read our replies), or every slot
    /// was taken.
    Skipped,
}

/// The score of a connection whose requests all come quickly.
const MOST: u8 = 16;
/// The score at which a wait spins. A new connection starts at 0: a
/// client with many requests in flight shows itself while nothing spins
/// (its requests pile up during each wake-up), one that waits for each
/// reply is spun for from its `SPIN_AT`th request.
pub(crate) const SPIN_AT: u8 = MOST / 2;
/// What a request that comes late costs the score (one that comes
/// quickly adds one): spinning goes on only while more than
/// `PENALTY / (PENALTY + 1)` of the requests come quickly.
const PENALTY: u8 = 4;

/// One connection's busy-polling: the socket it watches and how quickly
/// its requests have been coming.
pub struct BusyPoll {
    socket: OwnedFd,
    limit: Duration,
    spinners: Arc<Spinners>,
    /// When the connection started waiting for its next request.
    waiting_since: Option<Instant>,
    /// Up by one for each request that came within `limit` of the wait's
    /// start, down by [`PENALTY`] for each that came later; waits spin from
    /// [`SPIN_AT`].
    score: u8,
}

impl BusyPoll {
    /// Called before the connection blocks for its next request, having
    /// read `requests` since its last wait: spins until the socket has
    /// bytes to read or the limit has passed, if that was one request (its
    /// client waits for each reply before sending the next), its requests
    /// come quickly and a slot is free.
    pub fn before_waiting(&mut self, requests: u32) -> Spin {
        let start = Instant::now();
        self.waiting_since = Some(start);
        if requests > 1 {
            self.score = self.score.saturating_sub(PENALTY);
        }
        if requests != 1 || self.score < SPIN_AT {
            return Spin::Skipped;
        }
        self.spin(start)
    }

    /// Called before the connection blocks for the rest of a request it
    /// has the start of (a client may send a header and its payload
    /// apart, the payload right after): spins for it like
    /// [`before_waiting`](Self::before_waiting) while this connection's
    /// requests come quickly. Moves no score: how soon a request's own
    /// bytes follow says nothing of the client's next request.
    pub fn before_waiting_for_rest(&mut self) -> Spin {
        if self.score < SPIN_AT {
            return Spin::Skipped;
        }
        self.spin(Instant::now())
    }

    /// Watches the socket until it has bytes or the limit since `start`
    /// has passed, if a slot is free.
    fn spin(&self, start: Instant) -> Spin {
        let Some(_slot) = self.spinners.take() else {
            return Spin::Skipped;
        };
        loop {
            if self.readable() {
                self.spinners.caught.fetch_add(1, Ordering::Relaxed);
                return Spin::Caught;
            }
            if start.elapsed() >= self.limit {
                self.spinners.missed.fetch_add(1, Ordering::Relaxed);
                return Spin::Missed;
            }
            // Not a bare spin: a client or worker sharing this CPU (the
            // one this connection waits for, maybe) runs first.
            std::thread::yield_now();
        }
    }

    /// Called when bytes came after [`before_waiting`](Self::before_waiting):
    /// whether they came quickly, from a client that had read our replies,
    /// moves the score that decides whether later waits spin.
    pub fn arrived(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.score = if since.elapsed() <= self.limit && !self.replies_unread() {
                (self.score + 1).min(MOST)
            } else {
                self.score.saturating_sub(PENALTY)
            };
        }
    }

    /// Whether bytes we sent are still on their way to the client: it
    /// sent its request without reading our replies first, so it is not
    /// waiting on them. On a Unix socket `SIOCOUTQ` counts the bytes the
    /// peer has not read (`unix_outq_len`, net/unix/af_unix.c); on TCP,
    /// those not yet acknowledged, which a loopback peer acknowledges as
    /// they come, so there a pipelining client shows only by several
    /// requests per wait.
    fn replies_unread(&self) -> bool {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) on a socket we own writes one int to
        // the pointer, which points at one.
        let r = unsafe { libc::ioctl(self.socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        r == 0 && queued > 0
    }

    /// Whether the socket has bytes (or an end, or an error) to read now.
    fn readable(&self) -> bool {
        let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&Timespec::default())), Ok(n) if n > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn watched(polling: &BusyPolling) -> (BusyPoll, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (polling.watch(ours.into()).unwrap(), theirs)
    }

    /// A connection whose requests have come quickly so far: its next
    /// wait spins.
    fn quick(polling: &BusyPolling) -> (BusyPoll, UnixStream) {
        let (mut poll, client) = watched(polling);
        poll.score = SPIN_AT;
        (poll, client)
    }

    #[test]
    fn a_request_already_there_is_caught_at_once() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut poll, mut client) = quick(&polling);
        client.write_all(b"request").unwrap();
        let start = Instant::now();
        assert_eq!(poll.before_waiting(1), Spin::Caught);
        assert!(start.elapsed() < Duration::from_secs(30), "spun on");
        assert_eq!(polling.outcomes(), (1, 0));
    }

    #[test]
    fn a_request_sent_during_the_spin_is_caught() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut poll, mut client) = quick(&polling);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"request").unwrap();
            client
        });
        assert_eq!(poll.before_waiting(1), Spin::Caught);
        drop(sender.join());
    }

    /// One wait, for a request that comes after the wait's limit (`late`)
    /// or at once, which the server then reads.
    fn wait_for(poll: &mut BusyPoll, client: &mut UnixStream, late: bool) -> Spin {
        let spin = poll.before_waiting(1);
        if late {
            std::thread::sleep(poll.limit + Duration::from_millis(1));
        }
        client.write_all(b"request").unwrap();
        poll.arrived();
        let mut ours = poll.socket.try_clone().map(UnixStream::from).unwrap();
        std::io::Read::read(&mut ours, &mut [0; 64]).unwrap();
        spin
    }

    #[test]
    fn a_client_whose_requests_come_quickly_stays_spun_for() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut poll, mut client) = quick(&polling);
        for _ in 0..20 {
            client.write_all(b"request").unwrap();
            assert_eq!(poll.before_waiting(1), Spin::Caught);
            poll.arrived();
            let mut ours = poll.socket.try_clone().map(UnixStream::from).unwrap();
            std::io::Read::read(&mut ours, &mut [0; 64]).unwrap();
        }
        assert_eq!(poll.score, MOST);
        assert_eq!(polling.outcomes(), (20, 0));
    }

    #[test]
    fn a_client_with_one_late_request_in_two_is_soon_not_spun_for() {
        let polling = BusyPolling::with_spinners(Duration::from_millis(2), 1);
        let (mut poll, mut client) = watched(&polling);
        let spins: Vec<Spin> = (0..12)
            .map(|i| wait_for(&mut poll, &mut client, i % 2 == 0))
            .collect();
        let spun = spins.iter().filter(|s| **s != Spin::Skipped).count();
        assert!(spun <= 3, "spun {spun} of 12 waits: {spins:?}");
        assert_eq!(spins.last(), Some(&Spin::Skipped));
    }

    #[test]
    fn the_rest_of_a_request_is_spun_for_only_on_a_quick_connection_and_moves_no_score() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut slow, mut slow_client) = watched(&polling);
        slow_client.write_all(b"payload").unwrap();
        assert_eq!(slow.before_waiting_for_rest(), Spin::Skipped);
        let (mut poll, mut client) = quick(&polling);
        client.write_all(b"payload").unwrap();
        assert_eq!(poll.before_waiting_for_rest(), Spin::Caught);
        poll.arrived();
        assert_eq!((slow.score, poll.score), (0, SPIN_AT));
        assert_eq!(polling.outcomes(), (1, 0));
    }

    #[test]
    fn a_request_sent_before_our_replies_were_read_does_not_count_as_quick() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut poll, mut client) = quick(&polling);
        let mut ours = poll.socket.try_clone().map(UnixStream::from).unwrap();
        ours.write_all(b"reply").unwrap();
        // A request that came at once, but with our reply still unread:
        // the client is pipelining, not waiting on us.
        poll.waiting_since = Some(Instant::now());
        poll.arrived();
        assert_eq!(poll.score, SPIN_AT - PENALTY);
        std::io::Read::read(&mut client, &mut [0; 64]).unwrap();
        poll.waiting_since = Some(Instant::now());
        poll.arrived();
        assert_eq!(poll.score, SPIN_AT - PENALTY + 1);
    }

    #[test]
    fn a_client_that_turns_quick_is_spun_for_again() {
        let polling = BusyPolling::with_spinners(Duration::from_millis(2), 1);
        let (mut poll, mut client) = watched(&polling);
        for _ in 0..4 {
            wait_for(&mut poll, &mut client, true);
        }
        assert_eq!(poll.score, 0);
        let first_spun =
            (0..MOST).position(|_| wait_for(&mut poll, &mut client, false) != Spin::Skipped);
        assert_eq!(first_spun, Some(SPIN_AT as usize));
    }

    #[test]
    fn no_more_connections_spin_at_once_than_there_are_slots() {
        let polling = BusyPolling::with_spinners(Duration::from_secs(60), 1);
        let (mut first, first_client) = quick(&polling);
        let (mut second, mut second_client) = quick(&polling);
        let spinning = std::thread::spawn(move || first.before_waiting(1));
        while polling.spinners.now.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        second_client.write_all(b"request").unwrap();
        // Its request is there, but the one slot is taken: no spin.
        assert_eq!(second.before_waiting(1), Spin::Skipped);
        drop(first_client);
        assert_eq!(
            spinning.join().unwrap(),
            Spin::Caught,
            "a hang-up ends the spin"
        );
        assert_eq!(polling.spinners.now.load(Ordering::Acquire), 0);
    }

    #[test]
    fn off_or_on_one_cpu_nothing_spins() {
        let (ours, _) = UnixStream::pair().unwrap();
        assert!(BusyPolling::off().watch(ours.into()).is_none());
        let (ours, _) = UnixStream::pair().unwrap();
        let one_cpu = BusyPolling::with_spinners(Duration::from_micros(50), 0);
        assert!(one_cpu.watch(ours.into()).is_none());
    }
}
