//! The mock plugin (`contrib/mock/scratchd_root.py`) against a small fake
//! of mock's plugin registry (`contrib/mock/test_scratchd_root.py`) and
//! this scratchd: attach at `mount_root`, detach at `postumount`, the next
//! mock run of the build finds its files, `scrub` drops the disk.

use std::path::Path;
use std::process::Command;

use crate::util::{run_status, skip_without_fuse, Server, SCRATCHD};

#[test]
fn mock_plugin_against_a_fake_registry() {
    if skip_without_fuse("mock_plugin_against_a_fake_registry") {
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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mock/test_scratchd_root.py");
    let (code, out) = run_status(
        Command::new("/usr/bin/python3")
            .arg(&script)
            .env("SCRATCHD", SCRATCHD)
            .env("SCRATCHD_URI", server.uri())
            .env("SCRATCHD_CONTROL", &control)
            .env("SCRATCHD_STATE_DIR", dir.path().join("state"))
            .env("WORK", dir.path()),
    );
    let report = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 0, "the plugin's tests failed:\n{report}");
    assert!(report.contains("OK"), "{report}");
}
