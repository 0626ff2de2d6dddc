//! The mock plugin (`contrib/mock/scratchd_root.py`) against a fake of
//! mock that does what real mock does, each fact citing mock's source
//! (`contrib/mock/test_scratchd_root.py`: the plugin-dir scan, the plugin
//! loader, main and bootstrap roots, `_init`, `finalize()` under its lock,
//! `delete()`, `Commands.scrub`, a failing build, SIGTERM), and this
//! scratchd: one registration however it is enabled, the bootstrap root
//! left local, mock runs of one root sharing its disk, a clean giving a
//! fresh one, Koji's attached-between-runs mode, teardown hooks that only
//! warn, the key's checks, no disk name in the log, mock's snapshot hooks
//! (`--snapshot`, `--rollback-to`, `--remove-snapshot`,
//! `--list-snapshots`) on the server's snapshots; and the wrapper
//! `contrib/mock/mock-on-scratchd` refusing results on the disk.

use std::path::Path;
use std::process::Command;

use crate::util::{run_status, skip_without_fuse, Server, SCRATCHD};

#[test]
fn mock_plugin_against_a_fake_of_mock() {
    if skip_without_fuse("mock_plugin_against_a_fake_of_mock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let server = Server::start(&[
        "--control",
        control.to_str().unwrap(),
        "tmpdisk",
        "size=256M",
        "linger=60s",
    ]);
    let state = crate::util::state_dir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mock/test_scratchd_root.py");
    let (code, out) = run_status(
        Command::new("/usr/bin/python3")
            .arg(&script)
            .env("SCRATCHD", SCRATCHD)
            .env("SCRATCHD_URI", server.uri())
            .env("SCRATCHD_CONTROL", &control)
            .env("SCRATCHD_STATE_DIR", state.path())
            .env("WORK", dir.path()),
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 0, "the plugin's tests failed:\n{report}");
    assert!(report.contains("OK"), "{report}");
}
