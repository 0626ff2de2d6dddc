//! Running as a service: inetd-style `-s` on a socket, sd_notify, the
//! config file, and access control (`--allow`, per-peer limits).

use std::process::Command;
use std::time::Duration;

use crate::util::{libnbd, run, scratchd_serve, SCRATCHD};

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
