//! Write-behind against scratchd's server (in this process, its memory
//! disk wrapped to slow or hold writes, so that they are in flight when
//! it matters) and against nbdkit killed with writes in flight.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_client::{BlockDevice, Replies, Window, WriteBehind};
use scratchd_store::{Capabilities, Extent, MemoryDevice, ZeroFlags};

use crate::checks::errno_of;
use crate::util::{connect, nbdkit, Scratchd};

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;

/// A memory disk whose writes wait: `delay` each, and while the gate is
/// shut. Called inline on the server's connection thread (`may_block`
/// false), so a held write holds that connection's later requests too,
/// while other connections go on.
struct Held {
    inner: MemoryDevice,
    delay: Duration,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn shut() -> Arc<Gate> {
        Arc::new(Gate {
            shut: Mutex::new(true),
            opened: Condvar::new(),
        })
    }

    fn open(&self) {
        *self.shut.lock().unwrap() = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        let shut = self.shut.lock().unwrap();
        drop(self.opened.wait_while(shut, |s| *s).unwrap());
    }
}

impl BlockDevice for Held {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            may_block: false,
            ..self.inner.capabilities()
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.gate.pass();
        thread::sleep(self.delay);
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        self.inner.zero(offset, len, flags, fua)
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.inner.extents(offset, len, out)
    }
}

/// A server whose writes each take `delay`, behind `gate`.
fn held_server(delay: Duration, gate: Arc<Gate>, budget: Option<u64>) -> Scratchd {
    Scratchd {
        budget,
        wrap: Some(Box::new(move |inner| {
            Arc::new(Held { inner, delay, gate }) as Arc<dyn BlockDevice>
        })),
        ..Scratchd::default()
    }
}

fn open_gate() -> Arc<Gate> {
    Arc::new(Gate::default())
}

/// Several threads each write a range over their previous write and at
/// once read it back, over four connections, while every write takes 2 ms
/// on the server: a read that did not wait for the overlapping write in
/// flight would overtake it on another connection and see the previous
/// round's bytes.
#[test]
fn reads_see_overlapping_writes_in_flight_from_several_threads_and_connections() {
    let server = held_server(Duration::from_millis(2), open_gate(), None).start();
    let client = Arc::new(connect(&server.target, 4, Replies::Extended));
    assert_eq!(client.connection_count(), 4);
    let disk = Arc::new(WriteBehind::new(client, Window::default()));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let disk = disk.clone();
            thread::spawn(move || {
                for round in 0..40u8 {
                    // Unaligned, each overlapping the last.
                    let offset = u64::from(t) * 16384 + u64::from(round % 3) * 1000;
                    let tag = 1 + t * 50 + round;
                    disk.write(offset, &[tag; 3000], false).unwrap();
                    let mut back = vec![0u8; 3000];
                    disk.read(offset, &mut back).unwrap();
                    let stale = back.iter().filter(|&&b| b != tag).count();
                    assert_eq!(stale, 0, "thread {t} round {round}: {stale} bytes stale");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    disk.drain().unwrap();
    assert_eq!(disk.stats().behind, 160);
}

/// The window holds under a flood from several threads: with the server's
/// writes held, exactly as many writes are acknowledged as the window
/// allows, by requests and by bytes; the rest wait, and all go through
/// once the server answers.
#[test]
fn the_window_bounds_writes_in_flight_under_a_flood() {
    for (window, expected) in [
        (
            Window {
                bytes: 64 * MIB,
                requests: 5,
            },
            5,
        ),
        (
            Window {
                bytes: 3 * 64 * KIB as u64,
                requests: 64,
            },
            3,
        ),
    ] {
        let gate = Gate::shut();
        let server = held_server(Duration::ZERO, gate.clone(), None).start();
        let client = Arc::new(connect(&server.target, 2, Replies::Extended));
        let disk = Arc::new(WriteBehind::new(client.clone(), window));
        let acked = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let (disk, acked) = (disk.clone(), acked.clone());
                thread::spawn(move || {
                    for i in 0..6u64 {
                        let offset = (t * 6 + i) * 64 * KIB as u64;
                        disk.write(offset, &[t as u8 + 1; 64 * KIB], false).unwrap();
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(acked.load(Ordering::SeqCst), expected, "{window:?}");
        assert_eq!(disk.stats().requests, expected);
        // The server's side: that many requests sent and unanswered.
        assert_eq!(client.in_flight(), expected);
        gate.open();
        for w in writers {
            w.join().unwrap();
        }
        disk.drain().unwrap();
        assert_eq!(acked.load(Ordering::SeqCst), 24);
        let stats = disk.stats();
        assert_eq!((stats.peak_requests, stats.requests), (expected, 0));
        assert!(stats.peak_bytes <= window.bytes, "{stats:?}");
        let mut back = vec![0u8; 64 * KIB];
        disk.read(23 * 64 * KIB as u64, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 4));
    }
}

/// The server's memory budget runs out while writes are in flight (all
/// acknowledged before the server saw any): the refusal is latched, and
/// the next write, flush and close (drain) fail with ENOSPC; nothing
/// succeeds over the lost write.
#[test]
fn a_budget_that_runs_out_mid_window_fails_the_next_write_flush_and_close() {
    let server = held_server(Duration::from_millis(20), open_gate(), Some(MIB)).start();
    let client = Arc::new(connect(&server.target, 1, Replies::Extended));
    let disk = WriteBehind::new(client, Window::default());
    for i in 0..4u64 {
        disk.write(i * 512 * KIB as u64, &[7; 512 * KIB], false)
            .unwrap_or_else(|e| panic!("write {i} not acknowledged early: {e}"));
    }
    assert_eq!(errno_of(disk.drain()), libc::ENOSPC);
    let latched = disk.latched().expect("latched");
    assert_eq!(latched.errno, libc::ENOSPC);
    assert!(latched.offset >= MIB, "{latched:?}");
    assert_eq!(errno_of(disk.write(0, b"x", false)), libc::ENOSPC);
    assert_eq!(errno_of(disk.flush()), libc::ENOSPC);
    assert_eq!(errno_of(disk.deferred_error()), libc::ENOSPC);
    assert_eq!(errno_of(disk.drain()), libc::ENOSPC);
    // What the server took reads back.
    let mut back = vec![0u8; 512 * KIB];
    disk.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 7));
}

/// A durable export (nbdkit's memory plugin advertises FLUSH): a flush
/// waits for the writes in flight before it returns; on a scratch export
/// (scratchd's tmpdisk, which advertises none) it would not wait at all,
/// which the e2e tests check against `scratchd serve`.
#[test]
fn a_flush_on_a_durable_export_waits_for_writes_in_flight() {
    let server = nbdkit(&["--filter=delay", "memory", "16M", "delay-write=300ms"]);
    let client = Arc::new(connect(&server.target(""), 1, Replies::Extended));
    assert!(client.capabilities().durable_flush);
    let disk = WriteBehind::new(client, Window::default());
    let started = Instant::now();
    disk.write(0, b"in flight", false).unwrap();
    assert!(started.elapsed() < Duration::from_millis(250), "not behind");
    disk.flush().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "flush did not wait"
    );
    assert_eq!(disk.stats().requests, 0);
}

/// nbdkit killed while writes wait in its delay filter: they were
/// acknowledged, so the loss is latched as EIO; the next write, flush and
/// close fail at once, nothing hangs.
#[test]
fn a_server_killed_with_writes_in_flight_fails_what_follows() {
    let mut server = nbdkit(&["--filter=delay", "memory", "16M", "delay-write=30"]);
    let client = Arc::new(connect(&server.target(""), 2, Replies::Extended));
    let disk = WriteBehind::new(client, Window::default());
    for i in 0..6u64 {
        disk.write(i * 4096, &[1; 4096], false).unwrap();
    }
    assert_eq!(disk.stats().requests, 6);
    let started = Instant::now();
    server.kill();
    assert_eq!(errno_of(disk.drain()), libc::EIO);
    assert_eq!(errno_of(disk.write(0, b"x", false)), libc::EIO);
    assert_eq!(errno_of(disk.flush()), libc::EIO);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited for the dead"
    );
}
