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
//! 6. the command, with `SCRATCHD_MOUNT`, `SCRATCHD_DEVICE` and
//!    `SCRATCHD_EXPORT` in its environment; its exit status is the run's.
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
use std::time::{Duration, Instant};

use clap::Args;
use scratchd_attach::fuse::FuseFile;
use scratchd_attach::loopdev::LoopDevice;
use scratchd_attach::nbd_kernel::{self, NbdDevice};
use scratchd_attach::ns;
use scratchd_proto::negotiation::LookupError;
use scratchd_server::{Exports, OpenExport};
use scratchd_store::BlockDevice;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info, warn};

use crate::backend::{BackendError, OpenError};
use crate::size::parse_size;
use crate::tmpdisk;

/// Exit status for bad usage, as clap uses.
const EXIT_USAGE: i32 = 2;
/// Exit status when the run itself failed (no disk, no mount).
const EXIT_FAILED: i32 = 125;
/// How long a file system that was still busy at the end of the run, and so
/// detached lazily, is served before the disk is cut off (its last writes
/// then fail: nobody will read them).
const LAZY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Mount options.
    #[arg(long, value_name = "OPTS", default_value = "noatime")]
    mount_options: String,
    /// Connections to the server (when it allows several), and threads
    /// serving the disk's FUSE file.
    #[arg(long, value_name = "N", default_value_t = 4)]
    connections: usize,
    /// How the disk becomes a block device: fuse (a FUSE file and a loop
    /// device), kernel (the kernel's nbd driver, over netlink; needs
    /// --server and the nbd module), or auto (kernel where it can be used,
    /// else fuse).
    #[arg(long, value_name = "HOW", default_value = "auto")]
    attach: String,
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
    Server(#[from] scratchd_client::Error),
    #[error(transparent)]
    Kernel(#[from] nbd_kernel::Error),
    #[error("cannot read the disk: {0}")]
    Probe(#[source] io::Error),
    #[error("cannot make a directory for the mount: {0}")]
    TempDir(#[source] io::Error),
    #[error("cannot mount the disk's FUSE file: {0}")]
    Fuse(#[source] io::Error),
    #[error("cannot attach a loop device: {0}")]
    Loop(#[source] io::Error),
    #[error(transparent)]
    Mount(#[from] ns::MountError),
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
        Err(e @ RunError::Server(scratchd_client::Error::Uri(_))) => {
            eprintln!("scratchd run: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("scratchd run: {}", with_causes(&e));
            EXIT_FAILED
        }
    }
}

/// An error and the chain of its causes, as one line.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        // Some errors already carry their cause's text.
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn run(args: &RunArgs) -> Result<ExitStatus, RunError> {
    let tls = args
        .server
        .as_deref()
        .and_then(|uri| scratchd_client::Target::parse(uri).ok())
        .is_some_and(|target| target.tls.is_some());
    let how = choose_attach(
        &args.attach,
        args.server.is_some(),
        tls,
        nbd_kernel::kernel_nbd_available,
    )?;
    // First, while this process has one thread: the kernel will not give a
    // threaded process a namespace of its own.
    ns::enter_private_mount_namespace().map_err(RunError::Namespace)?;
    // From here on SIGINT, SIGTERM and SIGHUP are caught: before the command
    // runs, one ends the run (cleaning up); while it runs, it is passed on.
    let mut stops = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(RunError::Signals)?;
    if let (AttachKind::Kernel, Some(uri)) = (how, &args.server) {
        return run_kernel(args, uri, stops);
    }
    let started = Instant::now();
    let mut watchdog = Watchdog::start()?;
    let name = args.name.clone().unwrap_or_else(random_name);
    let disk = open_disk(args, &name)?;
    stopped(&mut stops)?;
    sweep_stale_work_dirs();
    let work = tempfile::Builder::new()
        .prefix(&format!("{WORK_PREFIX}{}.", std::process::id()))
        .tempdir()
        .map_err(RunError::TempDir)?;
    let attached = Attached::attach(disk.device(), work.path(), args, &mut watchdog)?;
    info!(
        export = %name,
        device = %attached.device.path().display(),
        mount = %attached.mount.display(),
        direct_io = attached.device.direct_io(),
        took = ?started.elapsed(),
        "scratch disk attached"
    );
    let status = stopped(&mut stops)
        .and_then(|()| run_command(args, &attached.mount, attached.device.path(), &name, stops));
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
    Local(OpenExport),
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

fn open_disk(args: &RunArgs, name: &str) -> Result<Disk, RunError> {
    let Some(uri) = &args.server else {
        return Ok(Disk::Local(open_local_disk(args, name)?));
    };
    let mut target = scratchd_client::Target::parse(uri).map_err(scratchd_client::Error::from)?;
    target.export = name.to_owned();
    let options = scratchd_client::Options {
        connections: args.connections.max(1),
        ..Default::default()
    };
    let client = scratchd_client::Client::connect_with(&target, &options)?;
    info!(
        server = %target,
        connections = client.connection_count(),
        size = client.size(),
        "connected"
    );
    Ok(Disk::Remote(Arc::new(client)))
}

/// Creates the run's own scratch disk with the tmpdisk machinery.
fn open_local_disk(args: &RunArgs, name: &str) -> Result<OpenExport, RunError> {
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
        .open(name, &scratchd_server::Identity::Anonymous)
        .map_err(|e| {
            let (LookupError::Unknown(reason)
            | LookupError::Policy(reason)
            | LookupError::Platform(reason)
            | LookupError::Shutdown(reason)) = e;
            RunError::Disk {
                name: name.to_owned(),
                reason,
            }
        })
}

/// Work directories are `$TMPDIR/scratchd-run.PID.XXXXXX`, holding the
/// (empty) mount points of the FUSE file and of the disk.
const WORK_PREFIX: &str = "scratchd-run.";

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
    let mut bytes = [0u8; 16];
    if let Err(e) = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        // Only a local disk's name, which no other process can reach.
        warn!(error = %e, "no random bytes; naming the disk after the process");
        return format!("run-{}", std::process::id());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("run-{hex}")
}

/// A disk attached and mounted; [`Attached::detach`] (or drop) undoes it.
struct Attached {
    mount: PathBuf,
    mounted: bool,
    device: LoopDevice,
    fuse: Option<FuseFile>,
}

impl Attached {
    fn attach(
        device: Arc<dyn BlockDevice>,
        work: &Path,
        args: &RunArgs,
        watchdog: &mut Watchdog,
    ) -> Result<Self, RunError> {
        let fuse_dir = work.join("fuse");
        let default_mount = work.join("mnt");
        for dir in [&fuse_dir, &default_mount] {
            std::fs::create_dir(dir).map_err(RunError::TempDir)?;
        }
        let read_only = device.capabilities().read_only;
        let block_size = logical_block_size(device.as_ref()).map_err(RunError::Probe)?;
        let fuse = FuseFile::mount(device, &fuse_dir, args.connections).map_err(RunError::Fuse)?;
        watchdog
            .watch(fuse.connection().map_err(RunError::Fuse)?)
            .map_err(RunError::Watchdog)?;
        let loopdev =
            LoopDevice::attach(fuse.path(), read_only, block_size).map_err(RunError::Loop)?;
        let mut attached = Attached {
            mount: args.mount.clone().unwrap_or(default_mount),
            mounted: false,
            device: loopdev,
            fuse: Some(fuse),
        };
        if args.server.is_some() || args.fs_type != "none" {
            ns::mount(attached.device.path(), &attached.mount, &args.mount_options)?;
            attached.mounted = true;
            // The mount holds the loop device now; ours would keep it
            // attached after the mount is gone.
            attached.device.release();
        }
        Ok(attached)
    }

    fn detach(mut self) {
        self.undo();
    }

    fn undo(&mut self) {
        let mut lazily = false;
        if self.mounted {
            self.mounted = false;
            match ns::unmount(&self.mount) {
                Ok(how) => lazily = how == ns::Unmounted::Lazily,
                Err(e) => warn!(mount = %self.mount.display(), error = %e, "cannot unmount"),
            }
        }
        self.device.release();
        if lazily {
            // Its last user may let go soon: keep serving it a little.
            let deadline = Instant::now() + LAZY_GRACE;
            while self.device.attached() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if let Some(fuse) = self.fuse.take() {
            if let Err(e) = fuse.unmount() {
                warn!(error = %e, "cannot unmount the FUSE file");
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.undo();
    }
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

/// The loop device's logical block size: the disk's preferred 4096 unless
/// the file system on it was made for smaller sectors (an ext2/3/4 with
/// 1 or 2 KiB blocks, an xfs with 512-byte sectors), which will not mount
/// on a device whose sectors are larger than its own.
fn logical_block_size(device: &dyn BlockDevice) -> io::Result<u32> {
    let mut head = vec![0u8; 2048.min(device.size() as usize)];
    device.read(0, &mut head)?;
    Ok(filesystem_sector_limit(&head)
        .unwrap_or(4096)
        .clamp(512, 4096))
}

/// The largest sector size the file system whose first bytes are `head`
/// mounts on, if it is one that cares.
fn filesystem_sector_limit(head: &[u8]) -> Option<u32> {
    let be16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let le16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.starts_with(b"XFSB") {
        // sb_sectsize, big-endian, at byte 102 of the superblock.
        return be16(102).map(u32::from);
    }
    // ext2/3/4: magic 0xEF53 at 56 in the superblock at 1024, block size
    // 1024 << s_log_block_size at 24.
    if le16(1024 + 56) == Some(0xEF53) {
        return le32(1024 + 24)
            .filter(|&log| log <= 6)
            .map(|log| 1024 << log);
    }
    None
}

/// The front end that makes the disk a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttachKind {
    /// A FUSE file and a loop device ([`Attached`]).
    Fuse,
    /// The kernel's nbd driver with our client's sockets ([`KernelAttached`]).
    Kernel,
}

/// `--attach`: auto takes the kernel's nbd driver for a disk on a server
/// when the driver is there (`kernel_available`, asked only then), else
/// FUSE; a local disk has no sockets to hand to the kernel, and the kernel
/// cannot take over a TLS session.
fn choose_attach(
    attach: &str,
    server: bool,
    tls: bool,
    kernel_available: impl FnOnce() -> bool,
) -> Result<AttachKind, RunError> {
    match attach {
        "fuse" => Ok(AttachKind::Fuse),
        "kernel" if server && tls => Err(RunError::Usage(
            "--attach kernel cannot take over a TLS connection (nbds://); use --attach fuse"
                .to_owned(),
        )),
        "kernel" if server => Ok(AttachKind::Kernel),
        "kernel" => Err(RunError::Usage(
            "--attach kernel needs --server (a local disk has no sockets to hand to the kernel)"
                .to_owned(),
        )),
        "auto" if server && !tls && kernel_available() => Ok(AttachKind::Kernel),
        "auto" => Ok(AttachKind::Fuse),
        other => Err(RunError::Usage(format!(
            "--attach {other}: expected auto, kernel or fuse"
        ))),
    }
}

/// How long the kernel holds I/O when every connection to the server is
/// dead, waiting for new sockets (`NBD_CMD_RECONFIGURE`): nothing of ours
/// reconnects yet, so this is only a short grace before the build's I/O
/// fails.
const KERNEL_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// A run whose disk, on the server at `uri`, is the kernel's `/dev/nbdN`:
/// no FUSE file and no watchdog (the kernel serves the device by itself,
/// and a killed run's mount going makes the kernel disconnect it, see
/// [`NbdDevice::disconnect_on_close`]).
fn run_kernel(args: &RunArgs, uri: &str, mut stops: Signals) -> Result<ExitStatus, RunError> {
    let started = Instant::now();
    let name = args.name.clone().unwrap_or_else(random_name);
    let mut target = scratchd_client::Target::parse(uri).map_err(scratchd_client::Error::from)?;
    target.export = name.clone();
    let options = scratchd_client::Options {
        connections: args.connections.max(1),
        ..Default::default()
    };
    sweep_stale_work_dirs();
    let work = tempfile::Builder::new()
        .prefix(&format!("{WORK_PREFIX}{}.", std::process::id()))
        .tempdir()
        .map_err(RunError::TempDir)?;
    let mount = match &args.mount {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.path().join("mnt");
            std::fs::create_dir(&dir).map_err(RunError::TempDir)?;
            dir
        }
    };
    let attached = attach_kernel(&target, &options, mount, &args.mount_options)?;
    info!(
        export = %name,
        device = %attached.device_path.display(),
        mount = %attached.mount.display(),
        took = ?started.elapsed(),
        "scratch disk attached (kernel nbd)"
    );
    let status = stopped(&mut stops)
        .and_then(|()| run_command(args, &attached.mount, &attached.device_path, &name, stops));
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

/// A disk on a server as the kernel's `/dev/nbdN`, mounted;
/// [`KernelAttached::detach`] (or drop) unmounts and disconnects it.
struct KernelAttached {
    mount: PathBuf,
    mounted: bool,
    device_path: PathBuf,
    device: Option<NbdDevice>,
}

/// Connects to `target` with `options`, hands the sockets to the kernel and
/// mounts the device at `mount`.
fn attach_kernel(
    target: &scratchd_client::Target,
    options: &scratchd_client::Options,
    mount: PathBuf,
    mount_options: &str,
) -> Result<KernelAttached, RunError> {
    use scratchd_client::{Client, Options, Replies};
    // A connection of our own reads the file system's sector size (as the
    // FUSE path does), and holds the export open until the kernel's are.
    let probe = Client::connect_with(
        target,
        &Options {
            connections: 1,
            ..options.clone()
        },
    )?;
    let largest = logical_block_size(&probe).map_err(RunError::Probe)?;
    // The kernel speaks simple replies only, and asks no block status.
    let handshaken = Client::handshake_only(
        target,
        &Options {
            replies: Replies::Simple,
            block_status: false,
            ..options.clone()
        },
    )?;
    let info = handshaken.info.clone();
    let block_size =
        nbd_kernel::choose_block_size(info.block_size.map(|b| (b.min, b.max)), largest)?;
    let config = nbd_kernel::Config {
        index: None,
        size: info.size,
        block_size,
        server_flags: info.flags.0,
        timeout: None,
        dead_conn_timeout: KERNEL_DEAD_CONN_TIMEOUT,
        // Not the export's name, which is the disk's key: sysfs shows this
        // to every local user.
        backend: Some(format!(
            "scratchd-run:{}:{}",
            std::process::id(),
            random_name()
        )),
    };
    let streams = handshaken
        .into_fds()
        .ok_or_else(|| RunError::Usage("the kernel cannot take over TLS connections".to_owned()))?;
    let device = nbd_kernel::connect(streams, &config)?;
    let mut attached = KernelAttached {
        mount,
        mounted: false,
        device_path: device.path(),
        device: Some(device),
    };
    ns::mount(&attached.device_path, &attached.mount, mount_options)?;
    attached.mounted = true;
    if let Some(device) = &mut attached.device {
        if let Err(e) = device.disconnect_on_close() {
            warn!(error = %e, "a killed run will leave its nbd device connected");
        }
    }
    if let Err(e) = probe.close() {
        debug!(error = %e, "closing the probe connection");
    }
    Ok(attached)
}

impl KernelAttached {
    fn detach(mut self) {
        self.undo();
    }

    fn undo(&mut self) {
        if self.mounted {
            self.mounted = false;
            if let Err(e) = ns::unmount(&self.mount) {
                warn!(mount = %self.mount.display(), error = %e, "cannot unmount");
            }
        }
        if let Some(device) = self.device.take() {
            if let Err(e) = device.disconnect() {
                warn!(device = %self.device_path.display(), error = %e, "cannot disconnect");
            }
        }
    }
}

impl Drop for KernelAttached {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Runs the command on the mounted disk, passing on the signals that would
/// stop a run (the command decides how to stop; the disk is cleaned up
/// after it has).
fn run_command(
    args: &RunArgs,
    mount: &Path,
    device: &Path,
    name: &str,
    mut signals: Signals,
) -> Result<ExitStatus, RunError> {
    let (program, rest) = args.command.split_first().expect("clap requires CMD");
    let mut command = Command::new(program);
    ns::kill_with_parent(&mut command);
    let mut child = command
        .args(rest)
        .env("SCRATCHD_MOUNT", mount)
        .env("SCRATCHD_DEVICE", device)
        .env("SCRATCHD_EXPORT", name)
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
    fn sector_limits_come_from_the_superblock() {
        let mut ext = vec![0u8; 2048];
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1024 + 24] = 2; // 4096-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(4096));
        ext[1024 + 24] = 0; // 1024-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(1024));
        let mut xfs = vec![0u8; 2048];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[102..104].copy_from_slice(&512u16.to_be_bytes());
        assert_eq!(filesystem_sector_limit(&xfs), Some(512));
        assert_eq!(filesystem_sector_limit(&[0u8; 2048]), None);
        assert_eq!(filesystem_sector_limit(&[0u8; 10]), None);
    }

    #[test]
    fn attach_choice() {
        let never = || -> bool { panic!("availability asked without --server") };
        assert_eq!(
            choose_attach("fuse", true, false, || true).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", false, false, never).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", true, false, || false).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", true, false, || true).unwrap(),
            AttachKind::Kernel
        );
        assert_eq!(
            choose_attach("kernel", true, false, || false).unwrap(),
            AttachKind::Kernel
        );
        assert!(matches!(
            choose_attach("kernel", false, false, never),
            Err(RunError::Usage(_))
        ));
        assert_eq!(
            choose_attach("auto", true, true, never).unwrap(),
            AttachKind::Fuse
        );
        assert!(matches!(
            choose_attach("kernel", true, true, never),
            Err(RunError::Usage(_))
        ));
        assert!(matches!(
            choose_attach("nbd", true, false, || true),
            Err(RunError::Usage(_))
        ));
    }

    #[test]
    fn random_names_carry_128_bits() {
        let (a, b) = (random_name(), random_name());
        assert_ne!(a, b);
        let hex = a.strip_prefix("run-").unwrap();
        assert_eq!(hex.len(), 32);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
