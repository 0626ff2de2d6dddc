//! The `tmpdisk` backend with real clients: one throw-away disk per export
//! name, shared by all of that name's connections.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ctl::ctl_json;
use crate::util::{
    eventually, fuse_unavailable, libnbd, require, run, run_status, stdout, Nbdfuse, Server,
};

/// Python helpers for the scripts below: `uri(name)` of an export on the
/// server whose socket is `ARGS[0]`, and `go_error(name)`, the error message
/// the server gave for NBD_OPT_GO (libnbd shows it only in its debug log).
pub(crate) const HELPERS: &str = r#"
def uri(name):
    return f"nbd+unix:///{name}?socket={ARGS[0]}"

def go_error(name):
    h = nbd.NBD()
    log = []
    h.set_debug(True)
    h.set_debug_callback(lambda ctx, msg: log.append(msg))
    h.set_export_name(name)
    try:
        h.connect_unix(ARGS[0])
    except nbd.Error:
        text = "\n".join(m for m in log if "server error message" in m)
        assert text, "no server error message in " + repr(log[-5:])
        return text
    raise AssertionError(f"connecting to {name!r} succeeded")

EXT4_MAGIC = b"\x53\xef"
"#;

/// Runs a libnbd script with [`HELPERS`] against `server`; `args` follow
/// the socket in `ARGS`. Returns its standard output.
fn script_with_args(server: &Server, body: &str, args: &[&str]) -> String {
    let sock = server.sock.to_string_lossy().into_owned();
    let mut all = vec![sock.as_str()];
    all.extend_from_slice(args);
    let out = libnbd(&server.uri(), &format!("{HELPERS}\n{body}"), &all);
    stdout(&out)
}

/// [`script_with_args`] without extra arguments.
fn script(server: &Server, body: &str) -> String {
    script_with_args(server, body, &[])
}

fn start(args: &[&str]) -> Server {
    let mut all = vec!["tmpdisk"];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// A file path in a fresh temporary directory (returned too, to keep) and
/// the server argument `VAR=PATH` that gives it to the format command as
/// `$VAR`.
fn command_file(var: &str, file: &str) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    let kv = format!("{var}={}", path.display());
    (dir, path, kv)
}

/// A fresh backing directory and the `backing=dir:PATH` argument for it.
fn backing_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let kv = format!("backing=dir:{}", dir.path().display());
    (dir, kv)
}

/// A real client's ext4 detection: `nbdinfo` on build `name` (creating
/// its disk if need be) finds filesystem data.
fn assert_nbdinfo_finds_filesystem(server: &Server, name: &str) {
    require("nbdinfo");
    let out = run(Command::new("nbdinfo").arg(server.uri_for(name)));
    assert!(stdout(&out).contains("filesystem data"), "{}", stdout(&out));
}

/// Files in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Names that `nbdinfo --list` shows.
fn listed(server: &Server) -> Vec<String> {
    require("nbdinfo");
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &server.uri()]));
    let j = crate::util::Json::parse(&stdout(&out));
    (0..j.len("exports"))
        .map(|i| j.get(&format!("exports.{i}.export-name")).to_owned())
        .collect()
}

/// Two connections to one build see each other's writes at once, with no
/// flush (a scratch disk offers none); another build has its own, freshly
/// formatted ext4 disk.
#[test]
fn connections_to_one_build_share_a_disk_and_builds_are_independent() {
    let server = start(&["size=64M"]);
    script(
        &server,
        r#"
a1, a2, b = connect(uri("build-a")), connect(uri("build-a")), connect(uri("build-b"))
for h in (a1, a2, b):
    eq(h.can_multi_conn(), True, "multi-conn")
    eq(h.get_size(), 64 << 20, "size")
    eq(h.pread(2, 1080), EXT4_MAGIC, "ext4 superblock magic")
data = bytes(range(256)) * 64
a1.pwrite(data, 32 << 20)
eq(a2.pread(len(data), 32 << 20), data, "the other connection sees the write")
# A scratch disk advertises no flush or FUA: nothing on it is durable,
# and a completed write is on every connection at once.
eq((a2.can_flush(), a2.can_fua()), (False, False), "no flush, no FUA")
a2.pwrite(b"back", 40 << 20)
eq(a1.pread(4, 40 << 20), b"back", "and the other way round")
eq(b.pread(len(data), 32 << 20), bytes(len(data)), "build-b is untouched")
"#,
    );
    // The ext4 detection of a real client, on a build nobody wrote to.
    assert_nbdinfo_finds_filesystem(&server, "build-c");
}

/// nbdcopy (several connections) in and out of one build, then four fio
/// jobs on one build name, verified with crc32c.
#[test]
fn nbdcopy_and_four_fio_connections_on_one_build() {
    require("nbdcopy");
    require("fio");
    let server = start(&["size=64M", "type=none"]);
    let dir = tempfile::tempdir().unwrap();
    let (src, back) = (dir.path().join("src"), dir.path().join("back"));
    crate::util::random_file(&src, 64 << 20, 7);
    // The disk outlives a single nbdcopy only while connected, so copy in
    // and out within one connection held open by a reader.
    let holder = Holder::start(&server, "copy");
    let uri = server.uri_for("copy");
    run(Command::new("nbdcopy").args(["--connections=4", src.to_str().unwrap(), &uri]));
    run(Command::new("nbdcopy").args(["--connections=4", &uri, back.to_str().unwrap()]));
    crate::util::assert_files_equal(&src, &back);
    drop(holder);

    crate::fio::fio_randwrite_verify(&server.uri_for("fio"), 4, 8 << 20, 8);
}

/// A connection kept open (by a Python libnbd handle) so that a build's
/// disk stays alive between clients.
struct Holder(Child);

impl Holder {
    fn start(server: &Server, name: &str) -> Holder {
        let mut child = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.read()",
                &server.uri_for(name),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run /usr/bin/python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "holder did not connect");
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nbdinfo` asks INFO then GO: the disk is formatted exactly once. INFO
/// and LIST alone create nothing.
#[test]
fn info_then_go_formats_once_and_info_or_list_create_nothing() {
    let (_dir, counter, counter_kv) = command_file("counter", "count");
    let server = start(&[
        "size=64M",
        "command=echo x >> $counter; mkfs -t ext4 -q -F $disk",
        &counter_kv,
    ]);
    script(
        &server,
        r#"
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri("never-opened"))
h.opt_info()
eq(h.get_size(), 64 << 20, "INFO reports the template size")
eq(h.can_multi_conn(), True, "INFO reports multi-conn")
names = []
h.opt_list(lambda name, desc: names.append(name))
eq(names, [], "LIST")
h.opt_abort()
"#,
    );
    assert!(!counter.exists(), "INFO or LIST ran the format command");
    assert_nbdinfo_finds_filesystem(&server, "build-1");
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "x\n");
}

/// With linger, a reconnect finds the data; after it, a fresh filesystem.
#[test]
fn linger_keeps_a_disk_for_a_reconnect_then_destroys_it() {
    let server = start(&["size=64M", "linger=1s"]);
    script(
        &server,
        r#"
h = connect(uri("koji-1"))
h.pwrite(b"mock run 1", 10 << 20)
h.shutdown()
h = connect(uri("koji-1"))
eq(h.pread(10, 10 << 20), b"mock run 1", "data after a reconnect within linger")
"#,
    );
    assert_eq!(listed(&server), ["koji-1"], "a lingering disk is listed");
    eventually("the lingering disk to go", Duration::from_secs(10), || {
        listed(&server).is_empty()
    });
    script(
        &server,
        r#"
h = connect(uri("koji-1"))
eq(h.pread(10, 10 << 20), bytes(10), "fresh disk after linger")
eq(h.pread(2, 1080), EXT4_MAGIC, "formatted")
"#,
    );
}

/// Writes past the memory budget fail with ENOSPC for that client only;
/// the memory comes back when the build disconnects.
#[test]
fn memory_budget_gives_enospc_and_comes_back_after_disconnect() {
    let server = Server::start(&["--memory-limit", "8M", "tmpdisk", "size=64M", "type=none"]);
    script(
        &server,
        r#"
import time
a, b = connect(uri("a")), connect(uri("b"))
a.pwrite(b"\1" * (5 << 20), 0)
fails("ENOSPC", a.pwrite, b"\2" * (4 << 20), 8 << 20)
b.pwrite(b"\3" * (2 << 20), 0)
eq(b.pread(16, 0), b"\3" * 16, "another build keeps working")
fails("ENOSPC", b.pwrite, b"\3" * (2 << 20), 4 << 20)
a.shutdown()
c = connect(uri("c"))
deadline = time.monotonic() + 10
while True:  # a's memory is returned once its connection is torn down
    try:
        c.pwrite(b"\4" * (5 << 20), 0)
        break
    except nbd.Error as e:
        assert e.errnum == errno.ENOSPC and time.monotonic() < deadline, e
        time.sleep(0.02)
eq(c.pread(16, 0), b"\4" * 16, "budget reused")
"#,
    );
}

/// A failing and a hanging format command: the client gets an NBD error
/// with the command's stderr; the server goes on serving other names; no
/// file is left in the backing directory.
#[test]
fn format_failure_and_timeout_are_clean_errors_and_leave_nothing() {
    let (backing, dir_kv) = backing_dir();
    // The first format fails, later ones work: a server that failed once
    // still creates disks.
    let (_flag_dir, _, flag_kv) = command_file("flag", "failed-once");
    let server = start(&[
        "size=64M",
        &dir_kv,
        "command=[ -e $flag ] && exec mkfs -t ext4 -q -F $disk; touch $flag; echo boom >&2; exit 1",
        &flag_kv,
    ]);
    let out = script(
        &server,
        r#"
msg = go_error("build-a")
assert "boom" in msg, msg
print("error:", msg)
h = connect(uri("build-b"))
eq(h.pread(2, 1080), EXT4_MAGIC, "the next build is formatted")
"#,
    );
    assert!(out.contains("format command failed"), "{out}");
    assert!(entries(backing.path()).is_empty());
    drop(server);

    let hang = start(&[
        "size=64M",
        &dir_kv,
        "format-timeout=1s",
        "command=echo zzz >&2; sleep 30",
    ]);
    let start_time = Instant::now();
    let out = script(&hang, "print(go_error('slow'))");
    assert!(out.contains("timed out") && out.contains("zzz"), "{out}");
    assert!(
        start_time.elapsed() < Duration::from_secs(8),
        "{:?}",
        start_time.elapsed()
    );
    // The server still serves, and nothing is left behind.
    script(&hang, "print(go_error('slow-2'))");
    assert!(entries(backing.path()).is_empty());
}

/// A format command that fills the memfd past `--memory-limit` (zeros
/// too take memory there) is stopped with an error naming the budget,
/// instead of taking the server's memory; the next build is formatted.
#[test]
fn a_format_command_outgrowing_the_memory_budget_is_a_clean_error() {
    let (_flag_dir, _, flag_kv) = command_file("flag", "greedy-once");
    let server = Server::start(&[
        "--memory-limit",
        "16M",
        "tmpdisk",
        "size=256M",
        "command=[ -e $flag ] && exec mkfs -t ext4 -q -F $disk; touch $flag; \
         dd if=/dev/zero of=$disk bs=1M count=128 conv=notrunc",
        &flag_kv,
    ]);
    let out = script(
        &server,
        r#"
print(go_error("greedy"))
h = connect(uri("build-b"))
eq(h.pread(2, 1080), EXT4_MAGIC, "the next build is formatted")
"#,
    );
    assert!(
        out.contains("format command exceeded the memory budget"),
        "{out}"
    );
}

/// With backing=dir: the disk lives in the directory without a name while
/// it is in use, and nothing is left after a normal end or a SIGKILL.
#[test]
fn dir_backing_leaves_no_files_after_destroy_or_sigkill() {
    let (backing, dir_kv) = backing_dir();
    let server = start(&["size=64M", &dir_kv]);
    script(
        &server,
        r#"
h = connect(uri("build-a"))
h.pwrite(b"x" * 65536, 0)
eq(h.pread(2, 1080), b"xx", "own data over the superblock")
"#,
    );
    assert!(entries(backing.path()).is_empty(), "after a normal destroy");

    let holder = Holder::start(&server, "build-b");
    // The disk is open in the server, unlinked, inside the backing dir.
    let backing_dir = backing.path().canonicalize().unwrap();
    let open_in_dir = crate::util::files_open_under(server.pid(), &backing_dir);
    assert!(
        open_in_dir >= 1,
        "no disk file open in {}",
        backing_dir.display()
    );
    assert!(entries(backing.path()).is_empty(), "while live");
    drop(server); // SIGKILL
    drop(holder);
    assert!(entries(backing.path()).is_empty(), "after SIGKILL");
}

/// Bad names get a policy error with a reason; the server keeps serving.
#[test]
fn bad_export_names_are_refused_by_policy() {
    let server = Server::start(&["--name-prefix", "ci-", "tmpdisk", "size=16M", "type=none"]);
    let long = format!("ci-{}", "x".repeat(200));
    script_with_args(
        &server,
        r#"
for name, why in [("ci-../x", "contains"), ("ci-a b", "contains"), (ARGS[1], "long"),
                  ("build-1", "start with"), ("", "build")]:
    msg = go_error(name)
    assert why in msg, (name, msg)
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri("x"))
names = []
h.opt_list(lambda name, desc: names.append(name))
eq(names, [], "nothing was created")
h.opt_abort()
h = connect(uri("ci-ok.1_2-3"))
eq(h.get_size(), 16 << 20, "a good name works")
"#,
        &[&long],
    );
    // Without a prefix: path-like and hidden names.
    let server = start(&["size=16M", "type=none"]);
    script(
        &server,
        r#"
for name in ("../x", ".hidden", "x" * 200):
    go_error(name)
"#,
    );
}

/// Unmounts, detaches and stops whatever an end-to-end mount set up, in
/// reverse order, whatever happened.
#[derive(Default)]
struct MountGuard {
    mounted: Option<PathBuf>,
    loop_dev: Option<String>,
    nbdfuse: Option<Nbdfuse>,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(l) = self.loop_dev.take() {
            let _ = Command::new("losetup").args(["-d", &l]).status();
            // Detaching is asynchronous: the loop device holds nbdfuse's
            // file until it is really gone, and nbdfuse's mount with it.
            let attached = format!(
                "/sys/block/{}/loop/backing_file",
                l.trim_start_matches("/dev/")
            );
            let _ = crate::util::poll(Duration::from_secs(5), || {
                !std::path::Path::new(&attached).exists()
            });
        }
        drop(self.nbdfuse.take());
    }
}

/// Exposes build `name` as a file with nbdfuse, attaches it to a loop
/// device and mounts it under `dir`.
fn fuse_mount(server: &Server, name: &str, dir: &Path) -> (MountGuard, PathBuf) {
    let mut guard = MountGuard::default();
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fuse = guard
        .nbdfuse
        .insert(Nbdfuse::start(&server.uri_for(name), dir));
    let out = run(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&fuse.disk));
    guard.loop_dev = Some(stdout(&out).trim().to_owned());
    run(Command::new("mount")
        .arg(guard.loop_dev.as_ref().unwrap())
        .arg(&mnt));
    guard.mounted = Some(mnt.clone());
    (guard, mnt)
}

/// Why the end-to-end mount test cannot run here, if it cannot.
fn mount_unavailable() -> Option<String> {
    if let Some(why) = fuse_unavailable() {
        return Some(why.into());
    }
    if run_status(Command::new("losetup").arg("-f")).0 != 0 {
        return Some("no free loop device (losetup -f failed)".into());
    }
    None
}

/// The real thing: two builds' disks mounted at once through nbdfuse and
/// loop devices, files written and read back, then everything taken down.
#[test]
fn two_builds_mounted_at_once_through_nbdfuse_and_loop() {
    if let Some(why) = mount_unavailable() {
        eprintln!("SKIPPED two_builds_mounted_at_once_through_nbdfuse_and_loop: {why}");
        return;
    }
    require("nbdfuse");
    let server = start(&["size=256M"]);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (guard_a, mnt_a) = fuse_mount(&server, "build-a", da.path());
    let (guard_b, mnt_b) = fuse_mount(&server, "build-b", db.path());
    let payload = crate::util::random_bytes(3 << 20, 42);
    std::fs::write(mnt_a.join("a.bin"), &payload).unwrap();
    std::fs::create_dir(mnt_b.join("rpmbuild")).unwrap();
    std::fs::write(mnt_b.join("rpmbuild/b.txt"), "build b").unwrap();
    run(&mut Command::new("sync"));
    assert_eq!(std::fs::read(mnt_a.join("a.bin")).unwrap(), payload);
    assert_eq!(
        std::fs::read_to_string(mnt_b.join("rpmbuild/b.txt")).unwrap(),
        "build b"
    );
    assert!(!mnt_a.join("rpmbuild").exists(), "builds share nothing");
    assert!(!mnt_b.join("a.bin").exists(), "builds share nothing");
    drop(guard_a);
    drop(guard_b);
    eventually(
        "both disks to be destroyed",
        Duration::from_secs(10),
        || listed(&server).is_empty(),
    );
}

/// With `pool=1` a new build gets a disk formatted in advance: its GO does
/// not wait for the (deliberately slow) format command, and the pool is
/// refilled in the background.
#[test]
fn pool_hands_out_disks_formatted_in_advance() {
    let (_dir, counter, counter_kv) = command_file("counter", "count");
    let server = start(&[
        "size=64M",
        "pool=1",
        "command=sleep 1; mkfs -t ext4 -q -F $disk; echo x >> $counter",
        &counter_kv,
    ]);
    let formats = || std::fs::read_to_string(&counter).map_or(0, |s| s.lines().count());
    eventually("the pool to fill", Duration::from_secs(10), || {
        formats() == 1
    });
    let out = script(
        &server,
        r#"
import time
t = time.monotonic()
h = connect(uri("pooled"))
print(time.monotonic() - t)
eq(h.pread(2, 1080), EXT4_MAGIC, "formatted")
"#,
    );
    let seconds: f64 = out.trim().parse().unwrap();
    assert!(seconds < 0.5, "GO took {seconds} s: the format command ran");
    eventually("the pool to refill", Duration::from_secs(10), || {
        formats() == 2
    });
}

/// `--disk-limit` caps what dir-backed disks allocate together: a write
/// past it fails with ENOSPC, and space comes back with TRIM.
#[test]
fn disk_limit_gives_enospc_with_dir_backing() {
    let (_backing, dir_kv) = backing_dir();
    let server = Server::start(&[
        "--disk-limit",
        "8M",
        "tmpdisk",
        "size=64M",
        "type=none",
        &dir_kv,
    ]);
    script(
        &server,
        r#"
a, b = connect(uri("a")), connect(uri("b"))
a.pwrite(b"\1" * (5 << 20), 0)
fails("ENOSPC", b.pwrite, b"\2" * (4 << 20), 0)
b.pwrite(b"\2" * (2 << 20), 0)
a.trim(5 << 20, 0)
b.pwrite(b"\3" * (4 << 20), 8 << 20)
eq(b.pread(4, 8 << 20), b"\3" * 4, "space from the trim")
"#,
    );
}

/// `backing=memory,spill=dir:`: past `--memory-limit` writes go on into an
/// unnamed file instead of failing, read back intact, and nothing named
/// appears in the spill directory. A new build made while the budget is
/// full is still formatted (its metadata spills).
#[test]
fn memory_spills_past_the_budget_into_an_unnamed_file() {
    let dir = tempfile::tempdir().unwrap();
    let kv = format!("backing=memory,spill=dir:{}", dir.path().display());
    let server = Server::start(&["--memory-limit", "4M", "tmpdisk", "size=64M", &kv]);
    script(
        &server,
        r#"
import os
MIB = 1 << 20
data = os.urandom(16 * MIB)
h = connect(uri("build-a"))
for off in range(0, len(data), MIB):
    h.pwrite(data[off:off + MIB], off)
for off in range(0, len(data), MIB):
    assert h.pread(MIB, off) == data[off:off + MIB], f"MiB at {off} differs"
b = connect(uri("build-b"))
eq(b.pread(2, 1080), EXT4_MAGIC, "a build made with the budget full is formatted")
h.trim(16 * MIB, 0)
h.pwrite(b"\1" * MIB, 32 * MIB)
eq(h.pread(4, 32 * MIB), b"\1" * 4, "writable after a trim")
"#,
    );
    assert!(
        entries(dir.path()).is_empty(),
        "named files in the spill dir"
    );
}

/// `quota=`: a disk past its quota gets ENOSPC, while another disk of the
/// same server (and the same owner) still takes writes; trimming gives the
/// quota back.
#[test]
fn a_disk_past_its_quota_gets_enospc_and_others_carry_on() {
    use crate::wire::{negotiating, Conn, Mode, CMD_TRIM};
    const ENOSPC: u32 = 28;
    let server = Server::start(&["tmpdisk", "size=64M", "type=none", "quota=1M"]);
    let open = |name: &str| Conn::go(negotiating(&server), Mode::Simple, name);
    let (mut a, mut b) = (open("build-a"), open("build-b"));
    let block = vec![7u8; 256 << 10];
    let mut errors = Vec::new();
    for i in 0..8u64 {
        a.send_write(i, i * (256 << 10), &block);
        errors.push(a.read_simple().0);
    }
    assert_eq!(&errors[..4], [0, 0, 0, 0], "within the quota");
    assert_eq!(errors[5..], [ENOSPC, ENOSPC, ENOSPC], "past the quota");
    b.send_write(1, 0, &block);
    assert_eq!(b.read_simple(), (0, 1), "another disk is not held back");
    a.request(0, CMD_TRIM, 9, 0, 1 << 20);
    assert_eq!(a.read_simple(), (0, 9));
    a.send_write(10, 4 << 20, &block);
    assert_eq!(a.read_simple(), (0, 10), "the trim gave the quota back");
}

/// Export classes from the config file: `big-*` disks are bigger, `raw-*`
/// ones are left blank, and every other name gets `[tmpdisk]` (64M,
/// ext4); INFO reports each class's size before any disk exists.
#[test]
fn export_classes_pick_size_and_type_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("scratchd.toml");
    std::fs::write(
        &config,
        r#"
backend = "tmpdisk"

[tmpdisk]
size = "64M"

[[class]]
match = "big-*"
size = "256M"

[[class]]
match = "raw-*"
type = "none"
"#,
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    script(
        &server,
        r#"
big, raw, other = connect(uri("big-1")), connect(uri("raw-1")), connect(uri("other"))
eq(big.get_size(), 256 << 20, "big-* size")
eq(big.pread(2, 1080), EXT4_MAGIC, "big-* is ext4, from [tmpdisk]")
eq(raw.get_size(), 64 << 20, "raw-* size, from [tmpdisk]")
eq(raw.pread(4096, 0), bytes(4096), "raw-* is blank")
eq(raw.pread(2, 1080), b"\0\0", "raw-* has no ext4 superblock")
eq(other.get_size(), 64 << 20, "default size")
eq(other.pread(2, 1080), EXT4_MAGIC, "default is ext4")
"#,
    );
    require("nbdinfo");
    let size = |name: &str| {
        let out = run(Command::new("nbdinfo")
            .arg("--size")
            .arg(server.uri_for(name)));
        stdout(&out).trim().to_owned()
    };
    assert_eq!(size("big-2"), (256u64 << 20).to_string());
    assert_eq!(size("small-2"), (64u64 << 20).to_string());
}

/// `pool = N` in a `[[class]]`: each class keeps its own pool of disks of
/// its own size, formatted in advance; both pools fill (their disks
/// charged to the memory budget like any other), and a new name of each
/// class gets one of its pool's disks at once, while a name of the
/// default class, which has no pool, waits for the (deliberately slow)
/// format command.
#[test]
fn each_export_class_keeps_its_own_pool() {
    require("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("ctl.sock");
    let config = dir.path().join("scratchd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
backend = "tmpdisk"
control = "{}"

[tmpdisk]
size = "8M"
linger = "60s"
command = "sleep 1; head -c 4096 /dev/urandom | dd of=$disk conv=notrunc status=none"

[[class]]
match = "big-*"
size = "32M"
pool = 2

[[class]]
match = "small-*"
size = "16M"
pool = 1
"#,
            control.display()
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let pools = || {
        let s = ctl_json(&control, &["status"]);
        let pools: Vec<String> = (0..s.len("pools"))
            .map(|i| {
                let p = |k: &str| s.get(&format!("pools.{i}.{k}")).to_owned();
                format!("{} {}/{}", p("class"), p("ready"), p("target"))
            })
            .collect();
        (pools, s.int("pool_ready"), s.int("memory.used"))
    };
    let full = vec![
        "default 0/0".to_owned(),
        "big-* 2/2".to_owned(),
        "small-* 1/1".to_owned(),
    ];
    eventually("both pools to fill", Duration::from_secs(15), || {
        pools().0 == full
    });
    let (_, ready, used) = pools();
    assert_eq!(ready, 3);
    assert_eq!(used, 3 * 4096, "pooled disks are charged to the budget");
    let text = crate::ctl::ctl(&control, &["status"]);
    assert!(
        text.contains("pool ready:   3 (big-* 2 of 2, small-* 1 of 1)"),
        "{text}"
    );

    // Size and time of a first connection to a new name.
    let first_connect = |name: &str| {
        let start = Instant::now();
        let out = run(Command::new("nbdinfo")
            .arg("--size")
            .arg(server.uri_for(name)));
        (stdout(&out).trim().parse::<u64>().unwrap(), start.elapsed())
    };
    let (size, took) = first_connect("big-1");
    assert_eq!(size, 32 << 20);
    assert!(
        took < Duration::from_millis(900),
        "big-1 waited {took:?}: not from the pool"
    );
    let (size, took) = first_connect("small-1");
    assert_eq!(size, 16 << 20);
    assert!(
        took < Duration::from_millis(900),
        "small-1 waited {took:?}: not from the pool"
    );
    let (size, took) = first_connect("other-1");
    assert_eq!(size, 8 << 20);
    assert!(
        took >= Duration::from_secs(1),
        "the default class has no pool"
    );
    let show = ctl_json(&control, &["show", "big-1"]);
    assert_eq!(show.get("exports.0.class"), "big-*");
    assert_eq!(
        show.int("exports.0.allocated_bytes"),
        4096,
        "formatted in advance"
    );
    eventually("the pools to refill", Duration::from_secs(15), || {
        pools().0 == full
    });
    // Three pooled disks, and three named ones (lingering).
    assert_eq!(pools().2, 6 * 4096);
}
