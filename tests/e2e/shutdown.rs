//! SIGTERM stops the server gracefully: connections in every phase are
//! closed cleanly, the socket file goes, and the exit status is 0.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{run, Server};
use crate::wire::{negotiating, Conn, Mode};

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

    run(Command::new("kill").args(["-TERM", &server.pid().to_string()]));

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
    run(Command::new("kill").args(["-TERM", &server.pid().to_string()]));

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
