//! `scratchd attach` and `scratchd detach`: a disk on a server mounted in
//! the host's mount namespace, served by a holder process until detached;
//! nothing left behind after a detach, after `kill -9` of the holder
//! (`detach --stale`, or the next attach's sweep), or after a failed
//! attach.
//!
//! Each test has a state directory of its own (`SCRATCHD_STATE_DIR`), so
//! they run in parallel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::{
    eventually, fuse_unavailable, run, run_status, skip_without_fuse, stdout, Json, Server,
    SCRATCHD,
};

/// A state directory and mount points of one test; whatever is still
/// attached is detached on drop (a failing test leaves no mounts).
struct Attachments {
    state: tempfile::TempDir,
    dirs: tempfile::TempDir,
}

impl Attachments {
    fn new() -> Attachments {
        Attachments {
            state: crate::util::state_dir(),
            dirs: tempfile::tempdir().unwrap(),
        }
    }

    /// A fresh empty directory to mount on (canonical, as records hold it).
    fn mount_point(&self, name: &str) -> PathBuf {
        let dir = self.dirs.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    fn scratchd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SCRATCHD);
        c.args(args).env("SCRATCHD_STATE_DIR", self.state.path());
        c
    }

    fn attach(&self, mount: &Path, uri: &str, more: &[&str]) -> (i32, Output) {
        let mount = mount.to_str().unwrap();
        let mut args = vec!["attach", "--mount", mount];
        args.extend_from_slice(more);
        args.push(uri);
        run_status(&mut self.scratchd(&args))
    }

    /// Attaches, asserting success; returns the block device.
    fn attach_ok(&self, mount: &Path, uri: &str, more: &[&str]) -> String {
        let (code, out) = self.attach(mount, uri, more);
        assert_eq!(code, 0, "attach: {}", String::from_utf8_lossy(&out.stderr));
        let device = stdout(&out).trim().to_owned();
        assert!(device.starts_with("/dev/loop"), "{device}");
        device
    }

    fn detach(&self, what: &str) -> (i32, Output) {
        run_status(&mut self.scratchd(&["detach", what]))
    }

    fn detach_ok(&self, what: &str) {
        let (code, out) = self.detach(what);
        assert_eq!(code, 0, "detach: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The only record in the state directory.
    fn record(&self) -> Json {
        let records: Vec<PathBuf> = self
            .state_files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        assert_eq!(records.len(), 1, "{records:?}");
        Json::parse(&std::fs::read_to_string(&records[0]).unwrap())
    }

    /// The pid of the only attachment's holder.
    fn holder(&self) -> u32 {
        self.record().int("holder.pid") as u32
    }

    /// Files in the state directory but its lock.
    fn state_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap() != "lock")
            .collect()
    }

    /// What an attachment can leave behind: a mount at `mount`, mounts and
    /// loop devices on files in the state directory, state files, a
    /// holder still running.
    fn leftovers(&self, mount: &Path, holder: Option<u32>) -> Vec<String> {
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
        for file in self.state_files() {
            found.push(format!("state: {}", file.display()));
        }
        if let Some(pid) = holder.filter(|&pid| running(pid)) {
            found.push(format!("holder {pid} still runs"));
        }
        found
    }

    fn assert_nothing_left(&self, mount: &Path, holder: Option<u32>) {
        eventually(
            "the attachment's leftovers to go",
            Duration::from_secs(10),
            || self.leftovers(mount, holder).is_empty(),
        );
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        let _ = self.scratchd(&["detach", "--all"]).output();
        let _ = self.scratchd(&["detach", "--stale"]).output();
    }
}

/// Whether process `pid` runs (a zombie does not count).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, s)| !s.starts_with('Z'))
    })
}

/// The source of the mount at `dir`, as findmnt sees it.
fn mounted_device(dir: &Path) -> String {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", "--mountpoint"])
        .arg(dir)
        .output()
        .unwrap();
    stdout(&out).trim().to_owned()
}

/// Writes to the file system at `mount` that reach the disk (direct I/O,
/// and a sync) fail, soon: no hang (24 is timeout's status).
fn assert_writes_fail(mount: &Path) {
    let m = mount.display();
    let started = Instant::now();
    for write in [
        format!("dd if=/dev/zero of={m}/g bs=1M count=4 oflag=direct status=none"),
        format!("echo x > {m}/h && sync -f {m}"),
    ] {
        let (code, _) = sh(&format!("timeout 20 sh -c '{write}'"));
        assert!(code != 0 && code != 124, "{write}: exit status {code}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "I/O hung");
}

fn sh(script: &str) -> (i32, Output) {
    run_status(Command::new("sh").args(["-c", script]))
}

/// Attach, files written by two other processes, detach: nothing left;
/// attached again within the server's linger (by `--name`), the files are
/// there; detached by its device.
#[test]
fn attach_detach_and_reattach_within_linger() {
    if skip_without_fuse("attach_detach_and_reattach_within_linger") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=256M", "linger=30s"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    let device = a.attach_ok(&mnt, &server.uri_for("build-1"), &["--connections", "2"]);
    assert_eq!(
        mounted_device(&mnt),
        device,
        "mounted in the host's namespace"
    );
    let record = a.record();
    assert_eq!(record.get("kind"), "fuse");
    assert_eq!(record.get("mount"), mnt.to_str().unwrap());
    assert_eq!(record.get("device"), device);
    assert_eq!(record.get("export"), "build-1");
    assert_eq!(record.get("uri"), server.uri_for("build-1"));
    let holder = record.int("holder.pid") as u32;
    assert!(running(holder));
    let m = mnt.display();
    for (file, text) in [("a", "one"), ("b", "two")] {
        let (code, out) = sh(&format!("echo {text} > {m}/{file}"));
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    }
    a.detach_ok(mnt.to_str().unwrap());
    a.assert_nothing_left(&mnt, Some(holder));

    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let device = a.attach_ok(&mnt, &uri, &["--name", "build-1"]);
    let (code, out) = sh(&format!("cat {m}/a {m}/b"));
    assert_eq!((code, stdout(&out).as_str()), (0, "one\ntwo\n"));
    let holder = a.holder();
    a.detach_ok(&device);
    a.assert_nothing_left(&mnt, Some(holder));
}

/// `kill -9` of a holder: I/O on the mount fails at once (the kernel
/// aborted the FUSE connection with the holder's last `/dev/fuse`
/// descriptor), nothing hangs; `detach --stale` removes the mount, loop
/// device, FUSE mount and record. A second killed attachment is swept by
/// the next attach at its directory.
#[test]
fn kill_9_of_the_holder_fails_io_and_stale_cleanup_removes_everything() {
    if skip_without_fuse("kill_9_of_the_holder_fails_io_and_stale_cleanup_removes_everything") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=256M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("killed-1"), &[]);
    let holder = a.holder();
    let m = mnt.display();
    assert_eq!(sh(&format!("echo kept > {m}/f && sync -f {m}")).0, 0);
    run(Command::new("kill").args(["-KILL", &holder.to_string()]));
    eventually("the holder to die", Duration::from_secs(5), || {
        !running(holder)
    });
    assert_writes_fail(&mnt);
    assert!(
        !a.leftovers(&mnt, None).is_empty(),
        "the dead attachment is left"
    );

    let (code, out) = run_status(&mut a.scratchd(&["detach", "--stale"]));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    a.assert_nothing_left(&mnt, Some(holder));

    // The next attach at the same place sweeps a killed one first.
    a.attach_ok(&mnt, &server.uri_for("killed-2"), &[]);
    let holder = a.holder();
    run(Command::new("kill").args(["-KILL", &holder.to_string()]));
    eventually("the holder to die", Duration::from_secs(5), || {
        !running(holder)
    });
    a.attach_ok(&mnt, &server.uri_for("killed-3"), &[]);
    let holder = a.holder();
    assert_eq!(a.record().get("export"), "killed-3");
    a.detach_ok(mnt.to_str().unwrap());
    a.assert_nothing_left(&mnt, Some(holder));
}

/// A server that goes away: the disk's I/O fails, the holder stays (and
/// logs why) until detached, and the detach cleans up.
#[test]
fn a_server_that_dies_fails_io_and_detach_still_cleans_up() {
    if skip_without_fuse("a_server_that_dies_fails_io_and_detach_still_cleans_up") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=256M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("orphan"), &[]);
    let record = a.record();
    let holder = record.int("holder.pid") as u32;
    let log = a.state.path().join(format!("{}.log", record.get("id")));
    server.signal("KILL");
    assert_writes_fail(&mnt);
    eventually(
        "the holder to log the broken connection",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains("connection to the server broke"))
        },
    );
    assert!(running(holder), "the holder keeps the attachment");
    a.detach_ok(mnt.to_str().unwrap());
    a.assert_nothing_left(&mnt, Some(holder));
}

/// SIGTERM to the holder itself tears the attachment down as a detach
/// does.
#[test]
fn sigterm_to_the_holder_detaches() {
    if skip_without_fuse("sigterm_to_the_holder_detaches") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("termed"), &[]);
    let holder = a.holder();
    run(Command::new("kill").args(["-TERM", &holder.to_string()]));
    a.assert_nothing_left(&mnt, Some(holder));
}

/// Errors: each says why, with exit status 2 for usage and 1 for
/// failures, and leaves nothing behind.
#[test]
fn attach_and_detach_errors_are_clear_and_leave_nothing() {
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    let m = mnt.to_str().unwrap();
    let server = Server::start(&["--name-prefix", "koji-", "tmpdisk", "size=64M"]);
    let expect = |(code, out): (i32, Output), want_code: i32, want: &str| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(code, want_code, "{err}");
        assert!(err.contains(want), "wanted {want:?} in: {err}");
        assert_eq!(stdout(&out), "", "no device printed");
    };
    expect(a.detach(m), 1, "is not attached");
    expect(a.detach("/nonexistent"), 1, "is not attached");
    let uri = server.uri_for("koji-1");
    expect(
        a.attach(Path::new("/nonexistent/dir"), &uri, &[]),
        1,
        "No such file or directory",
    );
    expect(a.attach(&mnt, &server.uri(), &[]), 2, "names no export");
    expect(a.attach(&mnt, "http://x/y", &[]), 2, "is not an NBD URI");
    expect(
        a.attach(&mnt, &uri, &["--attach", "bogus"]),
        2,
        "expected auto, kernel or fuse",
    );
    expect(
        a.attach(&mnt, "nbd+unix:///koji-1?socket=/nonexistent/nbd.sock", &[]),
        1,
        "cannot connect to unix:/nonexistent/nbd.sock: No such file or directory",
    );
    if fuse_unavailable().is_none() {
        // Refused by the server's name policy, after the holder claimed
        // the mount point: its record goes too.
        expect(
            a.attach(&mnt, &server.uri_for("other-1"), &[]),
            1,
            "ERR_POLICY",
        );
        // A mount point already in use, by something else or by us.
        let tmpfs = a.mount_point("tmpfs");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "none"])
            .arg(&tmpfs));
        let in_use = a.attach(&tmpfs, &uri, &[]);
        run(Command::new("umount").arg(&tmpfs));
        expect(in_use, 1, "is already a mount point");
        let device = a.attach_ok(&mnt, &uri, &[]);
        expect(
            a.attach(&mnt, &server.uri_for("koji-2"), &[]),
            1,
            &format!("is already attached ({device})"),
        );
        a.detach_ok(m);
    }
    a.assert_nothing_left(&mnt, None);
}

/// Kernel attachments (`--attach kernel`) cannot be made on a host without
/// the nbd module, as this one: records written by hand stand in for them.
/// A record whose `/dev/nbdN` no longer shows its backend identifier
/// (disconnected, or given to someone else) is detached by its directory
/// without touching the device, and swept by `--stale`; and an attach
/// the kernel refuses leaves no record.
#[test]
fn kernel_records_whose_device_is_gone_are_removed() {
    let a = Attachments::new();
    let record = |id: &str, mount: &Path, index: u32| {
        let text = format!(
            r#"{{"id": "{id}", "kind": "kernel", "mount": "{}", "device": "/dev/nbd{index}",
                "export": "koji-1", "uri": "nbd://storage1:10809/koji-1", "holder": null,
                "fuse_dir": null, "backend": "scratchd-attach:{id}"}}"#,
            mount.display()
        );
        std::fs::write(a.state.path().join(format!("{id}.json")), text).unwrap();
    };
    let (one, two) = (a.mount_point("one"), a.mount_point("two"));
    record("0c1", &one, 1000);
    record("0c2", &two, 1001);
    a.detach_ok(one.to_str().unwrap());
    assert_eq!(a.state_files(), [a.state.path().join("0c2.json")]);
    let (code, out) = run_status(&mut a.scratchd(&["detach", "--stale"]));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(a.state_files(), Vec::<PathBuf>::new());
    if !Path::new("/sys/module/nbd").exists() {
        let server = Server::start(&["tmpdisk", "size=64M"]);
        let (code, out) = a.attach(&one, &server.uri_for("k"), &["--attach", "kernel"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("modprobe nbd"), "{err}");
        assert_eq!(a.state_files(), Vec::<PathBuf>::new());
    }
}

/// A detach while a process still works in the directory: the file system
/// is detached lazily and served while that process finishes (within the
/// grace period); then everything goes.
#[test]
fn a_busy_mount_is_detached_lazily_and_goes_when_let_go() {
    if skip_without_fuse("a_busy_mount_is_detached_lazily_and_goes_when_let_go") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("busy"), &[]);
    let holder = a.holder();
    let m = mnt.display();
    let mut busy = Command::new("sh")
        .args([
            "-c",
            &format!("cd {m} && head -c 1000000 /dev/urandom > f && sleep 2 && cat f > /dev/null"),
        ])
        .spawn()
        .unwrap();
    eventually("the file to be written", Duration::from_secs(5), || {
        std::fs::metadata(mnt.join("f")).is_ok_and(|f| f.len() == 1_000_000)
    });
    let started = Instant::now();
    a.detach_ok(mnt.to_str().unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    assert!(
        busy.wait().unwrap().success(),
        "the busy process could read its file"
    );
    a.assert_nothing_left(&mnt, Some(holder));
}

/// A holder killed while it unmounts DIR itself (SIGTERM, then SIGKILL
/// during the writeback) is stuck: its last thread waits on its own FUSE
/// file, whose connection the kernel aborts only once the holder is gone.
/// A holder with SIGKILL pending counts as dead, and the stale cleanup
/// aborts its connection, which frees it.
#[test]
fn a_holder_killed_while_unmounting_is_freed_by_the_stale_cleanup() {
    if skip_without_fuse("a_holder_killed_while_unmounting_is_freed_by_the_stale_cleanup") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=512M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("stuck"), &[]);
    let holder = a.holder();
    let m = mnt.display();
    // Dirty pages for the holder's unmount to write back.
    let (code, _) = sh(&format!(
        "dd if=/dev/zero of={m}/big bs=1M count=128 status=none"
    ));
    assert_eq!(code, 0);
    run(Command::new("kill").args(["-TERM", &holder.to_string()]));
    std::thread::sleep(Duration::from_millis(50));
    run(Command::new("kill").args(["-KILL", &holder.to_string()]));
    std::thread::sleep(Duration::from_millis(200));
    let (code, out) = run_status(&mut a.scratchd(&["detach", "--stale"]));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    a.assert_nothing_left(&mnt, Some(holder));
}

/// Koji mode: kojid tears a build root down with its own `umount` (eager,
/// or lazy with `-l`), never `scratchd detach`. Two processes write, the
/// directory is unmounted from outside, and within a second the holder,
/// loop device, FUSE mount and record are gone; the server keeps the disk
/// for its linger (`ctl show` finds it, idle; attached again, the files are
/// there). The name is given in the environment only.
#[test]
fn an_unmount_from_outside_releases_everything_within_a_second() {
    if skip_without_fuse("an_unmount_from_outside_releases_everything_within_a_second") {
        return;
    }
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("ctl.sock");
    let server = Server::start(&[
        "--control",
        control.to_str().unwrap(),
        "tmpdisk",
        "size=64M",
        "linger=60s",
    ]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    for (umount, name) in [("umount", "koji-eager"), ("umount -l", "koji-lazy")] {
        let a = Attachments::new();
        let mnt = a.mount_point("root");
        let (code, out) = run_status(
            a.scratchd(&["attach", "--mount", mnt.to_str().unwrap(), &uri])
                .env("SCRATCHD_NAME", name),
        );
        assert_eq!(code, 0, "attach: {}", String::from_utf8_lossy(&out.stderr));
        let holder = a.holder();
        let m = mnt.display();
        let (code, out) = sh(&format!(
            "echo one > {m}/a & echo two > {m}/b & wait; sync -f {m}/a"
        ));
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        let (code, out) = sh(&format!("{umount} {m}"));
        assert_eq!(
            code,
            0,
            "{umount}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let started = Instant::now();
        let left = crate::util::poll(Duration::from_secs(1), || {
            a.leftovers(&mnt, Some(holder)).is_empty()
        });
        assert!(
            left.is_some(),
            "{umount}: still there after {:?}: {:?}",
            started.elapsed(),
            a.leftovers(&mnt, Some(holder))
        );
        let show = run(Command::new(SCRATCHD)
            .args(["ctl", "--control", control.to_str().unwrap(), "show"])
            .env("SCRATCHD_NAME", name));
        assert!(stdout(&show).contains(name), "{}", stdout(&show));
        let device = a.attach_ok(&mnt, &server.uri_for(name), &[]);
        let (code, out) = sh(&format!("cat {m}/a {m}/b"));
        assert_eq!((code, stdout(&out).as_str()), (0, "one\ntwo\n"), "{umount}");
        a.detach_ok(&device);
        a.assert_nothing_left(&mnt, None);
    }
}

/// An attach with the name in `SCRATCHD_NAME` and a URI without one: no
/// command line shows the name while the holder runs, and its info-level
/// log shows the fingerprint, not the name. `ctl drop -` reads it from
/// standard input.
#[test]
fn attach_names_stay_off_command_lines_and_out_of_info_logs() {
    if skip_without_fuse("attach_names_stay_off_command_lines_and_out_of_info_logs") {
        return;
    }
    let control_dir = tempfile::tempdir().unwrap();
    let control = control_dir.path().join("ctl.sock");
    let server = Server::start(&[
        "--control",
        control.to_str().unwrap(),
        "tmpdisk",
        "size=64M",
        "linger=60s",
    ]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let name = format!("secret-attach-{}", std::process::id());
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    let (code, out) = run_status(
        a.scratchd(&["attach", "-v", "--mount", mnt.to_str().unwrap(), &uri])
            .env("SCRATCHD_NAME", &name),
    );
    assert_eq!(code, 0, "attach: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        crate::util::cmdlines_containing(&name),
        Vec::<String>::new()
    );
    assert_eq!(a.record().get("export"), name);
    // The log goes with the record at the detach.
    let log: String = std::fs::read_dir(a.state.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    a.detach_ok(mnt.to_str().unwrap());
    let fingerprint = crate::util::fingerprint(&name);
    assert!(log.contains(&fingerprint) && !log.contains(&name), "{log}");

    let mut drop = Command::new(SCRATCHD)
        .args(["ctl", "--control", control.to_str().unwrap(), "drop", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = drop.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, format!("{name}\n").as_bytes()).unwrap();
    std::mem::drop(input);
    let out = drop.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains(&name), "{}", stdout(&out));
}

/// Koji mode, a lazy unmount of a root still in use: the file system lives
/// on for its last user, who finishes writing; the holder serves it until
/// then, and lets the loop device and FUSE file go only after it was
/// written back (the file is on the disk when attached again).
#[test]
fn a_lazy_unmount_from_outside_waits_for_the_last_user() {
    if skip_without_fuse("a_lazy_unmount_from_outside_waits_for_the_last_user") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=60s"]);
    let a = Attachments::new();
    let mnt = a.mount_point("root");
    a.attach_ok(&mnt, &server.uri_for("koji-busy"), &[]);
    let holder = a.holder();
    let m = mnt.display();
    let mut busy = Command::new("sh")
        .args([
            "-c",
            &format!("cd {m} && echo started > /dev/stderr && sleep 1 && echo late > late"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut started = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(busy.stderr.take().unwrap()),
        &mut started,
    )
    .unwrap();
    let (code, out) = sh(&format!("umount -l {m}"));
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(busy.wait().unwrap().success(), "the last user could write");
    let left = crate::util::poll(Duration::from_secs(1), || {
        a.leftovers(&mnt, Some(holder)).is_empty()
    });
    assert!(left.is_some(), "{:?}", a.leftovers(&mnt, Some(holder)));
    let device = a.attach_ok(&mnt, &server.uri_for("koji-busy"), &[]);
    let (code, out) = sh(&format!("cat {m}/late"));
    assert_eq!((code, stdout(&out).as_str()), (0, "late\n"));
    a.detach_ok(&device);
    a.assert_nothing_left(&mnt, None);
}

/// A Python process writing the FUSE file of an attachment with direct
/// I/O, as the loop device does, step by step on standard input: what the
/// build's writes, fsyncs and closes see.
struct FileWriter {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdin: std::process::ChildStdin,
}

/// Commands, one a line: `write OFFSET COUNT` (4 KiB writes of `x`
/// from OFFSET on, each result printed), `fsync`, `close`, `check OFFSET
/// COUNT` (`intact`, `lost` or `read ERRNO` for each block); each printed as `NAME ok`
/// or `NAME ERRNO`, then `done`.
const FILE_WRITER: &str = r#"
import errno, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
block = mmap.mmap(-1, 4096)
block.write(b"x" * 4096)
def attempt(name, f):
    try:
        f()
        print(name, "ok", flush=True)
    except OSError as e:
        print(name, errno.errorcode[e.errno], flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "write":
        for i in range(int(cmd[2])):
            attempt("write", lambda: os.pwrite(fd, block, int(cmd[1]) + i * 4096))
    elif cmd[0] == "fsync":
        attempt("fsync", lambda: os.fsync(fd))
    elif cmd[0] == "close":
        attempt("close", lambda: os.close(fd))
    elif cmd[0] == "check":
        r = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
        back = mmap.mmap(-1, 4096)
        for i in range(int(cmd[2])):
            try:
                os.preadv(r, [back], int(cmd[1]) + i * 4096)
                print("intact" if back[:] == block[:] else "lost", flush=True)
            except OSError as e:
                print("read", errno.errorcode[e.errno], flush=True)
        os.close(r)
    print("done", flush=True)
"#;

impl FileWriter {
    fn start(file: &Path) -> FileWriter {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", FILE_WRITER])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        FileWriter {
            child,
            lines,
            stdin,
        }
    }

    fn send(&mut self, command: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{command}").unwrap();
    }

    /// The lines up to `done`, or `None` if they take longer than `within`.
    fn answer(&mut self, within: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == "done" => return Some(lines),
                Ok(line) => lines.push(line),
                Err(_) => return None,
            }
        }
    }

    fn ask(&mut self, command: &str, within: Duration) -> Vec<String> {
        self.send(command);
        self.answer(within)
            .unwrap_or_else(|| panic!("{command}: no answer within {within:?}"))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The attachment's FUSE file (what its loop device is on).
fn fuse_file(a: &Attachments) -> PathBuf {
    Path::new(a.record().get("fuse_dir")).join("disk")
}

/// Where the tests below write: past what the file system on the disk
/// has touched (it is mounted, but never asked to read this).
const RAW: u64 = 96 << 20;

/// Write-behind is on for a tmpdisk export (`auto`): with the server
/// stopped, writes are acknowledged. The server then killed, the writes
/// in flight are lost: the next write, fsync and close fail with EIO, at
/// once; nothing hangs, and detach cleans up.
#[test]
fn a_server_killed_with_writes_in_flight_fails_the_next_write_fsync_and_close() {
    if skip_without_fuse(
        "a_server_killed_with_writes_in_flight_fails_the_next_write_fsync_and_close",
    ) {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=256M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("killed"), &[]);
    let mut writer = FileWriter::start(&fuse_file(&a));
    server.signal("STOP");
    // 64 KiB: within the window and the socket's buffer.
    let acked = writer.ask(&format!("write {RAW} 16"), Duration::from_secs(10));
    assert_eq!(
        acked,
        vec!["write ok"; 16],
        "acknowledged while the server is stopped"
    );
    server.signal("KILL");
    let started = Instant::now();
    let write = writer.ask(&format!("write {RAW} 1"), Duration::from_secs(10));
    assert_eq!(write, ["write EIO"]);
    assert_eq!(writer.ask("fsync", Duration::from_secs(10)), ["fsync EIO"]);
    assert_eq!(writer.ask("close", Duration::from_secs(10)), ["close EIO"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited for the dead"
    );
    drop(writer);
    let holder = a.holder();
    a.detach_ok(mnt.to_str().unwrap());
    a.assert_nothing_left(&mnt, Some(holder));
}

/// The server's memory budget runs out while writes are in flight: a
/// write acknowledged early whose data the server refused is never lost
/// silently: ENOSPC fails a later write, the fsync and the close, and the
/// holder logs it.
#[test]
fn a_budget_that_runs_out_mid_window_fails_the_next_write_fsync_and_close() {
    if skip_without_fuse("a_budget_that_runs_out_mid_window_fails_the_next_write_fsync_and_close") {
        return;
    }
    let server = Server::start(&["--memory-limit", "24M", "tmpdisk", "size=256M"]);
    let a = Attachments::new();
    let mnt = a.mount_point("mnt");
    a.attach_ok(&mnt, &server.uri_for("budget"), &[]);
    let mut writer = FileWriter::start(&fuse_file(&a));
    // 32 MiB of 4 KiB writes: the budget runs out on the way.
    let blocks = 8192;
    let writes = writer.ask(&format!("write {RAW} {blocks}"), Duration::from_secs(120));
    let fsync = writer.ask("fsync", Duration::from_secs(10));
    let check = writer.ask(&format!("check {RAW} {blocks}"), Duration::from_secs(120));
    let close = writer.ask("close", Duration::from_secs(10));
    let first_lost = check
        .iter()
        .position(|c| c == "lost")
        .expect("the budget ran out");
    // Acknowledged, and lost: write-behind was on, and the write did fail.
    assert_eq!(
        writes[first_lost],
        "write ok",
        "{:?}",
        &writes[..first_lost + 1]
    );
    let failed = writes[first_lost..]
        .iter()
        .filter(|w| *w == "write ENOSPC")
        .count();
    assert!(failed > 0, "no later write failed");
    assert!(
        writes[first_lost..].iter().all(|w| w != "write EIO"),
        "{writes:?}"
    );
    assert_eq!(fsync, ["fsync ENOSPC"]);
    assert_eq!(close, ["close ENOSPC"]);
    let log = a.state.path().join(format!("{}.log", a.record().get("id")));
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("a write acknowledged early failed"), "{text}");
}

/// `auto` leaves write-behind off for an export that may be durable (the
/// `file` backend advertises FLUSH): with the server stopped, a write
/// waits for it. `--write-behind on` turns it on there too.
#[test]
fn write_behind_is_off_for_a_durable_export_unless_asked_for() {
    if skip_without_fuse("write_behind_is_off_for_a_durable_export_unless_asked_for") {
        return;
    }
    for (flags, behind) in [(&[][..], false), (&["--write-behind", "on"][..], true)] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let path = format!("path={}", image.display());
        let server = Server::start(&["-e", "disk", "file", &path]);
        let a = Attachments::new();
        let mnt = a.mount_point("mnt");
        a.attach_ok(&mnt, &server.uri_for("disk"), flags);
        let mut writer = FileWriter::start(&fuse_file(&a));
        server.signal("STOP");
        writer.send(&format!("write {RAW} 1"));
        let early = writer.answer(Duration::from_secs(1));
        server.signal("CONT");
        match behind {
            true => assert_eq!(
                early.as_deref(),
                Some(&["write ok".to_owned()][..]),
                "{flags:?}"
            ),
            false => {
                assert!(
                    early.is_none(),
                    "{flags:?}: acknowledged with the server stopped"
                );
                let late = writer
                    .answer(Duration::from_secs(10))
                    .expect("the write went through");
                assert_eq!(late, ["write ok"]);
            }
        }
        assert_eq!(writer.ask("fsync", Duration::from_secs(10)), ["fsync ok"]);
        assert_eq!(writer.ask("close", Duration::from_secs(10)), ["close ok"]);
        drop(writer);
        a.detach_ok(mnt.to_str().unwrap());
    }
}
