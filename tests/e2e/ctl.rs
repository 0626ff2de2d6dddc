//! `scratchd ctl` over the control socket and `--metrics`, while real
//! clients (libnbd, nbdcopy) hold disks and move data.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

use crate::util::free_port;
use crate::util::{
    as_user, eventually, random_file, require, run, run_status, stdout, Json, Server, NOBODY,
    SCRATCHD,
};

/// A build holding a disk: a libnbd client connected to export `name`,
/// which wrote `len` bytes of `fill` at 0 and waits for commands.
struct Build {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const BUILD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_export_name(sys.argv[2])
h.connect_unix(sys.argv[1])
h.pwrite(bytes([int(sys.argv[4])]) * int(sys.argv[3]), 0)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "read":
        try:
            h.pread(4096, 0)
            print("ok", flush=True)
        except nbd.Error as e:
            print("error", e, flush=True)
    else:
        break
try:
    h.shutdown()
except nbd.Error:
    pass
"#;

impl Build {
    fn start(server: &Server, name: &str, len: usize, fill: u8) -> Build {
        Build::start_as(None, server, name, len, fill)
    }

    /// [`Build::start`] as user `uid` (see [`as_user`]).
    fn start_as(uid: Option<u32>, server: &Server, name: &str, len: usize, fill: u8) -> Build {
        require("nbdsh");
        let sock = server.sock.to_string_lossy();
        let (len, fill) = (len.to_string(), fill.to_string());
        let argv = as_user(
            uid,
            &["/usr/bin/python3", "-c", BUILD, &sock, name, &len, &fill],
        );
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut b = Build {
            child,
            stdin,
            stdout,
        };
        assert_eq!(b.line(), "ready", "build {name} did not start");
        b
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_owned()
    }

    /// Reads from its disk: "ok" or "error …".
    fn read(&mut self) -> String {
        writeln!(self.stdin, "read").unwrap();
        self.line()
    }

    /// Disconnects cleanly and waits for the client to exit.
    fn finish(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpdisk server with a control socket, `flags` before the backend and
/// `params` after it.
struct Setup {
    server: Server,
    control: PathBuf,
    /// Holds the control socket.
    _dir: tempfile::TempDir,
}

fn start(flags: &[&str], params: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let mut args = vec!["--control", control.to_str().unwrap()];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["tmpdisk", "size=64M", "type=none"]);
    args.extend_from_slice(params);
    Setup {
        server: Server::start(&args),
        control,
        _dir: dir,
    }
}

/// `scratchd ctl --control PATH ARGS…`, which must succeed; its output.
pub(crate) fn ctl(control: &Path, args: &[&str]) -> String {
    stdout(&run(&mut ctl_command(control, args)))
}

/// [`ctl`] that may fail: its exit code and output.
fn ctl_status(control: &Path, args: &[&str]) -> (i32, Output) {
    run_status(&mut ctl_command(control, args))
}

/// `scratchd ctl --control CONTROL ARGS...`.
fn ctl_command(control: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(SCRATCHD);
    cmd.args(["ctl", "--control"]).arg(control).args(args);
    cmd
}

/// [`ctl`] with `--json`, parsed.
pub(crate) fn ctl_json(control: &Path, args: &[&str]) -> Json {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    Json::parse(&ctl(control, &all))
}

/// Our uid, as the owner selector of our disks.
fn me() -> String {
    let out = run(Command::new("id").arg("-u"));
    format!("uid:{}", stdout(&out).trim())
}

#[test]
fn ctl_list_show_and_status_while_two_builds_are_connected() {
    let Setup {
        server,
        control,
        _dir,
    } = start(&[], &[]);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");
    let a = Build::start(&server, "build-a", 1 << 20, 1);
    let b = Build::start(&server, "build-b", 2 << 20, 2);

    let table = ctl(&control, &["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATE"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("build-a") && lines[1].contains("live"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("build-b") && lines[2].contains("2.0M"),
        "{table}"
    );

    let list = ctl_json(&control, &["list"]);
    assert_eq!(list.len("exports"), 2);
    assert_eq!(list.get("exports.0.name"), "build-a");
    assert_eq!(list.get("exports.0.owner"), me());
    assert_eq!(list.get("exports.0.backend"), "tmpdisk");
    assert_eq!(list.get("exports.0.state"), "live");
    assert_eq!(list.int("exports.0.size"), 64 << 20);
    assert_eq!(list.int("exports.0.connections"), 1);
    assert_eq!(list.int("exports.0.written_bytes"), 1 << 20);
    assert_eq!(list.int("exports.0.allocated_bytes"), 1 << 20);
    assert_eq!(list.int("exports.1.written_bytes"), 2 << 20);
    assert_eq!(list.get("exports.1.keep"), "null");

    let show = ctl(&control, &["show", "build-b"]);
    assert!(show.contains("export:          build-b"), "{show}");
    assert!(
        show.contains("writes:") && show.contains("(2097152 bytes)"),
        "{show}"
    );
    let show = ctl_json(&control, &["show", "build-b", "--owner", &me()]);
    assert_eq!(show.len("exports"), 1);
    assert_eq!(show.int("exports.0.connections_total"), 1);

    let status = ctl_json(&control, &["status"]);
    assert_eq!(status.get("backend"), "tmpdisk");
    assert_eq!(status.int("exports_live"), 2);
    assert_eq!(status.int("exports_created"), 2);
    assert_eq!(status.int("exports_destroyed"), 0);
    assert_eq!(status.int("connections"), 2);
    assert_eq!(status.int("memory.used"), 3 << 20);
    assert!(status.int("memory.limit") >= 3 << 20);
    let text = ctl(&control, &["status"]);
    assert!(
        text.contains("exports:      2 live, 2 created, 0 destroyed"),
        "{text}"
    );

    a.finish();
    b.finish();
    let status = ctl_json(&control, &["status"]);
    assert_eq!(status.int("exports_live"), 0);
    assert_eq!(status.int("exports_destroyed"), 2);
    assert_eq!(status.int("memory.used"), 0);
    // Unknown names are errors, with a message.
    let (code, out) = ctl_status(&control, &["show", "nope"]);
    assert_eq!(code, 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export \"nope\""));
}

#[test]
fn ctl_drop_disconnects_the_clients_and_frees_the_disk() {
    let Setup {
        server,
        control,
        _dir,
    } = start(&[], &["linger=60s"]);
    let mut build = Build::start(&server, "doomed", 1 << 20, 7);
    let other = Build::start(&server, "other", 4096, 1);
    assert_eq!(build.read(), "ok");
    let out = ctl(&control, &["drop", "doomed"]);
    assert_eq!(
        out.trim(),
        format!("dropped doomed of {} (1 connection closed)", me())
    );
    let reply = build.read();
    assert!(
        reply.starts_with("error"),
        "a dropped disk's client: {reply}"
    );
    // Freed (no linger for a dropped disk), and the others carry on.
    eventually("the dropped disk to go", Duration::from_secs(5), || {
        let s = ctl_json(&control, &["status"]);
        s.int("exports_destroyed") == 1 && s.int("memory.used") == 4096
    });
    let list = ctl_json(&control, &["list"]);
    assert_eq!(list.len("exports"), 1);
    assert_eq!(list.get("exports.0.name"), "other");
    other.finish();
    // A new connection with the name gets a fresh disk.
    let again = Build::start(&server, "doomed", 4096, 9);
    assert_eq!(
        ctl_json(&control, &["show", "doomed"]).int("exports.0.connections_total"),
        1
    );
    again.finish();
    let (code, out) = ctl_status(&control, &["drop", "never-was"]);
    assert_eq!(code, 1, "{}", stdout(&out));
}

#[test]
fn ctl_keep_makes_a_disk_outlive_its_last_connection() {
    // No linger: without keep, the disk would go with its build.
    let Setup {
        server,
        control,
        _dir,
    } = start(&[], &[]);
    let build = Build::start(&server, "failed-build", 1 << 20, 0x5a);
    let out = ctl(&control, &["keep", "failed-build", "--for", "1h"]);
    assert!(out.contains("keeping failed-build"), "{out}");
    assert_eq!(
        ctl_json(&control, &["list"]).get("exports.0.keep"),
        "after:3600"
    );
    build.finish();
    let list = ctl_json(&control, &["list"]);
    assert_eq!(list.get("exports.0.state"), "kept");
    assert_eq!(list.int("exports.0.connections"), 0);
    assert!(ctl(&control, &["list"]).contains("kept 59m"));
    // A reconnect sees the build's data.
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_export_name("failed-build")
h.connect_unix(sys.argv[1])
assert h.pread(1 << 20, 0) == b"\x5a" * (1 << 20)
h.shutdown()
"#;
    run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(&server.sock));
    // Kept until dropped: survives its connections, goes when dropped.
    // A time past what the server's clock can add is refused with a
    // clear error, and the control socket still answers.
    let (code, out) = ctl_status(
        &control,
        &["keep", "failed-build", "--for", "100000000000000h"],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_ne!(code, 0);
    assert!(said.contains("more than 10 years"), "{said}");
    ctl(&control, &["keep", "failed-build"]);
    assert_eq!(
        ctl_json(&control, &["list"]).get("exports.0.keep"),
        "forever"
    );
    ctl(&control, &["drop", "failed-build"]);
    assert_eq!(ctl_json(&control, &["status"]).int("exports_live"), 0);
}

#[test]
fn ctl_on_a_single_export_backend() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let mut server = Server::start(&[
        "--control",
        control.to_str().unwrap(),
        "-e",
        "disk",
        "memory",
        "size=8M",
    ]);
    let list = ctl_json(&control, &["list"]);
    assert_eq!(list.len("exports"), 1);
    assert_eq!(list.get("exports.0.name"), "disk");
    assert_eq!(list.get("exports.0.backend"), "memory");
    assert_eq!(list.int("exports.0.size"), 8 << 20);
    assert_eq!(ctl_json(&control, &["status"]).get("backend"), "memory");
    let (code, _) = ctl_status(&control, &["drop", "disk"]);
    assert_eq!(code, 1);
    // Removed at exit, like the NBD socket.
    server.signal("TERM");
    assert!(server.wait_for_exit(Duration::from_secs(10)).is_some());
    assert!(!control.exists(), "the control socket outlived the server");
}

#[test]
fn ctl_asks_which_owner_when_a_name_is_ambiguous() {
    let Setup {
        server,
        control,
        _dir,
    } = start(&[], &[]);
    server.open_to_everyone();
    let mut mine = Build::start(&server, "same", 4096, 1);
    let mut theirs = Build::start_as(Some(NOBODY), &server, "same", 4096, 2);
    let nobody = format!("uid:{NOBODY}");
    let list = ctl_json(&control, &["list"]);
    assert_eq!(list.len("exports"), 2);
    let owners = [list.get("exports.0.owner"), list.get("exports.1.owner")];
    assert!(
        owners.contains(&me().as_str()) && owners.contains(&nobody.as_str()),
        "{owners:?}"
    );
    assert_eq!(ctl_json(&control, &["show", "same"]).len("exports"), 2);
    assert_eq!(
        ctl_json(&control, &["show", "same", "--owner", &nobody]).get("exports.0.owner"),
        nobody
    );
    // drop will not guess.
    let (code, out) = ctl_status(&control, &["drop", "same"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--owner") && stderr.contains(&nobody) && stderr.contains(&me()),
        "{stderr}"
    );
    assert_eq!(mine.read(), "ok");
    let out = ctl(&control, &["drop", "same", "--owner", &nobody]);
    assert_eq!(
        out.trim(),
        format!("dropped same of {nobody} (1 connection closed)")
    );
    assert!(theirs.read().starts_with("error"));
    assert_eq!(mine.read(), "ok", "the other owner's disk is untouched");
    assert_eq!(ctl_json(&control, &["list"]).len("exports"), 1);
    mine.finish();
}

/// Scrapes `url` with curl; the metric lines as (series, value).
pub(crate) fn scrape(url: &str) -> Vec<(String, f64)> {
    require("curl");
    let out = run(Command::new("curl").args(["-sf", "--max-time", "5", url]));
    stdout(&out)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

/// The value of `series` (exact text before the value) in a scrape; 0 if absent.
pub(crate) fn value(scrape: &[(String, f64)], series: &str) -> f64 {
    scrape
        .iter()
        .find(|(k, _)| k == series)
        .map_or(0.0, |(_, v)| *v)
}

#[test]
fn metrics_move_with_traffic() {
    require("nbdcopy");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let Setup { server, _dir, .. } = start(&["--metrics", &addr], &[]);
    let url = format!("http://{addr}/metrics");
    let s = scrape(&url);
    assert_eq!(value(&s, "scratchd_exports"), 0.0);
    assert!(value(&s, "scratchd_budget_limit_bytes{kind=\"memory\"}") > 0.0);
    // The default class's pool (none here) has its series all the same.
    assert!(s
        .iter()
        .any(|(k, _)| k == "scratchd_pool_target{class=\"default\"}"));
    assert_eq!(value(&s, "scratchd_pool_ready{class=\"default\"}"), 0.0);

    let build = Build::start(&server, "m", 1 << 20, 3);
    let owner = me();
    let labels = |extra: &str| {
        format!("{{export=\"m\",owner=\"{owner}\",backend=\"tmpdisk\",class=\"default\"{extra}}}")
    };
    let written = format!(
        "scratchd_export_bytes_total{}",
        labels(",command=\"write\"")
    );
    let s = scrape(&url);
    assert_eq!(value(&s, "scratchd_exports"), 1.0);
    assert_eq!(
        value(&s, &format!("scratchd_export_connections{}", labels(""))),
        1.0
    );
    assert_eq!(value(&s, &written), (1 << 20) as f64);
    assert_eq!(
        value(&s, "scratchd_budget_used_bytes{kind=\"memory\"}"),
        (1 << 20) as f64
    );
    assert_eq!(value(&s, "scratchd_export_creation_seconds_count"), 1.0);

    // A second client (nbdcopy) writes 4 MiB to the same disk.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    random_file(&file, 4 << 20, 42);
    run(Command::new("nbdcopy").arg(&file).arg(server.uri_for("m")));
    let s = scrape(&url);
    assert!(
        value(&s, &written) >= (5 << 20) as f64,
        "{}",
        value(&s, &written)
    );
    assert!(
        value(
            &s,
            &format!("scratchd_export_ops_total{}", labels(",command=\"write\""))
        ) >= 2.0
    );
    assert_eq!(
        value(&s, "scratchd_budget_used_bytes{kind=\"memory\"}"),
        (4 << 20) as f64
    );
    // (nbdcopy may open several connections.)
    let opened = format!("scratchd_export_connections_opened_total{}", labels(""));
    assert!(value(&s, &opened) >= 2.0);
    assert!(value(&s, "scratchd_connections_accepted_total") >= 2.0);

    build.finish();
    let s = scrape(&url);
    assert_eq!(value(&s, "scratchd_exports"), 0.0);
    assert_eq!(value(&s, "scratchd_exports_destroyed_total"), 1.0);
    assert_eq!(
        value(&s, &written),
        0.0,
        "a destroyed disk's series are gone"
    );
    assert_eq!(
        value(&s, "scratchd_budget_used_bytes{kind=\"memory\"}"),
        0.0
    );
    // Other paths are not found.
    let out = run(Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/nope")));
    assert_eq!(stdout(&out), "404");
}

/// An ENOSPC write (past the disk's quota) moves
/// `scratchd_errors_total{errno="ENOSPC"}`; a client sending garbage
/// instead of an option, one refused its export, one leaving mid-handshake
/// and one saying nothing past `--handshake-timeout` move
/// `scratchd_handshake_failures_total` by reason.
#[test]
fn metrics_count_errors_and_failed_handshakes() {
    use std::io::Read;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let Setup { server, _dir, .. } = start(
        &["--metrics", &addr, "--handshake-timeout", "1s"],
        &["quota=1M"],
    );
    // Greeted, then silent: dropped after the handshake timeout.
    let mut silent = server.connect();
    let silent_since = std::time::Instant::now();
    let url = format!("http://{addr}/metrics");
    let enospc = "scratchd_errors_total{errno=\"ENOSPC\"}";
    let failures =
        |reason: &str| format!("scratchd_handshake_failures_total{{reason=\"{reason}\"}}");
    let s = scrape(&url);
    assert_eq!(value(&s, enospc), 0.0);
    assert_eq!(value(&s, &failures("malformed")), 0.0);
    assert_eq!(
        value(&s, "scratchd_tls_handshakes_total{result=\"failed\"}"),
        0.0
    );

    let out = crate::util::libnbd(
        &server.uri_for("q"),
        r#"
h = connect(URI)
try:
    h.pwrite(b"x" * (2 << 20), 0)
    raise AssertionError("a write past the quota succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
"#,
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the ENOSPC count", Duration::from_secs(5), || {
        value(&scrape(&url), enospc) >= 1.0
    });

    // Garbage instead of an option header: malformed.
    let mut raw = server.connect();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&[0, 0, 0, 3]).unwrap();
    raw.write_all(&[0x55; 16]).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    // Gone after the greeting.
    let mut gone = server.connect();
    gone.read_exact(&mut greeting).unwrap();
    drop(gone);
    // A name the policy refuses.
    require("nbdinfo");
    let _ = run_status(Command::new("nbdinfo").arg(server.uri_for(".hidden")));
    eventually(
        "the handshake failure counts",
        Duration::from_secs(5),
        || {
            let s = scrape(&url);
            value(&s, &failures("malformed")) >= 1.0
                && value(&s, &failures("client_gone")) >= 1.0
                && value(&s, &failures("refused")) >= 1.0
        },
    );
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    let waited = silent_since.elapsed();
    assert_eq!(rest.len(), 18, "a silent client gets the greeting only");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "silent client dropped after {waited:?}, expected about 1 s"
    );
    eventually("the timeout count", Duration::from_secs(5), || {
        value(&scrape(&url), &failures("timeout")) == 1.0
    });
}

/// Error replies are counted per export, by errno: a read past the end
/// (EINVAL, refused before it reaches the disk) and writes past the quota
/// (ENOSPC, from the disk) move `scratchd_export_errors_total` of that
/// export only, with its export, owner, backend and class labels, and show
/// in `ctl show`; a busy export without errors has no error series.
#[test]
fn metrics_count_errors_per_export_by_errno() {
    let addr = format!("127.0.0.1:{}", free_port());
    let Setup {
        server,
        control,
        _dir,
    } = start(&["--metrics", &addr], &["quota=1M", "linger=60s"]);
    let url = format!("http://{addr}/metrics");
    let errors = |export: &str, errno: &str| {
        format!(
            "scratchd_export_errors_total{{export=\"{export}\",owner=\"{}\",backend=\"tmpdisk\",class=\"default\",errno=\"{errno}\"}}",
            me()
        )
    };
    let server_wide = |s: &[(String, f64)], errno: &str| {
        value(s, &format!("scratchd_errors_total{{errno=\"{errno}\"}}"))
    };
    let before = scrape(&url);
    crate::util::libnbd(
        &server.uri_for("failing"),
        r#"
h = connect(URI)
h.set_strict_mode(0)
fails("EINVAL", h.pread, 4096, h.get_size())
for _ in range(2):
    fails("ENOSPC", h.pwrite, b"x" * (2 << 20), 0)
h.shutdown()
"#,
        &[],
    );
    crate::util::libnbd(
        &server.uri_for("healthy"),
        r#"
h = connect(URI)
h.pwrite(b"y" * 65536, 0)
eq(h.pread(65536, 0), b"y" * 65536, "read back")
h.shutdown()
"#,
        &[],
    );
    let s = scrape(&url);
    assert_eq!(value(&s, &errors("failing", "EINVAL")), 1.0);
    assert_eq!(value(&s, &errors("failing", "ENOSPC")), 2.0);
    let healthy: Vec<_> = s
        .iter()
        .filter(|(k, _)| k.starts_with("scratchd_export_errors_total") && k.contains("\"healthy\""))
        .collect();
    assert!(
        healthy.is_empty(),
        "the healthy export has errors: {healthy:?}"
    );
    let healthy_writes = format!(
        "scratchd_export_ops_total{{export=\"healthy\",owner=\"{}\",backend=\"tmpdisk\",class=\"default\",command=\"write\"}}",
        me()
    );
    assert_eq!(
        value(&s, &healthy_writes),
        1.0,
        "the healthy export was used"
    );
    // The server-wide family counts them too.
    assert!(server_wide(&s, "EINVAL") >= server_wide(&before, "EINVAL") + 1.0);
    assert!(server_wide(&s, "ENOSPC") >= server_wide(&before, "ENOSPC") + 2.0);
    let show = ctl_json(&control, &["show", "failing"]);
    assert_eq!(show.int("exports.0.errors.EINVAL"), 1);
    assert_eq!(show.int("exports.0.errors.ENOSPC"), 2);
    let text = ctl(&control, &["show", "failing"]);
    assert!(
        text.contains("errors:          EINVAL 1, ENOSPC 2"),
        "{text}"
    );
    let text = ctl(&control, &["show", "healthy"]);
    assert!(text.contains("errors:          none"), "{text}");
}

/// Every series the shipped Grafana dashboard queries is one the server
/// exports.
#[test]
fn the_dashboard_queries_exported_metrics() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let Setup { server, _dir, .. } = start(&["--metrics", &addr], &[]);
    let build = Build::start(&server, "d", 4096, 1);
    // One error, so that the per-export error family has a series.
    crate::util::libnbd(
        &server.uri_for("d"),
        "h = connect(URI)\nh.set_strict_mode(0)\nfails('EINVAL', h.pread, 512, h.get_size())\n",
        &[],
    );
    let names: std::collections::BTreeSet<String> = scrape(&format!("http://{addr}/metrics"))
        .into_iter()
        .map(|(series, _)| series.split('{').next().unwrap().to_owned())
        .collect();
    let dashboard = include_str!("../../contrib/grafana/scratchd.json");
    let mut used = 0;
    for (i, _) in dashboard.match_indices("scratchd_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            names.contains(&name),
            "the dashboard queries {name}, not exported: {names:?}"
        );
        used += 1;
    }
    assert!(used >= 8, "{used}");
    build.finish();
}

/// The metrics name every disk and its owner: a request by a name that is
/// not this endpoint's (a web page's own domain pointed at the address,
/// DNS rebinding) is refused, one by the address is answered, and a
/// client dripping its request does not hold the endpoint past its
/// deadline (5 s) while a scraper waits.
#[test]
fn metrics_refuse_other_host_names_and_dripping_clients() {
    use std::io::Write;
    require("curl");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let Setup {
        server: _server,
        _dir,
        ..
    } = start(&["--metrics", &addr], &[]);
    let url = format!("http://{addr}/metrics");
    let code = |host: &str| {
        let out = run(Command::new("curl").args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            "-H",
            &format!("Host: {host}"),
            &url,
        ]));
        stdout(&out)
    };
    assert_eq!(code("rebind.attacker.example"), "403");
    assert_eq!(code(&addr), "200");
    assert_eq!(code(&format!("localhost:{port}")), "200");
    let mut drip = std::net::TcpStream::connect(&addr).unwrap();
    let dripper = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(15) && drip.write_all(b"G").is_ok()
        {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    assert_eq!(code(&addr), "200");
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(8),
        "a scrape waited {waited:?} behind a dripping client"
    );
    dripper.join().unwrap();
}

/// `--busy-poll`: a client that sends each request as soon as its last
/// is answered (libnbd's synchronous calls) has its requests caught by
/// the server's spin, and `scratchd_busy_poll_waits_total` says so; with
/// `--busy-poll 0` nothing spins. The data is right either way.
#[test]
fn spins_that_catch_a_clients_next_request_are_counted() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (limit, spins) in [("20ms", cpus > 1), ("0", false)] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let Setup { server, _dir, .. } = start(&["--metrics", &addr, "--busy-poll", limit], &[]);
        let out = crate::util::libnbd(
            &server.uri_for("spin"),
            r#"
h = connect(URI)
for i in range(50):
    h.pwrite(bytes([i]) * 4096, i * 4096)
for i in range(50):
    assert h.pread(4096, i * 4096) == bytes([i]) * 4096, i
"#,
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = scrape(&format!("http://{addr}/metrics"));
        let series =
            |outcome: &str| format!("scratchd_busy_poll_waits_total{{outcome=\"{outcome}\"}}");
        assert!(
            s.iter().any(|(k, _)| *k == series("caught")),
            "no busy-poll series: {s:?}"
        );
        let caught = value(&s, &series("caught"));
        if spins {
            assert!(caught >= 1.0, "--busy-poll {limit}: nothing caught");
        } else {
            assert_eq!(
                caught + value(&s, &series("missed")),
                0.0,
                "spun with --busy-poll 0"
            );
        }
    }
}
