//! libnbd's `nbdinfo` against the server: what it advertises, how it lists
//! and maps exports, and the process modes (`--run`, TCP, `-s`).

use std::process::Command;

use crate::util::{
    data, hole, libnbd, nbdinfo_map, nbdinfo_test, require, run, run_status, scratchd_serve,
    stdout, Json, Server, SCRATCHD,
};

const MIB: u64 = 1 << 20;

fn nbdinfo(args: &[&str]) -> Command {
    require("nbdinfo");
    let mut cmd = Command::new("nbdinfo");
    cmd.args(args);
    cmd
}

fn nbdinfo_json(uri: &str) -> Json {
    Json::parse(&stdout(&run(&mut nbdinfo(&["--json", uri]))))
}

/// `nbdinfo --json` shows the exact size, every advertised capability, the
/// block sizes, the export name and the `--description`.
#[test]
fn nbdinfo_json_reports_size_capabilities_block_sizes_name_and_description() {
    let server = Server::start(&[
        "-e",
        "scratch",
        "--description",
        "throw-away disk",
        "memory",
        "size=1G",
    ]);
    let j = nbdinfo_json(&server.uri_for("scratch"));
    assert_eq!(j.get("protocol"), "newstyle-fixed");
    assert_eq!(j.get("structured"), "true");
    assert_eq!(j.len("exports"), 1);
    assert_eq!(j.get("exports.0.export-name"), "scratch");
    assert_eq!(j.get("exports.0.description"), "throw-away disk");
    assert_eq!(j.int("exports.0.export-size"), 1 << 30);
    assert_eq!(j.get("exports.0.contexts.0"), "base:allocation");
    assert_eq!(j.get("exports.0.is_read_only"), "false");
    for cap in [
        "multi_conn",
        "trim",
        "zero",
        "fua",
        "flush",
        "cache",
        "df",
        "fast_zero",
    ] {
        assert_eq!(j.get(&format!("exports.0.can_{cap}")), "true", "can_{cap}");
    }
    assert_eq!(j.int("exports.0.block_size_minimum"), 1);
    assert_eq!(j.int("exports.0.block_size_preferred"), 4096);
    assert_eq!(j.int("exports.0.block_size_maximum"), 32 * MIB);
}

/// The empty default name reaches a named export; any other name is refused.
#[test]
fn default_name_reaches_named_export_and_unknown_name_is_refused() {
    let server = Server::start(&["-e", "scratch", "memory", "size=3M"]);
    assert_eq!(
        stdout(&run(&mut nbdinfo(&["--size", &server.uri()]))).trim(),
        "3145728"
    );
    let (code, out) = run_status(&mut nbdinfo(&["--size", &server.uri_for("other")]));
    assert_ne!(code, 0, "unknown export accepted: {}", stdout(&out));
}

/// `nbdinfo --list` names the `-e` export (with its description).
#[test]
fn nbdinfo_list_shows_export_name_and_description() {
    let server = Server::start(&[
        "-e",
        "disk0",
        "--description",
        "first disk",
        "memory",
        "size=1M",
    ]);
    let text = stdout(&run(&mut nbdinfo(&["--list", &server.uri()])));
    assert!(text.contains("export=\"disk0\":"), "{text}");
    let j = Json::parse(&stdout(&run(&mut nbdinfo(&[
        "--list",
        "--json",
        &server.uri(),
    ]))));
    assert_eq!(j.len("exports"), 1);
    assert_eq!(j.get("exports.0.export-name"), "disk0");
    assert_eq!(j.get("exports.0.description"), "first disk");
    assert_eq!(j.int("exports.0.export-size"), MIB);
}

/// `nbdinfo --map` shows written 4 KiB blocks as data and the rest as holes,
/// at exact offsets, and trimmed/zeroed blocks turn back into holes.
#[test]
fn nbdinfo_map_shows_written_blocks_as_data_and_the_rest_as_holes() {
    let server = Server::start(&["memory", "size=1M"]);
    let uri = server.uri();
    // 4 KiB at 8 KiB, 100 bytes inside the block at 64 KiB, the last byte.
    libnbd(
        &uri,
        "h = connect()\nh.pwrite(b'a' * 4096, 8192)\nh.pwrite(b'b' * 100, 65546)\nh.pwrite(b'c', (1 << 20) - 1)",
        &[],
    );
    assert_eq!(
        nbdinfo_map(&uri),
        [
            hole(0, 8192),
            data(8192, 4096),
            hole(12288, 53248),
            data(65536, 4096),
            hole(69632, 974848),
            data(1044480, 4096),
        ]
    );
    let totals = stdout(&run(&mut nbdinfo(&["--map", "--totals", &uri])));
    let totals: Vec<Vec<&str>> = totals
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        totals,
        [
            ["12288", "1.2%", "0", "data"],
            ["1036288", "98.8%", "3", "hole,zero"]
        ]
    );
    libnbd(
        &uri,
        "h = connect()\nh.trim(4096, 8192)\nh.zero(4096, 65536)",
        &[],
    );
    assert_eq!(nbdinfo_map(&uri), [hole(0, 1044480), data(1044480, 4096)]);
}

/// `nbdinfo --can X` exits 0 for every advertised capability and 2 for
/// read-only, which a writable memory disk is not.
#[test]
fn nbdinfo_can_exits_zero_for_capabilities_and_two_for_read_only() {
    let server = Server::start(&["memory", "size=1M"]);
    let uri = server.uri();
    for cap in [
        "multi-conn",
        "trim",
        "zero",
        "fast-zero",
        "fua",
        "flush",
        "cache",
        "df",
        "write",
    ] {
        assert_eq!(nbdinfo_test("--can", cap, &uri), 0, "--can {cap}");
    }
    assert_eq!(nbdinfo_test("--can", "structured-reply", &uri), 0);
    assert_eq!(nbdinfo_test("--is", "read-only", &uri), 2);
    assert_eq!(nbdinfo_test("--can", "read-only", &uri), 2);
}

/// A `-r` server is read-only to nbdinfo, offers no trim/zero, and a client
/// that tries to write anyway (nbdcopy) fails and changes nothing.
#[test]
fn read_only_server_is_read_only_and_refuses_writes() {
    require("nbdcopy");
    let server = Server::start(&["-r", "memory", "size=1M"]);
    let uri = server.uri();
    assert_eq!(nbdinfo_test("--is", "read-only", &uri), 0);
    assert_eq!(nbdinfo_test("--can", "write", &uri), 2);
    assert_eq!(nbdinfo_test("--can", "trim", &uri), 2);
    assert_eq!(nbdinfo_test("--can", "zero", &uri), 2);
    let src = server.dir.path().join("src.img");
    crate::util::random_file(&src, MIB as usize, 7);
    let (code, _) = run_status(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert_ne!(code, 0, "nbdcopy wrote to a read-only export");
    assert_eq!(nbdinfo_map(&uri), [hole(0, MIB)]);
}

/// Captive mode: `--run` gets `$uri`, `$unixsocket`, `$exportname` for a
/// private socket (`-U -`), nbdinfo reaches the export through `$uri`, and
/// the socket is gone once the server exits.
#[test]
fn captive_run_sets_uri_unixsocket_exportname_and_cleans_up() {
    require("nbdinfo");
    let script = r#"printf '%s\n' "$uri" "$unixsocket" "$exportname" "${port-unset}"; test -S "$unixsocket" && nbdinfo --size "$uri""#;
    let out = run(&mut scratchd_serve(&[
        "-U", "-", "-e", "cap", "memory", "size=2M", "--run", script,
    ]));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let (uri, sock) = (lines[0], lines[1]);
    assert_eq!(uri, format!("nbd+unix:///cap?socket={sock}"));
    assert_eq!(&lines[2..], ["cap", "unset", "2097152"]);
    assert!(!std::path::Path::new(sock).exists(), "{sock} left behind");
}

/// Captive mode exits with the `--run` command's exit status.
#[test]
fn captive_run_propagates_exit_status() {
    require("nbdinfo");
    let (code, _) = run_status(&mut scratchd_serve(&[
        "-U", "-", "memory", "size=1M", "--run", "exit 3",
    ]));
    assert_eq!(code, 3);
    let (code, _) = run_status(&mut scratchd_serve(&[
        "-U",
        "-",
        "memory",
        "size=1M",
        "--run",
        "nbdinfo \"$uri\"",
    ]));
    assert_eq!(code, 0);
}

/// `-p 0 -i 127.0.0.1` listens on a free TCP port, given to `--run` as
/// `$port` and in `$uri`, through which nbdinfo reaches the export.
#[test]
fn captive_run_over_tcp_port_zero_sets_port_and_uri() {
    require("nbdinfo");
    let script = r#"printf '%s\n' "$port" "$uri" "${unixsocket-unset}"; nbdinfo --size "$uri""#;
    let args = [
        "-p",
        "0",
        "-i",
        "127.0.0.1",
        "memory",
        "size=5M",
        "--run",
        script,
    ];
    let text = stdout(&run(&mut scratchd_serve(&args)));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let port: u16 = lines[0]
        .parse()
        .unwrap_or_else(|_| panic!("$port = {:?}", lines[0]));
    assert_ne!(port, 0);
    assert_eq!(lines[1], format!("nbd://localhost:{port}/"));
    assert_eq!(&lines[2..], ["unset", "5242880"]);
}

/// `-s` serves one connection on stdin/stdout: libnbd's `connect_command`
/// negotiates, writes and reads back through it.
#[test]
fn single_mode_serves_libnbd_connect_command() {
    let script = r#"
h = connect(argv=[ARGS[0], "serve", "-s", "memory", "size=1M"])
eq(h.get_size(), 1 << 20, "size")
eq(h.can_multi_conn(), True, "multi-conn")
h.pwrite(b"single" * 1000, 4000)
eq(h.pread(6000, 4000), b"single" * 1000, "read back")
eq(h.pread(4000, 0), bytes(4000), "unwritten")
h.flush()
h.shutdown()
"#;
    libnbd("", script, &[SCRATCHD]);
}
