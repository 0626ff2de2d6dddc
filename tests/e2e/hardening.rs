//! The builder side against an unprivileged user on the same host and a
//! disk image written by someone else (issue 16): each attack run as that
//! user (`setpriv`) against the real binary, each failing on the code
//! before the hardening.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{as_user, run, run_status, skip_without_fuse, state_dir, Server, SCRATCHD};

/// The unprivileged user the attacks run as.
const NOBODY: u32 = 65534;

fn as_nobody(argv: &[&str]) -> (i32, std::process::Output) {
    let argv = as_user(Some(NOBODY), argv);
    run_status(Command::new(&argv[0]).args(&argv[1..]).current_dir("/"))
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A root process that must survive: killed on drop.
struct Victim(Child);

impl Victim {
    fn start() -> Victim {
        Victim(
            Command::new("sleep")
                .arg("120")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Field 22 of /proc/PID/stat, as a record holds it.
    fn start_time(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        rest.split_whitespace().nth(19).unwrap().parse().unwrap()
    }

    fn assert_alive(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "the victim was signalled"
        );
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A record, as JSON, that makes `detach` act on `victim` and `mount`.
fn forged_record(id: &str, mount: &Path, victim: &Victim, fuse_dir: &Path) -> String {
    format!(
        r#"{{"id": "{id}", "kind": "fuse", "mount": "{}", "device": "/dev/loop7",
            "export": "x", "uri": "nbd+unix:///x?socket=/run/x", "fuse_dir": "{}",
            "holder": {{"pid": {}, "start_time": {}}}, "backend": null}}"#,
        mount.display(),
        fuse_dir.display(),
        victim.pid(),
        victim.start_time()
    )
}

/// Another user owns a directory above the state directory, and fills it
/// with a forged record (naming a root process as holder), a symlinked
/// lock and a symlinked record: root's attach and detach refuse the
/// directory, naming the culprit, and touch nothing it names.
#[test]
fn a_state_directory_another_user_can_change_is_refused() {
    let base = state_dir();
    let theirs = base.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown_nobody(&theirs);
    let state = theirs.join("state");
    let precious = base.path().join("precious");
    std::fs::write(&precious, b"root's").unwrap();
    let mut victim = Victim::start();
    let mount = base.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    let record = forged_record("0bad", &mount, &victim, &state.join("0bad.fuse"));
    let script = format!(
        "set -e; mkdir -m 755 {state}; printf '%s' '{record}' > {state}/0bad.json; \
         ln -s {precious} {state}/lock; ln -s {precious} {state}/0bee.json",
        state = state.display(),
        precious = precious.display(),
    );
    let (code, out) = as_nobody(&["sh", "-c", &script]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));

    for args in [
        vec!["detach", "--all"],
        vec!["detach", "--stale"],
        vec!["detach", mount.to_str().unwrap()],
        vec![
            "attach",
            "--mount",
            mount.to_str().unwrap(),
            "nbd+unix:///x?socket=/run/none",
        ],
    ] {
        let (code, out) = run_status(
            Command::new(SCRATCHD)
                .args(&args)
                .env("SCRATCHD_STATE_DIR", &state),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains("owned by uid 65534"), "{args:?}: {err}");
        victim.assert_alive();
        assert_eq!(std::fs::read(&precious).unwrap(), b"root's", "{args:?}");
    }
    // Below /tmp, which everyone may write, the same.
    let open = tempfile::tempdir_in("/tmp").unwrap();
    let (code, out) = run_status(
        Command::new(SCRATCHD)
            .args(["detach", "--stale"])
            .env("SCRATCHD_STATE_DIR", open.path().join("state")),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("/tmp: mode 1777: writable by group or others"),
        "{err}"
    );
}

/// Inside a trusted state directory a record still only points: one whose
/// holder is not a scratchd process gets no signal, and one whose id or
/// FUSE directory is not its own is ignored (an id of `../x` once made
/// root delete files outside the directory).
#[test]
fn a_record_naming_another_process_signals_nothing() {
    let state = state_dir();
    let mut victim = Victim::start();
    let dirs = tempfile::tempdir().unwrap();
    let mount = dirs.path().canonicalize().unwrap();
    let fuse_dir = state.path().join("0abc.fuse");
    let record = forged_record("0abc", &mount, &victim, &fuse_dir);
    std::fs::write(state.path().join("0abc.json"), &record).unwrap();
    let precious = dirs.path().join("precious.json");
    std::fs::write(&precious, b"keep").unwrap();
    let outside = forged_record("../x", &mount, &victim, &fuse_dir).replace(
        "\"../x\"",
        &format!("\"{}\"", precious.with_extension("").display()),
    );
    std::fs::write(state.path().join("0abd.json"), outside).unwrap();

    let detach = |args: &[&str]| {
        run_status(
            Command::new(SCRATCHD)
                .args(args)
                .env("SCRATCHD_STATE_DIR", state.path()),
        )
    };
    let (code, out) = detach(&["detach", mount.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a scratchd process"), "{err}");
    victim.assert_alive();
    let (_, out) = detach(&["detach", "--all"]);
    victim.assert_alive();
    let (_, _) = detach(&["detach", "--stale"]);
    victim.assert_alive();
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("precious"), "{log}");
}

/// A disk whose writer planted a setuid-root program and a device node
/// readable and writable by all: after root attaches it, an unprivileged
/// user gets neither root nor the device.
#[test]
fn a_served_disk_cannot_carry_setuid_programs_or_device_nodes() {
    if skip_without_fuse("a_served_disk_cannot_carry_setuid_programs_or_device_nodes") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    mode(work.path(), 0o755);
    let content = work.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::copy("/usr/bin/id", content.join("id")).unwrap();
    mode(&content.join("id"), 0o4755);
    run(Command::new("mknod")
        .args(["-m", "666"])
        .arg(content.join("null"))
        .args(["c", "1", "3"]));
    let image = work.path().join("hostile.img");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .arg("64M"));
    // The writer: any client that knows the name (here the image goes in
    // whole, as nbdcopy writes it).
    let server = Server::start(&["tmpdisk", "size=64M", "type=none", "linger=30s"]);
    let uri = server.uri_for("hostile-build");
    run(Command::new("nbdcopy").arg(&image).arg(&uri));

    let state = state_dir();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let attach = |args: &[&str]| {
        run_status(
            Command::new(SCRATCHD)
                .args(args)
                .env("SCRATCHD_STATE_DIR", state.path()),
        )
    };
    let mnt_text = mnt.to_str().unwrap();
    let (code, out) = attach(&["attach", "--attach", "fuse", "--mount", mnt_text, &uri]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let planted = |name: &str| mnt.join(name).to_str().unwrap().to_owned();
    let (code, out) = as_nobody(&[&planted("id"), "-u"]);
    let euid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (_, dev) = as_nobody(&["sh", "-c", &format!("echo x > {}", planted("null"))]);
    let options = crate::util::stdout(&run(Command::new("findmnt")
        .args(["-no", "OPTIONS"])
        .arg(&mnt)));
    let (detached, out) = attach(&["detach", mnt_text]);
    assert_eq!(detached, 0, "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!((code, euid.as_str()), (0, "65534"), "the setuid bit worked");
    let dev_err = String::from_utf8_lossy(&dev.stderr);
    assert!(
        !dev.status.success() && dev_err.contains("Permission denied"),
        "{dev_err}"
    );
    assert!(
        options.contains("nosuid") && options.contains("nodev"),
        "{options}"
    );
}

/// The mount point's parent belongs to the attacker: a symlink put in the
/// mount point's place is refused instead of followed (the disk once went
/// over a root-only directory), and what `detach` unmounts is never
/// reached through a symlink.
#[test]
fn a_mount_point_swapped_for_a_symlink_is_refused() {
    if skip_without_fuse("a_mount_point_swapped_for_a_symlink_is_refused") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=30s"]);
    let work = tempfile::tempdir().unwrap();
    mode(work.path(), 0o755);
    let theirs = work.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown_nobody(&theirs);
    let root_only: PathBuf = work.path().join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    mode(&root_only, 0o700);
    let link = theirs.join("mnt");
    let (code, _) = as_nobody(&[
        "ln",
        "-s",
        root_only.to_str().unwrap(),
        link.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let state = state_dir();
    let (code, out) = run_status(
        Command::new(SCRATCHD)
            .args([
                "attach",
                "--attach",
                "fuse",
                "--mount",
                link.to_str().unwrap(),
            ])
            .arg(server.uri_for("swap"))
            .env("SCRATCHD_STATE_DIR", state.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // findmnt exits 1 when nothing is mounted there.
    let (_, found) = run_status(Command::new("findmnt").arg("-n").arg(&root_only));
    let mounted = crate::util::stdout(&found);
    if code == 0 {
        let _ = Command::new(SCRATCHD)
            .args(["detach", "--all"])
            .env("SCRATCHD_STATE_DIR", state.path())
            .status();
    }
    assert!(
        mounted.is_empty(),
        "mounted over the symlink's target: {mounted}"
    );
    assert_ne!(code, 0, "attached through a symlink");
    assert!(err.contains("symlink"), "{err}");
}

/// A pid no process has (a child that was reaped).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    child.id()
}

/// Another user's entries in a `TMPDIR` everyone may write, named as a
/// killed run's work directory: a directory of theirs (holding the empty
/// `fuse` and `mnt` a run leaves) and a symlink to a directory of root's
/// that holds an empty `fuse` and `mnt`. A run's sweep of killed runs'
/// work directories removes none of them, nor anything through them; a
/// real one of root's beside them goes (the sweep ran).
#[test]
fn a_run_sweeps_only_the_work_directories_root_made() {
    if skip_without_fuse("a_run_sweeps_only_the_work_directories_root_made") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    mode(tmp.path(), 0o1777);
    let roots = tempfile::tempdir().unwrap();
    let dead = dead_pid();
    let entry = |name: &str| tmp.path().join(format!("scratchd-run.{dead}.{name}"));
    let (theirs, link, ours) = (entry("theirs"), entry("link"), entry("ours"));
    let subdirs = |dir: &Path| [dir.join("fuse"), dir.join("mnt")];
    let [theirs_fuse, theirs_mnt] = subdirs(&theirs);
    let (code, out) = as_nobody(&[
        "mkdir",
        "-p",
        theirs_fuse.to_str().unwrap(),
        theirs_mnt.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    for dir in subdirs(roots.path()).iter().chain(&subdirs(&ours)) {
        std::fs::create_dir_all(dir).unwrap();
    }
    let (code, out) = as_nobody(&[
        "ln",
        "-s",
        roots.path().to_str().unwrap(),
        link.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));

    let (code, out) = run_status(
        Command::new(SCRATCHD)
            .args(["run", "--size", "64M", "--type", "none", "--", "true"])
            .env("TMPDIR", tmp.path()),
    );
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!ours.exists(), "the sweep did not run");
    for kept in subdirs(&theirs).iter().chain(&subdirs(roots.path())) {
        assert!(kept.is_dir(), "{} was removed", kept.display());
    }
    assert!(link.symlink_metadata().is_ok(), "the symlink was removed");
}

/// `scratchd run` runs mkfs from the system's directories only: an `mkfs`
/// and `mkfs.ext4` that another user put in a directory first on root's
/// `PATH` never run (they would leave a mark, then format as the real
/// ones do).
#[test]
fn mkfs_comes_from_the_system_not_the_callers_path() {
    if skip_without_fuse("mkfs_comes_from_the_system_not_the_callers_path") {
        return;
    }
    let evil = tempfile::tempdir().unwrap();
    mode(evil.path(), 0o755);
    chown_nobody(evil.path());
    let mark = evil.path().join("ran");
    for tool in ["mkfs", "mkfs.ext4"] {
        let script = evil.path().join(tool);
        let real = crate::util::stdout(&run(Command::new("sh").args([
            "-c",
            &format!("PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v {tool}"),
        ])));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho {tool} >> {}\nexec {} \"$@\"\n",
                mark.display(),
                real.trim()
            ),
        )
        .unwrap();
        mode(&script, 0o755);
        chown_nobody(&script);
    }
    let path = format!(
        "{}:{}",
        evil.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (code, out) = run_status(
        Command::new(SCRATCHD)
            .args(["run", "--size", "64M", "--", "sh", "-c"])
            .arg("findmnt -n -o FSTYPE \"$SCRATCHD_MOUNT\"")
            .env("PATH", &path),
    );
    assert_eq!(
        (code, crate::util::stdout(&out).trim()),
        (0, "ext4"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !mark.exists(),
        "ran from the caller's PATH: {}",
        std::fs::read_to_string(&mark).unwrap_or_default()
    );
}

/// A loop device with a file system of someone else's on it, mounted,
/// and losetup'd and unmounted on drop.
struct ForeignMount {
    dir: tempfile::TempDir,
    device: String,
}

impl ForeignMount {
    fn new() -> ForeignMount {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        run(Command::new("mkfs.ext4").arg("-q").arg(&image));
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image));
        let device = crate::util::stdout(&out).trim().to_owned();
        let mount = ForeignMount { dir, device };
        std::fs::create_dir(mount.mount_point()).unwrap();
        run(Command::new("mount")
            .arg(&mount.device)
            .arg(mount.mount_point()));
        mount
    }

    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn still_mounted(&self) -> bool {
        let (_, out) = run_status(
            Command::new("findmnt")
                .args(["-n", "-o", "SOURCE", "--mountpoint"])
                .arg(self.mount_point()),
        );
        crate::util::stdout(&out).trim() == self.device
    }
}

impl Drop for ForeignMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mount_point()).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A dead FUSE attachment's record whose loop device the kernel has since
/// given to someone else, whose file system is now mounted at the
/// record's directory: `detach DIR` and `detach --stale` remove the record
/// and leave that mount alone (the mount's source matches the record's
/// device; its backing file is not the attachment's FUSE file).
#[test]
fn a_loop_device_given_to_someone_else_is_not_unmounted() {
    if skip_without_fuse("a_loop_device_given_to_someone_else_is_not_unmounted") {
        return;
    }
    let state = state_dir();
    let foreign = ForeignMount::new();
    let record = |id: &str| {
        let text = format!(
            r#"{{"id": "{id}", "kind": "fuse", "mount": "{}", "device": "{}",
                "export": "x", "uri": "nbd+unix:///x?socket=/run/x", "holder": null,
                "fuse_dir": "{}", "backend": null}}"#,
            foreign.mount_point().display(),
            foreign.device,
            state.path().join(format!("{id}.fuse")).display()
        );
        std::fs::write(state.path().join(format!("{id}.json")), text).unwrap();
    };
    let scratchd = |args: &[&str]| {
        let (code, out) = run_status(
            Command::new(SCRATCHD)
                .args(args)
                .env("SCRATCHD_STATE_DIR", state.path()),
        );
        assert_eq!(
            code,
            0,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    record("0d1");
    scratchd(&["detach", foreign.mount_point().to_str().unwrap()]);
    assert!(
        foreign.still_mounted(),
        "detach unmounted someone else's disk"
    );
    record("0d2");
    scratchd(&["detach", "--stale"]);
    assert!(
        foreign.still_mounted(),
        "detach --stale unmounted someone else's disk"
    );
    assert!(!state.path().join("0d1.json").exists() && !state.path().join("0d2.json").exists());
}

/// `snapshot take --freeze DIR` as root, DIR in a directory `nobody`
/// owns, as mock's build roots are in a directory mock's group writes:
/// only the mount point of the attachment of the disk being snapshotted
/// is frozen. A symlink to it, a directory inside it, another attachment,
/// a file system that is not a scratchd disk (even with a record forged
/// to name it) and the host's `/` are refused, each before anything is
/// frozen; the real one freezes and thaws. `nobody` may not freeze at all.
#[test]
fn freeze_takes_only_the_mount_point_of_the_disk_snapshotted() {
    if skip_without_fuse("freeze_takes_only_the_mount_point_of_the_disk_snapshotted") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=30s"]);
    let attachments = crate::front::Attachments::new(crate::front::Front::Fuse);
    let root = attachments.mount_point("root");
    let other = attachments.mount_point("other");
    attachments.attach_ok(&root, &server.uri_for("root"), &[]);
    attachments.attach_ok(&other, &server.uri_for("other"), &[]);
    let work = tempfile::tempdir().unwrap();
    mode(work.path(), 0o755);
    let theirs = work.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chown_nobody(&theirs);
    let link = theirs.join("root");
    let (code, _) = as_nobody(&["ln", "-s", root.to_str().unwrap(), link.to_str().unwrap()]);
    assert_eq!(code, 0);
    std::fs::create_dir(root.join("sub")).unwrap();
    let foreign = ForeignMount::new();
    let forged = format!(
        r#"{{"id": "0f0", "kind": "fuse", "mount": "{}", "device": "{}",
            "export": "root", "uri": "{}", "holder": null,
            "fuse_dir": "{}", "backend": null}}"#,
        foreign.mount_point().display(),
        foreign.device,
        server.uri_for("root"),
        attachments.state.path().join("0f0.fuse").display()
    );
    std::fs::write(attachments.state.path().join("0f0.json"), forged).unwrap();
    let take = |dir: &Path, snapshot: &str| {
        run_status(&mut attachments.scratchd(&[
            "snapshot",
            "take",
            "--freeze",
            dir.to_str().unwrap(),
            &server.uri_for("root"),
            snapshot,
        ]))
    };
    let refusals: [(&Path, &str); 5] = [
        (&link, "symlink"),
        (&root.join("sub"), "not the mount point"),
        (&other, "whose disk is not the one being snapshotted"),
        (
            &foreign.mount_point(),
            "not the mount point of a scratchd disk",
        ),
        (Path::new("/"), "not the mount point of a scratchd disk"),
    ];
    for (dir, why) in refusals {
        let (code, out) = take(dir, "refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(code != 0 && err.contains(why), "{}: {err}", dir.display());
    }
    let (_, out) = run_status(&mut attachments.scratchd(&["snapshot", "list", &server.uri()]));
    assert!(
        !crate::util::stdout(&out).contains("refused"),
        "a refusal took a snapshot"
    );
    let (code, out) = take(&root, "base");
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(root.join("after"), b"thawed").unwrap();
    let argv = [
        SCRATCHD,
        "snapshot",
        "take",
        "--freeze",
        root.to_str().unwrap(),
    ];
    let uri = server.uri_for("root");
    let (code, out) = as_nobody(&[argv[0], argv[1], argv[2], argv[3], argv[4], &uri, "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(code != 0 && err.contains("only root"), "{err}");
}

/// `kill -9` of `snapshot take --freeze` while the file system is frozen
/// (its server never answers): the guard it forked thaws it, so a writer
/// waiting on it goes on, and the guard is gone after. Without the guard
/// every writer would hang for ever, unkillable.
#[test]
fn a_freeze_outlives_no_kill_9_of_the_snapshot() {
    use std::io::BufRead;
    if skip_without_fuse("a_freeze_outlives_no_kill_9_of_the_snapshot") {
        return;
    }
    let server = Server::start(&["tmpdisk", "size=64M", "linger=30s"]);
    let attachments = crate::front::Attachments::new(crate::front::Front::Fuse);
    let root = attachments.mount_point("root");
    attachments.attach_ok(&root, &server.uri_for("root"), &[]);
    let silent = tempfile::tempdir().unwrap();
    let sock = silent.path().join("silent.sock");
    // Connections wait in its backlog, never greeted.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let snapshot = format!("killed-{}", std::process::id());
    let mut take = attachments
        .scratchd(&["snapshot", "take", "-v", "--freeze", root.to_str().unwrap()])
        .arg(format!("nbd+unix:///root?socket={}", sock.display()))
        .arg(&snapshot)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufReader::new(take.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("froze the file system") {
        line.clear();
        assert_ne!(log.read_line(&mut line).unwrap(), 0, "no freeze logged");
    }
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > {}/during", root.display()))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let frozen = writer.try_wait().unwrap().is_none();
    take.kill().unwrap();
    take.wait().unwrap();
    let thawed = crate::util::poll(std::time::Duration::from_secs(10), || {
        writer.try_wait().unwrap().is_some()
    });
    if thawed.is_none() {
        // Left frozen: thaw it, or the test's clean-up and the writer hang.
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&root)
            .status();
        let _ = writer.wait();
    }
    assert!(
        frozen,
        "the file system was not frozen while the snapshot was taken"
    );
    assert!(
        thawed.is_some(),
        "still frozen 10 s after kill -9 of the snapshot"
    );
    let guard_gone = crate::util::poll(std::time::Duration::from_secs(10), || {
        crate::util::cmdlines_containing(&snapshot).is_empty()
    });
    assert!(
        guard_gone.is_some(),
        "{:?}",
        crate::util::cmdlines_containing(&snapshot)
    );
}
