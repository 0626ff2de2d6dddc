//! Starting the real server and running real clients against it.

#![allow(dead_code)] // each test module uses a different part of this

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SCRATCHD: &str = env!("CARGO_BIN_EXE_scratchd");

/// A `scratchd serve` process on a private Unix socket, killed on drop.
pub struct Server {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Server {
    /// Starts `scratchd serve -U SOCK ARGS...` and waits until it accepts.
    pub fn start(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let child = Command::new(SCRATCHD)
            .arg("serve")
            .arg("-U")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start scratchd");
        let mut server = Server { child, dir, sock };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("scratchd exited early with {status}");
            }
            if UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("scratchd did not listen on {} within 10 s", self.sock.display());
    }

    /// URI of the default export.
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// URI of export `name`.
    pub fn uri_for(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Panics if the server died (e.g. crashed on bad input).
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("scratchd died: {status}");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics with an install hint if `tool` is not on PATH.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed; run scripts/test.sh, which installs the test clients");
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script with the system interpreter, which has libnbd's
/// bindings (`python3-libnbd`); `args` become `sys.argv[1:]`.
pub fn python(script: &str, args: &[&str]) -> Output {
    require("nbdsh");
    run(Command::new("/usr/bin/python3").arg("-c").arg(script).args(args))
}

/// Writes a file of `len` pseudo-random bytes (xorshift; deterministic).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data).expect("write random file");
}

/// Reads exactly `n` bytes from a raw socket.
pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("read from server");
    b
}

pub fn send(s: &mut UnixStream, bytes: &[u8]) {
    s.write_all(bytes).expect("write to server");
}
