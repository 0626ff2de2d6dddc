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
//! 3. the disk as a FUSE file, served by threads that call it directly;
//! 4. a loop device on that file, in direct-I/O mode, detached by the kernel
//!    when its mount goes;
//!    (3 and 4 with `--attach kernel`, or `auto` on a host with the nbd
//!    module, and `--server`: the client's sockets handed to the kernel's
//!    nbd driver instead, [`run_kernel`], `/dev/nbdN`, no FUSE, no watchdog);
//! 5. the file system mounted at `--mount` (or a fresh directory);
//! 6. the command, with `SCRATCH_DIR`, `SCRATCH_DEV`, `SCRATCH_URI` (a
//!    disk on a server only) and the older `SCRATCHD_MOUNT`,
//!    `SCRATCHD_DEVICE`, `SCRATCHD_EXPORT` in its environment; its exit
//!    status is the run's.
//!
//! Steps 2 to 5 are [`crate::attachment`]'s, shared with `scratchd attach`.
//!
//! A run that is killed (`kill -9`) cannot unmount: its namespace's mounts
//! are torn down by the kernel when the namespace's last process exits.
//! That teardown writes the file system back through the FUSE file, whose
//! server was the killed process, and would wait for it forever. So each
//! run starts a watchdog process (`scratchd run-watchdog`, in the same
//! namespace, in a process group of its own so that Ctrl-C spares it): told
//! the FUSE connection's number, it waits for the run to say "done"; if the
//! run's end of the pipe closes first, it aborts the connection, so that
//! every pending write fails at once and the teardown completes.

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use scratchd_attach::nbd_kernel;
use scratchd_attach::ns;
use scratchd_client::Target;
use scratchd_scratch::{OpenDisk, Owner};
use scratchd_store::BlockDevice;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info, warn};

use crate::attachment::{
    attach_kernel, choose_attach, connect_remote, random_id, AttachError, AttachKind, Attached,
    FrontEndArgs, FuseSetup,
};
use crate::backend::{BackendError, OpenError};
use crate::size::parse_size;
use crate::tmpdisk;
use crate::with_causes;

/// Exit status for bad usage, as clap uses.
const EXIT_USAGE: i32 = 2;
/// Exit status when the run itself failed (no disk, no mount).
const EXIT_FAILED: i32 = 125;

#[derive(Args)]
pub struct RunArgs {
    /// Use a disk on this NBD server (`nbd://HOST[:PORT]` or
    /// `nbd+unix:///?socket=PATH`; the export is --name or a fresh name)
    /// instead of a private one; --size, --type and -o are then the
    /// server's business.
    #[arg(long, value_name = "URI")]
    server: Option<String>,
    /// Size of the scratch disk (sparse: unused space costs nothing).
    #[arg(long, value_name = "SIZE", default_value = "20G")]
    size: String,
    /// File system to make on it (mkfs -t TYPE; ext4 is made without a
    /// journal).
    #[arg(long = "type", value_name = "TYPE", default_value = "ext4")]
    fs_type: String,
    /// Name of the disk (the build's identity); default: `run-` and 128
    /// random bits.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Mount the disk here (default: a fresh directory, removed afterwards).
    /// The mount is private to the command and its children.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    #[command(flatten)]
    front_end: FrontEndArgs,
    /// RAM the disk may hold (default: half of the machine's RAM); writes
    /// past it fail with ENOSPC.
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// More tmpdisk keys for the disk (backing=dir:PATH, spill=..., label=L).
    #[arg(short = 'o', long = "disk-option", value_name = "KEY=VALUE")]
    disk_options: Vec<String>,
    /// More log output (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// Why a run could not start its command.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot make a private mount namespace (scratchd run needs root): {0}")]
    Namespace(#[source] io::Error),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("cannot create scratch disk {name:?}: {reason}")]
    Disk { name: String, reason: String },
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

pub fn main(args: RunArgs) -> i32 {
    crate::serve::init_logging(args.verbose, None);
    match run(&args) {
        Ok(status) => exit_code(status),
        Err(RunError::Usage(m)) => {
            eprintln!("scratchd run: {m}");
            EXIT_USAGE
        }
        Err(RunError::Backend(BackendError::Usage(e))) => {
            eprintln!("scratchd run: {e}");
            EXIT_USAGE
        }
        Err(RunError::Attach(e)) if e.is_usage() => {
            eprintln!("scratchd run: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("scratchd run: {}", with_causes(&e));
            EXIT_FAILED
        }
    }
}

fn run(args: &RunArgs) -> Result<ExitStatus, RunError> {
    let name = args.name.clone().unwrap_or_else(random_name);
    let server = server_target(args, &name)?;
    let how = choose_attach(
        &args.front_end.attach,
        server.is_some(),
        server.as_ref().is_some_and(|t| t.tls.is_some()),
        nbd_kernel::kernel_nbd_available,
    )?;
    // First, while this process has one thread: the kernel will not give a
    // threaded process a namespace of its own.
    ns::enter_private_mount_namespace().map_err(RunError::Namespace)?;
    // From here on SIGINT, SIGTERM and SIGHUP are caught: before the command
    // runs, one ends the run (cleaning up); while it runs, it is passed on.
    let mut stops = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(RunError::Signals)?;
    if let (AttachKind::Kernel, Some(target)) = (how, &server) {
        return run_kernel(args, target, stops);
    }
    let started = Instant::now();
    let mut watchdog = Watchdog::start()?;
    let disk = open_disk(args, server.as_ref(), &name)?;
    stopped(&mut stops)?;
    let work = work_dir()?;
    let fuse_dir = work.path().join("fuse");
    let default_mount = work.path().join("mnt");
    for dir in [&fuse_dir, &default_mount] {
        std::fs::create_dir(dir).map_err(RunError::TempDir)?;
    }
    let setup = FuseSetup {
        fuse_dir: &fuse_dir,
        mount: args.mount.as_deref().unwrap_or(&default_mount),
        // A local disk made without a file system has nothing to mount.
        mount_options: (server.is_some() || args.fs_type != "none")
            .then_some(args.front_end.mount_options.as_str()),
        threads: args.front_end.connections,
    };
    let attached = Attached::attach(disk.device(), &setup, |id| watchdog.watch(id))?;
    info!(
        export = %name,
        device = %attached.device_path().display(),
        mount = %attached.mount().display(),
        direct_io = attached.direct_io(),
        took = ?started.elapsed(),
        "scratch disk attached"
    );
    let place = Place {
        mount: attached.mount(),
        device: attached.device_path(),
        name: &name,
        server: server.as_ref(),
    };
    let status = stopped(&mut stops).and_then(|()| run_command(args, &place, stops));
    let stopping = Instant::now();
    attached.detach();
    watchdog.done();
    disk.close();
    debug!(took = ?stopping.elapsed(), "scratch disk detached");
    status
}

/// The disk of a run.
enum Disk {
    /// The run's own, held open in its registry.
    Local(OpenDisk),
    /// An export on a server.
    Remote(Arc<scratchd_client::Client>),
}

impl Disk {
    fn device(&self) -> Arc<dyn BlockDevice> {
        match self {
            Disk::Local(export) => export.device.clone(),
            Disk::Remote(client) => client.clone(),
        }
    }

    /// Lets the disk go: a local one is destroyed; a remote one is
    /// disconnected cleanly, and the server destroys it after its last
    /// connection (and linger).
    fn close(self) {
        match self {
            Disk::Local(export) => drop(export),
            Disk::Remote(client) => match Arc::try_unwrap(client) {
                Ok(client) => {
                    if let Err(e) = client.close() {
                        warn!(error = %e, "disconnecting from the server");
                    }
                }
                Err(client) => drop(client),
            },
        }
    }
}

/// `--server`'s export: the disk `name` on that server.
fn server_target(args: &RunArgs, name: &str) -> Result<Option<Target>, RunError> {
    let Some(uri) = &args.server else {
        return Ok(None);
    };
    let mut target =
        Target::parse(uri).map_err(|e| RunError::Attach(AttachError::Server(e.into())))?;
    target.export = name.to_owned();
    Ok(Some(target))
}

fn open_disk(args: &RunArgs, server: Option<&Target>, name: &str) -> Result<Disk, RunError> {
    match server {
        Some(target) => Ok(Disk::Remote(Arc::new(connect_remote(
            target,
            args.front_end.connections,
        )?))),
        None => Ok(Disk::Local(open_local_disk(args, name)?)),
    }
}

/// Creates the run's own scratch disk with the tmpdisk machinery.
fn open_local_disk(args: &RunArgs, name: &str) -> Result<OpenDisk, RunError> {
    let mut params = vec![
        format!("size={}", args.size),
        format!("type={}", args.fs_type),
    ];
    params.extend(args.disk_options.iter().cloned());
    let memory_limit = args
        .memory_limit
        .as_deref()
        .map(|t| parse_size("--memory-limit", t))
        .transpose()
        .map_err(|e| RunError::Usage(e.to_string()))?;
    let limits = tmpdisk::Limits {
        max_exports: Some(1),
        memory_limit,
        ..tmpdisk::Limits::default()
    };
    let config = tmpdisk::config(&params, limits, tmpdisk::ExportOptions::default())
        .map_err(BackendError::from)?;
    let exports = scratchd_scratch::from_config(config)
        .map_err(|e| RunError::Backend(OpenError::from(e).into()))?;
    // The run's own registry has one owner: this process.
    exports
        .open(name, Owner::Anyone)
        .map_err(|e| RunError::Disk {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}

/// Work directories are `$TMPDIR/scratchd-run.PID.XXXXXX`, holding the
/// (empty) mount points of the FUSE file and of the disk.
const WORK_PREFIX: &str = "scratchd-run.";

/// A fresh work directory for this run (after sweeping those of killed
/// runs).
fn work_dir() -> Result<tempfile::TempDir, RunError> {
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
        if Path::new(&format!("/proc/{pid}")).exists() {
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
    fn start() -> Result<Self, RunError> {
        let exe = std::env::current_exe().map_err(RunError::Watchdog)?;
        let mut child = Command::new(exe)
            .arg("run-watchdog")
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(RunError::Watchdog)?;
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

/// A run whose disk, `target` on a server, is the kernel's `/dev/nbdN`:
/// no FUSE file and no watchdog (the kernel serves the device by itself,
/// and a killed run's mount going makes the kernel disconnect it, see
/// [`scratchd_attach::nbd_kernel::NbdDevice::disconnect_on_close`]).
fn run_kernel(args: &RunArgs, target: &Target, mut stops: Signals) -> Result<ExitStatus, RunError> {
    let started = Instant::now();
    let work = work_dir()?;
    let mount = match &args.mount {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.path().join("mnt");
            std::fs::create_dir(&dir).map_err(RunError::TempDir)?;
            dir
        }
    };
    // Not the export's name, which is the disk's key: sysfs shows this to
    // every local user.
    let backend = format!("scratchd-run:{}:{}", std::process::id(), random_id());
    let attached = attach_kernel(
        target,
        args.front_end.connections,
        &mount,
        &args.front_end.mount_options,
        backend,
    )?;
    info!(
        export = %target.export,
        device = %attached.device_path().display(),
        mount = %attached.mount().display(),
        took = ?started.elapsed(),
        "scratch disk attached (kernel nbd)"
    );
    let place = Place {
        mount: attached.mount(),
        device: attached.device_path(),
        name: &target.export,
        server: Some(target),
    };
    let status = stopped(&mut stops).and_then(|()| run_command(args, &place, stops));
    let stopping = Instant::now();
    attached.detach();
    debug!(took = ?stopping.elapsed(), "scratch disk detached");
    status
}

/// An error if a stopping signal came before the command started.
fn stopped(stops: &mut Signals) -> Result<(), RunError> {
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
fn run_command(
    args: &RunArgs,
    place: &Place,
    mut signals: Signals,
) -> Result<ExitStatus, RunError> {
    let (program, rest) = args.command.split_first().expect("clap requires CMD");
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

/// The command's exit status, or 128+N when signal N killed it (as shells
/// report it).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
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
