//! SIGTERM stops the server gracefully: connections in every phase are
//! closed cleanly, the socket file goes, and the exit status is 0.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{eventually, fuse_unavailable, Nbdfuse, Server};
use crate::wire::{negotiating, Conn, Mode, CMD_FLUSH, CMD_READ};

/// Reads until end of stream, which must come within `within`.
fn expect_eof(s: &mut std::os::unix::net::UnixStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) => panic!("{what}: no clean close after {:?}: {e}", start.elapsed()),
        }
    }
}

#[test]
fn sigterm_closes_connections_cleanly_and_exits_zero() {
    let mut server = Server::start(&["memory", "size=1M"]);
    let mut busy = Conn::open(&server, Mode::Structured);
    busy.write(1, 0, &[5u8; 4096]);
    let mut negotiating = negotiating(&server);

    server.signal("TERM");

    expect_eof(
        &mut busy.s,
        Duration::from_secs(5),
        "connection in transmission",
    );
    expect_eof(
        &mut negotiating,
        Duration::from_secs(5),
        "connection negotiating",
    );
    let status = server
        .wait_for_exit(Duration::from_secs(5))
        .expect("server still running 5 s after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(!server.sock.exists(), "socket file left behind");
}

/// A request the server has received when SIGTERM arrives is still answered
/// in full (with its data, or ESHUTDOWN if it was not yet parsed), and only
/// then is the connection closed.
#[test]
fn sigterm_answers_requests_already_received() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    crate::util::random_file(&path, 64 << 20, 11);
    let mut server = Server::start(&["file", &format!("path={}", path.display())]);
    let mut c = Conn::open(&server, Mode::Simple);
    c.request(0, crate::wire::CMD_READ, 7, 0, 32 << 20);
    server.signal("TERM");

    let h = crate::util::read_n(&mut c.s, 16);
    assert_eq!(crate::wire::be64(&h, 8), 7, "cookie");
    match crate::wire::be32(&h, 4) {
        0 => {
            let data = crate::util::read_n(&mut c.s, 32 << 20);
            let want = std::fs::read(&path).unwrap();
            assert!(data == want[..32 << 20], "READ data differs");
        }
        108 => {} // ESHUTDOWN: parsed after shutdown began
        e => panic!("READ failed with {e}"),
    }
    expect_eof(&mut c.s, Duration::from_secs(5), "after the last reply");
    let status = server.wait_for_exit(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// Requests the server has received but not yet parsed when SIGTERM comes
/// get ESHUTDOWN, deterministically. The disk is a file whose reads hang:
/// an nbdfuse view of a second server that is stopped (SIGSTOP). With one
/// worker thread and 64 slow READs (the per-connection limit on requests in
/// flight), the connection thread waits for a slot for a 65th, with 7 more
/// requests unparsed in its input buffer. Then SIGTERM, then the second
/// server is let go: the 65 READs are answered with their data, the 7 with
/// ESHUTDOWN, and the server closes and exits 0.
#[test]
fn requests_unparsed_at_sigterm_get_eshutdown() {
    if let Some(why) = fuse_unavailable() {
        eprintln!("SKIPPED requests_unparsed_at_sigterm_get_eshutdown: {why}");
        return;
    }
    const IN_FLIGHT: u64 = 64; // MAX_IN_FLIGHT in crates/server/src/replies.rs
    const WAITING: u64 = 8;
    let inner = Server::start(&["memory", "size=1M"]);
    let dir = tempfile::tempdir().unwrap();
    let fuse = Nbdfuse::start(&inner.uri(), dir.path());
    let mut server = Server::start(&[
        "--threads",
        "1",
        "file",
        &format!("path={}", fuse.disk.display()),
    ]);
    let mut c = Conn::open(&server, Mode::Simple);
    // A second client, to see when shutdown has begun: sends to it fail
    // with EPIPE once the server has stopped reading.
    let mut probe = Conn::open(&server, Mode::Simple);

    inner.signal("STOP");
    let _resume = Resume(inner.pid());
    // SIGSTOP takes effect as each thread next leaves the kernel: a thread
    // of the inner server busy on another core could still answer a read
    // (the page cache would then serve its neighbours). Wait until every
    // thread is stopped.
    wait_until_stopped(inner.pid());
    // One write, so that the server receives every request at once. Reads
    // of pages never read before, so the page cache cannot answer them.
    let mut batch = Vec::new();
    for i in 0..IN_FLIGHT + WAITING {
        batch.extend(c.header(0, CMD_READ, i, i * 4096, 4096));
    }
    crate::util::send(&mut c.s, &batch);
    std::thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    // Only once shutdown has begun may the disk come unstuck (a loaded host
    // can take a while to handle the signal, and the socket file goes a
    // little before). Until then each probe is a harmless FLUSH, queued
    // behind the stuck READs.
    let flush = probe.header(0, CMD_FLUSH, 0, 0, 0);
    let shutdown = "shutdown to begin after SIGTERM (EPIPE on the probe)";
    eventually(
        shutdown,
        Duration::from_secs(10),
        || match std::io::Write::write_all(&mut probe.s, &flush) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
            Err(e) => panic!("probe: {e}"),
        },
    );
    inner.signal("CONT");

    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..IN_FLIGHT + WAITING {
        let (error, cookie) = c.read_simple();
        if error == 0 {
            crate::util::read_n(&mut c.s, 4096);
        }
        assert!(
            answered.insert(cookie, error).is_none(),
            "cookie {cookie} twice"
        );
    }
    // The 65th was parsed too (it was waiting for a slot), so normally
    // requests 0..=64 succeed and the rest get ESHUTDOWN. Those past the
    // 65th can never be parsed before SIGTERM; on a very slow host fewer
    // may have been parsed by then, but never a success after an ESHUTDOWN.
    let errors: Vec<u32> = answered.values().copied().collect();
    assert!(
        errors[IN_FLIGHT as usize + 1..]
            .iter()
            .all(|&e| e == ESHUTDOWN),
        "unparsed requests not refused: {answered:?}"
    );
    let parsed = errors.iter().take_while(|&&e| e == 0).count();
    assert!(
        errors[parsed..].iter().all(|&e| e == ESHUTDOWN),
        "replies other than data then ESHUTDOWN: {answered:?}"
    );
    expect_eof(&mut c.s, Duration::from_secs(5), "after the last reply");
    let status = server.wait_for_exit(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

const ESHUTDOWN: u32 = 108;

/// Waits until every thread of process `pid` is stopped (state `T`).
fn wait_until_stopped(pid: u32) {
    let stopped = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    };
    crate::util::eventually("the inner server to stop", Duration::from_secs(10), stopped);
}

/// Sends SIGCONT to a stopped process when dropped (even on a failed
/// assertion), so that it can be killed and reaped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}
