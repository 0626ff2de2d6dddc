//! Malformed and hostile input on raw sockets, byte by byte.
//!
//! Each test starts its own server, sends something wrong, asserts the exact
//! reply (or that the server hangs up, quickly), and then proves the server
//! still serves: a fresh client does a complete good session (handshake, GO,
//! write and read back 4 KiB, DISC) on a new connection.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{read_n, send, Server};
use crate::wire::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The server's limits under test (see `crates/proto`): longest option data
/// read, longest option data drained, longest payload served.
const MAX_OPTION_LEN: u32 = 64 * 1024;
const MAX_OPTION_DRAIN: u32 = 16 * 1024 * 1024;
const MAX_PAYLOAD: u64 = 32 * MIB;

fn memory_server() -> Server {
    Server::start(&["memory", "size=1M"])
}

/// A server of each backend, `size` bytes: memory runs requests inline on
/// the connection's thread; a file may block, so its requests go to the
/// worker pool and replies can leave out of order. The file's directory is
/// returned with its server (tuples drop in order: server first).
fn servers_of_each_backend(size: u64) -> Vec<(&'static str, Server, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let file = Server::start(&["file", &format!("path={}", path.display())]);
    let memory = Server::start(&["memory", &format!("size={size}")]);
    vec![("memory", memory, None), ("file", file, Some(dir))]
}

/// Deterministic pseudo-random bytes (xorshift).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes 4 KiB at `offset` on `c` and reads it back.
fn check_io(c: &mut Conn, offset: u64, seed: u64) {
    let data = pattern(seed, 4096);
    c.write(0xa11ce, offset, &data);
    assert!(
        c.read(0xb0b, offset, 4096) == data,
        "read back differs ({:?})",
        c.mode
    );
}

/// The server is alive and a brand-new client gets a complete, correct
/// session: handshake, GO, write + read back 4 KiB (just read on a read-only
/// export), DISC. Uses the export's last 4 KiB, which no test relies on.
fn assert_server_still_serves(server: &mut Server) {
    static SEED: AtomicU64 = AtomicU64::new(1);
    server.assert_alive();
    let mut c = Conn::open(server, Mode::Simple);
    let at = c.size() - 4096;
    if c.export.flags & TF_READ_ONLY != 0 {
        assert_eq!(
            c.read(1, at, 4096),
            vec![0u8; 4096],
            "read-only disk changed"
        );
    } else {
        let seed = SEED.fetch_add(1, Ordering::Relaxed) ^ u64::from(std::process::id()) << 20;
        check_io(&mut c, at, seed);
    }
    c.disconnect();
    server.assert_alive();
}

// ------------------------------------------------------------- handshake

#[test]
fn client_flags_with_unknown_bits_are_dropped() {
    let mut server = memory_server();
    // FIXED_NEWSTYLE plus an unknown bit, an unknown bit alone, and a high one.
    for flags in [0x5u32, 0x4, 0x8000_0001] {
        let (mut s, _) = greeted(&server);
        send(&mut s, &flags.to_be_bytes());
        expect_closed(&mut s, &format!("client flags {flags:#x}"));
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn client_without_fixed_newstyle_is_dropped() {
    let mut server = memory_server();
    for flags in [0u32, NO_ZEROES as u32] {
        let (mut s, _) = greeted(&server);
        send(&mut s, &flags.to_be_bytes());
        expect_closed(&mut s, &format!("client flags {flags:#x}"));
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn bad_option_magic_closes_connection() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send(&mut s, &Msg::new().bytes(b"IHAVEOPX").u32(OPT_GO).u32(0).0);
    expect_closed(&mut s, "option with bad magic");
    assert_server_still_serves(&mut server);
}

#[test]
fn overlong_option_is_drained_and_refused_too_big() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    // The longest option read is answered normally (unknown → UNSUP)...
    send_option(&mut s, 0x1234, &vec![0xaa; MAX_OPTION_LEN as usize]);
    expect_option_error(&mut s, 0x1234, ERR_UNSUP);
    // ...one byte more is drained and refused, for unknown and known options.
    send_option(&mut s, 0x1234, &vec![0xbb; MAX_OPTION_LEN as usize + 1]);
    expect_option_error(&mut s, 0x1234, ERR_TOO_BIG);
    let mut go_data = info_request("", &[]);
    go_data.resize(MAX_OPTION_LEN as usize + 1, 0);
    send_option(&mut s, OPT_GO, &go_data);
    expect_option_error(&mut s, OPT_GO, ERR_TOO_BIG);
    // The stream is still in sync: GO works on the same connection.
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 1);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn absurd_option_length_disconnects_at_once() {
    let mut server = memory_server();
    for len in [u32::MAX, MAX_OPTION_DRAIN + 1] {
        let mut s = negotiating(&server);
        let start = Instant::now();
        // Header only: a server that tried to read (or allocate) the data
        // would wait here until the 5 s close deadline.
        send(&mut s, &Msg::new().u64(IHAVEOPT).u32(0x1234).u32(len).0);
        expect_closed(&mut s, &format!("option length {len:#x}"));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "slow close: {:?}",
            start.elapsed()
        );
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn option_data_disagreeing_with_inner_lengths_is_invalid() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    let bad_go: [(&str, Vec<u8>); 5] = [
        (
            "name length past the end",
            Msg::new().u32(100).bytes(b"abc").u16(0).0,
        ),
        (
            "trailing junk",
            Msg::new().bytes(&info_request("", &[])).bytes(b"junk").0,
        ),
        (
            "info count past the end",
            Msg::new().u32(0).u16(5).u16(INFO_EXPORT).0,
        ),
        ("data shorter than a name length", vec![0, 0]),
        ("no data at all", vec![]),
    ];
    for (what, data) in &bad_go {
        for option in [OPT_GO, OPT_INFO] {
            send_option(&mut s, option, data);
            let r = read_option_reply(&mut s);
            assert_eq!(
                (r.option, r.kind),
                (option, ERR_INVALID),
                "{what} (option {option}): {r:?}"
            );
        }
    }
    // Meta-context requests are parsed once structured replies are on.
    ack_option(&mut s, OPT_STRUCTURED_REPLY);
    let bad_meta: [(&str, Vec<u8>); 4] = [
        (
            "query length past the end",
            Msg::new()
                .u32(0)
                .u32(1)
                .u32(100)
                .bytes(b"base:allocation")
                .0,
        ),
        (
            "query count past the end",
            Msg::new().u32(0).u32(0xffff_ffff).0,
        ),
        (
            "export name length past the end",
            Msg::new().u32(50).bytes(b"x").0,
        ),
        (
            "trailing junk",
            Msg::new()
                .bytes(&meta_request("", &["base:allocation"]))
                .bytes(&[1])
                .0,
        ),
    ];
    for (what, data) in &bad_meta {
        for option in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
            send_option(&mut s, option, data);
            let r = read_option_reply(&mut s);
            assert_eq!(
                (r.option, r.kind),
                (option, ERR_INVALID),
                "{what} (option {option}): {r:?}"
            );
        }
    }
    let mut c = Conn::go(s, Mode::Structured, "");
    check_io(&mut c, 0, 2);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn unknown_option_is_unsup_and_session_continues() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(&mut s, 0x1234, b"0123456789");
    expect_option_error(&mut s, 0x1234, ERR_UNSUP);
    send_option(&mut s, 0x8000_0000, &[]);
    expect_option_error(&mut s, 0x8000_0000, ERR_UNSUP);
    // NBD_OPT_PEEK_EXPORT was withdrawn from the protocol.
    send_option(&mut s, OPT_PEEK_EXPORT, &[]);
    expect_option_error(&mut s, OPT_PEEK_EXPORT, ERR_UNSUP);
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 3);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn unknown_export_is_refused_and_default_export_still_opens() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    for option in [OPT_INFO, OPT_GO] {
        send_option(&mut s, option, &info_request("nosuch", &[]));
        let msg = expect_option_error(&mut s, option, ERR_UNKNOWN);
        assert!(!msg.is_empty(), "ERR_UNKNOWN should say why");
    }
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 4);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn export_name_for_unknown_export_closes() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(&mut s, OPT_EXPORT_NAME, b"nosuch");
    expect_closed(&mut s, "NBD_OPT_EXPORT_NAME nosuch");
    assert_server_still_serves(&mut server);
}

#[test]
fn export_name_after_extended_headers_closes() {
    // EXPORT_NAME has no error reply and its success reply has no room for
    // extended headers; a client MUST NOT send it once they are on.
    let mut server = memory_server();
    let mut s = negotiating(&server);
    ack_option(&mut s, OPT_EXTENDED_HEADERS);
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    expect_closed(&mut s, "NBD_OPT_EXPORT_NAME after extended headers");
    assert_server_still_serves(&mut server);
}

#[test]
fn list_with_data_is_invalid() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(&mut s, OPT_LIST, b"x");
    expect_option_error(&mut s, OPT_LIST, ERR_INVALID);
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 5);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn starttls_without_tls_is_policy() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(&mut s, OPT_STARTTLS, &[]);
    expect_option_error(&mut s, OPT_STARTTLS, ERR_POLICY);
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 6);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn structured_reply_after_extended_headers_is_ext_header_reqd() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    ack_option(&mut s, OPT_EXTENDED_HEADERS);
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    expect_option_error(&mut s, OPT_STRUCTURED_REPLY, ERR_EXT_HEADER_REQD);
    // Extended headers stay on: replies come as extended chunks.
    let mut c = Conn::go(s, Mode::Extended, "");
    check_io(&mut c, 0, 7);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn set_meta_context_before_structured_replies_is_invalid() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_request("", &["base:allocation"]),
    );
    expect_option_error(&mut s, OPT_SET_META_CONTEXT, ERR_INVALID);
    let mut c = Conn::go(s, Mode::Simple, "");
    check_io(&mut c, 0, 8);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn abort_is_acked_then_closed() {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    send_option(&mut s, OPT_ABORT, &[]);
    let ack = read_n(&mut s, 20);
    assert_eq!(
        ack,
        Msg::new()
            .u64(OPTION_REPLY_MAGIC)
            .u32(OPT_ABORT)
            .u32(REP_ACK)
            .u32(0)
            .0
    );
    expect_closed(&mut s, "after NBD_OPT_ABORT");
    assert_server_still_serves(&mut server);
}

// ---------------------------------------------------------- transmission

#[test]
fn bad_request_magic_disconnects() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        let mut h = c.header(0, CMD_READ, 1, 0, 512);
        h[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        send(&mut c.s, &h);
        expect_closed(&mut c.s, &format!("bad request magic ({mode:?})"));
    }
    // The other framing's magic is just as wrong.
    let mut c = Conn::open(&server, Mode::Extended);
    let compact = Msg::new()
        .u32(REQUEST_MAGIC)
        .u16(0)
        .u16(CMD_READ)
        .u64(1)
        .u64(0)
        .u32(512);
    send(&mut c.s, &compact.u32(0).0);
    expect_closed(&mut c.s, "compact request after extended headers");
    let mut c = Conn::open(&server, Mode::Simple);
    let ext = Msg::new()
        .u32(EXT_REQUEST_MAGIC)
        .u16(0)
        .u16(CMD_READ)
        .u64(1)
        .u64(0)
        .u64(512);
    send(&mut c.s, &ext.0);
    expect_closed(&mut c.s, "extended request without extended headers");
    assert_server_still_serves(&mut server);
}

#[test]
fn unknown_command_is_einval_and_connection_continues() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        for kind in [42u16, 8, 0xffff] {
            c.request(0, kind, 0x4200 + u64::from(kind), 4096, 512);
            c.expect_error(0x4200 + u64::from(kind), 4096, EINVAL);
        }
        check_io(&mut c, 0, 10);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn unknown_flag_on_read_is_einval() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        c.request(1 << 9, CMD_READ, 0x9, 0, 4096);
        c.expect_error(0x9, 0, EINVAL);
        c.request(1 << 15, CMD_READ, 0xf, 8192, 512);
        c.expect_error(0xf, 8192, EINVAL);
        check_io(&mut c, 0, 11);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn df_read_is_einval_without_structured_replies() {
    let mut server = memory_server();
    let mut c = Conn::open(&server, Mode::Simple);
    assert_eq!(
        c.export.flags & TF_SEND_DF,
        0,
        "SEND_DF advertised without structured replies"
    );
    c.request(FLAG_DF, CMD_READ, 0xdf, 0, 4096);
    c.expect_error(0xdf, 0, EINVAL);
    check_io(&mut c, 0, 12);
    c.disconnect();
    // With chunks, DF is allowed and means at most one content chunk.
    for mode in [Mode::Structured, Mode::Extended] {
        let mut c = Conn::open(&server, mode);
        assert_ne!(c.export.flags & TF_SEND_DF, 0, "SEND_DF with {mode:?}");
        c.request(FLAG_DF, CMD_READ, 0xdf, 0, 64 * 1024);
        let chunk = c.read_chunk();
        assert_eq!(
            (chunk.cookie, chunk.flags),
            (0xdf, CHUNK_DONE),
            "one final chunk"
        );
        assert!(
            chunk.kind == CHUNK_OFFSET_DATA && chunk.payload.len() == 8 + 64 * 1024,
            "DF read must be one OFFSET_DATA chunk, got type {:#x} of {} bytes",
            chunk.kind,
            chunk.payload.len()
        );
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn read_and_cache_past_end_are_einval() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        let size = c.size();
        let cases = [
            (size - 4096, 8192),
            (size, 1),
            (u64::MAX - 100, 4096), // offset + length overflows u64
            (u64::MAX, 1),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            for kind in [CMD_READ, CMD_CACHE] {
                let cookie = 0x100 * u64::from(kind) + i as u64;
                c.request(0, kind, cookie, offset, len);
                c.expect_error(cookie, offset, EINVAL);
            }
        }
        if mode == Mode::Extended {
            // 64-bit lengths: far past the end, and overflowing.
            for (cookie, len) in [(0xe1, 1u64 << 40), (0xe2, u64::MAX)] {
                c.request(0, CMD_CACHE, cookie, 4096, len);
                c.expect_error(cookie, 4096, EINVAL);
            }
        }
        check_io(&mut c, 0, 13);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn trim_past_end_is_einval() {
    // Spec: "It SHOULD return NBD_EINVAL if it receives a read or trim
    // request including one or more sectors beyond the size of the device".
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        assert_ne!(
            c.export.flags & TF_SEND_TRIM,
            0,
            "memory backend advertises TRIM"
        );
        let size = c.size();
        for (cookie, offset, len) in [
            (1, size - 4096, 8192),
            (2, size, 1),
            (3, u64::MAX - 100, 4096),
        ] {
            c.request(0, CMD_TRIM, cookie, offset, len);
            c.expect_error(cookie, offset, EINVAL);
        }
        check_io(&mut c, 0, 14);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn write_past_end_is_enospc_and_payload_is_consumed() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        let size = c.size();
        let data = pattern(15, 4096);
        for (cookie, offset) in [(1, size - 2048), (2, size), (3, u64::MAX - 100)] {
            c.send_write(cookie, offset, &data);
            c.expect_error(cookie, offset, ENOSPC);
        }
        for (cookie, offset, len) in [(4, size - 2048, 4096), (5, u64::MAX - 100, 4096)] {
            c.request(0, CMD_WRITE_ZEROES, cookie, offset, len);
            c.expect_error(cookie, offset, ENOSPC);
        }
        // The partly in-range write changed nothing in range.
        assert_eq!(c.read(6, size - 8192, 8192), vec![0u8; 8192], "{mode:?}");
        check_io(&mut c, 0, 16);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn write_on_read_only_export_is_eperm_and_payload_is_consumed() {
    let mut server = Server::start(&["-r", "memory", "size=1M"]);
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        assert_ne!(c.export.flags & TF_READ_ONLY, 0, "READ_ONLY flag with -r");
        c.send_write(1, 0, &pattern(17, 4096));
        c.expect_error(1, 0, EPERM);
        // Other modifying commands are refused too, without disconnecting.
        for (cookie, kind) in [(2, CMD_TRIM), (3, CMD_WRITE_ZEROES)] {
            c.request(0, kind, cookie, 0, 4096);
            c.expect_error(cookie, 0, EPERM);
        }
        assert_eq!(
            c.read(4, 0, 4096),
            vec![0u8; 4096],
            "refused write landed ({mode:?})"
        );
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn block_status_without_meta_context_is_einval() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        c.request(0, CMD_BLOCK_STATUS, 0xb5, 0, 4096);
        c.expect_error(0xb5, 0, EINVAL);
        check_io(&mut c, 0, 18);
        c.disconnect();
    }
    // A SET_META_CONTEXT that matched nothing (unknown namespace) selects
    // nothing, so BLOCK_STATUS is still refused.
    let mut s = negotiating(&server);
    ack_option(&mut s, OPT_STRUCTURED_REPLY);
    send_option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_request("", &["nosuch:thing"]),
    );
    expect_option_reply(&mut s, OPT_SET_META_CONTEXT, REP_ACK);
    let mut c = Conn::go(s, Mode::Structured, "");
    c.request(0, CMD_BLOCK_STATUS, 0xb6, 0, 4096);
    c.expect_error(0xb6, 0, EINVAL);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn zero_length_requests_succeed() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        c.request(0, CMD_READ, 1, 4096, 0);
        assert!(c.expect_data(1, 4096, 0).is_empty());
        c.send_write(2, 4096, &[]);
        c.expect_ok(2, 4096);
        for (cookie, kind) in [
            (3, CMD_TRIM),
            (4, CMD_WRITE_ZEROES),
            (5, CMD_CACHE),
            (6, CMD_FLUSH),
        ] {
            let offset = if kind == CMD_FLUSH { 0 } else { 4096 };
            c.request(0, kind, cookie, offset, 0);
            c.expect_ok(cookie, offset);
        }
        check_io(&mut c, 0, 19);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

// ------------------------------------------------------ oversized payloads

#[test]
fn oversized_compact_write_is_drained_then_einval() {
    let mut server = memory_server();
    for (i, mode) in [Mode::Simple, Mode::Structured].into_iter().enumerate() {
        let mut c = Conn::open(&server, mode);
        let before = pattern(20 + i as u64, 4096);
        c.write(1, 0, &before);
        // Sent from another thread: the server may answer only after reading
        // all of it, and the test must not deadlock either way.
        let big = c.write_bytes(0xb16, 0, &vec![0x5a; (MAX_PAYLOAD + 4096) as usize]);
        let mut w = c.s.try_clone().unwrap();
        let writer = thread::spawn(move || std::io::Write::write_all(&mut w, &big));
        c.expect_error(0xb16, 0, EINVAL);
        let sent = writer.join().unwrap();
        sent.unwrap_or_else(|e| panic!("server stopped reading the payload ({mode:?}): {e}"));
        assert!(
            c.read(2, 0, 4096) == before,
            "refused write changed data ({mode:?})"
        );
        check_io(&mut c, 8192, 21);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn absurd_compact_write_length_disconnects_at_once() {
    let mut server = memory_server();
    for len in [u32::MAX, (2 * MAX_PAYLOAD + 1) as u32] {
        let mut c = Conn::open(&server, Mode::Simple);
        let start = Instant::now();
        let h = c.header(0, CMD_WRITE, 1, 0, u64::from(len));
        send(&mut c.s, &h);
        expect_closed(&mut c.s, &format!("WRITE of {len:#x} bytes"));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "slow close: {:?}",
            start.elapsed()
        );
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn extended_write_over_max_payload_disconnects() {
    let mut server = memory_server();
    let mut c = Conn::open(&server, Mode::Extended);
    let h = c.header(FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 33 * MIB);
    send(&mut c.s, &h);
    let _ = std::io::Write::write_all(&mut c.s, &[0u8; 4096]); // the server may hang up first
    expect_closed(&mut c.s, "extended WRITE of 33 MiB");
    assert_server_still_serves(&mut server);
}

#[test]
fn oversized_read_is_einval_without_data() {
    let mut server = memory_server();
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        c.request(0, CMD_READ, 0x33, 4096, 33 * MIB);
        c.expect_error(0x33, 4096, EINVAL);
        // No data followed the error: the next reply comes straight after.
        check_io(&mut c, 0, 22);
        c.disconnect();
    }
    assert_server_still_serves(&mut server);
}

// ------------------------------------------------------ clients going away

#[test]
fn truncated_write_payload_changes_nothing_and_server_survives() {
    let mut server = memory_server();
    let region = |i: u64| (i * 64 * KIB, pattern(30 + i, 64 * KIB as usize));
    let mut c = Conn::open(&server, Mode::Simple);
    for i in 0..3 {
        let (at, data) = region(i);
        c.write(i, at, &data);
    }
    c.disconnect();

    // A WRITE of 64 KiB over the middle region, but only 1 KiB of it, then
    // the client closes its write side (the server must hang up, not reply)...
    let mut c = Conn::open(&server, Mode::Simple);
    let mut partial = c.header(0, CMD_WRITE, 0xbad, 64 * KIB, 64 * KIB);
    partial.extend_from_slice(&[0xee; 1024]);
    send(&mut c.s, &partial);
    c.s.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut c.s, "truncated WRITE payload");
    // ...and the same with a client that simply vanishes.
    let mut c = Conn::open(&server, Mode::Extended);
    let mut partial = c.header(FLAG_PAYLOAD_LEN, CMD_WRITE, 0xbad, 64 * KIB, 64 * KIB);
    partial.extend_from_slice(&[0xee; 1024]);
    send(&mut c.s, &partial);
    drop(c);

    server.assert_alive();
    let mut c = Conn::open(&server, Mode::Structured);
    for i in 0..3 {
        let (at, data) = region(i);
        assert!(c.read(i, at, 64 * KIB as u32) == data, "region {i} changed");
    }
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn clients_vanishing_mid_handshake_or_request_leave_server_serving() {
    let mut server = memory_server();
    // Before reading the greeting.
    drop(server.connect());
    // After the greeting, before the client flags.
    drop(greeted(&server).0);
    // Half the client flags.
    let (mut s, _) = greeted(&server);
    send(&mut s, &[0, 0]);
    drop(s);
    // Half an option header.
    let mut s = negotiating(&server);
    send(&mut s, &IHAVEOPT.to_be_bytes());
    drop(s);
    // An option header promising more data than comes.
    let mut s = negotiating(&server);
    send(
        &mut s,
        &Msg::new().u64(IHAVEOPT).u32(OPT_GO).u32(100).u32(0).0,
    );
    drop(s);
    // GO sent, reply never read.
    let mut s = negotiating(&server);
    send_option(&mut s, OPT_GO, &info_request("", &[]));
    drop(s);
    // Half a request header, in each framing; once with a half-close.
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        let h = c.header(0, CMD_READ, 1, 0, 4096);
        send(&mut c.s, &h[..14]);
        drop(c);
    }
    let mut c = Conn::open(&server, Mode::Simple);
    let h = c.header(0, CMD_READ, 1, 0, 4096);
    send(&mut c.s, &h[..14]);
    c.s.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut c.s, "half a request header, then EOF");
    // Many READs whose replies are never read.
    let mut c = Conn::open(&server, Mode::Simple);
    let reads: Vec<u8> = (0..64)
        .flat_map(|i| c.header(0, CMD_READ, i, 0, 64 * 1024))
        .collect();
    send(&mut c.s, &reads);
    drop(c);
    assert_server_still_serves(&mut server);
}

// -------------------------------------------------------------- pipelining

#[test]
fn pipelined_requests_are_each_answered_exactly_once() {
    const N: u64 = 2000;
    for (backend, mut server, _dir) in servers_of_each_backend(16 * MIB) {
        pipelined_on(&mut server, backend, N);
    }
}

fn pipelined_on(server: &mut Server, backend: &str, n: u64) {
    for (m, mode) in MODES.into_iter().enumerate() {
        let seed = |i: u64| (m as u64) << 32 | i;
        let cookie = |i: u64| 0xc0de_0000_0000 | i;
        let mut c = Conn::open(server, mode);

        // 2000 WRITEs of 4 KiB without reading a reply in between.
        let reader = {
            let mut r = c.try_clone();
            thread::spawn(move || (0..n).map(|_| r.read_any_ok()).collect::<Vec<_>>())
        };
        for i in 0..n {
            c.send_write(cookie(i), i * 4096, &pattern(seed(i), 4096));
        }
        let mut seen = HashMap::new();
        for (ck, offset) in reader.join().unwrap() {
            assert_eq!(
                ck & !0xffff,
                0xc0de_0000_0000,
                "unknown cookie {ck:#x} ({backend}, {mode:?})"
            );
            let i = ck & 0xffff;
            assert!(
                seen.insert(i, ()).is_none(),
                "cookie {ck:#x} answered twice ({backend}, {mode:?})"
            );
            if let Some(o) = offset {
                assert_eq!(o, i * 4096, "extended chunk offset for cookie {ck:#x}");
            }
        }
        assert_eq!(
            seen.len() as u64,
            n,
            "every WRITE answered ({backend}, {mode:?})"
        );

        // 2000 READs the same way; the reader checks each reply's data.
        let reader = {
            let mut r = c.try_clone();
            thread::spawn(move || read_pipelined(&mut r, n, |ck| (ck & 0xffff) * 4096))
        };
        for i in 0..n {
            c.request(0, CMD_READ, cookie(i), i * 4096, 4096);
        }
        let replies = reader.join().unwrap();
        assert_eq!(
            replies.len() as u64,
            n,
            "every READ answered ({backend}, {mode:?})"
        );
        for (ck, data) in replies {
            let i = ck & 0xffff;
            assert!(
                data == pattern(seed(i), 4096),
                "READ {i} returned other data ({backend}, {mode:?})"
            );
        }
        c.disconnect();
    }
    assert_server_still_serves(server);
}

/// Reads the replies to `n` pipelined 4 KiB READs, in whatever order and
/// chunking they come; `offset_of` maps a cookie to its request's offset.
/// Returns each cookie's data; panics on a cookie answered twice.
fn read_pipelined(c: &mut Conn, n: u64, offset_of: impl Fn(u64) -> u64) -> HashMap<u64, Vec<u8>> {
    let mut done = HashMap::new();
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    while (done.len() as u64) < n {
        if c.mode == Mode::Simple {
            let (err, ck) = c.read_simple();
            assert_eq!(err, 0, "READ {ck:#x} failed");
            let data = read_n(&mut c.s, 4096);
            assert!(
                done.insert(ck, data).is_none(),
                "cookie {ck:#x} answered twice"
            );
            continue;
        }
        let chunk = c.read_chunk();
        let ck = chunk.cookie;
        assert!(!done.contains_key(&ck), "chunk for finished cookie {ck:#x}");
        let base = offset_of(ck);
        if let Some(o) = chunk.offset {
            assert_eq!(o, base, "extended chunk offset for cookie {ck:#x}");
        }
        let buf = partial.entry(ck).or_insert_with(|| vec![0u8; 4096]);
        match chunk.kind {
            CHUNK_OFFSET_DATA => {
                let at = (be64(&chunk.payload, 0) - base) as usize;
                buf[at..at + chunk.payload.len() - 8].copy_from_slice(&chunk.payload[8..]);
            }
            CHUNK_OFFSET_HOLE => {
                let at = (be64(&chunk.payload, 0) - base) as usize;
                buf[at..at + be32(&chunk.payload, 8) as usize].fill(0);
            }
            k => panic!("READ {ck:#x}: chunk type {k:#x}"),
        }
        if chunk.flags & CHUNK_DONE != 0 {
            done.insert(ck, partial.remove(&ck).unwrap());
        }
    }
    done
}

#[test]
fn disc_after_pipelined_writes_completes_them_first() {
    const WRITES: u64 = 16;
    const LEN: u64 = 32 * KIB;
    for (b, (backend, mut server, _dir)) in servers_of_each_backend(MIB).into_iter().enumerate() {
        for (m, mode) in MODES.into_iter().enumerate() {
            let seed = |i: u64| 0xd15c + (b * 10 + m) as u64 * 100 + i;
            let mut c = Conn::open(&server, mode);
            // 16 WRITEs and the DISC, all in one write() call.
            let mut burst = Vec::new();
            for i in 0..WRITES {
                burst.extend(c.write_bytes(i, i * LEN, &pattern(seed(i), LEN as usize)));
            }
            burst.extend(c.header(0, CMD_DISC, 0xd15c, 0, 0));
            send(&mut c.s, &burst);
            // Each WRITE is answered exactly once, then the server hangs up.
            let mut seen: Vec<u64> = (0..WRITES).map(|_| c.read_any_ok().0).collect();
            seen.sort_unstable();
            let all: Vec<u64> = (0..WRITES).collect();
            assert_eq!(
                seen, all,
                "WRITE replies before close ({backend}, {mode:?})"
            );
            expect_closed(&mut c.s, &format!("after DISC ({backend}, {mode:?})"));

            let mut c = Conn::open(&server, Mode::Simple);
            for i in 0..WRITES {
                let back = c.read(i, i * LEN, LEN as u32);
                assert!(
                    back == pattern(seed(i), LEN as usize),
                    "WRITE {i} lost ({backend}, {mode:?})"
                );
            }
            c.disconnect();
        }
        assert_server_still_serves(&mut server);
    }
}

/// A client that connects and then says nothing is dropped after the
/// handshake timeout (10 s), so silent clients cannot pin server threads;
/// a client idle in transmission is not.
#[test]
fn silent_client_is_dropped_after_handshake_timeout() {
    let mut server = memory_server();
    let mut idle = Conn::open(&server, Mode::Simple);
    let (mut silent, _) = greeted(&server);
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let n = std::io::Read::read(&mut silent, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "server sent bytes to a silent client");
    let waited = start.elapsed();
    assert!(
        (std::time::Duration::from_secs(9)..std::time::Duration::from_secs(14)).contains(&waited),
        "silent client dropped after {waited:?}, expected about 10 s"
    );
    // The idle transmission-phase client is still served.
    idle.write(1, 0, &[7u8; 512]);
    assert_eq!(idle.read(2, 0, 512), vec![7u8; 512]);
    assert_server_still_serves(&mut server);
}
