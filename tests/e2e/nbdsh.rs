//! Every command and flag through libnbd's Python bindings (what nbdsh
//! runs), with exact data, extents, reply chunks and errno values.

use crate::util::{libnbd, Server};

/// Starts a memory disk of `size` with extra server `flags` and runs the
/// libnbd `script` against its default export.
fn on_memory_disk(flags: &[&str], size: &str, script: &str) {
    let size = format!("size={size}");
    let mut args = flags.to_vec();
    args.extend(["memory", size.as_str()]);
    let server = Server::start(&args);
    libnbd(&server.uri(), script, &[]);
}

/// [`on_memory_disk`] for the usual case: a 1 MiB disk, default flags.
fn on_1m_disk(script: &str) {
    on_memory_disk(&[], "1M", script);
}

/// Structured replies, base:allocation, every capability flag and the
/// block sizes are negotiated as advertised.
#[test]
fn negotiation_reports_structured_replies_meta_context_and_capabilities() {
    on_1m_disk(
        r#"
h = connect()
eq(h.get_structured_replies_negotiated(), True, "structured replies")
eq(h.can_meta_context("base:allocation"), True, "base:allocation")
for cap in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
    eq(getattr(h, cap)(), True, cap)
eq(h.is_read_only(), False, "read-only")
eq(h.get_size(), 1 << 20, "size")
eq(h.get_block_size(nbd.SIZE_MINIMUM), 1, "minimum")
eq(h.get_block_size(nbd.SIZE_PREFERRED), 4096, "preferred")
eq(h.get_block_size(nbd.SIZE_MAXIMUM), 32 << 20, "maximum")
"#,
    );
}

/// pwrite (plain and FUA) then pread returns the same bytes, including
/// unaligned ranges and a maximum-size (32 MiB) request; flush succeeds.
#[test]
fn pwrite_with_and_without_fua_reads_back_and_flush_succeeds() {
    on_memory_disk(
        &[],
        "64M",
        r#"
h = connect()
a = bytes((i * 7) % 251 for i in range(10000))
h.pwrite(a, 12345)
h.pwrite(b"fua!" * 1000, 1 << 20, nbd.CMD_FLAG_FUA)
h.flush()
eq(h.pread(10000, 12345), a, "plain write")
eq(h.pread(4000, 1 << 20), b"fua!" * 1000, "FUA write")
eq(h.pread(100, 12345 - 50), bytes(50) + a[:50], "straddling read")
big = bytes(range(256)) * (128 << 10)
h.pwrite(big, 16 << 20)
eq(h.pread(32 << 20, 16 << 20) == big, True, "32 MiB round trip")
"#,
    );
}

/// After a write the range is data (flags 0); after trim it reads zeros and
/// is a hole|zero (3) extent.
#[test]
fn trim_turns_data_into_zero_reading_hole() {
    on_1m_disk(
        r#"
h = connect()
h.pwrite(b"\xff" * 65536, 65536)
eq(extents(h, 1 << 20, 0), [(65536, 3), (65536, 0), (917504, 3)], "after write")
h.trim(16384, 65536 + 8192)
eq(h.pread(65536, 65536), b"\xff" * 8192 + bytes(16384) + b"\xff" * 40960, "after trim")
eq(extents(h, 1 << 20, 0), [(65536, 3), (8192, 0), (16384, 3), (40960, 0), (917504, 3)], "extents after trim")
h.trim(131072, 0, nbd.CMD_FLAG_FUA)
eq(extents(h, 1 << 20, 0), [(1 << 20, 3)], "all trimmed")
"#,
    );
}

/// WRITE_ZEROES: without NO_HOLE it leaves a hole, with NO_HOLE the range
/// stays allocated (data), and FAST_ZERO succeeds on memory; all read zeros.
#[test]
fn write_zeroes_no_hole_and_fast_zero_read_zero_with_right_allocation() {
    on_1m_disk(
        r#"
h = connect()
h.pwrite(b"\xee" * (192 << 10), 0)
h.zero(65536, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 131072, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
eq(h.pread(192 << 10, 0), bytes(192 << 10), "zeroed")
eq(extents(h, 1 << 20, 0), [(65536, 3), (65536, 0), ((1 << 20) - 131072, 3)], "allocation")
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
eq(extents(h, 65536, 0), [(8192, 3), (4096, 0), (65536 - 12288, 3)], "NO_HOLE on a hole allocates")
eq(h.pread(65536, 0), bytes(65536), "still zero")
"#,
    );
}

/// CACHE succeeds and changes neither data nor allocation.
#[test]
fn cache_succeeds_and_changes_nothing() {
    on_1m_disk(
        r#"
h = connect()
h.pwrite(b"c" * 4096, 4096)
h.cache(1 << 20, 0)
h.cache(8192, 0)
eq(h.pread(8192, 0), bytes(4096) + b"c" * 4096, "data")
eq(extents(h, 1 << 20, 0), [(4096, 3), (4096, 0), ((1 << 20) - 8192, 3)], "allocation")
"#,
    );
}

/// BLOCK_STATUS with REQ_ONE answers exactly one descriptor, never longer
/// than the request; without it the descriptors cover the range exactly.
#[test]
fn block_status_req_one_gives_one_descriptor_within_the_request() {
    on_1m_disk(
        r#"
h = connect()
h.pwrite(b"d" * 8192, 0)
h.pwrite(b"d" * 4096, 65536)
R1 = nbd.CMD_FLAG_REQ_ONE
eq(extents(h, 1 << 20, 0, R1), [(8192, 0)], "data first")
eq(extents(h, 100, 0, R1), [(100, 0)], "shorter than the extent")
eq(extents(h, (1 << 20) - 8192, 8192, R1), [(57344, 3)], "hole first")
eq(extents(h, 1000, 10000, R1), [(1000, 3)], "inside a hole")
eq(extents(h, (1 << 20) - 5000, 5000, R1), [(3192, 0)], "unaligned start")
eq(extents(h, 70000, 1000), [(7192, 0), (57344, 3), (4096, 0), (1368, 3)], "without REQ_ONE")
"#,
    );
}

/// A large read over holes arrives as OFFSET_HOLE chunks around the data;
/// a read under 64 KiB is one data chunk; a DF read is one data chunk.
#[test]
fn structured_reads_send_hole_chunks_and_df_reads_one_data_chunk() {
    on_1m_disk(
        r#"
h = connect()
h.pwrite(b"x" * 4096, 65536)
D, H = nbd.READ_DATA, nbd.READ_HOLE
c, buf = chunks(h, 262144, 0)
eq(c, [(H, 0, 65536), (D, 65536, 4096), (H, 69632, 192512)], "256 KiB read")
eq(buf, bytes(65536) + b"x" * 4096 + bytes(192512), "256 KiB bytes")
c, buf = chunks(h, 102400, 1000)
eq(c, [(H, 1000, 64536), (D, 65536, 4096), (H, 69632, 33768)], "unaligned read")
c, _ = chunks(h, 131072, 262144)
eq(c, [(H, 262144, 131072)], "all hole")
c, buf = chunks(h, 32768, 49152)
eq(c, [(D, 49152, 32768)], "short read")
eq(buf, bytes(16384) + b"x" * 4096 + bytes(12288), "short read bytes")
c, buf = chunks(h, 262144, 0, nbd.CMD_FLAG_DF)
eq(c, [(D, 0, 262144)], "DF read")
eq(buf, bytes(65536) + b"x" * 4096 + bytes(192512), "DF bytes")
"#,
    );
}

/// Requests past the end fail with the spec's errno (READ, TRIM, CACHE,
/// BLOCK_STATUS: EINVAL; WRITE, WRITE_ZEROES: ENOSPC) and change nothing.
#[test]
fn requests_past_the_end_fail_with_einval_or_enospc() {
    on_1m_disk(
        r#"
h = connect()
h.set_strict_mode(0)
END = 1 << 20
for off, n in ((END, 1), (END - 512, 1024), (1 << 40, 4096)):
    fails("EINVAL", h.pread, n, off)
    fails("ENOSPC", h.pwrite, b"w" * n, off)
    fails("ENOSPC", h.zero, n, off)
    fails("EINVAL", h.trim, n, off)
    fails("EINVAL", h.cache, n, off)
    fails("EINVAL", extents, h, n, off)
eq(h.pread(1024, END - 1024), bytes(1024), "end unchanged")
eq(extents(h, END, 0), [(END, 3)], "nothing allocated")
"#,
    );
}

/// Unknown flags and flags that do not belong to a command fail with
/// EINVAL, FUA is accepted on every command, and the connection keeps
/// working afterwards.
#[test]
fn unknown_and_misplaced_flags_fail_with_einval_and_fua_is_accepted_everywhere() {
    on_1m_disk(
        r#"
h = connect()
h.set_strict_mode(0)
fails("EINVAL", h.pread, 512, 0, 0x40)
fails("EINVAL", h.pread, 512, 0, 0x8000)
fails("EINVAL", h.pwrite, b"p" * 512, 0, nbd.CMD_FLAG_DF)
fails("EINVAL", h.pwrite, b"p" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
fails("EINVAL", h.trim, 512, 0, nbd.CMD_FLAG_NO_HOLE)
fails("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
fails("EINVAL", h.zero, 512, 0, nbd.CMD_FLAG_DF)
fails("EINVAL", h.cache, 512, 0, nbd.CMD_FLAG_DF)
fails("EINVAL", extents, h, 512, 0, nbd.CMD_FLAG_DF)
fails("EINVAL", h.flush, 0x40)
eq(h.pread(512, 0), bytes(512), "nothing written")
h.flush(nbd.CMD_FLAG_FUA)
h.cache(512, 0, nbd.CMD_FLAG_FUA)
eq(h.pread(512, 0, nbd.CMD_FLAG_FUA), bytes(512), "FUA read")
eq(extents(h, 512, 0, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_REQ_ONE), [(512, 3)], "FUA block status")
h.pwrite(b"ok" * 256, 0, nbd.CMD_FLAG_FUA)
eq(h.pread(512, 0), b"ok" * 256, "still works")
"#,
    );
}

/// Zero-length READ, WRITE, TRIM, WRITE_ZEROES, CACHE succeed, even at the
/// very end of the disk.
#[test]
fn zero_length_requests_succeed() {
    on_1m_disk(
        r#"
h = connect()
h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ZERO_SIZE)
for off in (0, 4096, 1 << 20):
    eq(h.pread(0, off), b"", f"read at {off}")
    eq(chunks(h, 0, off, nbd.CMD_FLAG_DF)[1], b"", f"DF read at {off}")
    h.pwrite(b"", off)
    h.pwrite(b"", off, nbd.CMD_FLAG_FUA)
    h.trim(0, off)
    h.zero(0, off)
    h.zero(0, off, nbd.CMD_FLAG_NO_HOLE)
    h.cache(0, off)
eq(extents(h, 1 << 20, 0), [(1 << 20, 3)], "nothing allocated")
"#,
    );
}

/// 64 writes and then 64 reads in flight at once all complete, with the
/// right data in every buffer.
#[test]
fn sixty_four_requests_in_flight_complete_with_right_data() {
    on_memory_disk(
        &[],
        "8M",
        r#"
h = connect()
N, SIZE = 64, 65536
def drain(cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        eq(h.aio_command_completed(c), True, f"cookie {c}")
bufs = [nbd.Buffer.from_bytearray(bytes([i + 1]) * SIZE) for i in range(N)]
cookies = [h.aio_pwrite(b, i * SIZE) for i, b in enumerate(bufs)]
eq(h.aio_in_flight() > 1, True, "several in flight")
drain(cookies)
reads = [nbd.Buffer(SIZE) for _ in range(N)]
cookies = [h.aio_pread(b, (N - 1 - i) * SIZE) for i, b in enumerate(reads)]
drain(cookies)
for i, b in enumerate(reads):
    eq(bytes(b.to_bytearray()) == bytes([N - i]) * SIZE, True, f"buffer {i}")
"#,
    );
}

/// Multi-conn on memory: what one connection writes (or trims), another
/// connection reads at once.
#[test]
fn second_connection_sees_first_connections_writes_and_trims() {
    on_1m_disk(
        r#"
h1, h2 = connect(), connect()
eq(h2.can_multi_conn(), True, "multi-conn")
h1.pwrite(b"one" * 1000, 5000)
eq(h2.pread(3000, 5000), b"one" * 1000, "h2 sees h1's write")
h2.flush()
h2.trim(65536, 0)
eq(h1.pread(8000, 0), bytes(8000), "h1 sees h2's trim")
h1.zero(100, 200, nbd.CMD_FLAG_NO_HOLE)
h1.pwrite(b"1", 0, nbd.CMD_FLAG_FUA)
eq(h2.pread(1, 0), b"1", "h2 sees FUA write")
"#,
    );
}

/// On a `-r` server every write, trim and zero forced past libnbd fails
/// with EPERM and changes nothing; reads work.
#[test]
fn read_only_server_refuses_writes_trims_and_zeroes_with_eperm() {
    on_memory_disk(
        &["-r"],
        "1M",
        r#"
h = connect()
eq(h.is_read_only(), True, "read-only")
eq(h.can_trim(), False, "trim")
eq(h.can_zero(), False, "zero")
h.set_strict_mode(0)
fails("EPERM", h.pwrite, b"w" * 4096, 0)
fails("EPERM", h.pwrite, b"w" * 4096, 0, nbd.CMD_FLAG_FUA)
fails("EPERM", h.trim, 4096, 0)
fails("EPERM", h.zero, 4096, 0)
eq(h.pread(8192, 0), bytes(8192), "unchanged")
h.flush()
h.cache(4096, 0)
eq(extents(h, 1 << 20, 0), [(1 << 20, 3)], "nothing allocated")
"#,
    );
}
