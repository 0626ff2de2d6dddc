//! Idle connections: after two seconds without a byte from the client a
//! connection gives its buffers' pages back, and a client may pause for
//! longer than that anywhere, even in the middle of a request.

use std::thread;
use std::time::Duration;

use crate::util::rss_kib;
use crate::util::{poll, random_bytes, send, Server};
use crate::wire::*;

/// Longer than the server's idle time (2 s).
const PAUSE: Duration = Duration::from_millis(2500);

/// WRITEs sent in three parts with a pause past the idle time after the
/// first part of the header and another in the middle of the payload, on
/// every path a payload takes: small ones through the input buffer, large
/// ones straight into memory pages (memory backend) or into a buffer of
/// their own (file backend, on the worker pool). All land, and the
/// connection then works as before.
#[test]
fn a_client_pausing_mid_request_past_the_idle_time_is_served() {
    let (file, _) = Server::on_file(4 << 20);
    let memory = Server::start(&["memory", "size=4M"]);
    thread::scope(|scope| {
        for server in [&file, &memory] {
            // Each case writes its own range of the disk.
            for (len, mode, at) in [(4096, Mode::Simple, 0), (1 << 20, Mode::Extended, 2 << 20)] {
                scope.spawn(move || {
                    let mut c = Conn::open(server, mode);
                    let data = random_bytes(len, len as u64);
                    let request = c.write_bytes(1, at, &data);
                    let (head, rest) = request.split_at(10);
                    let (middle, tail) = rest.split_at(rest.len() / 2);
                    for (i, part) in [head, middle, tail].into_iter().enumerate() {
                        if i > 0 {
                            thread::sleep(PAUSE);
                        }
                        send(&mut c.s, part);
                    }
                    c.expect_ok(1, at);
                    assert!(c.read(2, at, len as u32) == data, "{len} bytes, {mode:?}");
                    c.write(3, at, &data[..4096]);
                    c.disconnect();
                });
            }
        }
    });
}

/// Forty connections that each moved 256 KiB through their input buffer
/// hold that memory while busy and give most of it back once idle; they
/// are served as before afterwards.
#[test]
fn idle_connections_give_their_buffers_back() {
    const CONNS: usize = 40;
    const LEN: usize = 256 * 1024;
    let server = Server::start(&["memory", "size=16M"]);
    let data = random_bytes(LEN, 7);
    let mut conns: Vec<Conn> = (0..CONNS)
        .map(|i| {
            let mut c = Conn::open(&server, Mode::Structured);
            c.write(1, (i * LEN) as u64, &data);
            c
        })
        .collect();
    let busy = rss_kib(server.pid());
    // Each input buffer had 256 KiB of payload in it; ask for half, within
    // a generous time (the threads wake after 2 s, later on a loaded host).
    let expected = (CONNS * LEN / 2 / 1024) as u64;
    let idle = poll(Duration::from_secs(10), || {
        let idle = rss_kib(server.pid());
        (busy.saturating_sub(idle) >= expected).then_some(idle)
    })
    .unwrap_or_else(|| rss_kib(server.pid()));
    eprintln!("RSS {busy} KiB busy, {idle} KiB idle");
    assert!(
        busy.saturating_sub(idle) >= expected,
        "RSS {busy} KiB busy, {idle} KiB idle: less than {expected} KiB given back"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.read(2, (i * LEN) as u64, LEN as u32), data);
        c.write(3, (i * LEN) as u64, &data);
    }
}
