//! Command-line errors: bad usage exits 2 with a message that says what is
//! valid; a backend that cannot be opened exits 1.

use crate::util::{run_status, scratchd_serve};

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
