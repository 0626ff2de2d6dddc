//! TLS (STARTTLS) with real clients: nbdinfo/nbdcopy with `nbds` URIs and
//! qemu-img with `tls-creds-x509`, certificates made by openssl in the test.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::free_port;
use crate::util::{random_file, require, run, run_status, stdout, Server};

/// Makes a CA in `dir` (ca-cert.pem, ca-key.pem) and, signed by it, a
/// certificate and key for `name` (`{name}-cert.pem`, `{name}-key.pem`):
/// "server" for localhost, "client" for a client.
fn make_ca(dir: &Path) {
    openssl(
        dir,
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
         -subj /CN=scratchd-test-CA -keyout ca-key.pem -out ca-cert.pem \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
    );
}

fn make_cert(dir: &Path, ca: &Path, name: &str, usage: &str) {
    openssl(
        dir,
        &format!(
            "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
             -keyout {name}-key.pem -out {name}.csr"
        ),
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n\
             basicConstraints=CA:FALSE\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}/ca-cert.pem -CAkey {ca}/ca-key.pem \
             -CAcreateserial -days 2 -out {name}-cert.pem -extfile {ext}",
            ca = ca.display(),
            ext = ext.display()
        ),
    );
}

fn openssl(dir: &Path, args: &str) {
    run(Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir));
}

/// A CA with a server certificate, and a client certificate from the same
/// CA, all in one directory (libnbd and scratchd's layout).
fn pki() -> tempfile::TempDir {
    require("openssl");
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    make_cert(dir.path(), dir.path(), "server", "serverAuth");
    make_cert(dir.path(), dir.path(), "client", "clientAuth");
    dir
}

/// A server on a free port of 127.0.0.1 with the certificates in `pki`,
/// the TLS options `extra` and the backend `backend` (with its keys).
fn tls_server_with(pki: &Path, extra: &[&str], backend: &[&str]) -> (Server, u16) {
    let port = free_port();
    let port_s = port.to_string();
    let certs = pki.to_str().unwrap();
    let mut args = vec![
        "-p",
        &port_s,
        "-i",
        "127.0.0.1",
        "--tls-certificates",
        certs,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(backend);
    (Server::start(&args), port)
}

fn tls_server(pki: &Path, extra: &[&str]) -> (Server, u16) {
    tls_server_with(pki, extra, &["memory", "size=64M"])
}

/// Required TLS with verified client certificates, serving `backend`.
fn certified_server(pki: &Path, backend: &[&str]) -> (Server, u16) {
    tls_server_with(pki, &["--tls", "require", "--tls-verify-peer"], backend)
}

fn nbds(port: u16, pki: &Path) -> String {
    format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        pki.display()
    )
}

#[test]
fn require_refuses_plaintext_and_serves_tls() {
    require("nbdinfo");
    let pki = pki();
    let (_server, port) = tls_server(pki.path(), &["--tls", "require"]);
    let out = run(Command::new("nbdinfo").arg(nbds(port, pki.path())));
    let text = stdout(&out);
    assert!(text.contains("with TLS"), "{text}");
    assert!(text.contains("export-size: 67108864"), "{text}");
    // Plaintext: the option is refused with TLS_REQD, and nbdinfo fails.
    let (code, out) = run_status(Command::new("nbdinfo").arg(format!("nbd://localhost:{port}/")));
    assert_ne!(code, 0, "plaintext was served: {}", stdout(&out));
}

#[test]
fn on_serves_both() {
    require("nbdinfo");
    let pki = pki();
    let (_server, port) = tls_server(pki.path(), &["--tls", "on"]);
    let tls = stdout(&run(Command::new("nbdinfo").arg(nbds(port, pki.path()))));
    assert!(tls.contains("with TLS"), "{tls}");
    let plain = stdout(&run(
        Command::new("nbdinfo").arg(format!("nbd://localhost:{port}/"))
    ));
    assert!(plain.contains("without TLS"), "{plain}");
}

/// Data round-trips over TLS with many requests in flight (nbdcopy keeps
/// 64 by default, over 4 connections), both ways.
#[test]
fn data_round_trips_over_tls() {
    require("nbdcopy");
    let pki = pki();
    let (_server, port) = tls_server(pki.path(), &["--tls", "require"]);
    let dir = tempfile::tempdir().unwrap();
    let (src, back) = (dir.path().join("src"), dir.path().join("back"));
    random_file(&src, 48 << 20, 5);
    let uri = nbds(port, pki.path());
    run(Command::new("nbdcopy").arg(&src).arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
    assert_eq!(&b[..a.len()], &a[..], "data changed over TLS");
}

#[test]
fn qemu_img_over_tls() {
    require("qemu-img");
    let pki = pki();
    let (_server, port) = tls_server(pki.path(), &["--tls", "require"]);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.path().display()
    );
    let image =
        format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0,tls-hostname=localhost");
    let out =
        run(Command::new("qemu-img").args(["info", "--object", &object, "--image-opts", &image]));
    assert!(stdout(&out).contains("64 MiB"), "{}", stdout(&out));
}

/// With --tls-verify-peer a client needs a certificate from the server's
/// CA: libnbd sends client-cert.pem from its directory; a directory whose
/// client certificate comes from another CA is refused.
#[test]
fn verify_peer_refuses_a_client_of_another_ca() {
    require("nbdinfo");
    let pki = pki();
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_server, port) = tls_server(
        pki.path(),
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--metrics",
            &metrics,
        ],
    );
    let ok = stdout(&run(Command::new("nbdinfo").arg(nbds(port, pki.path()))));
    assert!(ok.contains("with TLS"), "{ok}");

    // Another CA's client certificate, with our CA to check the server.
    let other_ca = tempfile::tempdir().unwrap();
    make_ca(other_ca.path());
    let stranger = tempfile::tempdir().unwrap();
    make_cert(stranger.path(), other_ca.path(), "client", "clientAuth");
    std::fs::copy(
        pki.path().join("ca-cert.pem"),
        stranger.path().join("ca-cert.pem"),
    )
    .unwrap();
    let (code, _) = run_status(Command::new("nbdinfo").arg(nbds(port, stranger.path())));
    assert_ne!(code, 0, "a client certificate from another CA was accepted");
    // And no client certificate at all.
    let bare = tempfile::tempdir().unwrap();
    std::fs::copy(
        pki.path().join("ca-cert.pem"),
        bare.path().join("ca-cert.pem"),
    )
    .unwrap();
    let (code, _) = run_status(Command::new("nbdinfo").arg(nbds(port, bare.path())));
    assert_ne!(code, 0, "a client without a certificate was accepted");
    // The metrics count both refusals, and the handshake that worked.
    use crate::ctl::{scrape, value};
    let url = format!("http://{metrics}/metrics");
    crate::util::eventually("the TLS counts", Duration::from_secs(5), || {
        let s = scrape(&url);
        value(&s, "scratchd_tls_handshakes_total{result=\"completed\"}") >= 1.0
            && value(&s, "scratchd_tls_handshakes_total{result=\"failed\"}") >= 2.0
            && value(&s, "scratchd_handshake_failures_total{reason=\"tls\"}") >= 2.0
    });
}

#[test]
fn bad_tls_setups_are_usage_errors() {
    let (code, out) = run_status(&mut crate::util::scratchd_serve(&[
        "--tls", "require", "memory", "size=1M",
    ]));
    assert_eq!(code, 2, "{}", String::from_utf8_lossy(&out.stderr));
    let empty = tempfile::tempdir().unwrap();
    let (code, out) = run_status(&mut crate::util::scratchd_serve(&[
        "--tls",
        "on",
        "--tls-certificates",
        empty.path().to_str().unwrap(),
        "memory",
        "size=1M",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server-cert.pem") || err.contains("server-key.pem"),
        "{err}"
    );
}

/// `scratchd run --server nbds://…`: our own client over TLS, presenting
/// the directory's client certificate to a server that verifies peers,
/// with several connections; data written and read back through the disk.
#[test]
fn scratchd_run_over_tls() {
    if let Some(why) = crate::util::fuse_unavailable() {
        eprintln!("SKIPPED scratchd_run_over_tls: {why}");
        return;
    }
    let pki = pki();
    let (_server, port) = certified_server(pki.path(), &["tmpdisk", "size=256M"]);
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        pki.path().display()
    );
    let script = r#"
        set -e
        head -c 3000000 /dev/urandom > "$SCRATCHD_MOUNT/data"
        sha256sum < "$SCRATCHD_MOUNT/data" > "$SCRATCHD_MOUNT/sum"
        sync -f "$SCRATCHD_MOUNT"
        dd if="$SCRATCHD_MOUNT/data" iflag=direct bs=1M status=none | sha256sum | cmp - "$SCRATCHD_MOUNT/sum"
        echo verified
    "#;
    let (code, out) = run_status(
        Command::new(crate::util::SCRATCHD)
            .args(["run", "--server", &uri, "--name", "tls-build", "--"])
            .args(["sh", "-c", script]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 0, "{}{err}", stdout(&out));
    assert!(stdout(&out).contains("verified"));
    // Without TLS the same server refuses our client, naming the reason.
    let plain = format!("nbd://localhost:{port}/");
    let (code, out) = run_status(
        Command::new(crate::util::SCRATCHD).args(["run", "--server", &plain, "--", "true"]),
    );
    assert_eq!(code, 125);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS_REQD"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With verified client certificates, each certificate is an owner: two
/// clients of the same CA asking for one build name get two disks, and a
/// client sees its own data again on reconnecting.
#[test]
fn two_client_certificates_are_two_owners() {
    require("nbdcopy");
    let pki = pki();
    // A second client certificate from the same CA, in a directory of its own.
    let other = tempfile::tempdir().unwrap();
    make_cert(other.path(), pki.path(), "client", "clientAuth");
    std::fs::copy(
        pki.path().join("ca-cert.pem"),
        other.path().join("ca-cert.pem"),
    )
    .unwrap();
    let (_server, port) = certified_server(
        pki.path(),
        &["tmpdisk", "size=8M", "type=none", "linger=30s"],
    );
    let uri = |dir: &Path| {
        format!(
            "nbds://localhost:{port}/build-x?tls-certificates={}",
            dir.display()
        )
    };
    let work = tempfile::tempdir().unwrap();
    let secret = work.path().join("secret");
    random_file(&secret, 8 << 20, 9);
    run(Command::new("nbdcopy").arg(&secret).arg(uri(pki.path())));
    let seen_by_other = work.path().join("other");
    run(Command::new("nbdcopy")
        .arg(uri(other.path()))
        .arg(&seen_by_other));
    let seen_by_owner = work.path().join("owner");
    run(Command::new("nbdcopy")
        .arg(uri(pki.path()))
        .arg(&seen_by_owner));
    let secret = std::fs::read(&secret).unwrap();
    assert_eq!(std::fs::read(&seen_by_owner).unwrap(), secret);
    let other = std::fs::read(&seen_by_other).unwrap();
    assert!(
        other.iter().all(|&b| b == 0),
        "another certificate read the build's disk"
    );
}

/// Two hundred TLS connections at once, four to each of fifty build names
/// (clients with verified certificates, one owner): each writes its own
/// 64 KiB and every connection of a name reads all four back (multi-conn
/// over TLS); with all of them open the server counts 200 connections on
/// 50 disks; once they close (no linger) there are no exports and no
/// memory in use.
#[test]
fn two_hundred_tls_connections_on_fifty_names_then_nothing_left() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    const NAMES: usize = 50;
    const PER_NAME: usize = 4;
    const CHUNK: u64 = 64 << 10;
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let (_server, port) = tls_server_with(
        pki.path(),
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--control",
            control.to_str().unwrap(),
        ],
        &["tmpdisk", "size=8M", "type=none"],
    );
    let script = r#"
import sys, nbd
port, certs, names, per_name, chunk = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
def data(n, j):
    return (f"build-{n}-conn-{j}:".encode() * chunk)[:chunk]
handles = []
for n in range(names):
    for j in range(per_name):
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(certs)
        h.set_export_name(f"tls-build-{n}")
        h.connect_tcp("localhost", port)
        assert h.get_tls_negotiated(), "not TLS"
        h.pwrite(data(n, j), j * chunk)
        handles.append((n, j, h))
for n, j, h in handles:
    for k in range(per_name):
        assert h.pread(chunk, k * chunk) == data(n, k), (n, j, k)
print("open", len(handles), flush=True)
sys.stdin.readline()
for _, _, h in handles:
    h.shutdown()
print("closed", flush=True)
"#;
    let started = std::time::Instant::now();
    let mut clients = Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &port.to_string(),
            pki.path().to_str().unwrap(),
        ])
        .args([NAMES, PER_NAME, CHUNK as usize].map(|n| n.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut out = BufReader::new(clients.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "open 200",
        "the clients failed (see their traceback above)"
    );
    let opened = started.elapsed();
    let status = crate::ctl::ctl_json(&control, &["status"]);
    assert_eq!(status.int("connections"), (NAMES * PER_NAME) as u64);
    assert_eq!(status.int("exports_live"), NAMES as u64);
    assert_eq!(status.int("exports_created"), NAMES as u64);
    let list = crate::ctl::ctl_json(&control, &["list"]);
    assert_eq!(list.len("exports"), NAMES);
    assert!(list.get("exports.0.owner").starts_with("cert:"));
    assert_eq!(
        status.int("memory.used"),
        NAMES as u64 * PER_NAME as u64 * CHUNK,
        "what the builds wrote"
    );

    writeln!(clients.stdin.take().unwrap(), "close").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "closed");
    assert!(clients.wait().unwrap().success());
    crate::util::eventually("every disk to go", Duration::from_secs(10), || {
        let s = crate::ctl::ctl_json(&control, &["status"]);
        s.int("exports_live") == 0 && s.int("connections") == 0
    });
    let status = crate::ctl::ctl_json(&control, &["status"]);
    assert_eq!(status.int("exports_destroyed"), NAMES as u64);
    assert_eq!(status.int("memory.used"), 0);
    assert_eq!(crate::ctl::ctl_json(&control, &["list"]).len("exports"), 0);
    eprintln!(
        "200 TLS connections opened and checked in {opened:?}, all in {:?}",
        started.elapsed()
    );
}

/// The handshake deadline covers the TLS handshake: a client that asks for
/// STARTTLS, then drips its TLS hello one byte a second (never letting a
/// read time out) is cut off at `--handshake-timeout` from its connect.
#[test]
fn a_dripped_tls_handshake_is_cut_off_at_the_deadline() {
    use std::io::{Read, Write};
    let pki = pki();
    let (mut server, port) = tls_server(
        pki.path(),
        &["--tls", "require", "--handshake-timeout", "3s"],
    );
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x05\0\0\0\0").unwrap(); // NBD_OPT_STARTTLS
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(
        u32::from_be_bytes(ack[12..16].try_into().unwrap()),
        1,
        "ACK"
    );
    // A TLS handshake record announcing 512 bytes, sent a byte at a time.
    let hello = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    let mut sent = 0;
    let cut = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still open after {sent} bytes of TLS hello"
        );
        if s.write_all(&[hello[sent % hello.len()]]).is_err() {
            break started.elapsed();
        }
        sent += 1;
        let mut byte = [0u8; 1];
        match s.read(&mut byte) {
            Ok(0) => break started.elapsed(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break started.elapsed(),
            Ok(_) => {} // an alert on its way out
        }
    };
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(6)).contains(&cut),
        "cut after {cut:?}; the deadline was 3 s"
    );
    server.assert_alive();
}
