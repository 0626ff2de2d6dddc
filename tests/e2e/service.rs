//! Running as a service: inetd-style `-s` on a socket, sd_notify, the
//! config file, and access control (`--allow`, per-peer limits).

use std::process::Command;
use std::time::Duration;

use crate::util::{libnbd, run, run_status, scratchd_serve, SCRATCHD};

/// `-s` with a socket on standard input (inetd, xinetd, systemd
/// `Accept=yes`) reads and writes that socket: standard output is
/// /dev/null here, so a server replying there would leave the client
/// waiting (the alarm ends the script then). Over a Unix socket pair, over
/// TCP (the peer's address is logged), and with stdin, stdout and stderr
/// all on the socket as xinetd passes it (logs must not reach the client).
#[test]
fn single_mode_serves_the_socket_on_stdin() {
    let script = r#"
import signal, socket, subprocess
signal.alarm(10)  # the default action ends the script if a reply never comes

def serve(sock, *flags, out=subprocess.DEVNULL, err=subprocess.PIPE):
    p = subprocess.Popen([ARGS[0], "serve", "-s", *flags, "memory", "size=64M"],
                         stdin=sock.fileno(), stdout=out, stderr=err)
    return p

def exercise(client, p, what):
    h = nbd.NBD()
    h.connect_socket(client.detach())
    eq(h.get_size(), 64 << 20, what + ": size")
    h.pwrite(b"inetd" * 1000, 4096)
    eq(h.pread(5000, 4096), b"inetd" * 1000, what + ": read back")
    h.shutdown()
    eq(p.wait(10), 0, what + ": exit status")

a, b = socket.socketpair()
p = serve(b)
b.close()
exercise(a, p, "unix socket pair")

listener = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(listener.getsockname())
accepted, _ = listener.accept()
p = serve(accepted, "-vv")
accepted.close()
port = client.getsockname()[1]
exercise(client, p, "tcp")
log = p.stderr.read().decode()
assert f"127.0.0.1:{port}" in log, "the TCP peer's address is logged:\n" + log

a, b = socket.socketpair()
p = serve(b, "-vv", out=b.fileno(), err=b.fileno())
b.close()
exercise(a, p, "stdin, stdout and stderr on the socket")
"#;
    libnbd("", script, &[SCRATCHD]);
}

/// Refused requests are logged at debug level with their reason: a read
/// past the end and a write to a read-only export, sent by libnbd with its
/// own checks switched off.
#[test]
fn refused_requests_are_logged_at_debug_level() {
    let script = r#"
import socket, subprocess
a, b = socket.socketpair()
p = subprocess.Popen([ARGS[0], "serve", "-s", "-vv", "-r", "memory", "size=1M"],
                     stdin=b.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
b.close()
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_socket(a.detach())
fails("EINVAL", h.pread, 4096, (1 << 20) - 512)
fails("EPERM", h.pwrite, b"x" * 512, 0)
h.shutdown()
eq(p.wait(10), 0, "exit status")
log = p.stderr.read().decode()
refused = [l for l in log.splitlines() if "request refused" in l]
eq(len(refused), 2, "refusals logged:\n" + log)
assert 'command="READ"' in refused[0], refused[0]
for want in ["offset=1048064", "length=4096", "errno=22", "reason="]:
    assert want in refused[0], (want, refused[0])
assert "WRITE" in refused[1] and "errno=1" in refused[1], refused[1]

"#;
    libnbd("", script, &[SCRATCHD]);
}

/// Under systemd (`Type=notify`), the server sends `READY=1` once it
/// listens and its pidfile is written, and `STOPPING=1` when a signal
/// starts its shutdown; to a socket path and to an abstract name (`@...`).
#[test]
fn tells_systemd_when_ready_and_when_stopping() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let abstract_name = format!("scratchd-test-notify-{}", std::process::id());
    let by_path = (
        UnixDatagram::bind(&path).unwrap(),
        path.to_string_lossy().into_owned(),
    );
    let by_name = (
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap(),
        format!("@{abstract_name}"),
    );
    for (listener, notify_socket) in [by_path, by_name] {
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let sock = dir.path().join("nbd.sock");
        let pidfile = dir.path().join("pid");
        let mut server = scratchd_serve(&["-U", sock.to_str().unwrap(), "-P"])
            .arg(&pidfile)
            .args(["memory", "size=1M"])
            .env("NOTIFY_SOCKET", &notify_socket)
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).expect("READY=1 within 10 s");
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            message.lines().any(|l| l == "READY=1"),
            "{notify_socket}: {message:?}"
        );
        assert!(pidfile.exists(), "the pidfile is written before READY=1");
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            "the socket listens before READY=1"
        );
        run(Command::new("kill").arg(server.id().to_string()));
        let n = listener.recv(&mut buf).expect("STOPPING=1 within 10 s");
        assert_eq!(&buf[..n], b"STOPPING=1", "{notify_socket}");
        assert!(server.wait().unwrap().success());
    }
}

/// `--config FILE`: a server configured by the file alone (a private Unix
/// socket, export name, backend and its size), then the same file with a
/// flag and a backend parameter overriding it.
#[test]
fn serves_from_a_config_file_and_flags_override_it() {
    crate::util::require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scratchd.toml");
    std::fs::write(
        &config,
        r#"
# a comment
unix = "-"
export-name = "from-file"
description = "configured"
max-connections = 8
reply-timeout = "30s"
backend = "memory"

[memory]
size = "3M"
"#,
    )
    .unwrap();
    let report =
        r#"nbdinfo --size "$uri" && echo "$exportname" && nbdinfo "$uri" | grep -c configured"#;
    let from_file = run(scratchd_serve(&["--config"])
        .arg(&config)
        .args(["--run", report]));
    assert_eq!(
        crate::util::stdout(&from_file).lines().collect::<Vec<_>>(),
        ["3145728", "from-file", "1"]
    );
    let overridden = run(scratchd_serve(&["--config"]).arg(&config).args([
        "-e",
        "from-flag",
        "--run",
        report,
        "memory",
        "5M",
    ]));
    assert_eq!(
        crate::util::stdout(&overridden).lines().collect::<Vec<_>>(),
        ["5242880", "from-flag", "1"]
    );
}

/// A config file with an unknown key is refused (exit 2) naming the key
/// and its line; so is malformed TOML, and a file that cannot be read.
#[test]
fn bad_config_files_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |text: &str| {
        let config = dir.path().join("scratchd.toml");
        std::fs::write(&config, text).unwrap();
        let (code, out) = run_status(scratchd_serve(&["--config"]).arg(&config));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(code, 2, "{text:?}: {stderr}");
        assert!(stderr.contains(config.to_str().unwrap()), "{stderr}");
        stderr
    };
    let unknown = refused("backend = \"memory\"\nmax-conections = 3\n[memory]\nsize = \"1M\"\n");
    assert!(
        unknown.contains("unknown field `max-conections`") && unknown.contains("line 2"),
        "{unknown}"
    );
    let unknown_param = refused("backend = \"memory\"\n[memory]\nsize = \"1M\"\nsise = 3\n");
    assert!(
        unknown_param.contains("line 4: unknown key \"sise\""),
        "{unknown_param}"
    );
    let malformed = refused("backend = \"memory\"\n[memory\nsize = \"1M\"\n");
    assert!(
        malformed.contains("TOML parse error at line 2"),
        "{malformed}"
    );
    let wrong_type = refused("port = \"10809\"\nbackend = \"memory\"\n");
    assert!(wrong_type.contains("line 1"), "{wrong_type}");
    let missing = dir.path().join("missing.toml");
    let (code, out) = run_status(scratchd_serve(&["--config"]).arg(&missing).arg("memory"));
    assert_eq!(code, 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}

/// Python helpers for the access tests: a server on 127.0.0.1 (and a Unix
/// socket), and libnbd clients from a chosen source address (all of
/// 127/8 reaches lo on Linux).
const ACCESS_PRELUDE: &str = r#"
import os, socket, subprocess, tempfile, time

def start(*flags):
    d = tempfile.mkdtemp()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    pidfile, sock = os.path.join(d, "pid"), os.path.join(d, "nbd.sock")
    p = subprocess.Popen([ARGS[0], "serve", "-i", "127.0.0.1", "-p", str(port), "-U", sock,
                          "-P", pidfile, *flags, "memory", "size=1M"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile):
        assert p.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return p, port, sock

def client(port, source):
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    s.settimeout(None)
    h = nbd.NBD()
    h.connect_socket(s.detach())
    return h

def unix_client(sock):
    h = nbd.NBD()
    h.connect_unix(sock)
    return h

def refused(port, source):
    try:
        client(port, source)
    except nbd.Error as e:
        return
    raise AssertionError(f"a client from {source} was served")

def stop(p):
    p.terminate()
    return p.communicate(timeout=10)[1].decode()
"#;

/// `--allow`: a TCP client from an address outside the list is closed at
/// once (and logged); one inside is served; Unix clients are not affected.
#[test]
fn tcp_peers_outside_allow_are_closed() {
    let script = format!(
        "{ACCESS_PRELUDE}{}",
        r#"
p, port, sock = start("--allow", "127.0.0.2/32", "--allow", "10.0.0.0/8")
h = client(port, "127.0.0.2")
h.pwrite(b"allowed" * 10, 0)
refused(port, "127.0.0.1")
refused(port, "127.0.0.3")
u = unix_client(sock)
eq(u.pread(70, 0), b"allowed" * 10, "a Unix client is not subject to --allow")
log = stop(p)
assert log.count("address not in --allow") == 2, log
assert "127.0.0.3" in log, log
"#
    );
    libnbd("", &script, &[SCRATCHD]);
}

/// `--max-connections-per-peer 2`: the third connection from one address
/// is closed while another address still connects, and once one of the
/// first two leaves, its address is served again; Unix clients are not
/// counted per peer.
#[test]
fn connections_past_the_per_peer_limit_are_closed() {
    let script = format!(
        "{ACCESS_PRELUDE}{}",
        r#"
p, port, sock = start("--max-connections-per-peer", "2")
a, b = client(port, "127.0.0.1"), client(port, "127.0.0.1")
refused(port, "127.0.0.1")
c = client(port, "127.0.0.2")
units = [unix_client(sock) for _ in range(3)]
a.pwrite(b"peer" * 128, 0)
eq(c.pread(512, 0), b"peer" * 128, "the other peer is served")
a.shutdown()
del a
deadline = time.monotonic() + 5
while True:
    try:
        d = client(port, "127.0.0.1")
        break
    except nbd.Error:
        assert time.monotonic() < deadline, "no room after a client left"
        time.sleep(0.05)
eq(d.pread(512, 0), b"peer" * 128, "admitted after one left")
log = stop(p)
assert "too many connections from this address" in log, log
"#
    );
    libnbd("", &script, &[SCRATCHD]);
}

/// The units in `contrib/systemd/` pass `systemd-analyze verify` (which
/// warns, on stderr, about unknown keys and bad values), with their
/// `/usr/bin/scratchd` pointed at the binary under test.
#[test]
fn systemd_units_verify() {
    crate::util::require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let units = [
        ("scratchd.service", "scratchd.service"),
        ("scratchd.socket", "scratchd.socket"),
        ("scratchd-inetd.socket", "scratchd-inetd.socket"),
        ("scratchd-inetd@.service", "scratchd-inetd@1.service"),
    ];
    for (name, instance) in units {
        let text = std::fs::read_to_string(contrib.join(name)).unwrap();
        let text = text.replace("/usr/bin/scratchd", SCRATCHD);
        // The template too: the inetd socket looks its service up by it.
        for file in [name, instance] {
            std::fs::write(dir.path().join(file), &text).unwrap();
        }
    }
    for (_, instance) in units {
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(instance)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.trim().is_empty(), "{instance}:\n{stderr}");
    }
}
