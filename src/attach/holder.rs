//! The holder: the background process that serves a FUSE attachment's
//! disk file for as long as it is attached (`scratchd attach-holder`,
//! started by `scratchd attach`, never by hand).
//!
//! It runs in a session of its own (no terminal's Ctrl-C or hangup
//! reaches it), in `/` (it pins no directory), with its standard error in
//! the attachment's log file, `ID.log` in the state directory. It reads its
//! [`Request`] on standard input (not from its command line, which every
//! local user can read: the export name is the disk's key), then:
//! claims the mount point (the record), connects, serves the disk as a
//! FUSE file, attaches a loop device, mounts it, updates the record, and
//! writes `ready DEVICE` (or `error MESSAGE`, after undoing what it did)
//! on standard output, which it then points at `/dev/null`.
//!
//! SIGTERM, SIGINT or SIGHUP (`scratchd detach`) tear it down in order:
//! DIR if still mounted, the loop device, the FUSE file, the connections
//! (cleanly, so the server's linger starts), the record.
//!
//! No watchdog as `scratchd run` has one: a killed holder's mounts are the
//! host's, not a namespace's torn down with it, and its death closes its
//! `/dev/fuse` descriptors, on which the kernel aborts the connection, so
//! the file system fails its I/O instead of waiting.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use scratchd_client::{Client, Target};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

use super::state::{ClaimError, Kind, Process, Record, StateDir, StateError};
use crate::attachment::{connect_remote, AttachError, Attached, FuseSetup};
use crate::with_causes;

/// The hidden subcommand that runs a holder.
pub const SUBCOMMAND: &str = "attach-holder";

/// How often the holder looks whether its connections still work, to log
/// when the server went away.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// What `scratchd attach` asks of its holder.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The attachment's id, naming its record, log and FUSE mount point.
    pub id: String,
    /// The export's URI, with the export.
    pub uri: String,
    pub connections: usize,
    /// The mount point (canonical).
    pub mount: PathBuf,
    pub mount_options: String,
    pub verbose: u8,
}

/// What the holder answers on standard output.
pub enum Answer {
    Ready(PathBuf),
    Failed(String),
}

impl Answer {
    pub fn parse(line: &str) -> Option<Answer> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if let Some(device) = line.strip_prefix("ready ") {
            return Some(Answer::Ready(device.into()));
        }
        line.strip_prefix("error ")
            .map(|message| Answer::Failed(message.to_owned()))
    }
}

/// Why a holder could not attach.
#[derive(Debug, thiserror::Error)]
enum HolderError {
    #[error("cannot read the request: {0}")]
    Request(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("cannot make the FUSE mount point: {0}")]
    FuseDir(#[source] io::Error),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("cannot read this process's start time: {0}")]
    Process(#[source] io::Error),
    #[error("cannot catch signals: {0}")]
    Signals(#[source] io::Error),
    #[error("stopped by signal {0} while attaching")]
    Stopped(i32),
}

/// `scratchd attach-holder`.
pub fn main() -> i32 {
    // Before anything: out of the caller's session and directory.
    let _ = rustix::process::setsid();
    let _ = std::env::set_current_dir("/");
    // Caught from the start: a detach while attaching undoes the attach.
    let stops = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(HolderError::Signals);
    let request = read_request();
    let verbose = request.as_ref().map_or(0, |r| r.verbose);
    crate::serve::init_logging(verbose, None);
    let held = stops.and_then(|stops| attach(request?, stops));
    let mut held = match held {
        Ok(held) => held,
        Err(e) => {
            // One line: mount's own messages may have several.
            let message = with_causes(&e).replace('\n', "; ");
            warn!("{message}");
            // scratchd attach may be gone: then nobody is left to tell.
            let _ = answer(&format!("error {message}"));
            return 1;
        }
    };
    if answer(&format!("ready {}", held.attached.device_path().display())).is_err() {
        warn!("scratchd attach is gone; detaching");
        held.release();
        return 1;
    }
    detach_stdio();
    watch_server(Arc::downgrade(&held.client));
    let signal = held.stops.forever().next();
    info!(?signal, "detaching");
    held.release();
    0
}

fn read_request() -> Result<Request, HolderError> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| HolderError::Request(e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| HolderError::Request(e.to_string()))
}

/// Writes one line to `scratchd attach`.
fn answer(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// Points standard input and output at `/dev/null`: `scratchd attach` has
/// gone, and a write to its pipe would fail.
fn detach_stdio() {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(null) => {
            let _ = rustix::stdio::dup2_stdin(&null);
            let _ = rustix::stdio::dup2_stdout(&null);
        }
        Err(e) => warn!(error = %e, "cannot open /dev/null"),
    }
}

/// An attachment being held.
struct Held {
    state: StateDir,
    id: String,
    stops: Signals,
    client: Arc<Client>,
    attached: Attached,
}

impl Held {
    /// Tears down in order (see the module docs) and removes the record.
    fn release(self) {
        let Held {
            state,
            id,
            client,
            attached,
            ..
        } = self;
        let started = std::time::Instant::now();
        attached.detach();
        close(client);
        state.remove(&id);
        info!(took = ?started.elapsed(), "detached");
    }
}

/// Disconnects cleanly (DISC), so the server knows the disk is let go.
fn close(client: Arc<Client>) {
    match Arc::try_unwrap(client) {
        Ok(client) => {
            if let Err(e) = client.close() {
                warn!(error = %e, "disconnecting from the server");
            }
        }
        // The health check holds it for an instant: dropping disconnects
        // as well, without the errors.
        Err(client) => drop(client),
    }
}

/// Claims the mount point and attaches; on failure, what was done is
/// undone and the record removed.
fn attach(request: Request, mut stops: Signals) -> Result<Held, HolderError> {
    let state = StateDir::open()?;
    let target = Target::parse(&request.uri).map_err(|e| AttachError::Server(e.into()))?;
    let fuse_dir = state.fuse_dir(&request.id);
    let mut record = Record {
        id: request.id.clone(),
        kind: Kind::Fuse,
        mount: request.mount.clone(),
        device: None,
        export: target.export.clone(),
        uri: request.uri.clone(),
        holder: Some(Process::current().map_err(HolderError::Process)?),
        fuse_dir: Some(fuse_dir.clone()),
        backend: None,
    };
    state.claim(&record)?;
    let claimed = Claimed {
        state: &state,
        id: &request.id,
    };
    std::fs::create_dir(&fuse_dir).map_err(HolderError::FuseDir)?;
    let client = Arc::new(connect_remote(&target, request.connections)?);
    let setup = FuseSetup {
        fuse_dir: &fuse_dir,
        mount: &request.mount,
        mount_options: Some(&request.mount_options),
        threads: request.connections,
    };
    // Nothing to watch: see the module docs.
    let attached = Attached::attach(client.clone(), &setup, |_| Ok(()))?;
    record.device = Some(attached.device_path().to_owned());
    state.write(&record)?;
    if let Some(signal) = stops.pending().next() {
        return Err(HolderError::Stopped(signal));
    }
    info!(
        export = %record.export,
        device = %attached.device_path().display(),
        mount = %request.mount.display(),
        "attached"
    );
    std::mem::forget(claimed);
    Ok(Held {
        state,
        id: request.id,
        stops,
        client,
        attached,
    })
}

/// A claimed record, removed on drop unless forgotten (the attach
/// succeeded).
struct Claimed<'a> {
    state: &'a StateDir,
    id: &'a str,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        self.state.remove(self.id);
    }
}

/// Logs, once, that the server went away: I/O on the disk fails (EIO)
/// from then on, and the holder stays until it is detached.
fn watch_server(client: Weak<Client>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(HEALTH_INTERVAL);
        let Some(client) = client.upgrade() else {
            return;
        };
        if let Some(reason) = client.lost() {
            warn!(
                reason,
                "the connection to the server broke: the disk's I/O fails until it is detached"
            );
            return;
        }
    });
}
