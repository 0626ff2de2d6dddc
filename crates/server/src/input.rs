//! The connection's input buffer: requests are parsed in place from it.
//!
//! One `read` fills it with as many requests as the client has sent (a
//! client with 32 requests in flight costs one system call, not 32), small
//! payloads are used where they lie, and large ones are read past it,
//! straight into their destination.
//!
//! It also notices idleness: in transmission, a read timeout of
//! [`IDLE_AFTER`] means the client has gone quiet. A timeout with nothing
//! buffered gives the buffer's pages back to the system (they keep their
//! addresses and fault in again on use), so thousands of idle connections
//! cost little more than their threads' stacks; a timeout mid-message is no
//! error, since a client may pause anywhere.

use std::io::{self, Read};
use std::time::Duration;

use crate::busy_poll::BusyPoll;

/// Input buffer size: holds dozens of small requests, so one read() serves many.
pub const INPUT_BUFFER: usize = 256 * 1024;
/// After this long without a byte from the client, a connection in
/// transmission gives its buffers' pages back. Clients may stay idle, or
/// pause mid-request, for as long as they like.
pub const IDLE_AFTER: Duration = Duration::from_secs(2);

/// Sets the read timeout of the stream beneath an [`Input`] (the socket's
/// `SO_RCVTIMEO`).
pub trait ReadTimeout: Send {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// A read buffer that lets the transmission loop parse requests in place.
pub struct Input {
    reader: Box<dyn Read + Send>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// In transmission: the socket, whose read timeout ([`IDLE_AFTER`])
    /// says the client has gone quiet; a timeout is then no error.
    idle: Option<IdleWatch>,
    /// In transmission: spinning for the next request before sleeping.
    busy_poll: Option<BusyPoll>,
}

struct IdleWatch {
    timeouts: Box<dyn ReadTimeout>,
    /// Whether the timeout is set: it is cleared once the connection is
    /// idle (nothing more to give back) and set again when bytes come.
    armed: bool,
}

/// What [`Input::fill_or_idle`] found.
pub enum Filled {
    Ready,
    /// End of stream, nothing buffered.
    End,
    /// Nothing came for [`IDLE_AFTER`] and nothing is buffered; the input
    /// buffer's pages were given back.
    Idle,
}

/// Whether a read failed because the socket's read timeout
/// (`SO_RCVTIMEO`) ran out, which says `EAGAIN`. `ETIMEDOUT` is something
/// else: TCP gave up on the peer (keepalive or retransmissions), and the
/// connection is dead.
fn is_timeout(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Gives the whole pages of a vector's spare capacity back to the system.
pub fn give_back_vec(v: &mut Vec<u8>) {
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
    pub fn new(reader: Box<dyn Read + Send>) -> Self {
        Self::with_capacity(reader, INPUT_BUFFER)
    }

    fn with_capacity(reader: Box<dyn Read + Send>, capacity: usize) -> Self {
        Input {
            reader,
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            idle: None,
            busy_poll: None,
        }
    }

    /// Reads from `reader` from now on (the stream became a TLS session).
    /// Nothing may be buffered from the old one.
    pub fn replace_reader(&mut self, reader: Box<dyn Read + Send>) {
        debug_assert!(self.buffered().is_empty());
        self.reader = reader;
    }

    /// From now on, a read timeout (set through `timeouts`) means the
    /// client is idle.
    pub fn watch_idle(&mut self, timeouts: Box<dyn ReadTimeout>) -> io::Result<()> {
        timeouts.set_read_timeout(Some(IDLE_AFTER))?;
        self.idle = Some(IdleWatch {
            timeouts,
            armed: true,
        });
        Ok(())
    }

    /// From now on, waits for a request spin first (see [`crate::busy_poll`]).
    pub fn busy_poll(&mut self, busy_poll: BusyPoll) {
        self.busy_poll = Some(busy_poll);
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

    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (≤ buffer size) bytes are buffered, the
    /// rest of a message: busy-polling may spin for it first. Returns
    /// false on end of stream with nothing buffered; end of stream part-way
    /// through a message is an error.
    pub fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.end - self.start < n {
            if let Some(poll) = &mut self.busy_poll {
                poll.before_waiting_for_rest();
            }
        }
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
    pub fn fill_or_idle(&mut self, n: usize) -> io::Result<Filled> {
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

    /// [`fill_or_idle`](Self::fill_or_idle) for a request's header, the
    /// connection having read `requests_read` requests since it last
    /// waited: where nothing of it is here yet, busy-polling may spin
    /// before the read sleeps, and learns how soon it came.
    pub fn fill_request_or_idle(&mut self, n: usize, requests_read: u32) -> io::Result<Filled> {
        let between_requests = self.end == self.start;
        if between_requests {
            if let Some(poll) = &mut self.busy_poll {
                poll.before_waiting(requests_read);
            }
        }
        let filled = self.fill_or_idle(n)?;
        if between_requests && self.end > self.start {
            if let Some(poll) = &mut self.busy_poll {
                poll.arrived();
            }
        }
        Ok(filled)
    }

    /// Gives the (empty) buffer's pages back and stops the timeout until
    /// bytes come again.
    fn go_idle(&mut self) -> io::Result<()> {
        // SAFETY: the buffer is ours and holds nothing (`start == end`).
        unsafe { give_back(self.buf.as_mut_ptr(), self.buf.len()) };
        if let Some(watch) = &mut self.idle {
            watch.timeouts.set_read_timeout(None)?;
            watch.armed = false;
        }
        Ok(())
    }

    fn rearm(&mut self) -> io::Result<()> {
        match &mut self.idle {
            Some(watch) if !watch.armed => {
                watch.timeouts.set_read_timeout(Some(IDLE_AFTER))?;
                watch.armed = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Fills `dst` from the buffer first, then straight from the stream.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
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
    pub fn read_some(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if self.buffered().is_empty() {
            return self.read_stream(dst);
        }
        let n = self.buffered().len().min(dst.len());
        dst[..n].copy_from_slice(&self.buffered()[..n]);
        self.consume(n);
        Ok(n)
    }

    /// Reads and drops `n` bytes without holding more than the buffer.
    pub fn discard(&mut self, mut n: u64) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a scripted stream returns on each read.
    enum Step {
        Bytes(&'static [u8]),
        /// The read timeout fired (`SO_RCVTIMEO`).
        Timeout,
    }

    /// A stream that returns its steps one read at a time, then end of
    /// stream. A step larger than the reader's buffer is split.
    struct Script(VecDeque<Step>);

    impl Read for Script {
        fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(Step::Timeout) => Err(io::ErrorKind::WouldBlock.into()),
                Some(Step::Bytes(b)) => {
                    let n = b.len().min(dst.len());
                    dst[..n].copy_from_slice(&b[..n]);
                    if n < b.len() {
                        self.0.push_front(Step::Bytes(&b[n..]));
                    }
                    Ok(n)
                }
            }
        }
    }

    fn input(steps: Vec<Step>) -> Input {
        Input::new(Box::new(Script(steps.into())))
    }

    /// Records every timeout the input sets.
    #[derive(Clone, Default)]
    struct Timeouts(Arc<Mutex<Vec<Option<Duration>>>>);

    impl ReadTimeout for Timeouts {
        fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
            self.0.lock().unwrap().push(timeout);
            Ok(())
        }
    }

    #[test]
    fn a_header_split_across_reads_is_put_together() {
        let mut i = input(vec![
            Step::Bytes(b"abc"),
            Step::Bytes(b"de"),
            Step::Bytes(b"fgh"),
        ]);
        assert!(matches!(i.fill_or_idle(7).unwrap(), Filled::Ready));
        assert_eq!(&i.buffered()[..7], b"abcdefg");
        i.consume(7);
        assert_eq!(i.buffered(), b"h");
    }

    #[test]
    fn many_requests_come_from_one_read() {
        let mut i = input(vec![Step::Bytes(b"1234567890")]);
        assert!(i.fill(2).unwrap());
        assert_eq!(i.buffered(), b"1234567890");
    }

    #[test]
    fn end_of_stream_between_messages_is_clean_and_within_one_is_an_error() {
        let mut i = input(vec![]);
        assert!(matches!(i.fill_or_idle(4).unwrap(), Filled::End));
        let mut i = input(vec![Step::Bytes(b"ab")]);
        let e = i.fill(4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn end_of_stream_in_the_middle_of_a_payload_is_an_error() {
        let mut i = input(vec![Step::Bytes(b"head"), Step::Bytes(b"pay")]);
        assert!(i.fill(4).unwrap());
        i.consume(4);
        let mut payload = [0u8; 8];
        let e = i.read_exact(&mut payload).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut i = input(vec![Step::Bytes(b"pay")]);
        let e = i.discard(8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_large_read_takes_the_buffered_bytes_then_the_stream() {
        let mut i = input(vec![Step::Bytes(b"0123"), Step::Bytes(b"4567")]);
        assert!(i.fill(2).unwrap());
        let mut dst = [0u8; 6];
        i.read_exact(&mut dst).unwrap();
        assert_eq!(&dst, b"012345");
        assert!(i.fill(2).unwrap());
        assert_eq!(i.buffered(), b"67");
    }

    #[test]
    fn read_some_never_reads_past_what_is_asked() {
        let mut i = input(vec![Step::Bytes(b"abcdef")]);
        assert!(i.fill(1).unwrap());
        let mut dst = [0u8; 4];
        assert_eq!(i.read_some(&mut dst).unwrap(), 4);
        assert_eq!(&dst, b"abcd");
        assert_eq!(i.buffered(), b"ef");
    }

    #[test]
    fn a_discard_across_the_buffers_edge_keeps_the_next_message() {
        // An 8-byte buffer: the 13 bytes to drop span two refills, and the
        // message after them starts in the middle of the second.
        let stream = Script(vec![Step::Bytes(b"xxxxxxxxxxxxxNEXT")].into());
        let mut i = Input::with_capacity(Box::new(stream), 8);
        assert!(i.fill(3).unwrap());
        i.discard(13).unwrap();
        assert!(i.fill(4).unwrap());
        assert_eq!(i.buffered(), b"NEXT");
    }

    #[test]
    fn a_message_that_would_run_past_the_buffers_end_is_moved_to_its_start() {
        let stream = Script(vec![Step::Bytes(b"aaaaaBBBB")].into());
        let mut i = Input::with_capacity(Box::new(stream), 8);
        assert!(i.fill(5).unwrap());
        i.consume(5);
        assert!(i.fill(4).unwrap());
        assert_eq!(i.buffered(), b"BBBB");
    }

    #[test]
    fn an_idle_client_gives_the_pages_back_and_disarms_the_timeout() {
        let timeouts = Timeouts::default();
        let mut i = input(vec![Step::Timeout, Step::Bytes(b"wake")]);
        i.watch_idle(Box::new(timeouts.clone())).unwrap();
        assert!(matches!(i.fill_or_idle(4).unwrap(), Filled::Idle));
        // Armed, then cleared while idle (nothing left to give back).
        assert_eq!(*timeouts.0.lock().unwrap(), [Some(IDLE_AFTER), None]);
        // The buffer still works after its pages were given back, and the
        // timeout is armed again once bytes come.
        assert!(matches!(i.fill_or_idle(4).unwrap(), Filled::Ready));
        assert_eq!(i.buffered(), b"wake");
        assert_eq!(
            *timeouts.0.lock().unwrap(),
            [Some(IDLE_AFTER), None, Some(IDLE_AFTER)]
        );
    }

    #[test]
    fn a_pause_in_the_middle_of_a_message_is_no_error() {
        let mut i = input(vec![
            Step::Bytes(b"he"),
            Step::Timeout,
            Step::Timeout,
            Step::Bytes(b"ad"),
        ]);
        i.watch_idle(Box::new(Timeouts::default())).unwrap();
        assert!(matches!(i.fill_or_idle(4).unwrap(), Filled::Ready));
        assert_eq!(i.buffered(), b"head");
        let mut i = input(vec![
            Step::Bytes(b"pa"),
            Step::Timeout,
            Step::Bytes(b"yload"),
        ]);
        i.watch_idle(Box::new(Timeouts::default())).unwrap();
        let mut dst = [0u8; 7];
        i.read_exact(&mut dst).unwrap();
        assert_eq!(&dst, b"payload");
    }

    #[test]
    fn a_dead_peer_is_an_error_even_when_idle_is_watched() {
        struct Dead;
        impl Read for Dead {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc_etimedout()))
            }
        }
        let mut i = Input::new(Box::new(Dead));
        i.watch_idle(Box::new(Timeouts::default())).unwrap();
        let e = i.fill(4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    /// ETIMEDOUT on Linux.
    fn libc_etimedout() -> i32 {
        110
    }

    #[test]
    fn before_transmission_a_timeout_is_an_error() {
        let mut i = input(vec![Step::Timeout]);
        let e = i.fill(4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn give_back_vec_keeps_the_contents() {
        let mut v = Vec::with_capacity(1 << 20);
        v.extend_from_slice(b"kept");
        give_back_vec(&mut v);
        assert_eq!(v, b"kept");
        v.resize(1 << 20, 7);
        assert!(v.iter().skip(4).all(|&b| b == 7));
    }
}
