//! Reply dispatch against a scripted server on a socket pair: replies out
//! of order, split into chunks and holes, errors, a server that dies or
//! stalls, and the in-flight bound.

use super::*;
use scratchd_proto::reply::{
    put_block_status, put_error, put_ok, put_read_data, put_read_hole, ReplyTo,
};
use scratchd_proto::request::request_len;
use scratchd_proto::Errno;
use std::os::unix::net::UnixStream;

/// The server end of a socket pair, reading requests in `mode`.
struct FakeServer {
    sock: UnixStream,
    mode: ReplyMode,
}

impl FakeServer {
    fn request(&mut self) -> RequestHeader {
        let mut raw = vec![0; request_len(self.mode)];
        self.sock.read_exact(&mut raw).unwrap();
        let header = RequestHeader::from_bytes(&raw, self.mode).unwrap();
        if header.kind == CMD_WRITE {
            let mut payload = vec![0; header.length as usize];
            self.sock.read_exact(&mut payload).unwrap();
        }
        header
    }

    fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }
}

fn to(h: &RequestHeader) -> ReplyTo {
    ReplyTo {
        cookie: h.cookie,
        offset: h.offset,
    }
}

fn pair(
    mode: ReplyMode,
    max_in_flight: usize,
    timeout: Option<Duration>,
) -> (Connection, FakeServer) {
    let (client, server) = UnixStream::pair().unwrap();
    let settings = Settings {
        mode,
        base_allocation: Some(3),
        max_in_flight,
        timeout,
    };
    let conn = Connection::start(Stream::Unix(client), settings).unwrap();
    (conn, FakeServer { sock: server, mode })
}

fn read(offset: u64, len: u64) -> Request<'static> {
    Request {
        command: CMD_READ,
        flags: 0,
        offset,
        len,
        payload: &[],
    }
}

fn other(command: u16) -> Request<'static> {
    Request {
        command,
        flags: 0,
        offset: 0,
        len: 512,
        payload: &[],
    }
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    let (conn, mut server) = pair(ReplyMode::Structured, 8, None);
    let server = thread::spawn(move || {
        let requests: Vec<_> = (0..4).map(|_| server.request()).collect();
        let mut out = Vec::new();
        // Answer in reverse order; each READ gets data then a hole, in
        // two chunks sent in reverse offset order.
        for h in requests.iter().rev() {
            if h.kind == CMD_READ {
                let half = h.length / 2;
                put_read_hole(
                    &mut out,
                    server.mode,
                    to(h),
                    h.offset + half,
                    (h.length - half) as u32,
                    false,
                );
                put_read_data(&mut out, server.mode, to(h), h.offset, half as u32, true);
                out.extend((0..half).map(|i| (h.offset + i) as u8 | 1));
            } else {
                put_ok(&mut out, server.mode, to(h));
            }
        }
        server.send(&out);
        server
    });
    let results: Vec<Vec<u8>> = thread::scope(|s| {
        let handles: Vec<_> = [0u64, 1000, 5000]
            .into_iter()
            .map(|offset| {
                let conn = &conn;
                s.spawn(move || {
                    conn.submit(&read(offset, 100))
                        .unwrap()
                        .wait()
                        .unwrap()
                        .data
                })
            })
            .collect();
        let data = [7u8; 512];
        let write = Request {
            command: CMD_WRITE,
            flags: 0,
            offset: 0,
            len: 512,
            payload: &data,
        };
        conn.submit(&write).unwrap().wait().unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (data, offset) in results.iter().zip([0u64, 1000, 5000]) {
        let want: Vec<u8> = (0..100u64)
            .map(|i| if i < 50 { (offset + i) as u8 | 1 } else { 0 })
            .collect();
        assert_eq!(data, &want, "read at {offset}");
    }
    assert_eq!(conn.in_flight(), 0);
    drop(server.join().unwrap());
}

#[test]
fn errors_and_block_status_in_every_framing() {
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        let (conn, mut server) = pair(mode, 8, None);
        let t = conn.submit(&other(CMD_WRITE_ZEROES)).unwrap();
        let h = server.request();
        let mut out = Vec::new();
        put_error(&mut out, mode, to(&h), Errno::NoSpc, "full");
        server.send(&out);
        let e = t.wait().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{mode:?}");
        if mode == ReplyMode::Simple {
            continue;
        }
        let t = conn.submit(&other(CMD_BLOCK_STATUS)).unwrap();
        let h = server.request();
        let d = [
            Descriptor {
                len: 256,
                status: 0,
            },
            Descriptor {
                len: 256,
                status: 3,
            },
        ];
        out.clear();
        // Another context's chunk is ignored.
        put_chunk_block_status(&mut out, mode, to(&h), 9, &d[..1], false);
        put_block_status(&mut out, mode, to(&h), 3, &d);
        server.send(&out);
        assert_eq!(t.wait().unwrap().extents, d, "{mode:?}");
    }
}

/// A block-status chunk without DONE (proto's encoder always sets it).
fn put_chunk_block_status(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    to: ReplyTo,
    context_id: u32,
    d: &[Descriptor],
    last: bool,
) {
    let payload = match mode {
        ReplyMode::Extended => ChunkPayload::BlockStatusExt {
            context_id,
            descriptors: d
                .iter()
                .map(|d| scratchd_proto::reply::ExtDescriptor {
                    len: d.len,
                    status: d.status.into(),
                })
                .collect(),
        },
        _ => ChunkPayload::BlockStatus {
            context_id,
            descriptors: d.to_vec(),
        },
    };
    scratchd_proto::reply::put_chunk(out, mode, to, last, &payload);
}

#[test]
fn simple_reads_take_the_request_length() {
    let (conn, mut server) = pair(ReplyMode::Simple, 8, None);
    let t = conn.submit(&read(4096, 10)).unwrap();
    let h = server.request();
    let mut out = Vec::new();
    put_read_data(&mut out, ReplyMode::Simple, to(&h), h.offset, 10, true);
    out.extend_from_slice(b"0123456789");
    server.send(&out);
    assert_eq!(t.wait().unwrap().data, b"0123456789");
}

#[test]
fn a_server_that_dies_fails_every_waiter_at_once() {
    let (conn, mut server) = pair(ReplyMode::Structured, 64, None);
    let started = Instant::now();
    let errors: Vec<io::Error> = thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let conn = &conn;
                s.spawn(move || {
                    conn.submit(&read(i * 512, 512))
                        .unwrap()
                        .wait()
                        .unwrap_err()
                })
            })
            .collect();
        for _ in 0..6 {
            server.request();
        }
        drop(server);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    for e in errors {
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
    }
    // Later requests fail without waiting.
    let e = conn.submit(&read(0, 1)).err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
}

#[test]
fn protocol_violations_end_the_connection() {
    let (conn, mut server) = pair(ReplyMode::Structured, 8, None);
    let t1 = conn.submit(&read(0, 8)).unwrap();
    let t2 = conn.submit(&read(8, 8)).unwrap();
    let h = server.request();
    server.request();
    let mut out = Vec::new();
    // Data outside the request.
    put_read_data(&mut out, ReplyMode::Structured, to(&h), 4, 8, true);
    out.extend_from_slice(&[1; 8]);
    server.send(&out);
    for t in [t1, t2] {
        let e = t.wait().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(e.to_string().contains("outside the request"), "{e}");
    }
    // An unknown cookie on a fresh connection.
    let (conn, mut server) = pair(ReplyMode::Simple, 8, None);
    let t = conn.submit(&other(CMD_FLUSH)).unwrap();
    let mut h = server.request();
    h.cookie += 1;
    out.clear();
    put_ok(&mut out, ReplyMode::Simple, to(&h));
    server.send(&out);
    assert!(t.wait().unwrap_err().to_string().contains("unknown cookie"));
}

#[test]
fn in_flight_requests_are_bounded() {
    let (conn, mut server) = pair(ReplyMode::Simple, 2, None);
    thread::scope(|s| {
        let conn = &conn;
        let waiters: Vec<_> = (0..3)
            .map(|_| s.spawn(move || conn.submit(&other(CMD_FLUSH)).unwrap().wait()))
            .collect();
        let first = server.request();
        let second = server.request();
        // The third waits for a slot: nothing more arrives.
        server
            .sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        let e = server.sock.read(&mut byte).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(conn.in_flight(), 2);
        server.sock.set_read_timeout(None).unwrap();
        let mut out = Vec::new();
        put_ok(&mut out, ReplyMode::Simple, to(&first));
        server.send(&out);
        let third = server.request();
        out.clear();
        put_ok(&mut out, ReplyMode::Simple, to(&third));
        put_ok(&mut out, ReplyMode::Simple, to(&second));
        server.send(&out);
        for w in waiters {
            w.join().unwrap().unwrap();
        }
    });
}

#[test]
fn a_stalled_server_times_out_and_frees_every_waiter() {
    let (conn, mut server) = pair(ReplyMode::Structured, 8, Some(Duration::from_millis(300)));
    let started = Instant::now();
    let t = conn.submit(&read(0, 512)).unwrap();
    server.request();
    let e = t.wait().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(3));
    // The connection is closed: further requests fail at once.
    let e = loop {
        match conn.submit(&read(0, 1)) {
            Err(e) => break e,
            // The reply thread may not have noticed yet.
            Ok(t) => drop(t.wait()),
        }
    };
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
}

#[test]
fn disconnect_sends_disc() {
    let (mut conn, mut server) = pair(ReplyMode::Extended, 8, None);
    conn.disconnect().unwrap();
    assert_eq!(server.request().kind, CMD_DISC);
    let mut rest = Vec::new();
    server.sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}
