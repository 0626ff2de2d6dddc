//! qemu's NBD client (`qemu-img`, `qemu-io`; qemu 10 negotiates extended
//! headers) against the server.

use std::process::Command;

use crate::util::{
    data, hole, libnbd, nbdinfo_map, random_file, require, run, run_status, stdout, Json, Server,
};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn qemu_img(args: &[&str]) -> Command {
    require("qemu-img");
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    cmd
}

/// Runs `qemu-io -f raw -t writeback URI -c CMD...` (so plain writes carry
/// no FUA), asserting every command succeeded; returns its output.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    require("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-t", "writeback", uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}:\n{text}"
    );
    text
}

/// Starts a memory disk of `size` and runs `qemu-io` `cmds` on it (see
/// [`qemu_io`]); returns the server, to keep alive, and its URI.
fn qemu_io_on_memory_disk(size: &str, cmds: &[&str]) -> (Server, String) {
    let server = Server::start(&["memory", &format!("size={size}")]);
    let uri = server.uri();
    qemu_io(&uri, cmds);
    (server, uri)
}

/// Runs `qemu-img ARGS...` and parses its JSON output.
fn qemu_img_json(args: &[&str]) -> Json {
    Json::parse(&stdout(&run(&mut qemu_img(args))))
}

/// `qemu-img info` sees the exact size, through the raw format over an NBD
/// URI and through the nbd driver given as `--image-opts`.
#[test]
fn qemu_img_info_reports_exact_size_via_uri_and_image_opts() {
    let server = Server::start(&["memory", "size=67112960"]);
    let j = qemu_img_json(&["info", "--output=json", "-f", "raw", &server.uri()]);
    assert_eq!(j.int("virtual-size"), 64 * MIB + 4096);
    assert_eq!(j.get("format"), "raw");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={}",
        server.sock.display()
    );
    let j = qemu_img_json(&["info", "--output=json", "--image-opts", &opts]);
    assert_eq!(j.int("virtual-size"), 64 * MIB + 4096);
    assert_eq!(j.get("format"), "nbd");
}

/// `qemu-img convert -n` writes a raw file into the export, `qemu-img
/// compare` finds them identical, and then finds a one-byte change.
#[test]
fn qemu_img_convert_then_compare_identical_and_detects_one_byte_change() {
    let server = Server::start(&["memory", "size=32M"]);
    let uri = server.uri();
    let src = server.dir.path().join("src.raw");
    random_file(&src, 32 * MIB as usize, 0x9e);
    let src = src.to_str().unwrap();
    run(&mut qemu_img(&[
        "convert", "-n", "-f", "raw", "-O", "raw", src, &uri,
    ]));
    let compare = ["compare", "-f", "raw", "-F", "raw", src, &uri];
    let (code, out) = run_status(&mut qemu_img(&compare));
    assert_eq!((code, stdout(&out).trim()), (0, "Images are identical."));
    qemu_io(&uri, &["write -P 0x5a 20971520 1"]);
    let (code, out) = run_status(&mut qemu_img(&compare));
    assert_eq!(
        (code, stdout(&out).trim()),
        (1, "Content mismatch at offset 20971520!")
    );
}

/// `qemu-img map --output=json` lists the written 4 KiB blocks as data and
/// everything else as zero, at exact offsets.
#[test]
fn qemu_img_map_lists_data_and_zero_extents_exactly() {
    let (_server, uri) = qemu_io_on_memory_disk(
        "1M",
        &[
            "write -P 0xab 64k 4k",
            "write -P 1 512k 8k",
            "write -P 2 1023k 1k",
        ],
    );
    let j = qemu_img_json(&["map", "--output=json", "-f", "raw", &uri]);
    let entries: Vec<(u64, u64, &str, &str)> = (0..j.len(""))
        .map(|i| {
            let f = |k: &str| format!("{i}.{k}");
            (
                j.int(&f("start")),
                j.int(&f("length")),
                j.get(&f("data")),
                j.get(&f("zero")),
            )
        })
        .collect();
    let (d, z) = (("true", "false"), ("false", "true"));
    let want = [
        (0, 64 * KIB, z),
        (64 * KIB, 4 * KIB, d),
        (68 * KIB, 444 * KIB, z),
        (512 * KIB, 8 * KIB, d),
        (520 * KIB, 500 * KIB, z),
        (1020 * KIB, 4 * KIB, d),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|&(s, l, (dd, zz))| (s, l, dd, zz))
        .collect();
    assert_eq!(entries, want);
}

/// Pattern writes (plain, FUA, unaligned, aio + aio_flush) read back with
/// the same pattern in qemu-io and, over a second client, in libnbd.
#[test]
fn qemu_io_pattern_writes_read_back_in_qemu_and_libnbd() {
    let (_server, uri) = qemu_io_on_memory_disk(
        "8M",
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0x44 1M 4k",
            "read -P 0x44 1M 4k",
            "write -P 0x77 5255225 1000",
            "read -P 0x77 5255225 1000",
            "read -P 0 5M 12345",
            "aio_write -P 0xcd 2M 4k",
            "aio_write -P 0xce 3M 64k",
            "aio_flush",
            "read -P 0xcd 2M 4k",
            "read -P 0xce 3M 64k",
            "read -P 0 64k 64k",
        ],
    );
    let script = r#"
h = connect()
eq(h.pread(65536, 0), b"\xab" * 65536, "0")
eq(h.pread(4096, 1 << 20), b"\x44" * 4096, "1M")
eq(h.pread(4096, 2 << 20), b"\xcd" * 4096, "2M")
eq(h.pread(65536, 3 << 20), b"\xce" * 65536, "3M")
eq(h.pread(1002, 5255224), b"\0" + b"\x77" * 1000 + b"\0", "5M+12345")
"#;
    libnbd(&uri, script, &[]);
    let err =
        run_status(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0xab 64k 4k"]))
            .0;
    assert_eq!(
        err, 1,
        "qemu-io must fail a wrong pattern, or the checks above prove nothing"
    );
}

/// qemu's write-zeroes variants (`-z` = NO_HOLE, `-u` = may unmap, `-n` =
/// FAST_ZERO) and discard all read back zeros, and leave data or holes as
/// their flags say.
#[test]
fn qemu_io_write_zeroes_variants_and_discard_read_zero_with_right_allocation() {
    let (_server, uri) = qemu_io_on_memory_disk(
        "1M",
        &[
            "write -P 0x11 0 320k",
            "write -z 0 64k",
            "write -z -u 64k 64k",
            "write -z -u -n 128k 64k",
            "write -z -n 192k 64k",
            "discard 256k 64k",
            "read -P 0 0 320k",
        ],
    );
    assert_eq!(
        nbdinfo_map(&uri),
        [
            data(0, 64 * KIB),
            hole(64 * KIB, 128 * KIB),
            data(192 * KIB, 64 * KIB),
            hole(256 * KIB, 768 * KIB)
        ]
    );
}
