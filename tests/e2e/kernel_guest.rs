//! The kernel front (`--attach kernel`, the kernel's nbd driver over
//! netlink) against a real kernel, in what only it has: sysfs, the nbd
//! devices' lifetime, a stalled or vanished server, kills between the
//! connect and the mount, `auto`'s choice. What `run`, `attach` and
//! `detach` do on both front ends is in the shared tests of `run.rs` and
//! `attach.rs` ([`crate::front`]), whose `kernel::` instances run beside
//! these. These tests run inside a guest that [`crate::kernel_vm`] boots
//! (Debian 12's 6.1 and 6.12 kernels, `nbd.ko` loaded), never on the host,
//! which has no nbd module. They are `#[ignore]`d so that a plain `cargo
//! test` passes them by; the guest runs them with `--ignored`.
//!
//! Each test has a state directory of its own, so they run in parallel
//! (the two long ones, a server stall and a vanished server, mostly wait).
//! The `without_nbd` tests are for a second boot, with nbd not loaded.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::front::{devices_labelled, nbd_devices, require_nbd, sh, Attachments, Front};
use crate::util::{as_user, eventually, poll, run, run_status, stdout, Server, NOBODY, SCRATCHD};

/// Attachments on the kernel front; panics unless nbd is loaded.
fn kernel_attachments() -> Attachments {
    require_nbd();
    Attachments::new(Front::Kernel)
}

/// `scratchd run --attach kernel --server URI -- sh -c SCRIPT`.
fn run_on_kernel(uri: &str, script: &str) -> (i32, Output) {
    require_nbd();
    run_status(Command::new(SCRATCHD).args([
        "run", "--attach", "kernel", "--server", uri, "--", "sh", "-c", script,
    ]))
}

/// `/sys/block/NAME/FILE` of a device `/dev/NAME`, trimmed.
fn sysfs(device: &str, file: &str) -> String {
    let name = device.strip_prefix("/dev/").expect(device);
    let path = format!("/sys/block/{name}/{file}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_owned()
}

/// The kernel log's lines, each with its time stamp (seconds since boot).
fn kernel_log() -> Vec<(f64, String)> {
    let log = run(&mut Command::new("dmesg"));
    stdout(&log)
        .lines()
        .map(|l| {
            let stamp = l
                .strip_prefix('[')
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(t, _)| t.trim().parse().ok())
                .unwrap_or(0.0);
            (stamp, l.to_owned())
        })
        .collect()
}

/// Where the kernel log ends now: a test reads only what comes after, as
/// an earlier test's device of the same name may have logged before.
fn kernel_log_mark() -> f64 {
    kernel_log().last().map_or(0.0, |(stamp, _)| *stamp)
}

/// The kernel log lines about block device `/dev/NAME` (`block NAME: ...`)
/// after `since` (a [`kernel_log_mark`]).
fn kernel_log_of(device: &str, since: f64) -> Vec<String> {
    let name = device.strip_prefix("/dev/").expect(device);
    kernel_log()
        .into_iter()
        .filter(|(stamp, l)| *stamp > since && l.contains(&format!("block {name}:")))
        .map(|(_, l)| l)
        .collect()
}

/// Writes 4 MiB with direct I/O and reads it back: fails the test unless
/// both reach the disk and agree.
fn write_and_check(mount: &Path, file: &str) {
    let f = mount.join(file);
    let f = f.display();
    let (code, out) = sh(&format!(
        "set -e; head -c 4194304 /dev/urandom > {f}.src
         dd if={f}.src of={f} bs=1M oflag=direct status=none
         sync -f {f}
         dd if={f} bs=1M iflag=direct status=none | cmp - {f}.src
         rm {f}.src"
    ));
    assert_eq!(
        code,
        0,
        "write and read back {f}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// After the connect, the device's sysfs shows the attachment's backend
/// identifier, a connecting pid, the export's size, the file system's
/// 4 KiB sectors, discard (the server trims), and read-write.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn sysfs_describes_the_connected_device() {
    let server = Server::start(&["tmpdisk", "size=256M"]);
    let a = kernel_attachments();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("sysfs"), &[]);
    let record = a.record();
    assert_eq!(record.get("kind"), "kernel");
    assert_eq!(record.get("device"), device);
    let report = |file: &str| format!("{file} = {}", sysfs(&device, file));
    eprintln!(
        "{device}: {}, {}, {}, {}, {}, {}",
        report("backend"),
        report("pid"),
        report("size"),
        report("queue/logical_block_size"),
        report("queue/discard_max_bytes"),
        report("ro")
    );
    assert_eq!(sysfs(&device, "backend"), record.get("backend"));
    let pid: u32 = sysfs(&device, "pid").parse().expect("a pid");
    assert!(pid > 0);
    assert_eq!(
        sysfs(&device, "size").parse::<u64>().unwrap() * 512,
        256 << 20,
        "size (512-byte sectors)"
    );
    assert_eq!(sysfs(&device, "queue/logical_block_size"), "4096");
    assert_ne!(sysfs(&device, "queue/discard_max_bytes"), "0");
    assert_eq!(sysfs(&device, "ro"), "0");
    assert_eq!(
        sysfs(&device, "queue/io_timeout"),
        "120000",
        "the default request timeout, in ms"
    );
    write_and_check(&mnt, "data");
    a.detach_ok(&device);
}

/// `--timeout` sets the kernel's request timeout (the block layer's
/// `queue/io_timeout`, in milliseconds), for `run` and for `attach`.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn the_request_timeout_is_the_timeout_given() {
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let (code, out) = run_status(Command::new(SCRATCHD).args([
        "run",
        "--attach",
        "kernel",
        "--timeout",
        "7",
        "--server",
        &server.uri(),
        "--",
        "sh",
        "-c",
        "cat /sys/block/${SCRATCHD_DEVICE#/dev/}/queue/io_timeout",
    ]));
    assert_eq!(
        (code, stdout(&out).trim()),
        (0, "7000"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = kernel_attachments();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("timeout"), &["--timeout", "3m"]);
    assert_eq!(sysfs(&device, "queue/io_timeout"), "180000");
    a.detach_ok(&device);
    let device = a.attach_ok(&mnt, &server.uri_for("timeout"), &["--timeout", "45s"]);
    assert_eq!(sysfs(&device, "queue/io_timeout"), "45000");
    a.detach_ok(&device);
}

/// `--attach auto` (the default) takes the kernel's driver for a disk on a
/// server when nbd is loaded.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn auto_takes_the_kernel_when_nbd_is_loaded() {
    let server = Server::start(&["tmpdisk", "size=64M"]);
    require_nbd();
    let a = Attachments::auto();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("auto"), &[]);
    assert!(device.starts_with("/dev/nbd"), "{device}");
    assert_eq!(a.record().get("kind"), "kernel");
    a.detach_ok(mnt.to_str().unwrap());
}

/// Runs in a row leave the host's `/dev/nbd0..15` as they were: a device
/// made at module load is not the run's to delete. (Each run deleted one
/// before the fix, so five show it as well as the twenty did, in
/// a quarter of the guests' time.)
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn runs_leave_the_nbd_devices_as_they_were() {
    require_nbd();
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let before = nbd_devices();
    assert!(
        before.len() >= 16,
        "nbd made 16 devices at load: {before:?}"
    );
    for round in 0..5 {
        let (code, out) = run_on_kernel(&server.uri(), "echo x > \"$SCRATCHD_MOUNT/x\"");
        assert_eq!(
            code,
            0,
            "run {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(nbd_devices(), before, "the devices after five runs");
}

/// `attach --attach kernel` as a user other than root: the kernel refuses
/// the connect (EPERM), the message says what is needed, and no record
/// is left.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn attach_as_non_root_is_refused() {
    require_nbd();
    let server = Server::start(&["tmpdisk", "size=64M"]);
    server.open_to_everyone();
    let dir = tempfile::tempdir().unwrap();
    let (mnt, state) = (dir.path().join("mnt"), dir.path().join("state"));
    std::fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "chmod 777 {} {}",
        dir.path().display(),
        mnt.display()
    ));
    let argv = as_user(
        Some(NOBODY),
        &[
            "env",
            &format!("SCRATCHD_STATE_DIR={}", state.display()),
            SCRATCHD,
            "attach",
            "--attach",
            "kernel",
            "--mount",
            mnt.to_str().unwrap(),
            &server.uri_for("nobody"),
        ],
    );
    let (code, out) = run_status(Command::new(&argv[0]).args(&argv[1..]).current_dir("/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("needs root or CAP_SYS_ADMIN"), "{err}");
    let records = std::fs::read_dir(&state)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(records, 0, "a refused attach leaves no record");
}

/// Four connections, and the server stopped (SIGSTOP) for 45 s, longer
/// than the kernel's default 30 s request timeout, with requests in
/// flight; resumed, they all complete without an error, and the kernel
/// dropped none of the four connections.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn a_stalled_server_loses_no_connection() {
    let server = Server::start(&["tmpdisk", "size=512M"]);
    let a = kernel_attachments();
    let since = kernel_log_mark();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("stall"), &["--connections", "4"]);
    write_and_check(&mnt, "before");
    // Stopped first, and small requests (direct reads of 64 KiB): each is
    // sent whole and waits for its reply through the stall. (A large write
    // can instead block in the send, where the kernel's timeout handler
    // leaves it alone.)
    server.signal("STOP");
    let readers: Vec<Child> = (0..4)
        .map(|i| start_reader(&mnt.join("before"), i))
        .collect();
    std::thread::sleep(Duration::from_secs(45));
    server.signal("CONT");
    let outs: Vec<Output> = readers
        .into_iter()
        .map(|r| r.wait_with_output().unwrap())
        .collect();
    let log = kernel_log_of(&device, since);
    for out in &outs {
        assert!(
            out.status.success(),
            "a reader failed after the stall: {}\nkernel log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            log.join("\n")
        );
    }
    write_and_check(&mnt, "after");
    let dropped: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("timed out") || l.contains("dead"))
        .collect();
    assert!(
        dropped.is_empty(),
        "the kernel dropped connections during the stall:\n{}",
        log.join("\n")
    );
    a.detach_ok(mnt.to_str().unwrap());
}

/// A reader of `file` with direct I/O (so its requests reach the server),
/// 64 KiB at a time from a different offset for each `n`.
fn start_reader(file: &Path, n: u32) -> Child {
    Command::new("dd")
        .args([
            "of=/dev/null",
            "bs=64k",
            "count=8",
            "iflag=direct",
            "status=none",
        ])
        .arg(format!("skip={}", n * 8))
        .arg(format!("if={}", file.display()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dd")
}

/// How long after its server's host vanished the kernel may take to find
/// the connection dead: TCP gives it up 30 s after the last answer
/// (keepalive and `TCP_USER_TIMEOUT`), or 30 s after the first packet sent
/// into the void, with a margin for TCG.
const VANISHED_SERVER_DEAD: Duration = Duration::from_secs(60);

/// How long I/O may then take to fail: the dead-connection timeout (5 s),
/// with a margin.
const DEAD_CONNECTION_IO: Duration = Duration::from_secs(15);

/// The server's host gone (its network namespace's link down, so its
/// packets are dropped, not refused) with one connection: TCP finds the
/// connection dead (the kernel logs it) within [`VANISHED_SERVER_DEAD`],
/// and a read of the device then fails within [`DEAD_CONNECTION_IO`]
/// instead of hanging (without keepalive and `TCP_USER_TIMEOUT` nothing
/// was ever found dead, and I/O hung). The reader goes to the device
/// itself, and the file system is mounted without background inode-table
/// initialization, so that little else is in flight. The link comes back
/// afterwards either way, so that the test cleans up.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn io_fails_soon_when_the_server_vanishes() {
    require_nbd();
    let net = ServerNetwork::new();
    let (_server, uri) = net.start_server();
    let a = kernel_attachments();
    let since = kernel_log_mark();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(
        &mnt,
        &uri,
        &[
            "--connections",
            "1",
            "--mount-options",
            "noatime,noinit_itable",
        ],
    );
    write_and_check(&mnt, "before");
    run(Command::new("sync").arg("-f").arg(&mnt));
    let logged = kernel_log_of(&device, since).len();
    net.link("down");
    let started = Instant::now();
    let found_dead = poll(VANISHED_SERVER_DEAD, || {
        kernel_log_of(&device, since).len() > logged
    });
    let dead_after = started.elapsed();
    let mut reader = Command::new("dd")
        .args([
            "of=/dev/null",
            "bs=64k",
            "count=1",
            "iflag=direct",
            "status=none",
        ])
        .arg(format!("if={device}"))
        .arg("skip=1000")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dd");
    let read_started = Instant::now();
    let ended = poll(DEAD_CONNECTION_IO, || reader.try_wait().unwrap());
    let read_took = read_started.elapsed();
    net.link("up");
    let status = match ended {
        Some(status) => status,
        None => reader.wait().unwrap(),
    };
    let log = kernel_log_of(&device, since).join("\n");
    eprintln!(
        "server vanished: found dead after {dead_after:?}; a read then ended after \
         {read_took:?} ({status}); kernel log:\n{log}"
    );
    assert!(
        found_dead.is_some(),
        "the kernel logged nothing about {device} {dead_after:?} after its server's host \
         vanished:\n{log}"
    );
    assert!(
        ended.is_some(),
        "a read still hung {read_took:?} after the connection was found dead:\n{log}"
    );
    assert!(!status.success(), "the read succeeded with the server gone");
}

/// Waits (polling hard, to land in the window between the connect and
/// the mount) for a device labelled `prefix` while `child` lives; kills
/// `child` with SIGKILL the moment one shows; returns the device.
fn kill_once_connected(child: &mut Child, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(device) = devices_labelled(prefix).pop() {
            child.kill().unwrap();
            child.wait().unwrap();
            return device;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "{prefix}: ended before its device showed"
        );
        assert!(Instant::now() < deadline, "{prefix}: no device after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `scratchd detach --stale` (state directory `state`), asserting success.
fn detach_stale(state: &Path) {
    let (code, out) = run_status(
        Command::new(SCRATCHD)
            .args(["detach", "--stale"])
            .env("SCRATCHD_STATE_DIR", state),
    );
    assert_eq!(
        code,
        0,
        "detach --stale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kill -9` of `scratchd run` the moment its device is connected, before
/// the reconfigure that makes its mount's end disconnect it: `detach
/// --stale` finds the device by the run's label and disconnects it (the
/// device stayed connected for good before).
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn a_run_killed_while_mounting_leaves_no_device_after_detach_stale() {
    require_nbd();
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let state = crate::util::state_dir();
    for round in 0..2 {
        let mut run = Command::new(SCRATCHD)
            .args(["run", "--attach", "kernel", "--server", &server.uri()])
            .args(["--", "sleep", "120"])
            .spawn()
            .expect("start scratchd run");
        let label = format!("scratchd-run:{}:", run.id());
        let device = kill_once_connected(&mut run, &label);
        detach_stale(state.path());
        // By its label: the other guest tests may connect the same index
        // again at once.
        eventually(
            &format!("round {round}: {device} to disconnect"),
            Duration::from_secs(20),
            || devices_labelled(&label).is_empty(),
        );
    }
}

/// `kill -9` of `scratchd attach --attach kernel` (the attachment's only
/// process) the moment its device is connected, before it records the
/// device: `detach --stale` finds the device by the record's label,
/// unmounts it if it got that far, disconnects it and removes the record.
#[test]
#[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
fn an_attach_killed_while_mounting_leaves_no_device_after_detach_stale() {
    require_nbd();
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let a = kernel_attachments();
    for round in 0..2 {
        let mnt = a.mount_point(&format!("mnt{round}"));
        let mut attach = a
            .scratchd(&["attach", "--attach", "kernel", "--mount"])
            .arg(&mnt)
            .arg(server.uri_for(&format!("killed{round}")))
            .spawn()
            .expect("start scratchd attach");
        // Its record, claimed before the connect, names the label.
        let id = poll(Duration::from_secs(30), || {
            std::fs::read_dir(a.state.path())
                .unwrap()
                .flatten()
                .find_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_suffix(".json").map(str::to_owned)
                })
        })
        .expect("attach claimed no record");
        let label = format!("scratchd-attach:{id}");
        let device = kill_once_connected(&mut attach, &label);
        detach_stale(a.state.path());
        // The kernel lets the device go once its last opener (the mount,
        // unmounted lazily) has closed it. By its label: the other guest
        // tests may connect the same index again at once.
        eventually(
            &format!("round {round}: {device} to disconnect"),
            Duration::from_secs(20),
            || devices_labelled(&label).is_empty(),
        );
        let (_, mounts) = sh("cat /proc/self/mountinfo");
        assert!(
            !stdout(&mounts).contains(&format!(" {} ", mnt.display())),
            "round {round}: {} still mounted",
            mnt.display()
        );
        assert!(
            !a.state.path().join(format!("{id}.json")).exists(),
            "round {round}: the record is left"
        );
    }
}

/// A network namespace `srv` for a server, reached from here over a veth
/// pair (addresses from the benchmarking range 198.18.0.0/15, inside the
/// guest only); removed on drop.
struct ServerNetwork;

impl ServerNetwork {
    const NS: &'static str = "scratchd-srv";
    const HOST_ADDR: &'static str = "198.18.0.1";
    const SERVER_ADDR: &'static str = "198.18.0.2";

    fn new() -> ServerNetwork {
        let ns = Self::NS;
        let (code, out) = sh(&format!(
            "set -e
             ip netns add {ns}
             ip link add veth-host type veth peer name veth-srv
             ip link set veth-srv netns {ns}
             ip addr add {}/30 dev veth-host
             ip link set veth-host up
             ip -n {ns} addr add {}/30 dev veth-srv
             ip -n {ns} link set veth-srv up
             ip -n {ns} link set lo up",
            Self::HOST_ADDR,
            Self::SERVER_ADDR
        ));
        let net = ServerNetwork;
        assert_eq!(
            code,
            0,
            "network namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        net
    }

    /// `scratchd serve` inside the namespace on TCP; returns it and the
    /// URI of its export `gone`.
    fn start_server(&self) -> (ChildGuard, String) {
        let port = 10809;
        let child = Command::new("ip")
            .args(["netns", "exec", Self::NS, SCRATCHD, "serve"])
            .args(["-i", Self::SERVER_ADDR, "-p", &port.to_string()])
            .args(["tmpdisk", "size=128M"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start scratchd in the namespace");
        let guard = ChildGuard(child);
        let addr = format!("{}:{port}", Self::SERVER_ADDR);
        eventually("the server to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        (guard, format!("nbd://{addr}/gone"))
    }

    /// Sets the server side's link up or down.
    fn link(&self, state: &str) {
        run(Command::new("ip").args(["-n", Self::NS, "link", "set", "veth-srv", state]));
    }
}

impl Drop for ServerNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", "veth-host"])
            .status();
        let _ = Command::new("ip").args(["netns", "del", Self::NS]).status();
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest's kernel as (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']);
    let mut number = || parts.next().and_then(|p| p.parse().ok()).expect(&release);
    (number(), number())
}

/// `--attach auto` with nbd not loaded: on 6.1 it takes FUSE; from 6.5 on
/// the kernel loads nbd itself when asked for its netlink family (the
/// module's alias), so `auto` takes the kernel's driver.
#[test]
#[ignore = "runs in a guest kernel without nbd loaded: kernel_vm boots it"]
fn without_nbd_auto_takes_fuse_or_loads_the_module() {
    assert!(
        !Path::new("/sys/module/nbd").exists(),
        "nbd is loaded: this test is for the guest kernel_vm boots without it"
    );
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let a = Attachments::auto();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("auto"), &[]);
    let kind = a.record().get("kind").to_owned();
    let version = kernel_version();
    eprintln!("kernel {version:?}: auto without nbd loaded: {kind} on {device}");
    if version < (6, 5) {
        assert_eq!(kind, "fuse", "{device}");
        assert!(!Path::new("/sys/module/nbd").exists(), "nbd was loaded");
    } else {
        assert_eq!(kind, "kernel", "{device}");
        assert!(Path::new("/sys/module/nbd").exists());
    }
    a.detach_ok(mnt.to_str().unwrap());
}
