//! `scratchd run`: a command on a scratch disk of its own, attached and
//! mounted in a private mount namespace; nothing is left behind, however
//! the run ends.
//!
//! The tests in [`front_tests!`] run on both front ends (FUSE here, the
//! kernel's nbd driver in the guests of [`crate::kernel_vm`]), on a disk of
//! a `scratchd serve`, as the kernel's needs; the ones after it are about
//! the run's own disk (FUSE only) or need no mount.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::front::{devices_labelled, front_tests, Front};
use crate::util::{eventually, run_status, skip_without_fuse, stdout, Server, SCRATCHD};

/// `scratchd run [--attach FRONT] ARGS -- sh -c SCRIPT` (`None`: auto).
fn scratchd_run(front: Option<Front>, args: &[&str], script: &str) -> Command {
    let mut c = Command::new(SCRATCHD);
    c.arg("run");
    if let Some(front) = front {
        c.args(front.args());
    }
    c.args(args).args(["--", "sh", "-c", script]);
    c
}

/// Runs `command` to its end: its exit status, output and pid (which a
/// kernel run's device label names).
fn run_to_end(command: &mut Command) -> (i32, Output, u32) {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{command:?} killed: {}", out.status));
    (code, out, pid)
}

/// What run `pid` can leave behind, found by the directory it worked in:
/// loop devices on its FUSE file, nbd devices with its label, mounts
/// under it, the directory itself.
fn leftovers(work: &Path, pid: u32) -> Vec<String> {
    let work = work.to_str().unwrap();
    let mut found = Vec::new();
    let loops = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&loops.stdout).lines() {
        if line.contains(work) {
            found.push(format!("loop device: {line}"));
        }
    }
    for device in devices_labelled(&format!("scratchd-run:{pid}:")) {
        found.push(format!("nbd device: {device}"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines().filter(|l| l.contains(work)) {
        found.push(format!("mount: {line}"));
    }
    if Path::new(work).exists() {
        found.push(format!("directory {work}"));
    }
    found
}

/// The run's work directory, from the mount point the command printed.
fn work_dir(mount_line: &str) -> PathBuf {
    Path::new(mount_line.trim()).parent().unwrap().to_owned()
}

/// A run started with a command that prints `$SCRATCHD_MOUNT` first.
struct Started {
    run: Child,
    /// The rest of its output.
    out: BufReader<ChildStdout>,
    /// Its work directory, once attached.
    work: PathBuf,
}

fn start_run(front: Front, args: &[&str], script: &str) -> Started {
    let mut run = scratchd_run(Some(front), args, script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let work = work_dir(&line);
    Started { run, out, work }
}

/// A server of tmpdisk exports of `size`, and its URI without an export.
fn server(size: &str) -> (Server, String) {
    let server = Server::start(&["tmpdisk", &format!("size={size}")]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    (server, uri)
}

front_tests! {
    /// With `--server`, the disk is a tmpdisk export of a `scratchd
    /// serve`, on the front end's block device, mounted; the run names it
    /// and returns the command's status.
    fn a_run_on_a_server_disk(front) {
        let (server, uri) = server("256M");
        let script = r#"
            set -e
            echo "$SCRATCHD_MOUNT"
            echo "$SCRATCHD_EXPORT"
            echo "$SCRATCH_URI"
            findmnt -n -o FSTYPE,SOURCE "$SCRATCHD_MOUNT"
            echo "$SCRATCHD_DEVICE"
            [ "$SCRATCH_DIR" = "$SCRATCHD_MOUNT" ] && [ "$SCRATCH_DEV" = "$SCRATCHD_DEVICE" ]
            head -c 2000000 /dev/urandom > "$SCRATCHD_MOUNT/data"
            sha256sum < "$SCRATCHD_MOUNT/data" > "$SCRATCHD_MOUNT/sum"
            sync -f "$SCRATCHD_MOUNT"
            dd if="$SCRATCHD_MOUNT/data" iflag=direct bs=1M status=none | sha256sum \
                | cmp - "$SCRATCHD_MOUNT/sum"
            exit 7
        "#;
        let (code, out, pid) = run_to_end(&mut scratchd_run(
            Some(front),
            &["--server", &uri, "--name", "build-remote-1"],
            script,
        ));
        let text = stdout(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 7, "the command's status is the run's\n{text}{err}");
        let mut lines = text.lines();
        let work = work_dir(lines.next().unwrap());
        assert_eq!(lines.next(), Some("build-remote-1"));
        assert_eq!(lines.next(), Some(server.uri_for("build-remote-1").as_str()));
        let fs: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert!(fs[0] == "ext4" && fs[1].starts_with(front.device_prefix()), "{fs:?}");
        assert_eq!(lines.next(), Some(fs[1]), "SCRATCHD_DEVICE is what is mounted");
        assert_eq!(leftovers(&work, pid), Vec::<String>::new());
    }

    fn a_command_killed_by_a_signal_gives_128_plus_the_signal(front) {
        let (_server, uri) = server("64M");
        let mut run = scratchd_run(Some(front), &["--server", &uri], "kill -TERM $$");
        let (code, _, _) = run_to_end(&mut run);
        assert_eq!(code, 128 + 15);
    }

    /// `kill -9` of a run while its command runs: the kernel kills its
    /// command and tears down its private mounts with the namespace; with
    /// the mount goes the device (FUSE: the loop device is autoclear, and
    /// the watchdog aborts the FUSE connection; kernel: disconnect on
    /// close), with nothing of ours left to do it; the next run sweeps the
    /// empty work directory.
    fn kill_9_of_a_run_leaves_nothing(front) {
        let (_server, uri) = server("64M");
        let mut started = start_run(
            front,
            &["--server", &uri],
            "echo \"$SCRATCHD_MOUNT\"; exec sleep 60",
        );
        let (pid, work) = (started.run.id(), started.work.clone());
        assert!(!leftovers(&work, pid).is_empty(), "the run is attached");
        started.run.kill().unwrap();
        started.run.wait().unwrap();
        // The empty work directory may stay for the next run's sweep, or
        // be gone already: another test's run, running beside this one,
        // sweeps the directories of dead runs (seen on the 6.1 guest).
        let only_the_directory = [format!("directory {}", work.display())];
        let gone = crate::util::poll(Duration::from_secs(20), || {
            let left = leftovers(&work, pid);
            left.is_empty() || left == only_the_directory
        });
        assert!(
            gone.is_some(),
            "20 s after the kill, still there: {:?}",
            leftovers(&work, pid)
        );
        let (code, _, _) = run_to_end(&mut scratchd_run(Some(front), &["--server", &uri], "true"));
        assert_eq!(code, 0);
        assert_eq!(leftovers(&work, pid), Vec::<String>::new());
    }

    /// A server that goes away mid-build turns into I/O errors for the
    /// build, never a hang, and the run still cleans up.
    fn a_server_that_dies_mid_run_fails_the_build_not_the_host(front) {
        let (server, uri) = server("256M");
        let script = r#"
            echo "$SCRATCHD_MOUNT"
            while [ ! -e "$SCRATCHD_MOUNT/../go" ]; do sleep 0.05; done
            dd if=/dev/urandom of="$SCRATCHD_MOUNT/f" bs=1M count=8 oflag=direct status=none
            echo "dd=$?"
        "#;
        let mut started = start_run(front, &["--server", &uri], script);
        server.signal("KILL");
        std::fs::write(started.work.join("go"), "").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut started.out, &mut rest).unwrap();
        let status = started.run.wait().unwrap();
        assert!(rest.contains("dd=1"), "the write on a dead server succeeded: {rest}");
        assert!(status.success(), "{status}");
        assert_eq!(leftovers(&started.work, started.run.id()), Vec::<String>::new());
    }

    /// A build that leaves a process behind with its working directory on
    /// the disk: the file system is detached lazily, served until that
    /// process lets go (within a grace period), and the run ends with
    /// nothing left.
    fn a_process_left_behind_on_the_disk_does_not_hang_the_run(front) {
        let (_server, uri) = server("64M");
        let script = r#"
            echo "$SCRATCHD_MOUNT"
            cd "$SCRATCHD_MOUNT" && head -c 1000000 /dev/urandom > f
            (sleep 2; cat f > /dev/null) &
        "#;
        let started = Instant::now();
        let mut run = scratchd_run(Some(front), &["--server", &uri], script);
        let (code, out, pid) = run_to_end(&mut run);
        let took = started.elapsed();
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        // Under emulation in the guest, more (but far less than the 120 s
        // a `sync` once waited there for another disk's dead server).
        let limit = Duration::from_secs(if crate::util::in_guest() { 60 } else { 15 });
        assert!(took < limit, "the run took {took:?}");
        let work = work_dir(stdout(&out).lines().next().unwrap());
        eventually("the lazily detached disk to go", Duration::from_secs(10), || {
            leftovers(&work, pid).is_empty()
        });
    }

    /// Two runs against one server at once get a disk each: what one
    /// writes, the other never sees.
    fn two_concurrent_runs_on_one_server_get_independent_disks(front) {
        let (_server, uri) = server("128M");
        let script = r#"
            echo "$SCRATCHD_EXPORT" > "$SCRATCHD_MOUNT/me"
            sleep 1
            ls "$SCRATCHD_MOUNT"
            cat "$SCRATCHD_MOUNT/me"
        "#;
        let runs: Vec<_> = (0..2)
            .map(|_| {
                scratchd_run(Some(front), &["--server", &uri], script)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<String> = runs
            .into_iter()
            .map(|r| {
                let out = r.wait_with_output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                stdout(&out)
            })
            .collect();
        for out in &outs {
            let lines: Vec<&str> = out.lines().collect();
            // Only its own file (and ext4's lost+found), holding its own name.
            assert_eq!(lines[..2], ["lost+found", "me"], "{out}");
            assert!(lines[2].starts_with("run-"), "{out}");
        }
        assert_ne!(outs[0], outs[1], "both runs saw one disk");
    }

    /// SIGTERM to a run mid-build: passed on to the command, which stops;
    /// the run then cleans up and reports the command's status.
    fn sigterm_to_a_run_mid_build_cleans_up(front) {
        let (_server, uri) = server("64M");
        let mut started = start_run(
            front,
            &["--server", &uri],
            "echo \"$SCRATCHD_MOUNT\"; exec sleep 30",
        );
        run_status(Command::new("kill").args(["-TERM", &started.run.id().to_string()]));
        let status = started.run.wait().unwrap();
        assert_eq!(status.code(), Some(128 + 15), "{status}");
        assert_eq!(leftovers(&started.work, started.run.id()), Vec::<String>::new());
    }

    /// The name given in `SCRATCHD_NAME` is on no command line while the
    /// run lasts, not in the command's environment under that variable (it
    /// has `SCRATCHD_EXPORT`), and not in the run's info-level log, which
    /// shows its fingerprint; `--name -` reads it from standard input and
    /// leaves the rest of the input to the command.
    fn names_stay_off_command_lines_and_out_of_info_logs(front) {
        let (_server, uri) = server("64M");
        let name = format!("secret-{}", std::process::id());
        let stop = tempfile::tempdir().unwrap();
        let stop_file = stop.path().join("stop");
        let script = format!(
            "echo \"$SCRATCHD_EXPORT\"; while [ ! -e {} ]; do sleep 0.05; done; \
             echo \"name variable: ${{SCRATCHD_NAME:-unset}}\"",
            stop_file.display()
        );
        let mut run = scratchd_run(Some(front), &["-v", "--server", &uri], &script)
            .env("SCRATCHD_NAME", &name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(run.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), name, "the command's disk is the named one");
        assert_eq!(crate::util::cmdlines_containing(&name), Vec::<String>::new());
        std::fs::write(&stop_file, "").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let log = run.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&log.stderr);
        assert_eq!(rest, "name variable: unset\n");
        assert!(!log.contains(&name), "{log}");
        let fingerprint = crate::util::fingerprint(&name);
        assert!(log.contains(&fingerprint), "{log}");

        let script = "echo \"$SCRATCHD_EXPORT\"; cat";
        let mut run = scratchd_run(Some(front), &["--server", &uri, "--name", "-"], script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = run.stdin.take().unwrap();
        std::io::Write::write_all(&mut input, format!("{name}\nthe command's input\n").as_bytes())
            .unwrap();
        drop(input);
        let out = run.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(stdout(&out), format!("{name}\nthe command's input\n"));
    }

    /// A run's command snapshots its own disk with its file system frozen,
    /// as docs/RUN.md shows: `--freeze "$SCRATCH_DIR"` is accepted as a
    /// live run's disk (a run has no attachment record: its loop device's
    /// FUSE file, or its nbd device's label, names the run), and the
    /// snapshot starts a run that reads what was written before it.
    fn a_run_snapshots_its_own_disk_frozen(front) {
        let (_server, uri) = server("64M");
        let script = format!(
            r#"echo prepared > "$SCRATCH_DIR/tool" &&
               {SCRATCHD} snapshot take "{uri}" --name frozen-root --freeze "$SCRATCH_DIR" base &&
               echo after > "$SCRATCH_DIR/later""#
        );
        let (code, out, _) =
            run_to_end(&mut scratchd_run(Some(front), &["--server", &uri, "--name", "frozen-root"], &script));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((code, stdout(&out).trim()), (0, "base"), "{err}");
        let (code, out, _) = run_to_end(&mut scratchd_run(
            Some(front),
            &["--server", &uri, "--name", "frozen-build", "--from", "base"],
            r#"cat "$SCRATCH_DIR/tool"; ls "$SCRATCH_DIR""#,
        ));
        let text = stdout(&out);
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.starts_with("prepared\n") && !text.contains("later"), "{text}");
    }
}

/// The run's own disk (no `--server`: FUSE, as the kernel cannot serve
/// it): made, mounted from a direct-I/O loop device with the file
/// system's 4 KiB sectors, named afresh, and gone with the run.
#[test]
fn a_command_gets_its_own_mounted_disk_and_nothing_is_left() {
    if skip_without_fuse("a_command_gets_its_own_mounted_disk_and_nothing_is_left") {
        return;
    }
    let script = r#"
        set -e
        echo "$SCRATCHD_MOUNT"
        echo "export=$SCRATCHD_EXPORT"
        # The issue's names for the same, and no URI for a private disk.
        [ "$SCRATCH_DIR" = "$SCRATCHD_MOUNT" ] && [ "$SCRATCH_DEV" = "$SCRATCHD_DEVICE" ]
        [ -z "${SCRATCH_URI+set}" ]
        findmnt -n -o FSTYPE,SOURCE "$SCRATCHD_MOUNT"
        losetup -n -O DIO,LOG-SEC "$SCRATCHD_DEVICE"
        head -c 3000000 /dev/urandom > "$SCRATCHD_MOUNT/data"
        sha256sum "$SCRATCHD_MOUNT/data" | cut -c1-64 > "$SCRATCHD_MOUNT/sum"
        sync -f "$SCRATCHD_MOUNT"
        # O_DIRECT: read through the loop device and the FUSE file, not the
        # page cache.
        dd if="$SCRATCHD_MOUNT/data" iflag=direct bs=1M status=none | sha256sum | cut -c1-64 \
            | cmp - "$SCRATCHD_MOUNT/sum"
        rm "$SCRATCHD_MOUNT/data"
        fstrim "$SCRATCHD_MOUNT" || true
        exit 7
    "#;
    let (code, out, pid) = run_to_end(&mut scratchd_run(None, &["--size", "256M"], script));
    let text = stdout(&out);
    assert_eq!(code, 7, "the command's status is the run's\n{text}");
    let mut lines = text.lines();
    let work = work_dir(lines.next().unwrap());
    let export = lines.next().unwrap();
    // A fresh name with 128 random bits: 32 hex digits.
    let hex = export.strip_prefix("export=run-").expect(export);
    assert_eq!(hex.len(), 32, "{export}");
    let fs: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert!(fs[0] == "ext4" && fs[1].starts_with("/dev/loop"), "{fs:?}");
    let loop_flags: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(loop_flags, ["1", "4096"], "direct I/O, 4 KiB sectors");
    assert_eq!(leftovers(&work, pid), Vec::<String>::new());
}

#[test]
fn a_disk_that_cannot_be_made_is_a_clear_error() {
    let (code, out) = run_status(&mut scratchd_run(None, &["--type", "nosuchfs"], "exit 0"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("mkfs.nosuchfs"), "{err}");
    let (code, out) = run_status(&mut scratchd_run(None, &["--size", "12Q"], "exit 0"));
    assert_eq!(code, 2, "{}", String::from_utf8_lossy(&out.stderr));
    for (args, expected) in [
        (&["--attach", "bogus"][..], "expected auto, kernel or fuse"),
        (&["--server", "http://x"][..], "is not an NBD URI"),
    ] {
        let (code, out) = run_status(&mut scratchd_run(None, args, "exit 0"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A server that is not there: the run fails, saying why.
    let (code, out) = run_status(&mut scratchd_run(
        None,
        &["--server", "nbd+unix:///?socket=/nonexistent/nbd.sock"],
        "exit 0",
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

/// The run's mount namespace follows the host's unmounts: a mount that
/// existed when the run started (another build's disk, on a host whose
/// mounts are shared) and that the host then unmounts is gone in the run
/// too, rather than kept mounted for as long as the run lasts.
#[test]
fn an_unmount_on_the_host_reaches_a_running_run() {
    if skip_without_fuse("an_unmount_on_the_host_reaches_a_running_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (shared, other) = (dir.path().join("shared"), dir.path().join("shared/other"));
    std::fs::create_dir(&shared).unwrap();
    let sh = |script: String| {
        let (code, out) = run_status(Command::new("sh").args(["-c", &script]));
        assert_eq!(
            code,
            0,
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (s, o) = (shared.display(), other.display());
    sh(format!(
        "mount -t tmpfs none {s} && mount --make-shared {s} && mkdir {o} && \
         mount -t tmpfs none {o}"
    ));
    let go = dir.path().join("go");
    let script = format!(
        "echo \"$SCRATCHD_MOUNT\"; while [ ! -e {} ]; do sleep 0.05; done; \
         findmnt -n -o TARGET --mountpoint {o} || echo gone",
        go.display()
    );
    let mut started = start_run(Front::Fuse, &["--size", "64M", "--type", "none"], &script);
    sh(format!("umount {o}"));
    std::fs::write(&go, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut started.out, &mut rest).unwrap();
    started.run.wait().unwrap();
    sh(format!("umount {s}"));
    assert_eq!(
        rest, "gone\n",
        "the run still had the host's unmounted file system"
    );
}

/// `--timeout`, the kernel's request timeout: whole seconds from 1 s to
/// 1 h, and not for the FUSE front end, which has none; anything else is
/// a usage error that says why, before anything is attached.
#[test]
fn a_request_timeout_the_kernel_cannot_take_is_a_usage_error() {
    let range = "is not a whole number of seconds from 1s to 3600s";
    for (args, expected) in [
        (&["--timeout", "0"][..], range),
        (&["--timeout", "1500ms"][..], range),
        (&["--timeout", "61m"][..], range),
        (&["--timeout", "99999999999999999999"][..], "out of range"),
        (&["--timeout", "soon"][..], "invalid duration \"soon\""),
        (
            &["--attach", "fuse", "--timeout", "30"][..],
            "--attach fuse has none",
        ),
    ] {
        let (code, out) = run_status(&mut scratchd_run(None, args, "echo ran"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!((code, stdout(&out).as_str()), (2, ""), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// A build that writes more than the disk's memory may hold sees an I/O
/// error (as on a full thin-provisioned disk), and the run cleans up; the
/// process never grows past the limit.
#[test]
fn a_full_memory_budget_fails_the_write_not_the_host() {
    if skip_without_fuse("a_full_memory_budget_fails_the_write_not_the_host") {
        return;
    }
    let script = r#"
        echo "$SCRATCHD_MOUNT"
        dd if=/dev/urandom of="$SCRATCHD_MOUNT/big" bs=1M count=96 conv=fsync 2>/dev/null
        echo "dd=$?"
    "#;
    let (code, out, pid) = run_to_end(&mut scratchd_run(
        None,
        &["--size", "1G", "--memory-limit", "32M"],
        script,
    ));
    let text = stdout(&out);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("dd=1"),
        "the write past the budget succeeded:\n{text}"
    );
    assert_eq!(
        leftovers(&work_dir(text.lines().next().unwrap()), pid),
        Vec::<String>::new()
    );
}
