//! `scratchd attach`: mounts a disk on a server at a directory in the
//! caller's mount namespace, where every process sees it, and returns;
//! `scratchd detach` ([`detach`]) undoes it. For tools that manage a
//! disk's lifetime themselves (Koji runs mock several times per build on
//! one disk; the server keeps the disk for its `linger` after the last
//! connection), where `scratchd run` gives one command a private disk for
//! its own lifetime.
//!
//! - FUSE + loop (`--attach fuse`, and `auto` without the nbd module or
//!   with TLS): a background [`holder`] process serves the disk's FUSE file
//!   until detached; `attach` waits for it to say it is ready (or why it
//!   failed).
//! - The kernel's nbd driver (`--attach kernel`, and `auto` where the module
//!   is loaded): `attach` hands the sockets to the kernel, mounts the
//!   device and returns; no process of ours stays.
//!
//! Each attachment has a record in the state directory ([`state`]).
//! Before attaching, `attach` sweeps away what attachments whose holder
//! died left (as `scratchd detach --stale` does).

pub mod detach;
pub mod holder;
mod state;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use clap::Args;
use scratchd_attach::nbd_kernel;
use scratchd_client::Target;
use tracing::{debug, info};

use crate::attachment::{
    attach_kernel, choose_attach, random_id, AttachError, AttachKind, FrontEndArgs,
};
use crate::with_causes;
use holder::Answer;
use state::{ClaimError, Kind, Process, Record, StateDir, StateError};

/// Exit status for bad usage, as clap uses.
const EXIT_USAGE: i32 = 2;
/// Exit status when attaching failed.
const EXIT_FAILED: i32 = 1;
/// Lines of a dead holder's log shown with the error.
const LOG_LINES: usize = 5;

#[derive(Args)]
pub struct AttachArgs {
    /// Mount the disk's file system here (an existing, empty directory; not
    /// a mount point already).
    #[arg(long, value_name = "DIR")]
    mount: PathBuf,
    /// The export: overrides the URI's.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    front_end: FrontEndArgs,
    /// More log output (-v info, -vv debug); the holder logs to its log
    /// file in the state directory.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// The server and export: `nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST[:PORT]/EXPORT`, `nbds://...?tls-certificates=DIR`.
    #[arg(value_name = "URI")]
    uri: String,
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot mount at {}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("cannot start the holder process: {0}")]
    Spawn(#[source] io::Error),
    #[error("{0}")]
    Holder(String),
    #[error("the holder process ended without attaching ({status}){log}")]
    HolderDied {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("cannot read this process's start time: {0}")]
    Process(#[source] io::Error),
}

impl Error {
    fn is_usage(&self) -> bool {
        match self {
            Error::Usage(_) => true,
            Error::Attach(e) => e.is_usage(),
            _ => false,
        }
    }
}

pub fn main(args: AttachArgs) -> i32 {
    crate::serve::init_logging(args.verbose, None);
    match attach(&args) {
        Ok(device) => {
            println!("{}", device.display());
            0
        }
        Err(e) if e.is_usage() => {
            eprintln!("scratchd attach: {e}");
            EXIT_USAGE
        }
        Err(e) => {
            eprintln!("scratchd attach: {}", with_causes(&e));
            EXIT_FAILED
        }
    }
}

/// Attaches; returns the block device.
fn attach(args: &AttachArgs) -> Result<PathBuf, Error> {
    let target = export_target(args)?;
    let how = choose_attach(
        &args.front_end.attach,
        true,
        target.tls.is_some(),
        nbd_kernel::kernel_nbd_available,
    )?;
    let mount = mount_dir(&args.mount)?;
    let state = StateDir::open()?;
    let swept = detach::sweep_stale(&state);
    if swept > 0 {
        info!(swept, "removed stale attachments");
    }
    match how {
        AttachKind::Fuse => attach_with_holder(&state, &target, &mount, args),
        AttachKind::Kernel => attach_with_kernel(&state, &target, &mount, args),
    }
}

/// The URI's server with the export `--name` or the URI's; one of them
/// must name one.
fn export_target(args: &AttachArgs) -> Result<Target, Error> {
    let mut target = Target::parse(&args.uri).map_err(|e| AttachError::Server(e.into()))?;
    if let Some(name) = &args.name {
        target.export.clone_from(name);
    }
    if target.export.is_empty() {
        return Err(Error::Usage(format!(
            "{:?} names no export: give it in the URI (nbd+unix:///NAME?socket=PATH, \
             nbd://HOST/NAME) or with --name",
            args.uri
        )));
    }
    Ok(target)
}

/// The mount point, canonical (records are found by it), which must be an
/// existing directory.
fn mount_dir(dir: &Path) -> Result<PathBuf, Error> {
    let failed = |source| Error::Dir {
        dir: dir.to_owned(),
        source,
    };
    let canonical = std::fs::canonicalize(dir).map_err(failed)?;
    if !canonical.is_dir() {
        return Err(failed(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    Ok(canonical)
}

/// Starts a holder (see [`holder`]) and waits for its answer.
fn attach_with_holder(
    state: &StateDir,
    target: &Target,
    mount: &Path,
    args: &AttachArgs,
) -> Result<PathBuf, Error> {
    let request = holder::Request {
        id: random_id(),
        uri: target.to_string(),
        connections: args.front_end.connections,
        mount: mount.to_owned(),
        mount_options: args.front_end.mount_options.clone(),
        verbose: args.verbose,
    };
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(state.log_path(&request.id))
        .map_err(Error::Spawn)?;
    let exe = std::env::current_exe().map_err(Error::Spawn)?;
    let mut child = Command::new(exe)
        .arg(holder::SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(Error::Spawn)?;
    debug!(pid = child.id(), id = %request.id, "holder started");
    let answer = ask(&mut child, &request);
    match answer {
        Some(Answer::Ready(device)) => Ok(device),
        failed => {
            let status = child.wait().map_err(Error::Spawn)?;
            let error = match failed {
                Some(Answer::Failed(message)) => Error::Holder(message),
                _ => Error::HolderDied {
                    status,
                    log: log_tail(&state.log_path(&request.id)),
                },
            };
            // A holder that failed cleaned up after itself; one that died
            // left a record, perhaps mounts.
            match state.get(&request.id) {
                Some(record) => detach::clean_up(state, &record),
                None => state.remove(&request.id),
            }
            Err(error)
        }
    }
}

/// Sends the holder its request; its answer, `None` if it ended without one.
fn ask(child: &mut Child, request: &holder::Request) -> Option<Answer> {
    let mut stdin = child.stdin.take()?;
    let line = serde_json::to_string(request).ok()?;
    // Dropping stdin closes it: the holder reads one line.
    writeln!(stdin, "{line}").ok()?;
    drop(stdin);
    let mut reply = String::new();
    BufReader::new(child.stdout.take()?)
        .read_line(&mut reply)
        .ok()?;
    Answer::parse(&reply)
}

/// The last lines of a holder's log, as a suffix for an error message.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    let _ = std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_LINES)..].join("; ");
    match tail.is_empty() {
        true => String::new(),
        false => format!(": {tail}"),
    }
}

/// Hands the disk to the kernel's nbd driver and mounts it; no process
/// stays. The record is claimed first (with this process as its holder,
/// so that a sweep leaves it alone while it is being made).
fn attach_with_kernel(
    state: &StateDir,
    target: &Target,
    mount: &Path,
    args: &AttachArgs,
) -> Result<PathBuf, Error> {
    let id = random_id();
    let backend = format!("scratchd-attach:{id}");
    let mut record = Record {
        id: id.clone(),
        kind: Kind::Kernel,
        mount: mount.to_owned(),
        device: None,
        export: target.export.clone(),
        uri: target.to_string(),
        holder: Some(Process::current().map_err(Error::Process)?),
        fuse_dir: None,
        backend: Some(backend.clone()),
    };
    state.claim(&record)?;
    let attached = attach_kernel(
        target,
        args.front_end.connections,
        mount,
        &args.front_end.mount_options,
        backend,
    )
    .inspect_err(|_| state.remove(&id))?;
    record.device = Some(attached.device_path().to_owned());
    record.holder = None;
    if let Err(e) = state.write(&record) {
        attached.detach();
        state.remove(&id);
        return Err(e.into());
    }
    let device = attached.device_path().to_owned();
    attached.keep();
    Ok(device)
}
