//! The builder side's tests, written once over a front end: the harness
//! that `run`, `attach` and `kernel_guest` share, and [`front_tests!`],
//! which instantiates each test once per front end:
//! - `MODULE::fuse::NAME` on the host, in a plain `cargo test` (skipped,
//!   saying so, where FUSE mounts cannot be made);
//! - `MODULE::kernel::NAME`, `#[ignore]`d on the host (which has no nbd
//!   module): [`crate::kernel_vm`] runs it inside its guests, with
//!   `--ignored`, beside the kernel-only `kernel_guest::` tests.
//!
//! So a behaviour of `run`, `attach` or `detach` is checked on both front
//! ends from one body, and the two cannot drift. Where the front ends
//! differ for a good reason, the body says so in a `match` on [`Front`],
//! with why.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::{run, run_status, stdout, Json, SCRATCHD};

/// A front end, as `--attach` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// A FUSE file served by a process of ours, a loop device on it.
    Fuse,
    /// The kernel's nbd driver, `/dev/nbdN`, with no process of ours.
    Kernel,
}

impl Front {
    /// Its `--attach` value.
    pub fn name(self) -> &'static str {
        match self {
            Front::Fuse => "fuse",
            Front::Kernel => "kernel",
        }
    }

    /// `--attach NAME`.
    pub fn args(self) -> [&'static str; 2] {
        ["--attach", self.name()]
    }

    /// What its block devices are called.
    pub fn device_prefix(self) -> &'static str {
        match self {
            Front::Fuse => "/dev/loop",
            Front::Kernel => "/dev/nbd",
        }
    }

    /// Runs the shared test `name` on this front end, if this machine has
    /// it: FUSE tests skip (saying so) without FUSE; kernel tests fail
    /// outside the guest, which is the only place they are meant to run.
    pub fn run_test(self, name: &str, test: fn(Front)) {
        match self {
            Front::Fuse if crate::util::skip_without_fuse(name) => {}
            Front::Fuse => test(self),
            Front::Kernel => {
                require_nbd();
                test(self)
            }
        }
    }
}

/// Each `fn NAME(front) { BODY }` becomes a function of a [`Front`] and a
/// test per front end: `fuse::NAME` and `kernel::NAME` (see the module
/// docs).
macro_rules! front_tests {
    ($( $(#[$meta:meta])* fn $name:ident($front:ident) $body:block )*) => {
        $( $(#[$meta])* fn $name($front: $crate::front::Front) $body )*

        /// The shared tests on the FUSE front, on the host.
        mod fuse {
            $(
                #[test]
                fn $name() {
                    $crate::front::Front::Fuse.run_test(stringify!($name), super::$name);
                }
            )*
        }

        /// The shared tests on the kernel front, in the guests `kernel_vm`
        /// boots.
        mod kernel {
            $(
                #[test]
                #[ignore = "runs in a guest kernel with nbd.ko: kernel_vm boots it"]
                fn $name() {
                    $crate::front::Front::Kernel.run_test(stringify!($name), super::$name);
                }
            )*
        }
    };
}
pub(crate) use front_tests;

/// Panics unless the nbd module is loaded: kernel tests are for the guest.
pub fn require_nbd() {
    assert!(
        Path::new("/sys/module/nbd").exists(),
        "no nbd module here: these tests run inside the guest that kernel_vm boots"
    );
}

/// A state directory and mount points of one test, attaching with one
/// front end (or `auto`); whatever is still attached is detached on drop
/// (a failing test leaves no mounts).
pub struct Attachments {
    /// `None`: no `--attach`, so `auto` chooses.
    pub front: Option<Front>,
    pub state: tempfile::TempDir,
    dirs: tempfile::TempDir,
    /// The sysfs labels of the kernel attachments made here, to find
    /// their devices after their records are gone.
    labels: RefCell<Vec<String>>,
    /// Whether `dirs` is a shared tmpfs of ours, unmounted on drop.
    shared: bool,
}

impl Attachments {
    /// In the guest, on a shared mount ([`Attachments::on_shared_mount`]):
    /// its root is private, and the `scratchd run`s of the tests beside
    /// each test would otherwise keep copies of its mounts, and so its nbd
    /// devices connected, after its detach.
    pub fn new(front: Front) -> Attachments {
        match crate::util::in_guest() {
            true => Attachments::on_shared_mount(front),
            false => Attachments::with(Some(front)),
        }
    }

    /// Attachments whose front end `--attach auto` chooses.
    pub fn auto() -> Attachments {
        Attachments::with(None)
    }

    fn with(front: Option<Front>) -> Attachments {
        Attachments {
            front,
            state: crate::util::state_dir(),
            dirs: tempfile::tempdir().unwrap(),
            labels: RefCell::new(Vec::new()),
            shared: false,
        }
    }

    /// Attachments whose mount points are on a shared mount, as every
    /// mount is on a systemd host: the mount namespace of a `scratchd run`
    /// that starts meanwhile (another test's) is a slave of it, and
    /// follows an unmount here. (On a private mount, such a run would keep
    /// its copy of an attachment's file system, and its device, for as
    /// long as it lasts.)
    pub fn on_shared_mount(front: Front) -> Attachments {
        let mut a = Attachments::with(Some(front));
        let dirs = a.dirs.path().display();
        let (code, out) = sh(&format!(
            "mount -t tmpfs none {dirs} && mount --make-shared {dirs}"
        ));
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        a.shared = true;
        a
    }

    /// A fresh empty directory to mount on (canonical, as records hold it).
    pub fn mount_point(&self, name: &str) -> PathBuf {
        let dir = self.dirs.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    /// `scratchd ARGS` with this test's state directory.
    pub fn scratchd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SCRATCHD);
        c.args(args).env("SCRATCHD_STATE_DIR", self.state.path());
        c
    }

    /// `attach --mount MOUNT [--attach FRONT] MORE... URI`.
    pub fn attach_command(&self, mount: &Path, uri: &str, more: &[&str]) -> Command {
        let mut args = vec!["attach", "--mount", mount.to_str().unwrap()];
        if let Some(front) = self.front {
            args.extend(front.args());
        }
        args.extend_from_slice(more);
        args.push(uri);
        self.scratchd(&args)
    }

    pub fn attach(&self, mount: &Path, uri: &str, more: &[&str]) -> (i32, Output) {
        run_status(&mut self.attach_command(mount, uri, more))
    }

    /// Attaches, asserting success; returns the block device.
    pub fn attach_ok(&self, mount: &Path, uri: &str, more: &[&str]) -> String {
        self.attached_ok(self.attach(mount, uri, more))
    }

    /// Asserts that an attach succeeded; returns the block device, and
    /// notes a kernel attachment's label.
    pub fn attached_ok(&self, (code, out): (i32, Output)) -> String {
        assert_eq!(code, 0, "attach: {}", String::from_utf8_lossy(&out.stderr));
        let device = stdout(&out).trim().to_owned();
        if let Some(front) = self.front {
            assert!(device.starts_with(front.device_prefix()), "{device}");
        }
        let record = self.record_of(&device);
        if record.get("kind") == "kernel" {
            self.labels
                .borrow_mut()
                .push(record.get("backend").to_owned());
        }
        device
    }

    pub fn detach(&self, what: &str) -> (i32, Output) {
        run_status(&mut self.scratchd(&["detach", what]))
    }

    pub fn detach_ok(&self, what: &str) {
        let (code, out) = self.detach(what);
        assert_eq!(code, 0, "detach: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `detach --stale`, asserting success.
    pub fn detach_stale(&self) {
        let (code, out) = run_status(&mut self.scratchd(&["detach", "--stale"]));
        assert_eq!(
            code,
            0,
            "detach --stale: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The records in the state directory.
    fn records(&self) -> Vec<Json> {
        self.state_files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| Json::parse(&std::fs::read_to_string(p).unwrap()))
            .collect()
    }

    /// The only record in the state directory.
    pub fn record(&self) -> Json {
        let mut records = self.records();
        assert_eq!(records.len(), 1, "{:?}", self.state_files());
        records.pop().unwrap()
    }

    /// The record of the attachment on `device`.
    fn record_of(&self, device: &str) -> Json {
        self.records()
            .into_iter()
            .find(|r| r.get("device") == device)
            .unwrap_or_else(|| panic!("no record of {device}: {:?}", self.state_files()))
    }

    /// The pid of the only attachment's holder; `None` for a kernel one,
    /// which has none once attached.
    pub fn holder(&self) -> Option<u32> {
        let record = self.record();
        match record.get("kind") {
            "kernel" => {
                assert_eq!(record.get("holder"), "null", "a kernel attachment's holder");
                None
            }
            _ => Some(record.int("holder.pid") as u32),
        }
    }

    /// Files in the state directory but its lock.
    pub fn state_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "lock")
            .collect()
    }

    /// What an attachment can leave behind: a mount at `mount`, mounts and
    /// loop devices on files in the state directory, connected nbd devices
    /// of the kernel attachments made here, state files, a holder still
    /// running.
    pub fn leftovers(&self, mount: &Path, holder: Option<u32>) -> Vec<String> {
        let state = self.state.path().to_str().unwrap();
        let mut found = Vec::new();
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for line in table.lines() {
            let point = line.split(' ').nth(4).unwrap();
            if Path::new(point) == mount || point.starts_with(state) {
                found.push(format!("mount: {line}"));
            }
        }
        let loops = run(Command::new("losetup").args(["-l", "-n", "-O", "NAME,BACK-FILE"]));
        for line in stdout(&loops).lines().filter(|l| l.contains(state)) {
            found.push(format!("loop device: {line}"));
        }
        for label in self.labels.borrow().iter() {
            for device in devices_labelled(label) {
                found.push(format!("nbd device: {device} ({label})"));
            }
        }
        for file in self.state_files() {
            found.push(format!("state: {}", file.display()));
        }
        if let Some(pid) = holder.filter(|&pid| running(pid)) {
            found.push(format!("holder {pid} still runs"));
        }
        found
    }

    /// Waits for [`Attachments::leftovers`] to go: 10 s, or 30 s under
    /// emulation in the guest (where a disconnected device's sysfs label
    /// was seen to outlast 10 s at a host load of 13).
    pub fn assert_nothing_left(&self, mount: &Path, holder: Option<u32>) {
        let within = Duration::from_secs(if crate::util::in_guest() { 30 } else { 10 });
        let gone = crate::util::poll(within, || self.leftovers(mount, holder).is_empty());
        assert!(
            gone.is_some(),
            "after {within:?}, still there: {:?}",
            self.leftovers(mount, holder)
        );
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        let _ = self.scratchd(&["detach", "--all"]).output();
        let _ = self.scratchd(&["detach", "--stale"]).output();
        if self.shared {
            let _ = Command::new("umount")
                .args(["-l"])
                .arg(self.dirs.path())
                .status();
        }
    }
}

/// Whether process `pid` runs (a zombie does not count).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, s)| !s.starts_with('Z'))
    })
}

/// The source of the mount at `dir`, as findmnt sees it.
pub fn mounted_device(dir: &Path) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "--mountpoint"])
        .arg(dir)
        .output()
        .unwrap();
    stdout(&out).trim().to_owned()
}

/// Writes to the file system at `mount` that reach the disk (direct I/O,
/// and a sync) fail, soon: no hang (124 is timeout's status). FUSE fails
/// them at once; the kernel front end holds each for its 5 s
/// dead-connection timeout first (under emulation, in the guest).
pub fn assert_writes_fail(mount: &Path, front: Front) {
    let within = match front {
        Front::Fuse => Duration::from_secs(10),
        Front::Kernel => Duration::from_secs(30),
    };
    let m = mount.display();
    let started = Instant::now();
    for write in [
        format!("dd if=/dev/zero of={m}/g bs=1M count=4 oflag=direct status=none"),
        format!("echo x > {m}/h && sync -f {m}"),
    ] {
        let (code, _) = sh(&format!("timeout 20 sh -c '{write}'"));
        assert!(code != 0 && code != 124, "{write}: exit status {code}");
    }
    assert!(
        started.elapsed() < within,
        "I/O hung: {:?}",
        started.elapsed()
    );
}

/// How long an unmount from outside may take to release an attachment:
/// a second, or five under emulation in the guest.
pub fn release_limit() -> Duration {
    match crate::util::in_guest() {
        false => Duration::from_secs(1),
        true => Duration::from_secs(5),
    }
}

/// `sh -c SCRIPT`: its exit status and output.
pub fn sh(script: &str) -> (i32, Output) {
    run_status(Command::new("sh").args(["-c", script]))
}

/// The `/dev/nbdN` that exist (names without `/dev/`), sorted by N.
pub fn nbd_devices() -> Vec<String> {
    let mut found: Vec<(u32, String)> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some((name.strip_prefix("nbd")?.parse().ok()?, name)))
        .collect();
    found.sort();
    found.into_iter().map(|(_, name)| name).collect()
}

/// The connected nbd devices whose sysfs `backend` starts with `prefix`.
pub fn devices_labelled(prefix: &str) -> Vec<String> {
    nbd_devices()
        .into_iter()
        .filter(|name| {
            std::fs::read_to_string(format!("/sys/block/{name}/backend"))
                .is_ok_and(|b| b.starts_with(prefix))
        })
        .map(|name| format!("/dev/{name}"))
        .collect()
}
