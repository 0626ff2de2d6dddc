//! Command-line errors: bad usage exits 2 with a message that says what is
//! valid; a backend that cannot be opened exits 1. And `--version`, which
//! names the build.

use std::process::Command;

use crate::util::{poll, run, run_status, scratchd_serve, stdout, SCRATCHD};

/// Runs `scratchd serve ARGS` expecting failure; returns (code, stderr).
fn refused(args: &[&str]) -> (i32, String) {
    let (code, out) = run_status(&mut scratchd_serve(args));
    (code, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn usage_errors_exit_2_and_name_what_is_valid() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["nosuch"],
            &["unknown backend", "memory", "file", "tmpdisk"],
        ),
        (
            &["memory", "size=1G", "colour=blue"],
            &["unknown key", "colour", "size"],
        ),
        (&["memory", "size=lots"], &["size=", "lots", "1GiB"]),
        (&["memory"], &["size="]),
        (&["file"], &["path="]),
        (
            &["--memory-limit", "x", "memory", "1G"],
            &["--memory-limit", "x"],
        ),
        (
            &["--disk-limit", "1G", "memory", "1G"],
            &["--disk-limit", "tmpdisk"],
        ),
        (
            &["tmpdisk", "size=1G", "bogus=1"],
            &["unknown key", "bogus"],
        ),
        (&["tmpdisk", "size=1G", "command=true", "1bad=x"], &["1bad"]),
        (&["--no-such-flag", "memory", "1G"], &["--no-such-flag"]),
        (
            &["--max-exports-per-owner", "0", "tmpdisk", "1M"],
            &["--max-exports-per-owner", "0"],
        ),
        (
            &["--owner-memory-limit", "lots", "tmpdisk", "1M"],
            &["--owner-memory-limit", "lots"],
        ),
        (
            &["--owner-memory-limit", "1G", "memory", "1G"],
            &["--owner-memory-limit", "tmpdisk"],
        ),
        (
            &["--owner-disk-limit", "1G", "tmpdisk", "1M"],
            &["--owner-disk-limit", "dir:PATH"],
        ),
        (
            &["--busy-poll", "fast", "memory", "1M"],
            &["--busy-poll", "fast"],
        ),
        (
            &["--busy-poll", "2s", "memory", "1M"],
            &["--busy-poll", "2s", "100ms"],
        ),
        (
            &["tmpdisk", "1M", "owner=root"],
            &["owner=", "root", "peer", "peer+gid", "name"],
        ),
    ];
    for (args, words) in cases {
        let (code, stderr) = refused(args);
        assert_eq!(code, 2, "{args:?} exit code; stderr: {stderr}");
        for w in *words {
            assert!(stderr.contains(w), "{args:?}: {w:?} missing from: {stderr}");
        }
    }
}

#[test]
fn unopenable_backend_exits_1() {
    let (code, stderr) = refused(&["file", "path=/nonexistent/disk.img"]);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(stderr.contains("/nonexistent/disk.img"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = refused(&["file", &format!("path={}", dir.path().display())]);
    assert_eq!(code, 1, "a directory is not a disk; stderr: {stderr}");
}

/// Systemd socket activation: with `LISTEN_PID`/`LISTEN_FDS` naming a
/// listening socket on fd 3, scratchd serves it and opens no listener of its
/// own (so no TCP port 10809 either).
#[test]
fn serves_a_socket_passed_by_systemd() {
    crate::util::require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    // Python binds the socket, puts it on fd 3 and execs scratchd in its own
    // process, so LISTEN_PID is scratchd's PID, as systemd would set it.
    let launcher = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], [sys.argv[2], "serve", "memory", "size=1M"])
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", launcher])
        .arg(&sock)
        .arg(crate::util::SCRATCHD)
        .spawn()
        .unwrap();
    let info = poll(std::time::Duration::from_secs(10), || {
        let out = Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        info.as_deref(),
        Some("1048576"),
        "nbdinfo through the activated socket"
    );
}

/// A LISTEN_FDS naming a descriptor that is not open is refused cleanly
/// (exit 1 with a message), not a crash.
#[test]
fn socket_activation_with_a_closed_descriptor_is_an_error() {
    let launcher = r#"
import os, sys
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.closerange(3, 4)
os.execv(sys.argv[1], [sys.argv[1], "serve", "memory", "size=1M"])
"#;
    let (code, out) = run_status(
        Command::new("/usr/bin/python3")
            .args(["-c", launcher])
            .arg(crate::util::SCRATCHD),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(
        stderr.contains("descriptor 3, which is not open"),
        "{stderr}"
    );
}

/// `--version` names the crate version and, in a git checkout, the commit
/// it was built from.
#[test]
fn version_names_the_commit() {
    let out = run(Command::new(SCRATCHD).arg("--version"));
    let version = stdout(&out);
    assert!(
        version.starts_with(&format!("scratchd {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("built 2"), "the build date: {version}");
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output();
    match head {
        Ok(o) if o.status.success() => {
            let hash = stdout(&o).trim().to_owned();
            assert!(
                version.contains(&format!("({hash}")),
                "{version} lacks {hash}"
            );
        }
        _ => assert!(version.contains("(unknown,"), "{version}"),
    }
}
