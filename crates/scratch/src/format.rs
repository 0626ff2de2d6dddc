//! Formatting a new disk: `mkfs` with throw-away options, or the operator's
//! shell command, run with a time limit.
//!
//! The disk is handed to the command as `/proc/PID/fd/N`: a path to an open
//! descriptor of this process (a memfd or an unnamed file), so nothing with a
//! name exists while mkfs runs and a crash leaves nothing behind.
//!
//! The command runs in its own process group with stdin and stdout on
//! `/dev/null` and stderr on a pipe. One thread waits for it with `poll` on a
//! pidfd and the pipe together, keeping the last few KiB of stderr, so there
//! is no sleeping and no extra thread. A caller may also pass a [`Watch`],
//! which that thread calls at least every [`WATCH_INTERVAL`] and which can
//! stop the command (a disk image outgrowing its budget). When the command
//! exits, overruns the timeout or is stopped, the whole group gets SIGKILL (a
//! format command must not leave helpers holding the disk open); the leader
//! is reaped only after that, so its process-group id cannot have been
//! reused.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{kill_process_group, pidfd_open, Pid, PidfdFlags, Signal};

use crate::config::{FormatKind, FormatSpec};
use crate::disk::ImageError;

/// Stderr bytes kept for the error message.
const STDERR_KEEP: usize = 4096;
/// The longest stderr summary put in an NBD error message.
const SUMMARY_LEN: usize = 300;
/// How often a [`Watch`] is called while the command runs: what the command
/// can write in between is how far it can overshoot what the watch checks.
const WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Called while a format command runs; an error stops the command and is
/// the reason given for the failure.
pub type Watch<'a> = &'a mut dyn FnMut() -> Result<(), ImageError>;

/// Why formatting a disk failed. The ways the command itself failed carry
/// the summary of its stderr (possibly empty), shown after the reason.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("spawned a child without a pid")]
    NoPid,
    #[error("no stderr pipe")]
    NoStderrPipe,
    #[error("cannot watch {program}: {source}")]
    Watch { program: String, source: io::Error },
    #[error("cannot wait for {program}: {source}")]
    Wait { program: String, source: io::Error },
    #[error("format command timed out after {timeout:?} and was killed{}", tail(.stderr))]
    TimedOut { timeout: Duration, stderr: String },
    #[error("format command failed with exit status {code}{}", tail(.stderr))]
    Exit { code: i32, stderr: String },
    #[error("format command killed by signal {signal}{}", tail(.stderr))]
    Signal { signal: i32, stderr: String },
    /// The [`Watch`] stopped the command.
    #[error("{reason}{}", tail(.stderr))]
    Stopped {
        #[source]
        reason: ImageError,
        stderr: String,
    },
}

/// The stderr summary as the end of a [`FormatError`] message.
fn tail(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Something that turns a blank disk into a formatted one.
pub trait Format: Send + Sync {
    /// Formats the `size`-byte disk at `disk`, calling `watch` (if any)
    /// while the command runs; the error's message is one line, for the
    /// client and the log.
    fn format(&self, disk: &Path, size: u64, watch: Option<Watch>) -> Result<(), FormatError>;

    /// Whether [`Format::format`] does nothing (`type=none`).
    fn is_blank(&self) -> bool {
        false
    }
}

impl Format for FormatSpec {
    fn format(&self, disk: &Path, size: u64, watch: Option<Watch>) -> Result<(), FormatError> {
        match self.command(disk, size) {
            Some(cmd) => run_with_timeout(cmd, self.timeout, watch),
            None => Ok(()),
        }
    }

    fn is_blank(&self) -> bool {
        self.kind == FormatKind::None
    }
}

/// Where mkfs is looked for.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl FormatSpec {
    /// The command that formats `disk`, or `None` for a blank disk.
    fn command(&self, disk: &Path, size: u64) -> Option<Command> {
        let label = self.label.as_deref();
        let cmd = match &self.kind {
            FormatKind::None => return None,
            FormatKind::Command(script) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(script)
                    .env("disk", disk)
                    .env("size", size.to_string())
                    .env("type", &self.fs_type)
                    .env("label", label.unwrap_or(""))
                    .envs(self.env.iter().map(|(k, v)| (k, v)));
                cmd
            }
            FormatKind::Filesystem(fs) => {
                let mut cmd = Command::new("mkfs");
                // `scratchd run` runs this as root: mkfs (and the
                // mkfs.TYPE it runs) come from the system's directories,
                // not from whatever PATH the caller had.
                cmd.env("PATH", SYSTEM_PATH)
                    .arg("-t")
                    .arg(fs)
                    .args(mkfs_options(fs, label, size))
                    .arg(disk);
                cmd
            }
        };
        Some(cmd)
    }
}

/// The largest ext4 journal a scratch disk gets: `-J size=64`, in MiB.
const JOURNAL_CAP: &str = "size=64";
/// The disk size from which mke2fs would make a larger journal than
/// [`JOURNAL_CAP`] (its `ext2fs_default_journal_size`: 128 MiB from 4 Mi
/// blocks of 4 KiB on; checked with mke2fs 1.47.0: 64M for 16383 MiB,
/// 128M for 16 GiB).
const JOURNAL_CAPPED_FROM: u64 = 16 << 30;

/// `mkfs` options for a throw-away disk of type `fs` and `size` bytes.
///
/// ext2/3/4: no reserved blocks (`-m 0`: nobody needs root's 5% on a build
/// disk), lazy inode table and journal initialisation, and 4 KiB blocks
/// whatever the size (mke2fs picks 1 KiB for small disks), matching the
/// preferred block size every export advertises, so the disk also mounts on
/// a device with 4 KiB sectors (`scratchd run`'s loop device).
///
/// ext4 keeps its journal, not for crashes (a scratch disk never has to
/// survive one) but for fsync: without a journal, ext4 writes each synced
/// file's inode block and every new parent directory one after another,
/// each a round trip to the server, where a journal commits them in one go.
/// dpkg's install, ~8,000 fsyncs, took 14% less time with it through
/// `scratchd run` and nbdfuse, and 9% less on a local loop device
/// (docs/PERFORMANCE.md, "ext4's journal on a scratch disk"). The journal
/// is capped at [`JOURNAL_CAP`]: it is written round and round, so on
/// a RAM disk it ends up all allocated, and mke2fs would give a 100 GiB
/// disk 512 MiB of it.
///
/// ext4 also gets `discard`, although the disk is already all zeros: the
/// disk is always a regular file here (a memfd or an unnamed file), where
/// mke2fs's discard punches holes, costs nothing on an empty file, and
/// tells it that the inode tables read as zeros. It then flags them
/// zeroed. Without that flag, the kernel's `ext4lazyinit` thread zeroes
/// every inode table after the first mount, during the build: on a 20 GiB
/// disk some 160 requests zeroing ~310 MiB, through every layer between
/// the file system and the server. (`assume_storage_prezeroed` says the same
/// without the discard, but only from e2fsprogs 1.47.0 on.) ext2 and ext3
/// have no such flags and no lazy zeroing: `nodiscard`, the pass being of
/// no use there.
///
/// Types without a known quiet or force flag get only the label.
pub(crate) fn mkfs_options(fs: &str, label: Option<&str>, size: u64) -> Vec<String> {
    let mut args: Vec<&str> = match fs {
        "ext4" => vec![
            "-F",
            "-q",
            "-b",
            "4096",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,discard",
        ],
        "ext2" | "ext3" => vec![
            "-F",
            "-q",
            "-b",
            "4096",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ],
        "xfs" | "btrfs" => vec!["-f", "-q", "-K"],
        _ => vec![],
    };
    if fs == "ext4" && size >= JOURNAL_CAPPED_FROM {
        args.extend(["-J", JOURNAL_CAP]);
    }
    if let Some(label) = label {
        args.push(if matches!(fs, "vfat" | "fat" | "msdos") {
            "-n"
        } else {
            "-L"
        });
        args.push(label);
    }
    args.into_iter().map(String::from).collect()
}

/// How the wait for a format command ended.
enum Ending {
    Exited,
    TimedOut,
    /// The watch stopped it, for this reason.
    Stopped(ImageError),
}

/// Runs `cmd` to completion within `timeout`, unless `watch` stops it; the
/// error says why it failed, with the end of its stderr.
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    watch: Option<Watch>,
) -> Result<(), FormatError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|source| FormatError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = Pid::from_raw(child.id() as i32).ok_or(FormatError::NoPid)?;
    let mut stderr = child.stderr.take().ok_or(FormatError::NoStderrPipe)?;
    let watched = pidfd_open(pid, PidfdFlags::empty())
        .map_err(io::Error::from)
        .and_then(|pidfd| {
            rustix::io::ioctl_fionbio(&stderr, true)?;
            Ok(wait(&pidfd, &mut stderr, Instant::now() + timeout, watch))
        });
    // Whatever happened, no member of the group may outlive the format step.
    let _ = kill_process_group(pid, Signal::KILL);
    let status = child.wait();
    let (ending, tail) = watched.map_err(|source| FormatError::Watch {
        program: program.clone(),
        source,
    })?;
    let stderr = summarize(&tail);
    let status = status.map_err(|source| FormatError::Wait { program, source })?;
    Err(match ending {
        Ending::TimedOut => FormatError::TimedOut { timeout, stderr },
        Ending::Stopped(reason) => FormatError::Stopped { reason, stderr },
        Ending::Exited if status.success() => return Ok(()),
        Ending::Exited => match status.code() {
            Some(code) => FormatError::Exit { code, stderr },
            None => FormatError::Signal {
                signal: status.signal().unwrap_or(0),
                stderr,
            },
        },
    })
}

/// Collects stderr until the process behind `pidfd` exits, the deadline
/// passes or `watch` fails; returns which, and the last bytes of stderr.
fn wait(
    pidfd: &impl AsFd,
    stderr: &mut impl ReadFd,
    deadline: Instant,
    mut watch: Option<Watch>,
) -> (Ending, Vec<u8>) {
    let mut tail = Vec::new();
    let mut open = true;
    loop {
        let mut left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (Ending::TimedOut, tail);
        }
        if watch.is_some() {
            left = left.min(WATCH_INTERVAL);
        }
        let timeout = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        });
        let mut fds = vec![PollFd::new(pidfd, PollFlags::IN)];
        if open {
            fds.push(PollFd::new(stderr, PollFlags::IN));
        }
        if poll(&mut fds, Some(&timeout)).is_err() {
            continue; // EINTR
        }
        let exited = !fds[0].revents().is_empty();
        let readable = fds.get(1).is_some_and(|f| !f.revents().is_empty());
        drop(fds);
        if readable || exited {
            open = drain(stderr, &mut tail) && open;
        }
        if exited {
            return (Ending::Exited, tail);
        }
        if let Some(Err(why)) = watch.as_mut().map(|watch| watch()) {
            return (Ending::Stopped(why), tail);
        }
    }
}

/// A readable descriptor (the stderr pipe).
trait ReadFd: Read + AsFd {}
impl<T: Read + AsFd> ReadFd for T {}

/// Reads what is available into `tail` (keeping its last [`STDERR_KEEP`]
/// bytes); false at end of file.
fn drain(r: &mut impl Read, tail: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_KEEP {
                    tail.drain(..tail.len() - STDERR_KEEP);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return e.kind() == io::ErrorKind::WouldBlock,
        }
    }
}

/// The last non-empty lines of `stderr`, joined with ` | ` and clipped to
/// [`SUMMARY_LEN`] bytes (from the end: the last words matter most).
fn summarize(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(3)..].join(" | ");
    if joined.len() <= SUMMARY_LEN {
        return joined;
    }
    let mut start = joined.len() - SUMMARY_LEN;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &joined[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> Result<(), FormatError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        run_with_timeout(cmd, timeout, None)
    }

    #[test]
    fn success_failure_and_stderr_summary() {
        sh("echo fine >&2; exit 0", Duration::from_secs(10)).unwrap();
        let err = sh(
            "echo one >&2; echo; echo boom >&2; exit 3",
            Duration::from_secs(10),
        )
        .unwrap_err();
        match &err {
            FormatError::Exit { code: 3, stderr } => assert_eq!(stderr, "one | boom"),
            other => panic!("{other:?}"),
        }
        // What the client and the log see.
        assert_eq!(
            err.to_string(),
            "format command failed with exit status 3: one | boom"
        );
        let err = sh("kill -9 $$", Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(err, FormatError::Signal { signal: 9, .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "format command killed by signal 9");
    }

    #[test]
    fn a_hanging_command_and_its_children_are_killed_at_the_timeout() {
        let start = Instant::now();
        let err = sh(
            "echo started >&2; sleep 30 & sleep 30",
            Duration::from_millis(300),
        )
        .unwrap_err();
        match err {
            FormatError::TimedOut { timeout, stderr } => {
                assert_eq!(
                    (timeout, stderr.as_str()),
                    (Duration::from_millis(300), "started")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_watch_is_called_while_the_command_runs_and_can_stop_it() {
        let start = Instant::now();
        let mut calls = 0;
        let mut watch = || {
            calls += 1;
            if calls < 5 {
                Ok(())
            } else {
                Err(ImageError::OverBudget {
                    kind: "memory",
                    allocated: 2,
                    others: 0,
                    limit: 1,
                })
            }
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 30 & sleep 30");
        let err = run_with_timeout(cmd, Duration::from_secs(60), Some(&mut watch)).unwrap_err();
        match &err {
            FormatError::Stopped {
                reason: ImageError::OverBudget { kind: "memory", .. },
                stderr,
            } => assert_eq!(stderr, ""),
            other => panic!("{other:?}"),
        }
        assert!(err
            .to_string()
            .starts_with("the format command exceeded the memory budget"));
        assert_eq!(calls, 5);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn stderr_is_clipped_from_the_end() {
        let long = "x".repeat(1000) + "END";
        let s = summarize(long.as_bytes());
        assert!(s.len() <= SUMMARY_LEN + 3 && s.ends_with("END") && s.starts_with("..."));
        assert_eq!(summarize(b""), "");
        let err = sh(
            "head -c 100000 /dev/zero | tr '\\0' y >&2; exit 1",
            Duration::from_secs(10),
        )
        .unwrap_err();
        match err {
            FormatError::Exit { code: 1, stderr } => assert!(stderr.len() <= SUMMARY_LEN + 3),
            other => panic!("{other:?}"),
        }
    }

    /// Checked with the real mke2fs and dumpe2fs: an ext4 scratch disk has
    /// its journal, capped, and its inode tables flagged zeroed, so no
    /// kernel thread zeroes them after the first mount.
    #[test]
    fn ext4_has_a_capped_journal_and_inode_tables_flagged_zeroed() {
        let size = 20 << 30;
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(size).unwrap();
        let spec = FormatSpec {
            kind: FormatKind::Filesystem("ext4".into()),
            fs_type: "ext4".into(),
            label: None,
            env: vec![],
            timeout: Duration::from_secs(30),
        };
        spec.format(image.path(), size, None).unwrap();
        let out = Command::new("dumpe2fs")
            .env("PATH", SYSTEM_PATH)
            .arg(image.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let journal = text.lines().find(|l| l.starts_with("Total journal size:"));
        assert_eq!(
            journal.map(|l| l.split_whitespace().last()),
            Some(Some("64M"))
        );
        let groups: Vec<&str> = text.lines().filter(|l| l.contains(": (Blocks ")).collect();
        // 20 GiB of 4 KiB blocks: 160 groups of 32768 blocks.
        assert_eq!(groups.len(), 160);
        for group in groups {
            assert!(group.contains("ITABLE_ZEROED"), "{group}");
        }
    }

    #[test]
    fn filesystem_options() {
        let ext4 = mkfs_options("ext4", None, 20 << 30);
        assert!(ext4.ends_with(&["-J".to_string(), "size=64".to_string()]));
        assert!(!mkfs_options("ext4", None, 8 << 30).contains(&"-J".to_string()));
        assert_eq!(mkfs_options("vfat", Some("L"), 1 << 30), ["-n", "L"]);
        assert_eq!(mkfs_options("xfs", Some("L"), 1 << 30)[3..], ["-L", "L"]);
        assert!(mkfs_options("weird", None, 1 << 30).is_empty());
    }
}
