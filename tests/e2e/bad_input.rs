//! Malformed and hostile input on raw sockets, byte by byte.
//!
//! Each test starts its own server, sends something wrong, asserts the exact
//! reply (or that the server hangs up, quickly), and then proves the server
//! still serves: a fresh client does a complete good session (handshake, GO,
//! write and read back 4 KiB, DISC) on a new connection.

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{random_bytes, read_n, send, Server};
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
/// worker pool and replies can leave out of order.
fn servers_of_each_backend(size: u64) -> Vec<(&'static str, Server)> {
    let (file, _) = Server::on_file(size);
    let memory = Server::start(&["memory", &format!("size={size}")]);
    vec![("memory", memory), ("file", file)]
}

/// Deterministic pseudo-random bytes: [`random_bytes`] with the seed spread
/// over all 64 bits, so that small neighbouring seeds give unrelated data.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    random_bytes(len, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
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

/// Sends `bytes` and expects the server to hang up at once: well within the
/// 5 s close deadline, so without waiting for (or allocating) whatever the
/// bytes announce.
fn send_and_expect_quick_close(s: &mut UnixStream, bytes: &[u8], what: &str) {
    let start = Instant::now();
    send(s, bytes);
    expect_closed(s, what);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "slow close: {:?}",
        start.elapsed()
    );
}

// ------------------------------------------------------------- handshake

/// Each of `flags`, sent as the client flags of a fresh connection, makes
/// the server hang up; then a fresh client still gets a full session.
fn client_flags_are_dropped(flags: &[u32]) {
    let mut server = memory_server();
    for &flags in flags {
        let (mut s, _) = greeted(&server);
        send(&mut s, &flags.to_be_bytes());
        expect_closed(&mut s, &format!("client flags {flags:#x}"));
    }
    assert_server_still_serves(&mut server);
}

/// On a fresh connection ready for options, `bad` sends something after
/// which the server must hang up (`what` says what); then a fresh client
/// still gets a full session.
fn negotiation_ends(what: &str, bad: impl FnOnce(&mut UnixStream)) {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    bad(&mut s);
    expect_closed(&mut s, what);
    assert_server_still_serves(&mut server);
}

/// On a fresh connection ready for options, `options` sends and checks
/// what it likes (acknowledging the options of `mode`); after it the stream
/// must still be in sync: GO works on the same connection, which writes and
/// reads back 4 KiB (`seed`) and disconnects. Then a fresh client still gets
/// a full session.
fn negotiation_goes_on(mode: Mode, seed: u64, options: impl FnOnce(&mut UnixStream)) {
    let mut server = memory_server();
    let mut s = negotiating(&server);
    options(&mut s);
    let mut c = Conn::go(s, mode, "");
    check_io(&mut c, 0, seed);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

/// Sends `option` with `data` and expects the error reply `err`; returns
/// the reply's message.
fn refuse_option(s: &mut UnixStream, option: u32, data: &[u8], err: u32) -> String {
    send_option(s, option, data);
    expect_option_error(s, option, err)
}

/// Each `(what, data)` sent as the data of each of `options` is refused
/// with ERR_INVALID.
fn expect_invalid(s: &mut UnixStream, options: [u32; 2], cases: &[(&str, Vec<u8>)]) {
    for (what, data) in cases {
        for option in options {
            send_option(s, option, data);
            let r = read_option_reply(s);
            assert_eq!(
                (r.option, r.kind),
                (option, ERR_INVALID),
                "{what} (option {option}): {r:?}"
            );
        }
    }
}

#[test]
fn client_flags_with_unknown_bits_are_dropped() {
    // FIXED_NEWSTYLE plus an unknown bit, an unknown bit alone, and a high one.
    client_flags_are_dropped(&[0x5, 0x4, 0x8000_0001]);
}

#[test]
fn client_without_fixed_newstyle_is_dropped() {
    client_flags_are_dropped(&[0, NO_ZEROES as u32]);
}

#[test]
fn bad_option_magic_closes_connection() {
    negotiation_ends("option with bad magic", |s| {
        send(s, &Msg::new().bytes(b"IHAVEOPX").u32(OPT_GO).u32(0).0);
    });
}

#[test]
fn overlong_option_is_drained_and_refused_too_big() {
    negotiation_goes_on(Mode::Simple, 1, |s| {
        // The longest option read is answered normally (unknown → UNSUP)...
        let longest = vec![0xaa; MAX_OPTION_LEN as usize];
        refuse_option(s, 0x1234, &longest, ERR_UNSUP);
        // ...one byte more is drained and refused, for unknown and known options.
        let too_long = vec![0xbb; MAX_OPTION_LEN as usize + 1];
        refuse_option(s, 0x1234, &too_long, ERR_TOO_BIG);
        let mut go_data = info_request("", &[]);
        go_data.resize(MAX_OPTION_LEN as usize + 1, 0);
        refuse_option(s, OPT_GO, &go_data, ERR_TOO_BIG);
    });
}

#[test]
fn absurd_option_length_disconnects_at_once() {
    let mut server = memory_server();
    for len in [u32::MAX, MAX_OPTION_DRAIN + 1] {
        let mut s = negotiating(&server);
        // Header only: a server that tried to read (or allocate) the data
        // would wait here until the 5 s close deadline.
        send_and_expect_quick_close(
            &mut s,
            &Msg::new().u64(IHAVEOPT).u32(0x1234).u32(len).0,
            &format!("option length {len:#x}"),
        );
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn option_data_disagreeing_with_inner_lengths_is_invalid() {
    negotiation_goes_on(Mode::Structured, 2, |s| {
        let bad_go = [
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
        expect_invalid(s, [OPT_GO, OPT_INFO], &bad_go);
        // Meta-context requests are parsed once structured replies are on.
        ack_option(s, OPT_STRUCTURED_REPLY);
        let bad_meta = [
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
        expect_invalid(s, [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT], &bad_meta);
    });
}

#[test]
fn unknown_option_is_unsup_and_session_continues() {
    negotiation_goes_on(Mode::Simple, 3, |s| {
        refuse_option(s, 0x1234, b"0123456789", ERR_UNSUP);
        refuse_option(s, 0x8000_0000, &[], ERR_UNSUP);
        // NBD_OPT_PEEK_EXPORT was withdrawn from the protocol.
        refuse_option(s, OPT_PEEK_EXPORT, &[], ERR_UNSUP);
    });
}

#[test]
fn unknown_export_is_refused_and_default_export_still_opens() {
    negotiation_goes_on(Mode::Simple, 4, |s| {
        for option in [OPT_INFO, OPT_GO] {
            let msg = refuse_option(s, option, &info_request("nosuch", &[]), ERR_UNKNOWN);
            assert!(!msg.is_empty(), "ERR_UNKNOWN should say why");
        }
    });
}

#[test]
fn export_name_for_unknown_export_closes() {
    negotiation_ends("NBD_OPT_EXPORT_NAME nosuch", |s| {
        send_option(s, OPT_EXPORT_NAME, b"nosuch");
    });
}

#[test]
fn export_name_after_extended_headers_closes() {
    // EXPORT_NAME has no error reply and its success reply has no room for
    // extended headers; a client MUST NOT send it once they are on.
    negotiation_ends("NBD_OPT_EXPORT_NAME after extended headers", |s| {
        ack_option(s, OPT_EXTENDED_HEADERS);
        send_option(s, OPT_EXPORT_NAME, b"");
    });
}

#[test]
fn list_with_data_is_invalid() {
    negotiation_goes_on(Mode::Simple, 5, |s| {
        refuse_option(s, OPT_LIST, b"x", ERR_INVALID);
    });
}

#[test]
fn starttls_without_tls_is_policy() {
    negotiation_goes_on(Mode::Simple, 6, |s| {
        refuse_option(s, OPT_STARTTLS, &[], ERR_POLICY);
    });
}

#[test]
fn structured_reply_after_extended_headers_is_ext_header_reqd() {
    // Extended headers stay on: replies come as extended chunks.
    negotiation_goes_on(Mode::Extended, 7, |s| {
        ack_option(s, OPT_EXTENDED_HEADERS);
        refuse_option(s, OPT_STRUCTURED_REPLY, &[], ERR_EXT_HEADER_REQD);
    });
}

#[test]
fn set_meta_context_before_structured_replies_is_invalid() {
    negotiation_goes_on(Mode::Simple, 8, |s| {
        let data = meta_request("", &["base:allocation"]);
        refuse_option(s, OPT_SET_META_CONTEXT, &data, ERR_INVALID);
    });
}

#[test]
fn abort_is_acked_then_closed() {
    negotiation_ends("after NBD_OPT_ABORT", |s| {
        send_option(s, OPT_ABORT, &[]);
        let ack = read_n(s, 20);
        assert_eq!(
            ack,
            Msg::new()
                .u64(OPTION_REPLY_MAGIC)
                .u32(OPT_ABORT)
                .u32(REP_ACK)
                .u32(0)
                .0
        );
    });
}

// ---------------------------------------------------------- transmission

/// A request without payload: (flags, command, cookie, offset, length).
type Req = (u16, u16, u64, u64, u64);

/// Sends each of `reqs` in turn and expects it to fail with `errno`.
fn expect_refused(c: &mut Conn, errno: u32, reqs: &[Req]) {
    for &(flags, kind, cookie, offset, len) in reqs {
        c.request(flags, kind, cookie, offset, len);
        c.expect_error(cookie, offset, errno);
    }
}

/// In each mode, on a fresh connection: `case`; after it the same
/// connection must still write and read back 4 KiB at offset 0 (`seed`)
/// and disconnect cleanly. Then a fresh client still gets a full session.
fn transmission_goes_on(server: &mut Server, seed: u64, mut case: impl FnMut(&mut Conn)) {
    for mode in MODES {
        let mut c = Conn::open(server, mode);
        case(&mut c);
        check_io(&mut c, 0, seed);
        c.disconnect();
    }
    assert_server_still_serves(server);
}

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
    let read_header = |magic: u32| Msg::new().u32(magic).u16(0).u16(CMD_READ).u64(1).u64(0);
    for (mode, request, what) in [
        (
            Mode::Extended,
            read_header(REQUEST_MAGIC).u32(512).u32(0).0,
            "compact request after extended headers",
        ),
        (
            Mode::Simple,
            read_header(EXT_REQUEST_MAGIC).u64(512).0,
            "extended request without extended headers",
        ),
    ] {
        let mut c = Conn::open(&server, mode);
        send(&mut c.s, &request);
        expect_closed(&mut c.s, what);
    }
    assert_server_still_serves(&mut server);
}

#[test]
fn unknown_command_is_einval_and_connection_continues() {
    transmission_goes_on(&mut memory_server(), 10, |c| {
        let reqs = [42u16, 8, 0xffff].map(|kind| (0, kind, 0x4200 + u64::from(kind), 4096, 512));
        expect_refused(c, EINVAL, &reqs);
    });
}

#[test]
fn unknown_flag_on_read_is_einval() {
    transmission_goes_on(&mut memory_server(), 11, |c| {
        expect_refused(
            c,
            EINVAL,
            &[
                (1 << 9, CMD_READ, 0x9, 0, 4096),
                (1 << 15, CMD_READ, 0xf, 8192, 512),
            ],
        );
    });
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
    expect_refused(&mut c, EINVAL, &[(FLAG_DF, CMD_READ, 0xdf, 0, 4096)]);
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
    transmission_goes_on(&mut memory_server(), 13, |c| {
        let size = c.size();
        let cases = [
            (size - 4096, 8192),
            (size, 1),
            (u64::MAX - 100, 4096), // offset + length overflows u64
            (u64::MAX, 1),
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let reqs = [CMD_READ, CMD_CACHE]
                .map(|kind| (0, kind, 0x100 * u64::from(kind) + i as u64, offset, len));
            expect_refused(c, EINVAL, &reqs);
        }
        if c.mode == Mode::Extended {
            // 64-bit lengths: far past the end, and overflowing.
            expect_refused(
                c,
                EINVAL,
                &[
                    (0, CMD_CACHE, 0xe1, 4096, 1 << 40),
                    (0, CMD_CACHE, 0xe2, 4096, u64::MAX),
                ],
            );
        }
    });
}

#[test]
fn trim_past_end_is_einval() {
    // Spec: "It SHOULD return NBD_EINVAL if it receives a read or trim
    // request including one or more sectors beyond the size of the device".
    transmission_goes_on(&mut memory_server(), 14, |c| {
        assert_ne!(
            c.export.flags & TF_SEND_TRIM,
            0,
            "memory backend advertises TRIM"
        );
        let size = c.size();
        expect_refused(
            c,
            EINVAL,
            &[
                (0, CMD_TRIM, 1, size - 4096, 8192),
                (0, CMD_TRIM, 2, size, 1),
                (0, CMD_TRIM, 3, u64::MAX - 100, 4096),
            ],
        );
    });
}

#[test]
fn write_past_end_is_enospc_and_payload_is_consumed() {
    transmission_goes_on(&mut memory_server(), 16, |c| {
        let size = c.size();
        let data = pattern(15, 4096);
        for (cookie, offset) in [(1, size - 2048), (2, size), (3, u64::MAX - 100)] {
            c.send_write(cookie, offset, &data);
            c.expect_error(cookie, offset, ENOSPC);
        }
        expect_refused(
            c,
            ENOSPC,
            &[
                (0, CMD_WRITE_ZEROES, 4, size - 2048, 4096),
                (0, CMD_WRITE_ZEROES, 5, u64::MAX - 100, 4096),
            ],
        );
        // The partly in-range write changed nothing in range.
        let mode = c.mode;
        assert_eq!(c.read(6, size - 8192, 8192), vec![0u8; 8192], "{mode:?}");
    });
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
        expect_refused(
            &mut c,
            EPERM,
            &[(0, CMD_TRIM, 2, 0, 4096), (0, CMD_WRITE_ZEROES, 3, 0, 4096)],
        );
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
    transmission_goes_on(&mut server, 18, |c| {
        expect_refused(c, EINVAL, &[(0, CMD_BLOCK_STATUS, 0xb5, 0, 4096)]);
    });
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
    expect_refused(&mut c, EINVAL, &[(0, CMD_BLOCK_STATUS, 0xb6, 0, 4096)]);
    c.disconnect();
    assert_server_still_serves(&mut server);
}

#[test]
fn zero_length_requests_succeed() {
    transmission_goes_on(&mut memory_server(), 19, |c| {
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
    });
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
        let h = c.header(0, CMD_WRITE, 1, 0, u64::from(len));
        send_and_expect_quick_close(&mut c.s, &h, &format!("WRITE of {len:#x} bytes"));
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
    // No data may follow the error: the 4 KiB check after it reads the next
    // reply straight after.
    transmission_goes_on(&mut memory_server(), 22, |c| {
        expect_refused(c, EINVAL, &[(0, CMD_READ, 0x33, 4096, 33 * MIB)]);
    });
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

    // A WRITE of 64 KiB over the middle region, but only 1 KiB of it...
    let send_partial_write = |c: &mut Conn| {
        let whole = c.write_bytes(0xbad, 64 * KIB, &vec![0xee; 64 * KIB as usize]);
        let header = whole.len() - 64 * KIB as usize;
        send(&mut c.s, &whole[..header + 1024]);
    };
    // ...then the client closes its write side (the server must hang up,
    // not reply)...
    let mut c = Conn::open(&server, Mode::Simple);
    send_partial_write(&mut c);
    c.s.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut c.s, "truncated WRITE payload");
    // ...and the same with a client that simply vanishes.
    let mut c = Conn::open(&server, Mode::Extended);
    send_partial_write(&mut c);
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
    let send_half_header = |c: &mut Conn| {
        let h = c.header(0, CMD_READ, 1, 0, 4096);
        send(&mut c.s, &h[..14]);
    };
    for mode in MODES {
        let mut c = Conn::open(&server, mode);
        send_half_header(&mut c);
        drop(c);
    }
    let mut c = Conn::open(&server, Mode::Simple);
    send_half_header(&mut c);
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
    for (backend, mut server) in servers_of_each_backend(16 * MIB) {
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
    for (b, (backend, mut server)) in servers_of_each_backend(MIB).into_iter().enumerate() {
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
    // Timed from before the connect: the server's clock starts after it,
    // so a test thread that a busy machine schedules late after the
    // greeting cannot make the timeout look short.
    let start = std::time::Instant::now();
    let (mut silent, _) = greeted(&server);
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(25)))
        .unwrap();
    let mut buf = [0u8; 8];
    // EINTR is no end: on Linux a read with a timeout returns it after the
    // process was stopped and continued, whatever the server did.
    let read = loop {
        match std::io::Read::read(&mut silent, &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            read => break read,
        }
    };
    let waited = start.elapsed();
    // A server that died (killed or crashed) also ends the connection:
    // say so rather than blame the timeout.
    server.assert_alive();
    assert_eq!(read.unwrap(), 0, "server sent bytes to a silent client");
    assert!(
        (std::time::Duration::from_secs(10)..std::time::Duration::from_secs(20)).contains(&waited),
        "silent client dropped after {waited:?}, expected about 10 s"
    );
    // The idle transmission-phase client is still served.
    idle.write(1, 0, &[7u8; 512]);
    assert_eq!(idle.read(2, 0, 512), vec![7u8; 512]);
    assert_server_still_serves(&mut server);
}

/// With extended headers a WRITE must carry PAYLOAD_LEN; one that omits it
/// is still taken as carrying its payload (documented choice), so the stream
/// stays in sync and the data lands.
#[test]
fn extended_write_without_payload_len_keeps_the_stream_in_sync() {
    let mut server = memory_server();
    let mut c = Conn::open(&server, Mode::Extended);
    let data = random_bytes(4096, 77);
    let mut b = c.header(0, CMD_WRITE, 1, 8192, data.len() as u64);
    b.extend_from_slice(&data);
    send(&mut c.s, &b);
    c.expect_ok(1, 8192);
    assert_eq!(c.read(2, 8192, 4096), data);
    c.disconnect();
    assert_server_still_serves(&mut server);
}
