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
    /// Lets every local user connect to the server's socket (as a farm's
    /// socket in a shared directory would), for tests with a second user.
    pub fn open_to_everyone(&self) {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()))
        };
        mode(self.dir.path(), 0o755);
        mode(&self.sock, 0o777);
    }

    /// Starts `scratchd serve -U SOCK ARGS...` and waits until it accepts.
    pub fn start(args: &[&str]) -> Server {
        Server::start_in(tempfile::tempdir().expect("tempdir"), args)
    }

    /// Starts `scratchd serve -U SOCK file path=FILE` on a zero-filled
    /// sparse file of `len` bytes in the server's own directory (removed
    /// with it); returns the file's path too.
    pub fn on_file(len: u64) -> (Server, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("create the backing file");
        let server = Server::start_in(dir, &["file", &format!("path={}", path.display())]);
        (server, path)
    }

    /// [`Server::start`] with its socket in `dir`, which it keeps.
    fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Server {
        let sock = dir.path().join("nbd.sock");
        let mut command = Command::new(SCRATCHD);
        command.arg("serve").arg("-U").arg(&sock);
        if in_guest() {
            // Emulated clients beside a dozen other tests can take longer
            // than the default 10 s to negotiate.
            command.args(["--handshake-timeout", "60s"]);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("start scratchd");
        let mut server = Server { child, dir, sock };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let what = format!("scratchd to listen on {}", self.sock.display());
        eventually(&what, startup_limit(), || {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("scratchd exited early with {status}");
            }
            UnixStream::connect(&self.sock).is_ok()
        });
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

    /// Sends `sig` ("TERM", "STOP", ...) to the server with kill(1).
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]));
    }

    /// Waits up to `timeout` for the server to exit; returns its status.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        poll(timeout, || self.child.try_wait().expect("try_wait"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a condition polled by [`eventually`] or [`poll`] returns: `bool`
/// (true: done) or `Option<T>` (`Some`: done, with a value to hand back).
pub trait Ready {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Calls `check` every 20 ms until it is ready, for up to `within`; returns
/// its value, or `None` when time ran out first. For waits whose timeout the
/// test asserts on itself; others use [`eventually`].
pub fn poll<R: Ready>(within: Duration, mut check: impl FnMut() -> R) -> Option<R::Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().ready() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `check` every 20 ms until it is ready (true, or `Some(value)`) and
/// returns its value; panics naming `what` (the thing awaited, "the pool to
/// fill") if that takes longer than `within`.
pub fn eventually<R: Ready>(what: &str, within: Duration, check: impl FnMut() -> R) -> R::Value {
    poll(within, check).unwrap_or_else(|| panic!("timed out after {within:?} waiting for {what}"))
}

/// Why a FUSE mount cannot be made here (no `/dev/fuse`, not root), if it
/// cannot; tests that need one say so and skip.
pub fn fuse_unavailable() -> Option<&'static str> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse");
    }
    let uid = run(Command::new("id").arg("-u"));
    (stdout(&uid).trim() != "0").then_some("not root")
}

/// Whether a test that needs FUSE, loop devices and mounts must skip here
/// (saying so, with the reason).
pub fn skip_without_fuse(test: &str) -> bool {
    match fuse_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            true
        }
        None => false,
    }
}

/// An export seen as a file through nbdfuse; unmounted, and nbdfuse
/// reaped, on drop.
pub struct Nbdfuse {
    /// The file: the export's bytes.
    pub disk: PathBuf,
    /// The directory nbdfuse mounts (holding `disk`).
    mount: PathBuf,
    child: Child,
}

impl Nbdfuse {
    /// Runs nbdfuse for `uri` in `dir` (the mount point `dir/fuse`, its pid
    /// file beside it) and waits until it serves `dir/fuse/disk`.
    pub fn start(uri: &str, dir: &Path) -> Nbdfuse {
        require("nbdfuse");
        let (mount, pidfile) = (dir.join("fuse"), dir.join("pid"));
        std::fs::create_dir(&mount).expect("create the nbdfuse mount point");
        let disk = mount.join("disk");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&disk)
            .arg(uri)
            .spawn()
            .expect("run nbdfuse");
        let fuse = Nbdfuse { disk, mount, child };
        eventually("nbdfuse to start", Duration::from_secs(10), || {
            std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0)
        });
        fuse
    }
}

impl Drop for Nbdfuse {
    /// Unmounts, then stops nbdfuse. The unmount is retried while the file
    /// is still busy (a loop device just detached lets go of it a moment
    /// later), then done lazily; nbdfuse gets SIGTERM (it unmounts as it
    /// exits) before SIGKILL. Killing it outright with the mount still in
    /// place left a dead FUSE mount behind ("transport endpoint is not
    /// connected").
    fn drop(&mut self) {
        let unmounted = poll(Duration::from_secs(5), || {
            Command::new("umount")
                .arg(&self.mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if unmounted.is_none() {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
        if poll(Duration::from_secs(5), || {
            self.child.try_wait().ok().flatten()
        })
        .is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Panics with an install hint if `tool` is not on PATH.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed; run scripts/test.sh, which installs the test clients"
    );
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
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
    run(Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .args(args))
}

/// Writes a file of `len` pseudo-random bytes (xorshift; deterministic).
pub fn random_file(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, random_bytes(len, seed)).expect("write random file");
}

/// `len` pseudo-random bytes (xorshift; deterministic for a seed).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len);
    data
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

/// `scratchd serve ARGS...` as a command, for tests that run it themselves
/// (captive `--run`, `-s`).
pub fn scratchd_serve(args: &[&str]) -> Command {
    let mut cmd = Command::new(SCRATCHD);
    cmd.arg("serve").args(args).stdin(Stdio::null());
    cmd
}

/// Runs a command that may fail; returns its exit code and output.
pub fn run_status(cmd: &mut Command) -> (i32, Output) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{cmd:?} killed: {}", out.status));
    (code, out)
}

/// A JSON document flattened to `path → value`: object keys and array
/// indexes joined with `.` (`exports.0.can_trim`), strings unquoted, other
/// leaves as JSON text (`true`, `1048576`, `null`).
pub struct Json(std::collections::BTreeMap<String, String>);

const FLATTEN_JSON: &str = r#"
import json, sys
text = sys.stdin.read()
def walk(path, v):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(path + [k], x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            walk(path + [str(i)], x)
    else:
        print(".".join(path) + "\t" + (v if isinstance(v, str) else json.dumps(v)).replace("\n", "\\n"))
lines = text.splitlines(True)
first = next(i for i, l in enumerate(lines) if l[:1] and l[:1] in "{[")
walk([], json.loads("".join(lines[first:])))
"#;

impl Json {
    /// Parses `text`; lines before the first one starting with `{` or `[`
    /// (tool chatter) are skipped.
    pub fn parse(text: &str) -> Json {
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(FLATTEN_JSON)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "not JSON:\n{text}");
        Json(
            stdout(&out)
                .lines()
                .map(|l| l.split_once('\t').expect("flattened line"))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// The value at `path`; panics (showing the document) if there is none.
    pub fn get(&self, path: &str) -> &str {
        self.0
            .get(path)
            .unwrap_or_else(|| panic!("no {path} in JSON:\n{:#?}", self.0))
    }

    /// The value at `path` as an integer.
    pub fn int(&self, path: &str) -> u64 {
        let v = self.get(path);
        v.parse()
            .unwrap_or_else(|_| panic!("{path} = {v} is not an integer"))
    }

    /// How many elements the array at `path` has (`""` for a top-level one).
    pub fn len(&self, path: &str) -> usize {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        (0..)
            .take_while(|i| {
                let p = format!("{prefix}{i}");
                self.0
                    .keys()
                    .any(|k| k == &p || k.starts_with(&format!("{p}.")))
            })
            .count()
    }
}

/// Python prelude for [`libnbd`] scripts: `URI` (second argument), `ARGS`
/// (the rest), and helpers on libnbd handles. It runs the script (first
/// argument) so that tracebacks give line numbers within it.
const LIBNBD_PRELUDE: &str = r#"
import errno, sys, nbd
SCRIPT, URI, ARGS = sys.argv[1], sys.argv[2] or None, sys.argv[3:]

def connect(uri=None, argv=None):
    """A handle asking for base:allocation, connected to a URI or a command."""
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    if argv:
        h.connect_command(argv)
    else:
        h.connect_uri(uri or URI)
    return h

def fails(errname, f, *args):
    """Asserts that f(*args) fails with errno `errname` (e.g. "EINVAL")."""
    try:
        f(*args)
    except nbd.Error as e:
        want = getattr(errno, errname)
        assert e.errnum == want, f"{f.__name__}{args}: wanted {errname}, got {errno.errorcode.get(e.errnum)}: {e}"
        return
    raise AssertionError(f"{f.__name__}{args} succeeded; wanted {errname}")

def extents(h, count, offset, flags=0):
    """base:allocation as [(length, flags)], checking the context and offset."""
    out = []
    def cb(context, off, entries, err):
        assert context == "base:allocation", context
        assert off == offset, (off, offset)
        out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(count, offset, cb, flags)
    return out

def chunks(h, count, offset, flags=0):
    """A structured read as [(status, offset, length)] in offset order, and its bytes."""
    out = []
    def cb(buf, off, status, err):
        out.append((status, off, len(buf)))
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    return sorted(out, key=lambda c: c[1]), data

def eq(got, want, what=""):
    assert got == want, f"{what}: got {got!r}, wanted {want!r}"

exec(compile(SCRIPT, "script", "exec"))
"#;

/// Runs a libnbd Python script (with the helpers of [`LIBNBD_PRELUDE`]),
/// `uri` and `args` as its arguments; a failed assertion or an unexpected
/// libnbd error fails the test with the script's traceback.
pub fn libnbd(uri: &str, script: &str, args: &[&str]) -> Output {
    libnbd_as(None, uri, script, args)
}

/// How many of process `pid`'s descriptors are files below `dir` (a
/// canonical path): unnamed ones too, as `/proc` shows them.
pub fn files_open_under(pid: u32, dir: &Path) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

/// The user nobody, as whom tests run clients of a second owner.
pub const NOBODY: u32 = 65534;

/// The command line (program first) that runs a client as user `uid`
/// (group `uid`, no supplementary groups), or as this process's user.
pub fn as_user(uid: Option<u32>, argv: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = match uid {
        Some(uid) => vec![
            "setpriv".into(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ],
        None => Vec::new(),
    };
    all.extend(argv.iter().map(|a| a.to_string()));
    all
}

/// The command line of a [`libnbd`] script run as user `uid` (see
/// [`as_user`]), for scripts that start it themselves.
pub fn libnbd_argv(uid: Option<u32>, uri: &str, script: &str, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["/usr/bin/python3", "-c", LIBNBD_PRELUDE, script, uri];
    argv.extend_from_slice(args);
    as_user(uid, &argv)
}

/// [`libnbd`] as user `uid` (see [`as_user`]).
pub fn libnbd_as(uid: Option<u32>, uri: &str, script: &str, args: &[&str]) -> Output {
    require("nbdsh");
    let argv = libnbd_argv(uid, uri, script, args);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        // Another user may not be allowed into the test's directory.
        .current_dir("/")
        .output()
        .expect("run /usr/bin/python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "libnbd script failed ({}):\n{stderr}",
        out.status
    );
    out
}

/// Exit status of `nbdinfo --can|--is WHAT URI`: 0 true, 2 false.
pub fn nbdinfo_test(test: &str, what: &str, uri: &str) -> i32 {
    require("nbdinfo");
    run_status(Command::new("nbdinfo").args([test, what, uri])).0
}

/// `nbdinfo --map` (base:allocation) of `uri` as `(offset, length, type, description)`.
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32, String)> {
    require("nbdinfo");
    let out = run(Command::new("nbdinfo").arg("--map").arg(uri));
    parse_map(&stdout(&out))
}

/// Parses `nbdinfo --map` lines: `OFFSET LENGTH TYPE DESCRIPTION`.
pub fn parse_map(text: &str) -> Vec<(u64, u64, u32, String)> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "unexpected map line {l:?}");
            let n = |s: &str| {
                s.parse::<u64>()
                    .unwrap_or_else(|_| panic!("bad map line {l:?}"))
            };
            (n(f[0]), n(f[1]), n(f[2]) as u32, f[3].to_owned())
        })
        .collect()
}

/// A data run and a hole run in the form [`nbdinfo_map`] returns.
pub fn data(offset: u64, len: u64) -> (u64, u64, u32, String) {
    (offset, len, 0, "data".into())
}

pub fn hole(offset: u64, len: u64) -> (u64, u64, u32, String) {
    (offset, len, 3, "hole,zero".into())
}

/// Creates a sparse file of `len` bytes with pseudo-random data written at
/// each `(offset, length)`; the rest are holes.
pub fn sparse_file(path: &Path, len: u64, runs: &[(u64, usize)]) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::create(path).expect("create sparse file");
    f.set_len(len).unwrap();
    for (i, &(offset, n)) in runs.iter().enumerate() {
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&random_bytes(n, 0x5eed + i as u64)).unwrap();
    }
}

/// Panics at the first differing byte unless the files are identical.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            );
        }
        at += n as u64;
    }
}

/// Sockets the process holds (its listener and its clients).
pub fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Resident memory of process `pid` in KiB (shared memfd pages included).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A TCP port of 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The command lines (`/proc/*/cmdline`, readable by every local user)
/// that contain `secret`, with their pids.
pub fn cmdlines_containing(secret: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(secret) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// What logs show instead of an export's name: the first 8 hex digits of
/// its SHA-256 (as the mock plugin's `fingerprint`).
pub fn fingerprint(name: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(name.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    stdout(&out)[..8].to_owned()
}

/// A state directory for `scratchd attach`/`detach` (`SCRATCHD_STATE_DIR`)
/// of one test: under /run, which is root's and 0755 as the builder
/// requires of every directory above its state (it refuses one under
/// /tmp, which everyone may write).
pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("scratchd-e2e-state.")
        .tempdir_in("/run")
        .expect("a state directory under /run")
}

/// Whether this runs in a guest that `kernel_vm` booted (under TCG
/// emulation, so slower): `/run/scratchd-vm` is its results directory.
pub fn in_guest() -> bool {
    Path::new("/run/scratchd-vm").exists()
}

/// How long a server may take to start listening: 10 s, or a minute in a
/// qemu guest without KVM (`/run/scratchd-vm` is its results directory),
/// where a debug binary loads over 9p under emulation.
pub fn startup_limit() -> Duration {
    if in_guest() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    }
}
