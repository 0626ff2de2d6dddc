//! Where a connection's replies leave, and how much may wait to leave.
//!
//! Every reply of a connection goes through its [`ReplyQueue`]: no other code
//! writes to a client. There are two ways a reply leaves:
//!
//! - **Inline** (backends that never block): the connection's own thread
//!   runs each request and gathers the replies in one buffer, written with
//!   one system call when no further request is waiting. It may wait for the
//!   client to read (only its own client waits with it), and READ replies
//!   large enough go straight from storage to the socket.
//! - **Pooled** (backends that may block): requests run on workers shared by
//!   every connection, so a worker must never wait for one client. Each
//!   request is first admitted with a [`Ticket`] that reserves room for its
//!   payload and reply; the worker hands its reply to [`Ticket::post`],
//!   which sends what the socket takes at once and queues the rest. The
//!   send happens outside the connection's lock: replies posted by other
//!   workers meanwhile are gathered behind it and leave in the sender's
//!   next write, together (at queue depth 32, fewer writes than replies,
//!   and no worker waits for another's system call). A
//!   flusher thread of the connection's own (started the first time anything
//!   is queued) waits for the client and sends the queue. When the queue and
//!   the running requests fill the connection's budget, [`ReplyQueue::admit`]
//!   waits: that connection stops reading requests, and nobody else notices.
//!   A lone request (nothing running, nothing queued) may run on the
//!   connection's own thread instead; its reply leaves the same way, sent
//!   without waiting and queued behind nothing, so whatever the client does
//!   next goes through admission again.
//!
//! Either way, a client that reads none of its replies for the stall timeout
//! (`--reply-timeout`) while some are waiting is cut off, and what it had
//! queued is dropped.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_store::sync;
use tracing::{debug, warn};

use crate::transport::{stalled, Control, WriteHalf};

/// Requests one connection may have running or answered-but-unsent at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Bytes one connection's pooled requests may hold at once (payloads
/// received, replies expected or queued). One request is always admitted
/// when nothing else is held, so a 32 MiB READ still runs.
pub const BUDGET: usize = 32 * 1024 * 1024;
/// Small requests (up to [`SMALL`] bytes) may use this much room beyond
/// [`BUDGET`], so that a large READ never holds up the small ones behind it:
/// they still overtake it, as the worker pool allows.
const SMALL_HEADROOM: usize = 1024 * 1024;
const SMALL: usize = 64 * 1024;
/// Gathered inline replies are written once they reach this size, even if
/// more requests are waiting, to keep memory and latency bounded.
pub const FLUSH_AT: usize = 256 * 1024;
/// Writes one post makes for replies gathered behind it before it leaves
/// the rest to the flusher: a worker is lent to sending for a while, not
/// kept from the pool by a busy connection.
const GATHER_ROUNDS: usize = 16;
/// Stack of a connection's flusher thread: it only moves buffers.
const FLUSHER_STACK: usize = 64 * 1024;

/// A connection's replies: the gathering buffer of its own thread, and the
/// state it shares with the workers running its requests.
pub struct ReplyQueue {
    shared: Arc<Shared>,
    /// Replies gathered by the connection's thread, sent by [`Self::flush`].
    batch: Vec<u8>,
    /// Whether requests run on the worker pool (see the module docs).
    pooled: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when room is freed, when replies leave, and on close; only
    /// while someone waits on it (see [`Shared::notify`]).
    changed: Condvar,
    /// Signalled when the flusher has work: replies queued, or the close.
    work: Condvar,
    /// The socket, to wait for it without holding the state's lock and to
    /// cut off a stalled client.
    control: Control,
    stall: Duration,
}

struct State {
    /// `None` while a post sends outside the lock (see
    /// [`Shared::send_gathering`]).
    writer: Option<WriteHalf>,
    /// Replies, or their unsent ends, waiting for the client to read; sent
    /// in order, each whole before the next.
    queue: VecDeque<Vec<u8>>,
    /// Small replies posted while another post was sending, in order: that
    /// post sends them in its next write, all at once. (Larger ones are
    /// queued instead, not copied.)
    gathered: Vec<u8>,
    /// Bytes posted and not yet written: queued, gathered or being sent.
    queued_bytes: usize,
    /// Admitted requests that have not posted a reply yet.
    running: usize,
    /// Bytes the running requests reserved.
    reserved: usize,
    /// The client is gone or was cut off: replies are dropped from now on.
    closed: bool,
    flusher: bool,
    /// Threads waiting on `changed` (admission, `wait_idle`).
    waiters: usize,
    /// The flusher waits on `work`.
    flusher_asleep: bool,
    /// When the client last took bytes of a queued reply.
    progress: Instant,
}

impl State {
    fn used(&self) -> usize {
        self.reserved + self.queued_bytes
    }

    /// Whether anything waits to be sent or is being sent: queued replies,
    /// a post sending outside the lock, or records a TLS transport holds.
    fn backlog(&self) -> bool {
        self.sending() || self.waiting_for_client()
    }

    /// Whether replies wait for the socket to take them: queued, or left
    /// inside the transport (TLS records) by an earlier write.
    fn waiting_for_client(&self) -> bool {
        !self.queue.is_empty() || self.writer.as_ref().is_some_and(|w| w.pending())
    }

    /// Whether a post is sending outside the lock (it holds the writer).
    fn sending(&self) -> bool {
        self.writer.is_none()
    }

    /// Keeps `reply` until whoever sends next takes it: a small one
    /// gathered behind the post that is sending now, else queued for the
    /// flusher (after what was gathered before it).
    fn hold(&mut self, reply: Cow<'_, [u8]>) {
        self.queued_bytes += reply.len();
        if self.sending() && reply.len() <= SMALL {
            return self.gathered.extend_from_slice(&reply);
        }
        if !self.gathered.is_empty() {
            let gathered = std::mem::take(&mut self.gathered);
            self.queue.push_back(gathered);
        }
        self.queue.push_back(reply.into_owned());
    }

    /// Sends queued replies until the queue is empty or the socket is full
    /// (`WouldBlock`). Only while no post is sending (the flusher checks).
    fn send_queued(&mut self) -> io::Result<()> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        writer.try_flush()?;
        while let Some(front) = self.queue.front_mut() {
            let n = writer.try_write(front)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.progress = Instant::now();
            self.queued_bytes -= n;
            if n == front.len() {
                self.queue.pop_front();
            } else {
                front.drain(..n);
            }
        }
        writer.try_flush()
    }

    /// Counts `n` bytes of `out` as taken by the client. Whether replies
    /// gathered meanwhile are to be written next, by the sender; if not
    /// (the socket was full, a large reply was queued meanwhile, or the
    /// sender may not `go_on`), the rest of `out`, then what was queued and
    /// gathered, wait for the flusher, in that order.
    fn sent(&mut self, n: usize, out: &mut Cow<'_, [u8]>, go_on: bool) -> bool {
        self.progress = Instant::now();
        self.queued_bytes -= n;
        if n == out.len() && go_on && self.queue.is_empty() {
            return !self.gathered.is_empty();
        }
        let rest = match std::mem::take(out) {
            // A large reply keeps its buffer (no copy, and its memory
            // returns to the system as one piece).
            Cow::Owned(mut reply) => {
                reply.drain(..n);
                reply
            }
            Cow::Borrowed(reply) => reply[n..].to_vec(),
        };
        if !rest.is_empty() {
            self.queue.push_front(rest);
        }
        if !self.gathered.is_empty() {
            let gathered = std::mem::take(&mut self.gathered);
            self.queue.push_back(gathered);
        }
        false
    }

    /// Keeps a sent gathering buffer for the next gathering, unless a
    /// huge burst grew it.
    fn recycle(&mut self, sent: Cow<'_, [u8]>) {
        if let Cow::Owned(mut buf) = sent {
            if buf.capacity() <= FLUSH_AT && self.gathered.capacity() == 0 {
                buf.clear();
                self.gathered = buf;
            }
        }
    }

    fn close(&mut self) {
        self.closed = true;
        self.queue.clear();
        self.gathered.clear();
        self.queued_bytes = 0;
    }
}

impl ReplyQueue {
    pub fn new(writer: WriteHalf, control: Control, stall: Duration, pooled: bool) -> Self {
        ReplyQueue {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    writer: Some(writer),
                    queue: VecDeque::new(),
                    gathered: Vec::new(),
                    queued_bytes: 0,
                    running: 0,
                    reserved: 0,
                    closed: false,
                    flusher: false,
                    waiters: 0,
                    flusher_asleep: false,
                    progress: Instant::now(),
                }),
                changed: Condvar::new(),
                work: Condvar::new(),
                control,
                stall,
            }),
            batch: Vec::with_capacity(FLUSH_AT),
            pooled,
        }
    }

    /// The buffer the connection's thread appends replies to.
    pub fn batch(&mut self) -> &mut Vec<u8> {
        &mut self.batch
    }

    /// Whether enough is gathered to send it even with requests waiting.
    pub fn batch_is_full(&self) -> bool {
        self.batch.len() >= FLUSH_AT
    }

    /// Sends what the connection's thread gathered. Inline, this waits for
    /// the client (up to the stall timeout); pooled, it never waits.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.pooled {
            // Sent from the batch itself: the buffer is kept for the next
            // replies, and only what the socket cannot take now is copied.
            let r = self.shared.post(Cow::Borrowed(&self.batch), None);
            self.batch.clear();
            return r;
        }
        let r = self.writer().write_all(&self.batch);
        self.batch.clear();
        r
    }

    /// Where the connection's thread puts the reply of a request it runs.
    pub fn output(&mut self) -> Output<'_> {
        Output {
            buf: &mut self.batch,
            // Only an inline connection may wait on its client.
            direct: (!self.pooled).then_some(Direct(&self.shared)),
        }
    }

    fn writer(&self) -> Writer<'_> {
        Direct(&self.shared).lock()
    }

    /// Waits for room for a pooled request holding `bytes` (its payload and
    /// expected reply), then reserves it. Fails once the client is gone.
    pub fn admit(&self, bytes: usize) -> io::Result<Ticket> {
        let shared = &self.shared;
        let mut st = sync::lock(&shared.state);
        loop {
            if st.closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the client stopped taking replies",
                ));
            }
            let limit = if bytes <= SMALL {
                BUDGET + SMALL_HEADROOM
            } else {
                BUDGET
            };
            let fits = st.used() == 0 || st.used() + bytes <= limit;
            if fits && st.running < MAX_IN_FLIGHT {
                break;
            }
            st = shared.wait(st);
        }
        st.running += 1;
        st.reserved += bytes;
        Ok(Ticket {
            shared: shared.clone(),
            bytes,
            posted: false,
        })
    }

    /// Whether nothing of this pooled connection is running on a worker or
    /// waiting for the client (and the client is still there): a request
    /// run now on the connection's thread has its reply sent without
    /// waiting, behind no queue. A post still in its system call counts as
    /// idle: its client may already have the reply and have sent the next
    /// request (queue depth 1), and a reply posted meanwhile is gathered
    /// into that post's next write.
    pub fn is_idle(&self) -> bool {
        let st = sync::lock(&self.shared.state);
        st.running == 0 && !st.waiting_for_client() && !st.closed
    }

    /// Waits until every admitted request has posted its reply and every
    /// reply has been sent (or dropped, if the client is gone or stalled).
    pub fn wait_idle(&self) {
        let mut st = sync::lock(&self.shared.state);
        while st.running > 0 || (st.backlog() && !st.closed) {
            st = self.shared.wait(st);
        }
    }

    /// Drops what is queued and every reply still to come: the client is
    /// gone. Ends the flusher.
    pub fn close(&self) {
        let mut st = sync::lock(&self.shared.state);
        st.close();
        self.shared.notify(&st);
    }

    /// Frees the batch buffer if a huge request grew it past `keep` bytes
    /// (smaller ones are kept, so steady traffic allocates nothing).
    pub fn shrink(&mut self, keep: usize) {
        if self.batch.capacity() > keep {
            self.batch = Vec::with_capacity(FLUSH_AT);
        }
    }

    /// The client is idle: gives the batch buffer's pages back to the
    /// system (it keeps its address and capacity).
    pub fn give_back(&mut self) {
        self.batch.clear();
        crate::input::give_back_vec(&mut self.batch);
    }
}

impl Shared {
    /// Sends or queues a reply; never waits for the client. `reserved`:
    /// the reservation of the request it answers, freed in the same step
    /// (so that [`ReplyQueue::wait_idle`] never sees a request neither running
    /// nor replied).
    fn post(self: &Arc<Self>, reply: Cow<'_, [u8]>, reserved: Option<usize>) -> io::Result<()> {
        let mut st = sync::lock(&self.state);
        if let Some(bytes) = reserved {
            st.running -= 1;
            st.reserved -= bytes;
        }
        let sent = if st.closed {
            Ok(())
        } else if st.backlog() {
            st.hold(reply);
            Ok(())
        } else {
            let sent;
            (st, sent) = self.send_gathering(st, reply);
            sent
        };
        match sent {
            Err(_) => st.close(),
            Ok(()) => self.start_flusher(&mut st),
        }
        // Room was freed, the flusher may have work, or the client is gone.
        self.notify(&st);
        sent
    }

    /// Sends `reply` with the lock released, so that workers posting
    /// meanwhile neither wait for the system call nor make one: their
    /// replies gather behind it and leave in the next write, together. Ends
    /// when nothing more was posted, or when the socket is full: what it did
    /// not take is queued for the flusher. Never waits for the client.
    fn send_gathering<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        reply: Cow<'_, [u8]>,
    ) -> (MutexGuard<'a, State>, io::Result<()>) {
        let Some(mut writer) = st.writer.take() else {
            st.hold(reply);
            return (st, Ok(()));
        };
        st.queued_bytes += reply.len();
        let mut out = reply;
        let mut rounds = 1;
        loop {
            drop(st);
            let written = write_now(&mut writer, &out);
            st = sync::lock(&self.state);
            let more = match written {
                // Cut off meanwhile: what is left was dropped.
                _ if st.closed => Ok(false),
                Ok(n) => Ok(st.sent(n, &mut out, rounds < GATHER_ROUNDS)),
                Err(e) => Err(e),
            };
            match more {
                Ok(true) => {
                    let next = Cow::Owned(std::mem::take(&mut st.gathered));
                    st.recycle(std::mem::replace(&mut out, next));
                    rounds += 1;
                }
                done => {
                    st.writer = Some(writer);
                    return (st, done.map(drop));
                }
            }
        }
    }

    /// Waits on `changed`, counted so that a notification is sent only when
    /// someone waits for it.
    fn wait<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.waiters += 1;
        let mut st = sync::wait(&self.changed, st);
        st.waiters -= 1;
        st
    }

    /// Wakes whoever waits on `changed`, and the flusher if it has work
    /// now. A notification is a system call even when nobody waits, and
    /// every pooled reply would pay one; a flusher woken for nothing costs
    /// two context switches.
    fn notify(&self, st: &State) {
        if st.waiters > 0 {
            self.changed.notify_all();
        }
        if st.flusher_asleep && (st.closed || (st.backlog() && !st.sending())) {
            self.work.notify_one();
        }
    }

    /// Starts the connection's flusher thread the first time a reply waits
    /// for the client; if it cannot start, the client is cut off (nothing
    /// else would ever send what waits).
    fn start_flusher(self: &Arc<Self>, st: &mut State) {
        if st.backlog() && !st.flusher && !st.closed {
            st.flusher = true;
            let shared = self.clone();
            let spawned = thread::Builder::new()
                .name("flusher".to_owned())
                .stack_size(FLUSHER_STACK)
                .spawn(move || shared.flush_queue());
            if let Err(e) = spawned {
                warn!(error = %e, "cannot start a flusher thread; client cut off");
                st.close();
                self.control.cut();
            }
        }
    }

    /// The flusher thread: sends queued replies as the client reads them,
    /// until the connection closes.
    fn flush_queue(&self) {
        let mut st = sync::lock(&self.state);
        loop {
            if st.closed {
                return;
            }
            // A post sending outside the lock sends what waits, or queues it
            // and wakes this thread.
            if !st.backlog() || st.sending() {
                st.flusher_asleep = true;
                st = sync::wait(&self.work, st);
                st.flusher_asleep = false;
                continue;
            }
            let before = st.queued_bytes;
            match st.send_queued() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "client gone with replies queued");
                    st = self.cut(st);
                    continue;
                }
            }
            if st.queued_bytes < before {
                self.notify(&st);
            }
            if !st.backlog() {
                continue;
            }
            let waited = st.progress.elapsed();
            if waited >= self.stall {
                warn!("{}; disconnecting it", stalled(self.stall));
                st = self.cut(st);
                continue;
            }
            drop(st);
            let _ = self.control.wait_writable(self.stall - waited);
            st = sync::lock(&self.state);
        }
    }

    /// Cuts the client off: queued replies are dropped, and the
    /// connection's thread wakes from its read.
    fn cut<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.close();
        self.control.cut();
        self.notify(&st);
        st
    }
}

/// Writes as much of `out` as the socket takes now, without waiting: 0
/// when it takes nothing.
fn write_now(writer: &mut WriteHalf, out: &[u8]) -> io::Result<usize> {
    match writer.try_write(out) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        r => r,
    }
}

/// A pooled request's reserved room, and its right to post one reply.
/// Dropped without posting (the request was abandoned), it frees the room.
pub struct Ticket {
    shared: Arc<Shared>,
    bytes: usize,
    posted: bool,
}

impl Ticket {
    /// Sends or queues the request's reply and frees its reservation. A
    /// send error means the client is gone; its connection's thread notices.
    pub fn post(mut self, reply: Vec<u8>) {
        self.posted = true;
        let _ = self.shared.post(Cow::Owned(reply), Some(self.bytes));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.posted {
            let mut st = sync::lock(&self.shared.state);
            st.running -= 1;
            st.reserved -= self.bytes;
            self.shared.notify(&st);
        }
    }
}

/// Where a reply goes.
pub struct Output<'a> {
    /// Replies gathered for one write.
    pub buf: &'a mut Vec<u8>,
    /// The socket, for READ replies large enough to be worth sending straight
    /// from storage (after whatever `buf` holds); `None` to always gather.
    pub direct: Option<Direct<'a>>,
}

/// The socket of an inline connection, to be locked for one reply.
#[derive(Clone, Copy)]
pub struct Direct<'a>(&'a Shared);

impl<'a> Direct<'a> {
    pub fn lock(self) -> Writer<'a> {
        Writer {
            state: sync::lock(&self.0.state),
            stall: self.0.stall,
        }
    }
}

/// The socket of an inline connection, locked for one reply.
pub struct Writer<'a> {
    state: MutexGuard<'a, State>,
    stall: Duration,
}

impl Writer<'_> {
    /// Writes all of `bytes`, waiting for the client up to the stall timeout.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // Only pooled connections post, so an inline one always holds its
        // writer here.
        match self.state.writer.as_mut() {
            Some(writer) => writer.write_all(bytes, self.stall),
            None => Err(io::Error::other("a pooled reply is being sent")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    use super::*;
    use crate::testing::reply_socket;

    const SECOND: Duration = Duration::from_secs(1);

    fn replies(pooled: bool, stall: Duration) -> (UnixStream, ReplyQueue) {
        let (client, writer, control) = reply_socket();
        (client, ReplyQueue::new(writer, control, stall, pooled))
    }

    fn read(client: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        client.read_exact(&mut buf).unwrap();
        buf
    }

    /// Admits `bytes` on another thread; the receiver hears when it got in.
    fn admit_later(replies: &Arc<ReplyQueue>, bytes: usize) -> mpsc::Receiver<io::Result<Ticket>> {
        let (tx, rx) = mpsc::channel();
        let replies = replies.clone();
        thread::spawn(move || tx.send(replies.admit(bytes)).unwrap());
        rx
    }

    fn waits(rx: &mpsc::Receiver<io::Result<Ticket>>) -> bool {
        rx.recv_timeout(Duration::from_millis(200)).is_err()
    }

    #[test]
    fn an_inline_batch_leaves_in_one_piece_when_flushed() {
        let (mut client, mut replies) = replies(false, SECOND);
        replies.batch().extend_from_slice(b"one");
        replies.batch().extend_from_slice(b"two");
        assert!(!replies.batch_is_full());
        replies.flush().unwrap();
        assert_eq!(read(&mut client, 6), b"onetwo");
        assert!(replies.batch().is_empty());
        replies.batch().resize(FLUSH_AT, 0);
        assert!(replies.batch_is_full());
    }

    #[test]
    fn pooled_replies_leave_whole_in_the_order_they_are_posted() {
        let (mut client, replies) = replies(true, SECOND);
        let first = replies.admit(100).unwrap();
        let second = replies.admit(100).unwrap();
        second.post(vec![2; 100]);
        first.post(vec![1; 100]);
        replies.wait_idle();
        let got = read(&mut client, 200);
        assert_eq!((got[0], got[99], got[100], got[199]), (2, 2, 1, 1));
    }

    #[test]
    fn replies_the_socket_cannot_take_are_queued_without_waiting_and_sent_in_order() {
        let (mut client, replies) = replies(true, 10 * SECOND);
        let (count, len) = (16, 512 * 1024);
        let started = Instant::now();
        for i in 0..count {
            let ticket = replies.admit(len).unwrap();
            ticket.post(vec![i as u8; len]);
        }
        // 8 MiB is more than a Unix socket holds: the rest was queued, and
        // posting never waited for this client, which reads nothing yet.
        assert!(started.elapsed() < 5 * SECOND);
        assert!(sync::lock(&replies.shared.state).queued_bytes > 0);
        for i in 0..count {
            assert!(read(&mut client, len).iter().all(|&b| b == i as u8));
        }
        replies.wait_idle();
        assert_eq!(sync::lock(&replies.shared.state).queued_bytes, 0);
    }

    /// The connection thread's own batch, queued behind a full socket when
    /// the flusher already exists and sleeps with nothing to send, must
    /// wake it: nothing else might (no request of this connection may be
    /// running). Found in a guest: a reply held for the kernel's whole
    /// 120 s request timeout, sent only when the next request came.
    #[test]
    fn a_batch_queued_behind_a_full_socket_wakes_a_sleeping_flusher() {
        let (mut client, mut replies) = replies(true, 10 * SECOND);
        let len = 4 * 1024 * 1024;
        for round in 1..=2u8 {
            replies.batch().resize(len, round);
            replies.flush().unwrap();
            assert!(sync::lock(&replies.shared.state).queued_bytes > 0);
            assert!(read(&mut client, len).iter().all(|&b| b == round));
            // The flusher sent it all and sleeps until told of more.
            replies.wait_idle();
        }
    }

    /// Takes the writer as a post sending outside the lock does, so that
    /// what is posted meanwhile gathers; `send_gathering` gives it back.
    fn start_sending(replies: &ReplyQueue) -> WriteHalf {
        sync::lock(&replies.shared.state).writer.take().unwrap()
    }

    /// Finishes the send `start_sending` began, with `first` as the reply
    /// it was sending.
    fn finish_sending(replies: &ReplyQueue, writer: WriteHalf, first: &[u8]) {
        let mut st = sync::lock(&replies.shared.state);
        st.writer = Some(writer);
        let (mut st, sent) = replies.shared.send_gathering(st, Cow::Borrowed(first));
        sent.unwrap();
        replies.shared.start_flusher(&mut st);
        replies.shared.notify(&st);
    }

    #[test]
    fn replies_posted_during_a_send_gather_and_leave_after_it_in_order() {
        let (mut client, replies) = replies(true, SECOND);
        let writer = start_sending(&replies);
        replies.admit(3).unwrap().post(b"two".to_vec());
        replies.admit(5).unwrap().post(b"three".to_vec());
        // Posting did not wait for the send, nor send anything itself.
        assert_eq!(sync::lock(&replies.shared.state).gathered, b"twothree");
        client.set_nonblocking(true).unwrap();
        let mut byte = [0];
        assert_eq!(
            client.read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        client.set_nonblocking(false).unwrap();
        finish_sending(&replies, writer, b"one");
        assert_eq!(read(&mut client, 11), b"onetwothree");
        replies.wait_idle();
        let st = sync::lock(&replies.shared.state);
        assert_eq!((st.queued_bytes, st.gathered.len()), (0, 0));
    }

    #[test]
    fn gathered_replies_the_socket_cannot_take_are_queued_behind_the_rest() {
        let (mut client, replies) = replies(true, 10 * SECOND);
        let len = 4 * 1024 * 1024;
        let writer = start_sending(&replies);
        replies.admit(len).unwrap().post(vec![2; len]);
        replies.admit(3).unwrap().post(vec![3; 3]);
        // More than the socket holds: the end of the first reply and what
        // was gathered wait for the flusher, in order.
        finish_sending(&replies, writer, &vec![1; len]);
        assert!(read(&mut client, len).iter().all(|&b| b == 1));
        assert!(read(&mut client, len).iter().all(|&b| b == 2));
        assert_eq!(read(&mut client, 3), [3; 3]);
        replies.wait_idle();
    }

    #[test]
    fn a_sender_that_used_its_rounds_leaves_the_gathered_replies_to_the_flusher() {
        let (mut client, replies) = replies(true, SECOND);
        let writer = start_sending(&replies);
        replies.admit(3).unwrap().post(b"two".to_vec());
        let mut st = sync::lock(&replies.shared.state);
        st.writer = Some(writer);
        st.queued_bytes += 3;
        // "one" was written whole, on the sender's last round.
        assert!(!st.sent(3, &mut Cow::Borrowed(b"one"), false));
        assert_eq!(st.queue, [b"two".to_vec()]);
        assert!(st.gathered.is_empty());
        replies.shared.start_flusher(&mut st);
        replies.shared.notify(&st);
        drop(st);
        assert_eq!(read(&mut client, 3), b"two");
        replies.wait_idle();
    }

    #[test]
    fn a_large_reply_posted_during_a_send_is_queued_in_its_place_not_copied() {
        let (mut client, replies) = replies(true, SECOND);
        let writer = start_sending(&replies);
        replies.admit(1).unwrap().post(b"a".to_vec());
        replies.admit(SMALL + 1).unwrap().post(vec![2; SMALL + 1]);
        replies.admit(1).unwrap().post(b"c".to_vec());
        {
            let st = sync::lock(&replies.shared.state);
            assert_eq!(st.queue.len(), 2, "what was gathered, then the large one");
            assert_eq!(st.gathered, b"c");
        }
        finish_sending(&replies, writer, b"one");
        assert_eq!(read(&mut client, 4), b"onea");
        assert!(read(&mut client, SMALL + 1).iter().all(|&b| b == 2));
        assert_eq!(read(&mut client, 1), b"c");
        replies.wait_idle();
    }

    #[test]
    fn gathered_replies_count_against_the_budget() {
        let (_client, replies) = replies(true, SECOND);
        let replies = Arc::new(replies);
        let _writer = start_sending(&replies);
        replies.admit(SMALL).unwrap().post(vec![0; SMALL]);
        assert_eq!(sync::lock(&replies.shared.state).gathered.len(), SMALL);
        // Nothing is running any more, but the gathered reply holds its
        // room until it is sent.
        let next = admit_later(&replies, BUDGET);
        assert!(waits(&next));
    }

    #[test]
    fn a_request_waits_until_the_budget_has_room() {
        let (_client, replies) = replies(true, SECOND);
        let replies = Arc::new(replies);
        let big = replies.admit(BUDGET).unwrap();
        let next = admit_later(&replies, BUDGET);
        assert!(waits(&next));
        // Dropped without a reply (abandoned), its room is freed too.
        drop(big);
        assert!(next.recv_timeout(5 * SECOND).unwrap().is_ok());
    }

    #[test]
    fn small_requests_overtake_a_large_one_within_the_headroom() {
        let (_client, replies) = replies(true, SECOND);
        let replies = Arc::new(replies);
        let _big = replies.admit(BUDGET).unwrap();
        let small = admit_later(&replies, SMALL);
        assert!(small.recv_timeout(5 * SECOND).unwrap().is_ok());
        let not_small = admit_later(&replies, SMALL + 1);
        assert!(waits(&not_small));
    }

    #[test]
    fn at_most_max_in_flight_requests_are_admitted() {
        let (mut client, replies) = replies(true, SECOND);
        let replies = Arc::new(replies);
        let mut tickets: Vec<Ticket> = (0..MAX_IN_FLIGHT)
            .map(|_| replies.admit(1).unwrap())
            .collect();
        let next = admit_later(&replies, 1);
        assert!(waits(&next));
        tickets.pop().unwrap().post(vec![9]);
        assert!(next.recv_timeout(5 * SECOND).unwrap().is_ok());
        assert_eq!(read(&mut client, 1), [9]);
    }

    #[test]
    fn wait_idle_waits_for_running_requests_to_post() {
        let (mut client, replies) = replies(true, SECOND);
        let ticket = replies.admit(3).unwrap();
        let started = Instant::now();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            ticket.post(b"end".to_vec());
        });
        replies.wait_idle();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(read(&mut client, 3), b"end");
    }

    #[test]
    fn a_client_that_reads_nothing_is_cut_off_after_the_stall_timeout() {
        let stall = Duration::from_millis(200);
        let (mut client, replies) = replies(true, stall);
        for _ in 0..16 {
            replies.admit(512 * 1024).unwrap().post(vec![0; 512 * 1024]);
        }
        let started = Instant::now();
        replies.wait_idle();
        let waited = started.elapsed();
        assert!(waited < 5 * SECOND, "cut off after {waited:?}");
        let e = replies.admit(1).err().expect("the client is gone");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        // What the socket held arrives, then the end: the rest was dropped.
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got);
        assert!(got.len() < 16 * 512 * 1024);
    }

    #[test]
    fn an_inline_client_that_reads_nothing_fails_the_flush_after_the_stall_timeout() {
        let (_client, mut replies) = replies(false, Duration::from_millis(200));
        replies.batch().resize(16 * 1024 * 1024, 0);
        let e = replies.flush().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
