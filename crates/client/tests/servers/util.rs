//! Servers to test against: scratchd's own server in this process, and
//! nbdkit and qemu-nbd as child processes (killed on drop). A missing tool
//! fails the test with what to install; nothing is skipped silently.

#![allow(dead_code)] // each module uses a different part of this

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_client::{Client, Options, Replies, ReplyMode, Target};
use scratchd_server::shutdown::Shutdown;
use scratchd_server::workers::WorkerPool;
use scratchd_server::{ConnectionLimit, Listener, ServerContext, SingleExport};
use scratchd_store::memory::Budget;
use scratchd_store::{BlockDevice, MemoryDevice};

/// Options with `n` connections and the given reply framing.
pub fn options(connections: usize, replies: Replies) -> Options {
    Options {
        connections,
        replies,
        request_timeout: Some(Duration::from_secs(60)),
        ..Options::default()
    }
}

pub fn connect(target: &Target, connections: usize, replies: Replies) -> Client {
    Client::connect_with(target, &options(connections, replies))
        .unwrap_or_else(|e| panic!("connect to {target}: {e}"))
}

/// Makes the device an in-process export serves from its memory disk.
pub type Wrap = Box<dyn FnOnce(MemoryDevice) -> Arc<dyn BlockDevice>>;

/// How an in-process scratchd export is set up.
pub struct Scratchd {
    pub name: &'static str,
    pub size: u64,
    pub read_only: bool,
    /// Memory budget in bytes (`None`: unlimited).
    pub budget: Option<u64>,
    pub tcp: bool,
    /// Wraps the memory disk (to slow or hold its writes).
    pub wrap: Option<Wrap>,
}

impl Default for Scratchd {
    fn default() -> Self {
        Scratchd {
            name: "disk",
            size: 64 << 20,
            read_only: false,
            budget: None,
            tcp: false,
            wrap: None,
        }
    }
}

/// A scratchd server on a socket, in this process; it lives until the
/// test binary exits (its accept thread cannot be stopped), but each has
/// its own socket and memory disk.
pub struct ScratchdServer {
    pub target: Target,
    _dir: tempfile::TempDir,
}

impl Scratchd {
    pub fn start(self) -> ScratchdServer {
        let device = match self.budget {
            Some(limit) => MemoryDevice::with_budget(self.size, Arc::new(Budget::new(limit))),
            None => MemoryDevice::new(self.size),
        }
        .expect("memory device");
        let device: Arc<dyn BlockDevice> = match self.wrap {
            Some(wrap) => wrap(device),
            None => Arc::new(device),
        };
        let exports = SingleExport::new(self.name.into(), None, device, self.read_only);
        let ctx = Arc::new(ServerContext {
            exports: Arc::new(exports),
            counters: Arc::default(),
            workers: WorkerPool::new(1).expect("workers"),
            shutdown: Shutdown::default(),
            connections: ConnectionLimit::new(None),
            reply_timeout: Duration::from_secs(30),
            handshake_timeout: scratchd_server::connection::DEFAULT_HANDSHAKE_TIMEOUT,
            tls: None,
            tcp_keepalive: None,
            busy_polling: scratchd_server::busy_poll::BusyPolling::off(),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, target) = if self.tcp {
            let mut l = Listener::tcp(Some("127.0.0.1"), 0).expect("listen on tcp");
            let l = l.remove(0);
            let port = l.tcp_port().expect("tcp port");
            (l, Target::tcp("127.0.0.1", port, self.name))
        } else {
            let sock = dir.path().join("nbd.sock");
            let l = Listener::unix(&sock).expect("listen on unix");
            (l, Target::unix(sock, self.name))
        };
        listener.spawn(ctx).expect("accept thread");
        ScratchdServer { target, _dir: dir }
    }
}

/// A server process on a Unix socket in a private directory.
pub struct Process {
    child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub what: String,
}

impl Process {
    /// Starts `program ARGS...`, where `{sock}` in an argument becomes the
    /// socket path and `{dir}` the private directory, and waits until the
    /// socket accepts.
    pub fn start(program: &str, package: &str, args: &[&str]) -> Process {
        Process::start_in(
            tempfile::tempdir().expect("tempdir"),
            program,
            package,
            args,
        )
    }

    /// [`Process::start`] in `dir`, which may hold files already.
    pub fn start_in(
        dir: tempfile::TempDir,
        program: &str,
        package: &str,
        args: &[&str],
    ) -> Process {
        let sock = dir.path().join("nbd.sock");
        let fill = |a: &&str| {
            a.replace("{sock}", &sock.to_string_lossy())
                .replace("{dir}", &dir.path().to_string_lossy())
        };
        let args: Vec<String> = args.iter().map(fill).collect();
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {program} ({e}); install {package} (scripts/test.sh does)")
            });
        let mut p = Process {
            child,
            dir,
            sock,
            what: format!("{program} {}", args.join(" ")),
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{} exited early with {status}", self.what);
            }
            if self.dir.path().join("pid").exists() && self.sock.exists() {
                return;
            }
            assert!(Instant::now() < deadline, "{} never listened", self.what);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn target(&self, export: &str) -> Target {
        Target::unix(&self.sock, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `nbdkit -U SOCK -f ARGS...` (foreground, so the child is nbdkit).
pub fn nbdkit(args: &[&str]) -> Process {
    let mut all = vec![
        "-U",
        "{sock}",
        "-f",
        "--exit-with-parent",
        "-P",
        "{dir}/pid",
    ];
    all.extend_from_slice(args);
    Process::start("nbdkit", "nbdkit", &all)
}

/// qemu-nbd serving a fresh sparse raw image of `size` bytes, persistent
/// (`-t`), with `extra` options before the image. Both servers write a pid
/// file once they listen, which is how readiness is seen (a probing
/// connection would make them log a broken handshake).
pub fn qemu_nbd(size: u64, extra: &[&str]) -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(size))
        .expect("image");
    let img = img.to_string_lossy().into_owned();
    let mut all = vec!["-k", "{sock}", "-t", "-f", "raw", "--pid-file={dir}/pid"];
    all.extend_from_slice(extra);
    all.push(&img);
    Process::start_in(dir, "qemu-nbd", "qemu-utils", &all)
}

/// The version `qemu-nbd --version` prints first ("qemu-nbd 7.2.22 (Debian
/// ...)"), as (major, minor).
pub fn qemu_nbd_version() -> (u32, u32) {
    let out = Command::new("qemu-nbd")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("qemu-nbd --version: {e} (apt-get install qemu-utils)"));
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text)
        .unwrap_or_else(|| panic!("no version in qemu-nbd --version: {text:?}"))
}

/// The first `MAJOR.MINOR` after the program name in `--version` output.
fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let word = text.split_whitespace().nth(1)?;
    let mut parts = word.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The reply framing the qemu-nbd on this machine negotiates when asked for
/// extended headers: qemu 8.2 added `NBD_OPT_EXTENDED_HEADERS` to its server
/// (qemu's `docs/interop/nbd.rst`, "Features by version": "8.2:
/// NBD_OPT_EXTENDED_HEADERS"); before that, structured replies are the best
/// it offers (since 2.11). Debian 12 packages 7.2, its backports 10.0.
pub fn qemu_nbd_best_replies() -> ReplyMode {
    if qemu_nbd_version() >= (8, 2) {
        ReplyMode::Extended
    } else {
        ReplyMode::Structured
    }
}

#[test]
fn qemu_versions_parse() {
    let debian12 = "qemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nWritten by";
    assert_eq!(parse_qemu_version(debian12), Some((7, 2)));
    assert_eq!(
        parse_qemu_version("qemu-nbd 10.0.2 (Debian)"),
        Some((10, 0))
    );
    assert_eq!(parse_qemu_version("qemu-nbd"), None);
}

/// Deterministic pseudo-random bytes (splitmix64), so failures repeat.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}
