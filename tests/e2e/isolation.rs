//! Build isolation with real clients and two users: a scratch disk belongs
//! to the uid that created it. Another uid can neither list it nor reach
//! it by its name (asking for the name gets that uid a fresh disk of its
//! own), and per-owner caps stop one uid from taking the host while others
//! carry on. The second user is `nobody`, through `setpriv`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};

use crate::tmpdisk::HELPERS;
use crate::util::{
    as_user, libnbd_argv, libnbd_as, require, run, scratchd_serve, stdout, Json, Server, NOBODY,
};

/// The build in the report that opened this hole.
const BUILD: &str = "koji-secret-build-4711";

/// Starts a server whose socket every user may connect to; running clients
/// as another user needs root (as the tests have here and in CI).
fn start(args: &[&str]) -> Server {
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        stdout(&uid).trim(),
        "0",
        "the isolation tests switch to user nobody with setpriv, which needs root"
    );
    let server = Server::start(args);
    server.open_to_everyone();
    server
}

/// Runs a libnbd script (with the tmpdisk helpers: `uri(name)`,
/// `go_error(name)`) as `uid` against `server`; `args` follow the socket in
/// `ARGS`. Returns its standard output.
fn script_as(uid: Option<u32>, server: &Server, body: &str, args: &[&str]) -> String {
    let sock = server.sock.to_string_lossy().into_owned();
    let mut all = vec![sock.as_str()];
    all.extend_from_slice(args);
    stdout(&libnbd_as(
        uid,
        &server.uri(),
        &format!("{HELPERS}\n{body}"),
        &all,
    ))
}

/// Runs a real client (program and arguments) as `uid`; its output.
fn client_as(uid: Option<u32>, argv: &[&str]) -> std::process::Output {
    require(argv[0]);
    let argv = as_user(uid, argv);
    run(Command::new(&argv[0]).args(&argv[1..]).current_dir("/"))
}

/// Names `nbdinfo --list` shows `uid`.
fn listed_as(uid: Option<u32>, server: &Server) -> Vec<String> {
    let out = client_as(uid, &["nbdinfo", "--list", "--json", &server.uri()]);
    let j = Json::parse(&stdout(&out));
    (0..j.len("exports"))
        .map(|i| j.get(&format!("exports.{i}.export-name")).to_owned())
        .collect()
}

/// A build of this process's user: four connections to one disk, holding
/// a secret, kept open until [`Build::finish`] checks that it is intact.
struct Build {
    child: Child,
    out: BufReader<ChildStdout>,
}

/// The build's side: four handles share the disk (a write on one is read
/// on all), wait for stdin to close, then check that the secret is intact,
/// that nothing else was written, and that the four still share the disk.
const BUILD_SCRIPT: &str = r#"
import sys
uri = ARGS[0]
secret = b"koji secret \x00\xff" * 4096
hs = [connect(uri) for _ in range(4)]
for h in hs:
    eq(h.can_multi_conn(), True, "multi-conn")
hs[0].pwrite(secret, 1 << 20)
for h in hs[1:]:
    eq(h.pread(len(secret), 1 << 20), secret, "the build's connections share its disk")
print("ready", flush=True)
sys.stdin.read()
for h in hs:
    eq(h.pread(len(secret), 1 << 20), secret, "the secret is intact")
    eq(h.pread(4096, 0), bytes(4096), "nobody else wrote to the disk")
hs[2].pwrite(b"still shared", 0)
eq(hs[3].pread(12, 0), b"still shared", "the four still share the disk")
print("intact", flush=True)
"#;

impl Build {
    fn start(server: &Server, name: &str) -> Build {
        let argv = libnbd_argv(None, "", BUILD_SCRIPT, &[&server.uri_for(name)]);
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the build did not start");
        Build { child, out }
    }

    /// Lets the build check its disk and end; panics unless all is intact.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success() && rest.trim() == "intact",
            "build: {status} {rest:?}"
        );
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The report's attack, by another uid with real clients while the build
/// runs: LIST shows it nothing, INFO tells it nothing a fresh name would
/// not, and GO, nbdinfo and nbdcopy on the build's name reach a fresh disk
/// of its own. The build's four connections keep their data and their
/// sharing; with a pool and linger, the build's reconnect finds its data
/// and the other uid's does not.
#[test]
fn another_uid_can_neither_list_nor_open_read_or_write_a_build_disk() {
    require("nbdcopy");
    let server = start(&["tmpdisk", "size=16M", "type=none", "pool=1", "linger=30s"]);
    let build = Build::start(&server, BUILD);
    assert_eq!(
        listed_as(None, &server),
        [BUILD],
        "the owner lists its disk"
    );

    assert_eq!(listed_as(Some(NOBODY), &server), Vec::<String>::new());
    script_as(
        Some(NOBODY),
        &server,
        r#"
name = ARGS[1]
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri(name))
names = []
h.opt_list(lambda n, d: names.append(n))
eq(names, [], "LIST")
h.opt_info()
taken = (h.get_size(), h.can_multi_conn(), h.is_read_only())
h.set_export_name("never-used")
h.opt_info()
eq((h.get_size(), h.can_multi_conn(), h.is_read_only()), taken, "INFO as for a fresh name")
h.opt_abort()

h = connect(uri(name))
eq(h.pread(4096, 1 << 20), bytes(4096), "a fresh disk, not the build's")
h.pwrite(b"overwrite the secret", 1 << 20)
h.pwrite(b"x" * 4096, 0)
eq(h.pread(20, 1 << 20), b"overwrite the secret", "its own disk takes writes")
"#,
        &[BUILD],
    );
    // Real clients of that uid on the build's name find its own disk
    // (still lingering), never the build's.
    let info = client_as(Some(NOBODY), &["nbdinfo", &server.uri_for(BUILD)]);
    assert!(!stdout(&info).contains("koji secret"), "{}", stdout(&info));
    let copy = client_as(Some(NOBODY), &["nbdcopy", &server.uri_for(BUILD), "-"]);
    assert_eq!(copy.stdout.len(), 16 << 20);
    let found = |what: &[u8]| copy.stdout.windows(what.len()).any(|w| w == what);
    assert!(!found(b"koji secret"), "nbdcopy read the build's secret");
    assert!(
        found(b"overwrite the secret"),
        "nbdcopy missed its own write"
    );
    // Its own disk of that name lingers, and is all it lists.
    assert_eq!(listed_as(Some(NOBODY), &server), [BUILD]);
    assert_eq!(listed_as(None, &server), [BUILD]);
    build.finish();

    // Lingering: each uid comes back to its own data.
    script_as(
        None,
        &server,
        r#"
h = connect(uri(ARGS[1]))
eq(h.pread(12, 1 << 20), b"koji secret ", "the owner's reconnect within linger")
"#,
        &[BUILD],
    );
    script_as(
        Some(NOBODY),
        &server,
        r#"
h = connect(uri(ARGS[1]))
eq(h.pread(20, 1 << 20), b"overwrite the secret", "its own lingering disk, not the build's")
"#,
        &[BUILD],
    );
}

/// `--max-exports-per-owner` refuses an owner's next disk with a policy
/// error that says why, and `--owner-memory-limit` its next write past the
/// share with ENOSPC, while another uid creates and writes its own disks;
/// a closed disk gives its slot and its memory back.
#[test]
fn per_owner_caps_refuse_the_next_disk_and_write_while_others_carry_on() {
    let server = start(&[
        "--memory-limit",
        "64M",
        "--max-exports-per-owner",
        "2",
        "--owner-memory-limit",
        "8M",
        "tmpdisk",
        "size=64M",
        "type=none",
    ]);
    // The other uid works while this one is at both caps.
    let other = r#"
x, y = connect(uri("x")), connect(uri("y"))
x.pwrite(b"\2" * (8 << 20), 0)
fails("ENOSPC", y.pwrite, b"\2" * 4096, 0)
m = go_error("z")
assert "at most 2 scratch disks" in m, m
"#;
    let sock = server.sock.to_string_lossy().into_owned();
    let other = libnbd_argv(
        Some(NOBODY),
        &server.uri(),
        &format!("{HELPERS}\n{other}"),
        &[&sock],
    );
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    script_as(
        None,
        &server,
        r#"
import subprocess, time
a, a2, b = connect(uri("a")), connect(uri("a")), connect(uri("b"))
m = go_error("c")
assert "at most 2 scratch disks" in m, m
a.pwrite(b"\1" * (6 << 20), 0)
eq(a2.pread(16, 0), b"\1" * 16, "two connections share a")
fails("ENOSPC", b.pwrite, b"\1" * (4 << 20), 0)
b.pwrite(b"\1" * (2 << 20), 0)
fails("ENOSPC", b.pwrite, b"\1" * 4096, 2 << 20)
r = subprocess.run(ARGS[1:], capture_output=True)
assert r.returncode == 0, r.stderr.decode()
# Closing a gives its slot and its memory back.
a.shutdown(); a2.shutdown()
deadline = time.monotonic() + 10
while True:
    try:
        c = connect(uri("c"))
        b.pwrite(b"\1" * (4 << 20), 2 << 20)
        break
    except nbd.Error:
        assert time.monotonic() < deadline, "a's slot and memory never came back"
        time.sleep(0.05)
"#,
        &other,
    );
}

/// Plain TCP proves no identity: the server warns at startup that a name
/// is all a TCP peer needs, TCP peers reach a disk by its name, and LIST
/// shows them nothing, not even the disks they made.
#[test]
fn tcp_clients_reach_disks_by_name_alone_list_nothing_and_are_warned_about() {
    require("nbdsh");
    let script = r#"
u="nbd://127.0.0.1:$port/b1"
nbdsh -u "$u" -c 'h.pwrite(b"tcp", 0)'
nbdsh -u "$u" -c 'assert h.pread(3, 0) == b"tcp", "another TCP peer, same name"'
nbdinfo --list --json "nbd://127.0.0.1:$port/"
"#;
    let out = run(&mut scratchd_serve(&[
        "-p",
        "0",
        "-i",
        "127.0.0.1",
        "--run",
        script,
        "tmpdisk",
        "size=16M",
        "type=none",
        "linger=10s",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tmpdisk over TCP") && stderr.contains("knows a disk's name"),
        "{stderr}"
    );
    assert_eq!(Json::parse(&stdout(&out)).len("exports"), 0);
}

/// One owner filling the host cannot destroy another's data: at
/// `--max-exports`, nobody's lingering disk (a cache a build keeps between
/// runs) is not evicted for root's new disks, and root, under the default
/// per-owner cap (three quarters of `--max-exports`), is refused its next
/// disk with a clear error while nobody's disk keeps its bytes.
#[test]
fn one_owner_filling_the_host_leaves_anothers_lingering_disk_alone() {
    let server = start(&[
        "--max-exports",
        "4",
        "tmpdisk",
        "size=16M",
        "type=none",
        "linger=600s",
    ]);
    script_as(
        Some(NOBODY),
        &server,
        r#"
h = connect(uri("nobodys-cache"))
h.pwrite(b"\7" * 4096, 0)
h.shutdown()
"#,
        &[],
    );
    script_as(
        None,
        &server,
        r#"
held = [connect(uri(n)) for n in ("a", "b", "c")]
m = go_error("d")
assert "at most 3 scratch disks" in m, m
# Its own lingering disk does make room for it.
held.pop().shutdown()
import time
deadline = time.monotonic() + 10
while True:
    try:
        held.append(connect(uri("d")))
        break
    except nbd.Error:
        assert time.monotonic() < deadline, "c's slot never came back"
        time.sleep(0.05)
"#,
        &[],
    );
    script_as(
        Some(NOBODY),
        &server,
        r#"
h = connect(uri("nobodys-cache"))
eq(h.pread(4096, 0), b"\7" * 4096, "nobody's lingering disk kept its data")
"#,
        &[],
    );
}
