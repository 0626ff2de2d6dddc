//! Fault injection: clients killed mid-I/O, a backing file system that
//! fills up, and the server itself killed with `kill -9` and restarted.
//!
//! Faults covered elsewhere: stuck clients that never read (`stuck.rs`), a
//! format command that fails or hangs and a server SIGKILLed with dir-backed
//! disks (`tmpdisk.rs`), a full `--memory-limit`/`--disk-limit`
//! (`limits.rs`, `tmpdisk.rs`), malformed input (`bad_input.rs`,
//! `session_fuzz.rs`); `docs/RELIABILITY.md` lists them all.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::rss_kib;
use crate::util::{
    eventually, libnbd, random_bytes, random_file, read_n, require, run, scratchd_serve, send,
    stdout, Json, Server,
};
use crate::wire::{be16, go, Conn, Mode, FIXED_NEWSTYLE, NO_ZEROES};

const MIB: u64 = 1 << 20;

/// Export names the server lists (live scratch disks).
fn listed(sock: &Path) -> Vec<String> {
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let j = Json::parse(&stdout(&out));
    (0..j.len("exports"))
        .map(|i| j.get(&format!("exports.{i}.export-name")).to_owned())
        .collect()
}

/// A raw connection to build `name` on the server at `sock`, in simple mode.
fn open_build(sock: &Path, name: &str) -> Conn {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let g = read_n(&mut s, 18);
    let flags = u32::from(FIXED_NEWSTYLE | (be16(&g, 16) & NO_ZEROES));
    send(&mut s, &flags.to_be_bytes());
    let export = go(&mut s, name);
    Conn {
        s,
        mode: Mode::Simple,
        export,
    }
}

/// Starts `child` (a client) and SIGKILLs it once `ready` holds.
fn kill_when(mut child: Child, what: &str, ready: impl FnMut() -> bool) {
    let mut ready = ready;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} ended ({status}) before it could be killed mid-I/O");
        }
        assert!(Instant::now() < deadline, "{what} never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL the client");
    child.wait().unwrap();
}

/// fio (four connections, reads and writes in flight) and nbdcopy (four
/// connections, writing) are SIGKILLed mid-I/O on their own builds: each
/// build's disk is destroyed with its last connection, the server's memory
/// goes back to where it was, and a third build beside them keeps its data
/// and is served throughout.
#[test]
fn clients_killed_mid_io_leave_no_disk_and_give_memory_back() {
    require("fio");
    require("nbdcopy");
    require("nbdinfo");
    let mut server = Server::start(&["tmpdisk", "size=256M", "type=none"]);
    let pid = server.pid();
    let mut bystander = open_build(&server.sock, "bystander");
    let kept = random_bytes(MIB as usize, 3);
    bystander.write(1, 0, &kept);
    let idle = rss_kib(pid);

    let fio = Command::new("fio")
        .args([
            "--name=victim",
            "--ioengine=nbd",
            &format!("--uri={}", server.uri_for("fio-victim")),
            "--rw=randrw",
            "--bs=64k",
            "--numjobs=4",
            "--iodepth=16",
            "--size=48M",
            "--offset_increment=48M",
            "--time_based",
            "--runtime=60",
            // Jobs as threads of one process, so that one SIGKILL kills
            // every connection (forked jobs would outlive their parent).
            "--thread",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run fio");
    // Killed once it has written at least 32 MiB.
    kill_when(fio, "fio", || rss_kib(pid) > idle + 32 * 1024);
    let bytes = bystander.read(2, 0, MIB as u32);
    assert!(bytes == kept, "the bystander's data changed");

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    random_file(&src, 192 << 20, 5);
    let before = rss_kib(pid);
    let nbdcopy = Command::new("nbdcopy")
        .args([
            "--connections=4",
            src.to_str().unwrap(),
            &server.uri_for("nbdcopy-victim"),
        ])
        .spawn()
        .expect("run nbdcopy");
    kill_when(nbdcopy, "nbdcopy", || rss_kib(pid) > before + 32 * 1024);

    eventually(
        "the killed clients' disks to be destroyed",
        Duration::from_secs(10),
        || listed(&server.sock) == ["bystander"],
    );
    eventually(
        "the server's memory to go back to its idle size",
        Duration::from_secs(10),
        || rss_kib(pid) < idle + 8 * 1024,
    );
    assert!(bystander.read(3, 0, MIB as u32) == kept);
    bystander.disconnect();
    server.assert_alive();
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs (needs root or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes used on the file system.
    fn used(&self) -> u64 {
        let out = run(Command::new("df")
            .args(["-B1", "--output=used"])
            .arg(self.path()));
        stdout(&out)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Dir-backed builds on a 24 MiB tmpfs, without `--disk-limit`: the build
/// that fills the file system gets ENOSPC (not EIO, not a dropped
/// connection), the other build and its own earlier writes keep their data,
/// a trim makes room again, and once both builds end the file system is
/// empty.
#[test]
fn a_full_backing_file_system_is_enospc_and_other_disks_keep_their_data() {
    let fs = Tmpfs::mount("24m");
    let backing = format!("backing=dir:{}", fs.path().display());
    let server = Server::start(&["tmpdisk", "size=64M", "type=none", &backing]);
    libnbd(
        &server.uri(),
        r#"
import os
MIB = 1 << 20
def uri(name):
    return f"nbd+unix:///{name}?socket={ARGS[0]}"
a, b = connect(uri("a")), connect(uri("b"))
a_data = os.urandom(8 * MIB)
a.pwrite(a_data, 0)
b_data = os.urandom(MIB)
written = 0
while True:
    try:
        b.pwrite(b_data, written)
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC, f"wanted ENOSPC, got {e}"
        break
    written += MIB
    assert written < 64 * MIB, "the file system never filled"
assert written >= 8 * MIB, written
eq(a.pread(8 * MIB, 0) == a_data, True, "the other build's data")
for off in range(0, written, MIB):
    eq(b.pread(MIB, off) == b_data, True, f"the full build's MiB at {off}")
fails("ENOSPC", b.pwrite, b_data, written)
b.trim(written, 0)
b.pwrite(b_data, 0)
eq(b.pread(MIB, 0) == b_data, True, "a write after the trim")
"#,
        &[server.sock.to_str().unwrap()],
    );
    eventually("the tmpfs to be empty", Duration::from_secs(10), || {
        std::fs::read_dir(fs.path()).unwrap().count() == 0 && fs.used() < MIB
    });
}

/// `scratchd serve -U SOCK -P PIDFILE tmpdisk ... backing=dir:DIR`,
/// waiting until it accepts.
fn serve_at(sock: &Path, pidfile: &Path, backing: &Path) -> Child {
    let mut child = scratchd_serve(&[
        "-U",
        sock.to_str().unwrap(),
        "-P",
        pidfile.to_str().unwrap(),
        "tmpdisk",
        "size=64M",
        "type=none",
        &format!("backing=dir:{}", backing.display()),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .expect("start scratchd");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("scratchd exited ({status}) instead of serving: {err}");
        }
        if UnixStream::connect(sock).is_ok() {
            return child;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "scratchd never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of a server with live dir-backed scratch disks: no file is
/// left in the backing directory, and a new server on the same socket path
/// and pidfile starts at once (the stale socket and pidfile do not block
/// it) and serves the same build names as fresh disks.
#[test]
fn kill_9_with_live_disks_then_a_restart_on_the_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let sock: PathBuf = dir.path().join("nbd.sock");
    let pidfile = dir.path().join("scratchd.pid");
    let mut first = serve_at(&sock, &pidfile, &backing);
    let data = random_bytes(4 * MIB as usize, 9);
    let mut builds: Vec<Conn> = ["a", "a", "b"]
        .iter()
        .map(|name| open_build(&sock, name))
        .collect();
    for (i, c) in builds.iter_mut().enumerate() {
        c.write(i as u64, i as u64 * 4 * MIB, &data);
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    drop(builds);
    let left: Vec<_> = std::fs::read_dir(&backing).unwrap().collect();
    assert!(left.is_empty(), "files left in the backing dir: {left:?}");

    let mut second = serve_at(&sock, &pidfile, &backing);
    // The socket accepts a moment before the pidfile is rewritten (it
    // still names the killed server until then).
    let written = crate::util::poll(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        text.trim().parse::<u32>().ok() == Some(second.id())
    });
    if written.is_none() {
        let _ = second.kill();
        panic!("the new server's pidfile never named it");
    }
    let mut a = open_build(&sock, "a");
    assert!(
        a.read(1, 0, 4 * MIB as u32).iter().all(|&b| b == 0),
        "build a is a fresh disk"
    );
    a.write(2, 0, &data);
    assert!(a.read(3, 0, 4 * MIB as u32) == data);
    a.disconnect();
    second.kill().unwrap();
    second.wait().unwrap();
}

/// A file backend whose file shrinks behind the server's back: a read past
/// the new end comes back short from the kernel, which the client gets as
/// EIO for that request only; the connection and the rest of the file are
/// served on, and a new client is served too.
#[test]
fn a_short_read_from_the_file_backend_is_eio_for_that_request() {
    const EIO: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    crate::util::random_file(&path, 4 << 20, 21);
    let mut server = crate::util::Server::start(&["file", &format!("path={}", path.display())]);
    let mut c = Conn::open(&server, Mode::Simple);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    c.request(0, crate::wire::CMD_READ, 1, 2 << 20, 4096);
    assert_eq!(c.read_simple(), (EIO, 1), "a read past the shrunk end");
    c.request(0, crate::wire::CMD_READ, 2, 0, 4096);
    assert_eq!(c.read_simple(), (0, 2), "the connection goes on");
    let expected = std::fs::read(&path).unwrap();
    let got = crate::util::read_n(&mut c.s, 4096);
    assert_eq!(got, expected[..4096]);
    server.assert_alive();
    let mut fresh = Conn::open(&server, Mode::Simple);
    fresh.request(0, crate::wire::CMD_READ, 3, 4096, 4096);
    assert_eq!(fresh.read_simple(), (0, 3));
}

/// A network of its own for one test: a network namespace holding one end
/// of a veth pair, `PREFIX.2`, the host holding the other, `PREFIX.1`.
/// Removed on drop.
struct TestNet {
    ns: String,
    host_if: String,
    ns_if: String,
    prefix: String,
}

impl TestNet {
    fn new() -> TestNet {
        let tag = std::process::id() % 100_000;
        let net = TestNet {
            ns: format!("sdt{tag}"),
            host_if: format!("sdh{tag}"),
            ns_if: format!("sdn{tag}"),
            prefix: format!("10.253.{}", tag % 250),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &net.ns]);
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.ns_if,
        ]);
        ip(&["link", "set", &net.ns_if, "netns", &net.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/30", net.prefix),
            "dev",
            &net.host_if,
        ]);
        ip(&["link", "set", &net.host_if, "up"]);
        net.in_ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}.2/30", net.prefix),
            "dev",
            &net.ns_if,
        ]);
        net.in_ns(&["ip", "link", "set", &net.ns_if, "up"]);
        net
    }

    fn in_ns(&self, args: &[&str]) {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args));
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A TCP client that vanishes without closing (its host gone: no FIN, no
/// RST ever comes) while idle is found out by TCP keepalive and its
/// connection ended, instead of holding a thread and its buffers for ever.
/// (One that vanishes with replies unacknowledged is ended by
/// `TCP_USER_TIMEOUT`, set with keepalive.)
#[test]
fn a_half_open_tcp_peer_is_dropped_by_keepalive() {
    crate::util::require("ip");
    let net = TestNet::new();
    let host = format!("{}.1", net.prefix);
    let port = std::net::TcpListener::bind((host.as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_s = port.to_string();
    let _server = crate::util::Server::start(&[
        "-i",
        &host,
        "-p",
        &port_s,
        "--tcp-keepalive",
        "2s",
        "memory",
        "size=16M",
    ]);
    let uri = format!("nbd://{host}:{port}/");
    // The server's established TCP connections, as the kernel lists them.
    let established = || {
        let out = run(Command::new("ss")
            .args(["-Htn", "state", "established"])
            .arg(format!("( sport = :{port} )")));
        crate::util::stdout(&out).lines().count()
    };
    // The client reads once (so the connection is in transmission and
    // every reply acknowledged), says so, then idles.
    let script = "import nbd, sys, time\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pread(512, 0)\nprint('ready', flush=True)\ntime.sleep(120)\n";
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns,
            "/usr/bin/python3",
            "-c",
            script,
            &uri,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(client.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    assert_eq!(established(), 1);
    // The client's host vanishes: its address goes, so whatever the server
    // sends is dropped there in silence (no RST, as from a powered-off
    // machine), while the server's side of the link stays up (a link that
    // is down would make the server's probes fail locally, which TCP
    // retries for ever instead of counting them).
    net.in_ns(&["ip", "addr", "flush", "dev", &net.ns_if]);
    let started = Instant::now();
    crate::util::eventually(
        "keepalive to end the connection",
        Duration::from_secs(40),
        || established() == 0,
    );
    let took = started.elapsed();
    assert!(
        client.try_wait().unwrap().is_none(),
        "the client ended by itself: the test proves nothing"
    );
    assert!(
        took >= Duration::from_secs(2),
        "ended after {took:?}, before any probe"
    );
    eprintln!("half-open peer dropped after {took:?}");
    let _ = client.kill();
    let _ = client.wait();
}
