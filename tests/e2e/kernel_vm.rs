//! Real kernels for the kernel front: each test here boots one of Debian
//! 12's kernels under qemu with `scripts/vm/guest.sh` (the host's root
//! read-only over 9p, `nbd.ko` loaded) and runs this test binary's guest
//! tests inside it ([`is_guest_test`]: the kernel-only
//! [`crate::kernel_guest`] tests, and the `kernel::` instances of the
//! builder tests shared by both front ends, [`crate::front`]), then reports
//! each guest test's result. One boot per kernel keeps the time down: the
//! guest tests run in parallel within it.
//!
//! They are `#[ignore]`d in a plain `cargo test`: `scripts/test.sh` runs
//! them on their own after the rest of the suite, since two guests under
//! TCG keep the machine's cores busy and the suite has tests that time
//! their clients (`cargo test --test e2e kernel_vm:: -- --ignored` by hand).
//!
//! Guest tests that fail on today's code for a known reason are listed in
//! [`KNOWN_FAILURES`] with the issue finding that fixes them: their
//! failure is reported, not fatal; a listed test that passes fails the run,
//! so that the list is shortened with the fix.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::poll;

/// A guest test that fails on today's code, on some kernels.
struct KnownFailure {
    test: &'static str,
    /// The kernel flavours it fails on.
    kernels: &'static [&'static str],
    why: &'static str,
    /// Whether it fails every time (a pass then means it was fixed), or
    /// only some of the time (a race: a pass proves nothing).
    every_time: bool,
}

/// Guest tests expected to fail today, and why. Empty: the last two
/// (a stalled server's and a busy mount's request unanswered for 120 s on
/// 6.1) were the kernel's receive works starved by their workqueue's
/// rescuer, which attach now checks for (docs/RUN.md, "Every socket read").
const KNOWN_FAILURES: &[KnownFailure] = &[];

/// How long one guest may take, boot to power-off, before it is killed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(420);

#[test]
#[ignore = "boots guest kernels for minutes: scripts/test.sh runs it, after the rest"]
fn debian_12_kernel_6_1() {
    guest_suite("6.1");
}

#[test]
#[ignore = "boots guest kernels for minutes: scripts/test.sh runs it, after the rest"]
fn debian_12_kernel_6_12() {
    guest_suite("6.12");
}

/// Boots kernel `flavour`, runs the guest tests in it and checks each
/// one's result against [`KNOWN_FAILURES`].
fn guest_suite(flavour: &str) {
    // The guest reads the host's whole root through qemu's 9p server,
    // which sees only what qemu's user may read.
    let uid = crate::util::run(Command::new("id").arg("-u"));
    if crate::util::stdout(&uid).trim() != "0" {
        eprintln!("SKIPPED kernel_vm {flavour}: not root");
        return;
    }
    let expected = guest_tests();
    for known in KNOWN_FAILURES {
        assert!(
            expected.iter().any(|name| name == known.test),
            "KNOWN_FAILURES names {}, which is no guest test",
            known.test
        );
    }
    let mut results = Vec::new();
    let mut elapsed = Duration::ZERO;
    for boot in BOOTS {
        let outcome = boot_and_run_guest_tests(flavour, boot);
        let ran = parse_results(&outcome.stdout);
        // The whole guest output goes to the test's output: shown on failure.
        eprintln!("{}", outcome.stdout);
        eprintln!("{}", outcome.stderr);
        assert!(
            !ran.is_empty(),
            "kernel {flavour}, {}: the guest ran no test (status {:?}, {:?}):\n{}",
            boot.what,
            outcome.status,
            outcome.elapsed,
            outcome.stderr
        );
        let all_passed = ran.iter().all(|(_, ok)| *ok);
        assert_eq!(
            outcome.status,
            Some(if all_passed { 0 } else { 101 }),
            "kernel {flavour}, {}: the guest's test run ended unexpectedly",
            boot.what
        );
        results.extend(ran);
        elapsed += outcome.elapsed;
    }
    let mut problems: Vec<String> = expected
        .iter()
        .filter(|name| !results.iter().any(|(n, _)| n == *name))
        .map(|name| format!("{name} gave no result"))
        .collect();
    for (name, passed) in &results {
        let known = KNOWN_FAILURES
            .iter()
            .find(|k| k.test == name && k.kernels.contains(&flavour));
        match (passed, known) {
            (true, None) => eprintln!("kernel {flavour}: {name}: ok"),
            (false, Some(known)) => {
                eprintln!("kernel {flavour}: {name}: KNOWN FAILURE: {}", known.why);
                record_known_failure(flavour, name);
            }
            (false, None) => problems.push(format!("{name} failed")),
            (true, Some(known)) if !known.every_time => eprintln!(
                "kernel {flavour}: {name}: ok this time (fails some of the time: {})",
                known.why
            ),
            (true, Some(_)) => problems.push(format!(
                "{name} passes now: take it off kernel_vm::KNOWN_FAILURES for {flavour}"
            )),
        }
    }
    eprintln!(
        "kernel {flavour}: {} guest tests in {} boots, {elapsed:?}",
        results.len(),
        BOOTS.len()
    );
    assert!(
        problems.is_empty(),
        "kernel {flavour}: {} (a failed guest run's dmesg and nbd trace are kept under {})",
        problems.join("; "),
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("kernel-vm")
            .display()
    );
}

/// One boot of a guest: the modules loaded at boot, and which guest tests
/// it runs (libtest's arguments: filters, which match anywhere in a test's
/// name, and `--skip`s).
struct Boot {
    what: &'static str,
    modules: &'static str,
    tests: &'static [&'static str],
}

/// The kernel-only guest tests start with this.
const GUEST_ONLY: &str = "kernel_guest::";

/// The shared builder tests' instances on the kernel front have this in
/// their names (`attach::kernel::NAME`, see [`crate::front`]).
const SHARED_ON_KERNEL: &str = "::kernel::";

/// The guest tests that need nbd not loaded start with this.
const WITHOUT_NBD: &str = "kernel_guest::without_nbd";

/// Whether test `name` (with its module path) is one the guests run.
fn is_guest_test(name: &str) -> bool {
    name.starts_with(GUEST_ONLY) || name.contains(SHARED_ON_KERNEL)
}

const BOOTS: &[Boot] = &[
    Boot {
        what: "nbd loaded",
        modules: "nbd loop fuse ext4",
        tests: &[GUEST_ONLY, SHARED_ON_KERNEL, "--skip", WITHOUT_NBD],
    },
    Boot {
        what: "nbd not loaded",
        modules: "loop fuse ext4",
        tests: &[WITHOUT_NBD],
    },
];

/// What a guest run gave back.
struct GuestOutcome {
    /// guest.sh's exit status (the guest test binary's, or 124/125 for a
    /// timeout or a harness failure); `None` if a signal ended it.
    status: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs this test binary's ignored guest tests that `boot` names in a
/// guest running kernel `flavour`.
fn boot_and_run_guest_tests(flavour: &str, boot: &Boot) -> GuestOutcome {
    for tool in ["qemu-system-x86_64", "busybox", "cpio", "depmod"] {
        crate::util::require(tool);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm/guest.sh");
    let exe = std::env::current_exe().expect("the test binary's path");
    // Files, not pipes: guest.sh writes the guest's output only after
    // qemu ends, and an unread pipe would block it.
    let logs = tempfile::tempdir().expect("tempdir");
    let file = |name: &str| std::fs::File::create(logs.path().join(name)).expect("log file");
    let kept = kept_logs(flavour, boot);
    let _ = std::fs::remove_dir_all(&kept);
    let started = Instant::now();
    let child = Command::new(&script)
        .args([
            "--timeout",
            &GUEST_TIMEOUT.as_secs().to_string(),
            flavour,
            "--",
        ])
        .arg(exe)
        .args(["--ignored", "--test-threads=8"])
        .args(boot.tests)
        .env("SCRATCHD_VM_MODULES", boot.modules)
        .env("SCRATCHD_VM_KEEP_FAILED", &kept)
        // guest.sh's run directory inside ours: gone with it even when
        // guest.sh itself had to be killed.
        .env("TMPDIR", logs.path())
        .stdin(Stdio::null())
        .stdout(file("stdout"))
        .stderr(file("stderr"))
        // Its own process group, with qemu in it: killed as one.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let mut guard = GroupGuard(child);
    // guest.sh kills qemu itself after GUEST_TIMEOUT; this is the backstop
    // for guest.sh hanging before or after.
    let status = poll(GUEST_TIMEOUT + Duration::from_secs(180), || {
        guard.0.try_wait().expect("try_wait")
    });
    drop(guard);
    let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
    let (stdout, stderr) = (read("stdout"), read("stderr"));
    let status = status.unwrap_or_else(|| {
        panic!(
            "kernel {flavour}: guest.sh still ran after {:?}: killed\n{stderr}",
            started.elapsed()
        )
    });
    GuestOutcome {
        status: status.code(),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// Where guest.sh keeps a failed guest run's directory: its dmesg, the
/// nbd driver's trace of every request, the console log.
fn kept_logs(flavour: &str, boot: &Boot) -> PathBuf {
    let slug = boot.what.replace(' ', "-");
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-vm/{flavour}-{slug}"))
}

/// Notes a known failure where `scripts/test.sh` shows it (libtest shows a
/// passing test's output to nobody), so that each occurrence is seen and
/// its kept logs can be read.
fn record_known_failure(flavour: &str, test: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-vm");
    let file = dir.join("known-failures");
    let line = format!(
        "kernel {flavour}: {test} failed (known, intermittent); guest logs: {}/{flavour}-*\n",
        dir.display()
    );
    let appended = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
        })
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot note the known failure in {}: {e}", file.display());
    }
}

/// The names of the guest tests, as this test binary lists them.
fn guest_tests() -> Vec<String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let list = crate::util::run(Command::new(exe).args(["--list", "--ignored"]));
    crate::util::stdout(&list)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| is_guest_test(name))
        .map(str::to_owned)
        .collect()
}

/// `(test name, passed)` of each guest test, from libtest's `test NAME
/// ... ok|FAILED` lines.
fn parse_results(stdout: &str) -> Vec<(String, bool)> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("test ")?;
            let (name, result) = rest.split_once(" ... ")?;
            if !is_guest_test(name) {
                return None;
            }
            match result.trim() {
                "ok" => Some((name.to_owned(), true)),
                "FAILED" => Some((name.to_owned(), false)),
                _ => None,
            }
        })
        .collect()
}

/// SIGKILL to process group `pgid`.
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status();
}

/// guest.sh's process: its whole group (qemu included) is killed on drop,
/// so that no qemu outlives a test that panicked.
struct GroupGuard(Child);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            kill_group(self.0.id());
            let _ = self.0.wait();
        }
    }
}
