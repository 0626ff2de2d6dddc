//! Replies leave in completion order: on a backend whose requests run on the
//! worker pool, a slow request does not hold up the fast ones sent after it.

use std::io::Read;

use crate::util::{read_n, send, Server};
use crate::wire::{be32, be64, Conn, Mode, CMD_READ};

/// A 32 MiB READ followed by eight 4 KiB READs on one connection of a
/// file-backed export: a small read's reply comes back first, then every
/// cookie is answered exactly once.
#[test]
fn small_reads_overtake_a_large_one_on_the_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    crate::util::random_file(&path, 64 << 20, 3);
    let server = Server::start(&["file", &format!("path={}", path.display())]);
    let mut c = Conn::open(&server, Mode::Simple);
    let mut batch = c.header(0, CMD_READ, 1, 0, 32 << 20);
    for cookie in 2..10u64 {
        batch.extend(c.header(0, CMD_READ, cookie, (40 << 20) + cookie * 4096, 4096));
    }
    send(&mut c.s, &batch);

    let mut order = Vec::new();
    for _ in 1..10 {
        let h = read_n(&mut c.s, 16);
        assert_eq!(be32(&h, 4), 0, "error reply");
        let cookie = be64(&h, 8);
        let len = if cookie == 1 { 32 << 20 } else { 4096 };
        let mut data = vec![0u8; len];
        c.s.read_exact(&mut data).unwrap();
        order.push(cookie);
    }
    assert_ne!(
        order[0], 1,
        "the large read held up the small ones: {order:?}"
    );
    order.sort();
    assert_eq!(order, (1..10).collect::<Vec<u64>>());
}
