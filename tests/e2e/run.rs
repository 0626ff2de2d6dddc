//! `scratchd run`: a command on a scratch disk of its own, attached through
//! the kernel's FUSE and loop drivers and mounted; nothing is left behind,
//! however the run ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{eventually, run_status, skip_without_fuse, stdout, SCRATCHD};

fn scratchd_run(args: &[&str], command: &str) -> Command {
    let mut c = Command::new(SCRATCHD);
    c.arg("run").args(args).args(["--", "sh", "-c", command]);
    c
}

/// What a run can leave behind, found by the directory it worked in: loop
/// devices on its FUSE file, mounts under it, the directory itself.
fn leftovers(work: &Path) -> Vec<String> {
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

/// Starts a run whose command prints `$SCRATCHD_MOUNT` first; returns the
/// run, the rest of its output, and its work directory once attached.
fn start_run(
    args: &[&str],
    script: &str,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    PathBuf,
) {
    let mut run = scratchd_run(args, script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    (run, out, work_dir(&line))
}

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
    let (code, out) = run_status(&mut scratchd_run(&["--size", "256M"], script));
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
    assert_eq!(leftovers(&work), Vec::<String>::new());
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_the_signal() {
    if skip_without_fuse("a_command_killed_by_a_signal_gives_128_plus_the_signal") {
        return;
    }
    let (code, _) = run_status(&mut scratchd_run(&["--size", "64M"], "kill -TERM $$"));
    assert_eq!(code, 128 + 15);
}

#[test]
fn a_disk_that_cannot_be_made_is_a_clear_error() {
    let (code, out) = run_status(&mut scratchd_run(&["--type", "nosuchfs"], "exit 0"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("mkfs.nosuchfs"), "{err}");
    let (code, out) = run_status(&mut scratchd_run(&["--size", "12Q"], "exit 0"));
    assert_eq!(code, 2, "{}", String::from_utf8_lossy(&out.stderr));
    for (args, expected) in [
        (&["--attach", "bogus"][..], "expected auto, kernel or fuse"),
        (&["--server", "http://x"][..], "is not an NBD URI"),
    ] {
        let (code, out) = run_status(&mut scratchd_run(args, "exit 0"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A server that is not there: the run fails, saying why.
    let (code, out) = run_status(&mut scratchd_run(
        &["--server", "nbd+unix:///?socket=/nonexistent/nbd.sock"],
        "exit 0",
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
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
    let (code, out) = run_status(&mut scratchd_run(
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
        leftovers(&work_dir(text.lines().next().unwrap())),
        Vec::<String>::new()
    );
}

/// `kill -9` of a run: the kernel kills its command, tears down its private
/// mounts with the namespace, detaches the loop device; the next run sweeps
/// the empty work directory.
#[test]
fn kill_9_of_a_run_leaves_nothing() {
    if skip_without_fuse("kill_9_of_a_run_leaves_nothing") {
        return;
    }
    let (mut run, _, work) = start_run(
        &["--size", "64M"],
        "echo \"$SCRATCHD_MOUNT\"; exec sleep 60",
    );
    assert!(!leftovers(&work).is_empty(), "the run is attached");
    run.kill().unwrap();
    run.wait().unwrap();
    eventually(
        "the killed run's loop device and mounts to go",
        Duration::from_secs(10),
        || leftovers(&work) == [format!("directory {}", work.display())],
    );
    let (code, _) = run_status(&mut scratchd_run(
        &["--size", "64M", "--type", "none"],
        "true",
    ));
    assert_eq!(code, 0);
    assert_eq!(leftovers(&work), Vec::<String>::new());
}

/// With `--server`, the disk is a tmpdisk export of a `scratchd serve`,
/// reached by our client over four connections; the run names it.
#[test]
fn a_run_on_a_server_disk() {
    if skip_without_fuse("a_run_on_a_server_disk") {
        return;
    }
    let server = crate::util::Server::start(&["tmpdisk", "size=256M"]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let script = r#"
        set -e
        echo "$SCRATCHD_MOUNT"
        echo "$SCRATCHD_EXPORT"
        echo "$SCRATCH_URI"
        [ "$SCRATCH_DIR" = "$SCRATCHD_MOUNT" ] && [ "$SCRATCH_DEV" = "$SCRATCHD_DEVICE" ]
        head -c 2000000 /dev/urandom > "$SCRATCHD_MOUNT/data"
        sha256sum < "$SCRATCHD_MOUNT/data" > "$SCRATCHD_MOUNT/sum"
        sync -f "$SCRATCHD_MOUNT"
        dd if="$SCRATCHD_MOUNT/data" iflag=direct bs=1M status=none | sha256sum | cmp - "$SCRATCHD_MOUNT/sum"
    "#;
    let (code, out) = run_status(&mut scratchd_run(
        &["--server", &uri, "--name", "build-remote-1"],
        script,
    ));
    let text = stdout(&out);
    assert_eq!(code, 0, "{text}{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = text.lines();
    let work = work_dir(lines.next().unwrap());
    assert_eq!(lines.next(), Some("build-remote-1"));
    assert_eq!(
        lines.next(),
        Some(server.uri_for("build-remote-1").as_str())
    );
    assert_eq!(leftovers(&work), Vec::<String>::new());
}

/// A server that goes away mid-build turns into I/O errors for the build,
/// never a hang, and the run still cleans up.
#[test]
fn a_server_that_dies_mid_run_fails_the_build_not_the_host() {
    if skip_without_fuse("a_server_that_dies_mid_run_fails_the_build_not_the_host") {
        return;
    }
    let server = crate::util::Server::start(&["tmpdisk", "size=256M"]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let script = r#"
        echo "$SCRATCHD_MOUNT"
        while [ ! -e "$SCRATCHD_MOUNT/../go" ]; do sleep 0.05; done
        dd if=/dev/urandom of="$SCRATCHD_MOUNT/f" bs=1M count=8 oflag=direct status=none
        echo "dd=$?"
    "#;
    let (mut run, mut out, work) = start_run(&["--server", &uri], script);
    server.signal("KILL");
    std::fs::write(work.join("go"), "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = run.wait().unwrap();
    assert!(
        rest.contains("dd=1"),
        "the write on a dead server succeeded: {rest}"
    );
    assert!(status.success(), "{status}");
    assert_eq!(leftovers(&work), Vec::<String>::new());
}

/// A build that leaves a process behind with its working directory on the
/// disk: the file system is detached lazily, served until that process
/// lets go (within a grace period), and the run ends with nothing left.
#[test]
fn a_process_left_behind_on_the_disk_does_not_hang_the_run() {
    if skip_without_fuse("a_process_left_behind_on_the_disk_does_not_hang_the_run") {
        return;
    }
    let script = r#"
        echo "$SCRATCHD_MOUNT"
        cd "$SCRATCHD_MOUNT" && head -c 1000000 /dev/urandom > f
        (sleep 2; cat f > /dev/null) &
    "#;
    let started = std::time::Instant::now();
    let (code, out) = run_status(&mut scratchd_run(&["--size", "64M"], script));
    let took = started.elapsed();
    assert_eq!(code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(15), "the run took {took:?}");
    let work = work_dir(stdout(&out).lines().next().unwrap());
    eventually(
        "the lazily detached disk to go",
        Duration::from_secs(10),
        || leftovers(&work).is_empty(),
    );
}

/// Two runs against one server at once get a disk each: what one writes,
/// the other never sees.
#[test]
fn two_concurrent_runs_on_one_server_get_independent_disks() {
    if skip_without_fuse("two_concurrent_runs_on_one_server_get_independent_disks") {
        return;
    }
    let server = crate::util::Server::start(&["tmpdisk", "size=128M"]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let script = r#"
        echo "$SCRATCHD_EXPORT" > "$SCRATCHD_MOUNT/me"
        sleep 1
        ls "$SCRATCHD_MOUNT"
        cat "$SCRATCHD_MOUNT/me"
    "#;
    let runs: Vec<_> = (0..2)
        .map(|_| {
            scratchd_run(&["--server", &uri], script)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<String> = runs
        .into_iter()
        .map(|r| {
            let out = r.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
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

/// SIGTERM to a run mid-build: passed on to the command, which stops; the
/// run then cleans up and reports the command's status.
#[test]
fn sigterm_to_a_run_mid_build_cleans_up() {
    if skip_without_fuse("sigterm_to_a_run_mid_build_cleans_up") {
        return;
    }
    let (mut run, _, work) = start_run(
        &["--size", "64M"],
        "echo \"$SCRATCHD_MOUNT\"; exec sleep 30",
    );
    run_status(Command::new("kill").args(["-TERM", &run.id().to_string()]));
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status}");
    assert_eq!(leftovers(&work), Vec::<String>::new());
}

/// The name given in `SCRATCHD_NAME` is on no command line while the run
/// lasts, not in the command's environment under that variable (it has
/// `SCRATCHD_EXPORT`), and not in the run's info-level log, which shows
/// its fingerprint; `--name -` reads it from standard input and leaves the
/// rest of the input to the command.
#[test]
fn names_stay_off_command_lines_and_out_of_info_logs() {
    if skip_without_fuse("names_stay_off_command_lines_and_out_of_info_logs") {
        return;
    }
    let server = crate::util::Server::start(&["tmpdisk", "size=64M"]);
    let uri = format!("nbd+unix:///?socket={}", server.sock.display());
    let name = format!("secret-{}", std::process::id());
    let stop = tempfile::tempdir().unwrap();
    let stop_file = stop.path().join("stop");
    let script = format!(
        "echo \"$SCRATCHD_EXPORT\"; while [ ! -e {} ]; do sleep 0.05; done; \
         echo \"name variable: ${{SCRATCHD_NAME:-unset}}\"",
        stop_file.display()
    );
    let mut run = Command::new(SCRATCHD)
        .args(["run", "-v", "--server", &uri, "--", "sh", "-c", &script])
        .env("SCRATCHD_NAME", &name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), name, "the command's disk is the named one");
    assert_eq!(
        crate::util::cmdlines_containing(&name),
        Vec::<String>::new()
    );
    std::fs::write(&stop_file, "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let log = run.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&log.stderr);
    assert_eq!(rest, "name variable: unset\n");
    assert!(!log.contains(&name), "{log}");
    let fingerprint = crate::util::fingerprint(&name);
    assert!(log.contains(&fingerprint), "{log}");

    let mut run = Command::new(SCRATCHD)
        .args(["run", "--server", &uri, "--name", "-", "--"])
        .args(["sh", "-c", "echo \"$SCRATCHD_EXPORT\"; cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = run.stdin.take().unwrap();
    std::io::Write::write_all(
        &mut input,
        format!("{name}\nthe command's input\n").as_bytes(),
    )
    .unwrap();
    drop(input);
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("{name}\nthe command's input\n"));
}
