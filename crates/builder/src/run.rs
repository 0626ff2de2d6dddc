//! `scratchd run`: one command that gives a build its own scratch disk,
//! mounted, runs the build on it, and always cleans up.
//!
//! The path of a run, each step undone in reverse by a guard:
//! 1. a private mount namespace ([`scratchd_attach::ns`]): every mount of the
//!    run is invisible to the host and dies with the run, even after
//!    `kill -9`;
//! 2. the disk: with `--server URI`, the export `--name` (or a fresh name)
//!    on that server, reached by our NBD client over `--connections`
//!    connections (the server creates and formats it: a tmpdisk export);
//!    without, a scratch disk of this process's own (the tmpdisk machinery
//!    and budgets of `scratchd serve`, no socket in between);
//! 3. the disk as a block device, by the front end `--attach` chooses
//!    ([`crate::frontend`]): a FUSE file served by threads that call the
//!    disk directly and a direct-I/O loop device on it, detached by the
//!    kernel when its mount goes; or, for a disk on a server, the client's
//!    sockets handed to the kernel's nbd driver, `/dev/nbdN`;
//! 4. the file system mounted at `--mount` (or a fresh directory);
//! 5. the command, with `SCRATCH_DIR`, `SCRATCH_DEV`, `SCRATCH_URI` (a
//!    disk on a server only) and the older `SCRATCHD_MOUNT`,
//!    `SCRATCHD_DEVICE`, `SCRATCHD_EXPORT` in its environment; its exit
//!    status is the run's.
//!
//! The disk of step 2 without `--server` is the caller's ([`LocalDisk`]):
//! the binary makes it with the tmpdisk machinery, which this crate does
//! not depend on. Steps 3 and 4 are the front end's, shared with
//! `scratchd attach`.
//!
//! A run that is killed (`kill -9`) cannot unmount: its namespace's mounts
//! are torn down by the kernel when the namespace's last process exits.
//! That teardown writes the file system back through the FUSE file, whose
//! server was the killed process, and would wait for it forever. So each
//! run whose front end is served by this process (FUSE) starts a watchdog
//! process (`scratchd run-watchdog`, in the same namespace, in a process
//! group of its own so that Ctrl-C spares it): told the FUSE connection's
//! number, it waits for the run to say "done"; if the run's end of the
//! pipe closes first, it aborts the connection, so that every pending
//! write fails at once and the teardown completes. The kernel front end
//! needs none: a killed run's mount going makes the kernel disconnect the
//! device.

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Instant;

use scratchd_attach::ns;
use scratchd_client::Target;
use scratchd_store::BlockDevice;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info};

use crate::frontend::{AttachError, Disk, FrontEndOptions, Origin, Setup};
use crate::id::{fingerprint, random_id, SECRET_VARS};

/// The hidden subcommand of the `scratchd` binary that runs a run's
/// watchdog ([`watchdog_main`]).
pub const WATCHDOG_SUBCOMMAND: &str = "run-watchdog";

/// What `scratchd run` is asked.
pub struct RunRequest {
    /// A disk on this NBD server instead of a private one.
    pub server: Option<String>,
    /// The disk's name (the build's identity); default: `run-` and 128
    /// random bits.
    pub name: Option<String>,
    /// Where to mount the disk (default: a fresh directory, removed
    /// afterwards).
    pub mount: Option<PathBuf>,
    pub front_end: FrontEndOptions,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

/// A disk of the run's own (no `--server`), made by the caller (the
/// binary's tmpdisk machinery); dropped, after it is detached, to destroy
/// it.
pub trait LocalDisk {
    /// The disk, to attach.
    fn device(&self) -> Arc<dyn BlockDevice>;
    /// Whether it was made with a file system (without one there is
    /// nothing to mount).
    fn has_file_system(&self) -> bool;
}

/// Why a run could not start its command. `E` is why the caller could not
/// make the run's local disk.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    #[error("no command to run")]
    NoCommand,
    #[error("cannot make a private mount namespace (scratchd run needs root): {0}")]
    Namespace(#[source] io::Error),
    #[error(transparent)]
    LocalDisk(E),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("cannot make a directory for the mount: {0}")]
    TempDir(#[source] io::Error),
    #[error("cannot catch signals: {0}")]
    Signals(#[source] io::Error),
    #[error("stopped by signal {0} before the command started")]
    Stopped(i32),
    #[error("cannot start the run's watchdog: {0}")]
    Watchdog(#[source] io::Error),
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
}

impl<E> RunError<E> {
    /// Whether the caller asked for something impossible (exit status 2)
    /// rather than something failing; the caller judges its own `E`.
    pub fn is_usage(&self) -> bool {
        match self {
            RunError::NoCommand => true,
            RunError::Attach(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// Runs the command on its own disk (see the module docs); its exit
/// status. `open_local` makes the disk when there is no `--server`, given
/// its name, once the run is in its namespace.
pub fn run<D: LocalDisk, E>(
    request: &RunRequest,
    open_local: impl FnOnce(&str) -> Result<D, E>,
) -> Result<ExitStatus, RunError<E>> {
    if request.command.is_empty() {
        return Err(RunError::NoCommand);
    }
    let name = request.name.clone().unwrap_or_else(random_name);
    let server = server_target(request, &name)?;
    let front_end = request.front_end.choose(Origin::of(server.as_ref()))?;
    // First, while this process has one thread: the kernel will not give a
    // threaded process a namespace of its own.
    ns::enter_private_mount_namespace().map_err(RunError::Namespace)?;
    // From here on SIGINT, SIGTERM and SIGHUP are caught: before the command
    // runs, one ends the run (cleaning up); while it runs, it is passed on.
    let mut stops = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(RunError::Signals)?;
    let started = Instant::now();
    let mut watchdog = match front_end.driver().served_here() {
        true => Some(Watchdog::start().map_err(RunError::Watchdog)?),
        false => None,
    };
    let source = match server {
        Some(target) => Source::Server(target),
        None => Source::Local(open_local(&name).map_err(RunError::LocalDisk)?),
    };
    // Held until the run ends: the disk is made, as a clone, before the
    // front end connects.
    let _seed = match (&source, &request.front_end.from) {
        (Source::Server(target), Some(from)) => {
            Some(crate::remote::seed(target, from).map_err(AttachError::Server)?)
        }
        _ => None,
    };
    stopped(&mut stops)?;
    let work = work_dir()?;
    let mount = match &request.mount {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.path().join("mnt");
            std::fs::create_dir(&dir).map_err(RunError::TempDir)?;
            dir
        }
    };
    // Not the disk's name, which is its key: sysfs shows this to every
    // local user.
    // It names this process, so that a sweep can disconnect the kernel's
    // device if the run is killed before the device is tied to its mount.
    let label = crate::frontend::kernel::run_label(
        crate::state::Process::current().map_err(|e| RunError::Attach(AttachError::Process(e)))?,
    );
    let setup = Setup {
        mount: &mount,
        mount_options: source
            .has_file_system()
            .then_some(request.front_end.mount_options.as_str()),
        fs_type: &request.front_end.fs_type,
        connections: request.front_end.connections,
        write_behind: request.front_end.write_behind,
        private_dir: &work.path().join("fuse"),
        label: &label,
        request_timeout: request.front_end.request_timeout(),
    };
    let mut watch = |connection| watchdog.as_mut().map_or(Ok(()), |w| w.watch(connection));
    let attached = front_end
        .driver()
        .attach(source.disk(), &setup, &mut watch)?;
    // The name is the disk's key: info shows its fingerprint, debug the name.
    debug!(export = %name, "the disk's name");
    info!(
        disk = %fingerprint(&name),
        %front_end,
        device = %attached.device_path().display(),
        mount = %attached.mount().display(),
        took = ?started.elapsed(),
        "scratch disk attached"
    );
    let place = Place {
        mount: attached.mount(),
        device: attached.device_path(),
        name: &name,
        server: source.server(),
    };
    let status = stopped(&mut stops).and_then(|()| run_command(&request.command, &place, stops));
    let stopping = Instant::now();
    attached.detach();
    if let Some(mut watchdog) = watchdog {
        watchdog.done();
    }
    // A local disk is destroyed; a remote one was disconnected cleanly
    // with its front end, and the server destroys it after its last
    // connection (and linger).
    drop(source);
    debug!(took = ?stopping.elapsed(), "scratch disk detached");
    status
}

/// The disk of a run.
enum Source<D> {
    /// The run's own.
    Local(D),
    /// An export on a server.
    Server(Target),
}

impl<D: LocalDisk> Source<D> {
    fn disk(&self) -> Disk<'_> {
        match self {
            Source::Local(disk) => Disk::Local(disk.device()),
            Source::Server(target) => Disk::Server(target),
        }
    }

    /// A local disk made without a file system has nothing to mount.
    fn has_file_system(&self) -> bool {
        match self {
            Source::Local(disk) => disk.has_file_system(),
            Source::Server(_) => true,
        }
    }

    fn server(&self) -> Option<&Target> {
        match self {
            Source::Local(_) => None,
            Source::Server(target) => Some(target),
        }
    }
}

/// `--server`'s export: the disk `name` on that server.
fn server_target<E>(request: &RunRequest, name: &str) -> Result<Option<Target>, RunError<E>> {
    let Some(uri) = &request.server else {
        return Ok(None);
    };
    let mut target = Target::parse(uri).map_err(|e| AttachError::Server(e.into()))?;
    target.export = name.to_owned();
    Ok(Some(target))
}

/// Work directories are `$TMPDIR/scratchd-run.PID.XXXXXX`, holding the
/// (empty) mount points of the FUSE file and of the disk.
pub(crate) const WORK_PREFIX: &str = "scratchd-run.";

/// A fresh work directory for this run (after sweeping those of killed
/// runs).
fn work_dir<E>() -> Result<tempfile::TempDir, RunError<E>> {
    sweep_stale_work_dirs();
    tempfile::Builder::new()
        .prefix(&format!("{WORK_PREFIX}{}.", std::process::id()))
        .tempdir()
        .map_err(RunError::TempDir)
}

/// Removes the work directories of runs that were killed (`kill -9`) and so
/// could not remove their own. Their mounts died with their namespace; only
/// the empty directories are left, and `remove_dir` never removes more.
fn sweep_stale_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(WORK_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() || !made_by_root(&entry) {
            continue;
        }
        let dir = entry.path();
        for sub in ["fuse", "mnt"] {
            let _ = std::fs::remove_dir(dir.join(sub));
        }
        if std::fs::remove_dir(&dir).is_ok() {
            debug!(dir = %dir.display(), "removed a killed run's work directory");
        }
    }
}

/// Whether a work directory is one a run made: a real directory (not a
/// symlink another user put there, in a `TMPDIR` everyone writes, to make
/// root remove directories elsewhere), root's.
fn made_by_root(entry: &std::fs::DirEntry) -> bool {
    use std::os::unix::fs::MetadataExt;
    entry
        .path()
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_dir() && m.uid() == 0)
}

/// `run-` and 128 random bits: a name nobody can guess (see docs/RUN.md).
fn random_name() -> String {
    format!("run-{}", random_id())
}

/// The run's watchdog process (see the module docs).
struct Watchdog {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl Watchdog {
    fn start() -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(WATCHDOG_SUBCOMMAND)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take();
        Ok(Watchdog { child, pipe })
    }

    /// Tells the watchdog which FUSE connection to abort if the run dies.
    fn watch(&mut self, connection: u32) -> io::Result<()> {
        match &mut self.pipe {
            Some(p) => writeln!(p, "{connection}"),
            None => Ok(()),
        }
    }

    /// Everything is unmounted: the watchdog may go.
    fn done(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "done");
        }
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done();
    }
}

/// `scratchd run-watchdog`: reads FUSE connection numbers from standard
/// input until "done"; if the input ends first (the run died), aborts them.
/// Its exit status.
pub fn watchdog_main() -> i32 {
    let mut connections = Vec::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line == "done" {
            return 0;
        }
        if let Ok(id) = line.trim().parse::<u32>() {
            connections.push(id);
        }
    }
    for id in connections {
        if let Err(e) = scratchd_attach::fuse::abort_connection(id) {
            eprintln!("scratchd run-watchdog: cannot abort FUSE connection {id}: {e}");
        }
    }
    0
}

/// An error if a stopping signal came before the command started.
fn stopped<E>(stops: &mut Signals) -> Result<(), RunError<E>> {
    match stops.pending().next() {
        Some(sig) => Err(RunError::Stopped(sig)),
        None => Ok(()),
    }
}

/// Where the command finds its disk.
struct Place<'a> {
    mount: &'a Path,
    device: &'a Path,
    /// The disk's name.
    name: &'a str,
    /// The disk's server and export, for a disk on a server.
    server: Option<&'a Target>,
}

impl Place<'_> {
    /// The command's environment: the names the issue asked for
    /// (`SCRATCH_*`) and the ones runs had first (`SCRATCHD_*`).
    fn set_env(&self, command: &mut Command) {
        command
            .env("SCRATCH_DIR", self.mount)
            .env("SCRATCH_DEV", self.device)
            .env("SCRATCHD_MOUNT", self.mount)
            .env("SCRATCHD_DEVICE", self.device)
            .env("SCRATCHD_EXPORT", self.name);
        // The command has the name as SCRATCHD_EXPORT; a scratchd it runs
        // must not take this run's disk (or snapshot) by default.
        for var in SECRET_VARS {
            command.env_remove(var);
        }
        // A private disk has no URI: nothing else can reach it.
        match self.server {
            // The URI form carries no credentials (the parser drops a
            // `user@`); only the certificate directory's path.
            Some(target) => command.env("SCRATCH_URI", target.to_string()),
            None => command.env_remove("SCRATCH_URI"),
        };
    }
}

/// Runs the command on the mounted disk, passing on the signals that would
/// stop a run (the command decides how to stop; the disk is cleaned up
/// after it has).
fn run_command<E>(
    argv: &[OsString],
    place: &Place,
    mut signals: Signals,
) -> Result<ExitStatus, RunError<E>> {
    let Some((program, rest)) = argv.split_first() else {
        return Err(RunError::NoCommand);
    };
    let mut command = Command::new(program);
    ns::kill_with_parent(&mut command);
    place.set_env(&mut command);
    let mut child = command
        .args(rest)
        .spawn()
        .map_err(|source| RunError::Spawn {
            command: program.to_string_lossy().into_owned(),
            source,
        })?;
    let pid = child.id();
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in signals.forever() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let sig = rustix::process::Signal::from_named_raw(sig);
                if let Some(sig) = sig {
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
        }
    });
    let status = child.wait();
    handle.close();
    let _ = forwarder.join();
    status.map_err(|source| RunError::Spawn {
        command: program.to_string_lossy().into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_names_carry_128_bits() {
        let (a, b) = (random_name(), random_name());
        assert_ne!(a, b);
        let hex = a.strip_prefix("run-").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
