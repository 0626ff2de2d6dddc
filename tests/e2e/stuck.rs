//! Clients that stop reading their replies: they stall only themselves, the
//! server's memory stays bounded, and after `--reply-timeout` they are cut
//! off and their memory returns.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use crate::util::rss_kib;
use crate::util::{random_bytes, sockets, Server};
use crate::wire::{Conn, Mode, CMD_READ};

/// The scenario of the stuck-clients issue: `stuck` raw connections each
/// queue 32 MiB READs until their socket is full and then never read a
/// reply; a healthy client that connects afterwards must be served at once.
fn stuck_clients_leave_others_served(backend: &[&str], stuck: usize) {
    let mut args = vec!["--reply-timeout", "4s"];
    args.extend_from_slice(backend);
    let server = Server::start(&args);
    let base_rss = rss_kib(server.pid());
    let base_sockets = idle_sockets(&server);
    let stuck: Vec<Conn> = (0..stuck).map(|_| stop_reading(&server)).collect();

    let started = Instant::now();
    let mut healthy = Conn::open(&server, Mode::Simple);
    healthy
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = random_bytes(4096, 11);
    healthy.send_write(1, 1 << 20, &data);
    let (error, cookie) = healthy.read_simple();
    assert_eq!((error, cookie), (0, 1), "healthy write");
    healthy.request(0, CMD_READ, 2, 1 << 20, 4096);
    let (error, cookie) = healthy.read_simple();
    assert_eq!((error, cookie), (0, 2), "healthy read");
    let mut back = vec![0u8; 4096];
    healthy.s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
    let took = started.elapsed();
    // Well under a second on a quiet machine; the bound leaves room for a
    // loaded CI host. Before the fix the client waited forever.
    assert!(
        took < Duration::from_secs(2),
        "a healthy client waited {took:?} behind {} stuck ones",
        stuck.len()
    );

    // Each stuck connection holds at most its budget (32 MiB, plus a
    // little for small requests) of replies and payloads.
    let held_mib = (rss_kib(server.pid()) - base_rss) / 1024;
    let bound = stuck.len() as u64 * 36;
    assert!(
        held_mib < bound,
        "{held_mib} MiB held for {} stuck clients",
        stuck.len()
    );

    // After the reply timeout each stuck connection is cut (the server closes
    // its socket): what was already in the socket can still be read, then
    // the stream ends. Reading before the cut would count as progress, so
    // wait for the server's sockets first.
    drop(healthy);
    crate::util::eventually(
        "the server to cut off every stuck client",
        Duration::from_secs(60),
        || sockets(server.pid()) <= base_sockets,
    );
    for mut c in stuck {
        let drained = drain(&mut c);
        assert!(
            drained < 40 << 20,
            "a stuck client could read {drained} bytes: it was not cut off"
        );
    }
    let after_mib = (rss_kib(server.pid()).saturating_sub(base_rss)) / 1024;
    assert!(
        after_mib < 64,
        "{after_mib} MiB still held after every stuck client was cut off"
    );
}

/// The server's sockets with no client, once the connection of `Server::start`'s readiness probe is gone (on a loaded
/// host it may still be ending, holding its socket, and a duplicate of it
/// for the handshake deadline, when the server is first seen ready; a
/// baseline counting them let a stuck client look cut off before it was).
fn idle_sockets(server: &Server) -> usize {
    // The fewest seen over half a second: the probe's connection ends in
    // well under that once its thread runs.
    (0..25)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            sockets(server.pid())
        })
        .min()
        .unwrap_or(0)
}

/// Opens a connection and sends 32 MiB READs without reading a reply, until
/// the server stops taking requests (its budget is full, so it stopped
/// reading, and the socket filled up).
fn stop_reading(server: &Server) -> Conn {
    let mut c = Conn::open(server, Mode::Simple);
    c.s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let size = c.size();
    for cookie in 0..1_000_000u64 {
        let offset = (cookie * (32 << 20)) % (size - (32 << 20));
        let h = c.header(0, CMD_READ, cookie, offset, 32 << 20);
        match c.s.write_all(&h) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return c,
            Err(e) => panic!("stuck client: {e}"),
        }
    }
    panic!("the server took a million 32 MiB READs without anyone reading a reply");
}

/// Reads a connection to its end; how many bytes came.
fn drain(c: &mut Conn) -> usize {
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match c.s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("stuck client was not cut off ({total} bytes read): {e}"),
        }
        assert!(total < 1 << 30, "the server kept sending");
    }
}

fn sparse_image(dir: &std::path::Path) -> String {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    format!("path={}", path.display())
}

#[test]
fn sixteen_stuck_clients_of_a_file_export() {
    let dir = tempfile::tempdir().unwrap();
    stuck_clients_leave_others_served(&["file", &sparse_image(dir.path())], 16);
}

#[test]
fn more_stuck_clients_than_workers_of_a_file_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(dir.path());
    stuck_clients_leave_others_served(&["--threads", "4", "file", &image], 5);
}

#[test]
fn stuck_clients_of_tmpdisks_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let backing = format!("backing=dir:{}", dir.path().display());
    stuck_clients_leave_others_served(
        &["-e", "build", "tmpdisk", "size=4G", "type=none", &backing],
        16,
    );
}

#[test]
fn stuck_clients_of_spilling_tmpdisks() {
    let dir = tempfile::tempdir().unwrap();
    let backing = format!("backing=memory,spill=dir:{}", dir.path().display());
    stuck_clients_leave_others_served(
        &[
            "-e",
            "build",
            "--threads",
            "4",
            "tmpdisk",
            "size=4G",
            "type=none",
            &backing,
        ],
        5,
    );
}

/// A memory export runs requests on the connection's own thread, so a
/// stuck client never held anyone else; it is cut off all the same.
#[test]
fn a_stuck_client_of_a_memory_export_is_cut_off() {
    let server = Server::start(&["--reply-timeout", "2s", "memory", "size=1G"]);
    let base_sockets = idle_sockets(&server);
    let mut c = stop_reading(&server);
    let mut healthy = Conn::open(&server, Mode::Simple);
    healthy.request(0, CMD_READ, 1, 0, 4096);
    assert_eq!(healthy.read_simple(), (0, 1));
    drop(healthy);
    let server_pid = server.pid();
    crate::util::eventually(
        "the stuck client to be cut off",
        Duration::from_secs(60),
        || sockets(server_pid) <= base_sockets,
    );
    let drained = drain(&mut c);
    assert!(drained < 40 << 20, "read {drained} bytes: not cut off");
}
