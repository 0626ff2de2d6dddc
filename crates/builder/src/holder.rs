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
//! (cleanly, so the server's linger starts), the record. So does an
//! unmount of DIR from outside (Koji mode: kojid unmounts build roots
//! itself), which [`crate::mount_watch`] notices without polling.
//!
//! [`start`] is `scratchd attach`'s side: it starts the holder and waits
//! for its answer; [`stop`] is `scratchd detach`'s.
//!
//! No watchdog as `scratchd run` has one: a killed holder's mounts are the
//! host's, not a namespace's torn down with it, and its death closes its
//! `/dev/fuse` descriptors, on which the kernel aborts the connection, so
//! the file system fails its I/O instead of waiting.

use std::error::Error;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Weak;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};
use scratchd_attach::ns;
use scratchd_client::{Client, Target};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, info, warn};

use crate::detach::{self, DetachError};
use crate::frontend::fuse::FuseAttached;
use crate::frontend::{
    AttachError, Attachment, Disk, FrontEnd, KeepRequest, Setup, WriteBehindMode,
};
use crate::id::{fingerprint, SECRET_VARS};
use crate::mount_watch::{self, FsId};
use crate::state::{ClaimError, Process, Record, StateDir, StateError};

/// The hidden subcommand of the `scratchd` binary that runs a holder
/// ([`Holder`]); [`start`] runs it as `/proc/self/exe SUBCOMMAND`.
pub const SUBCOMMAND: &str = "attach-holder";

/// How often the holder looks whether its connections still work, to log
/// when the server went away.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Lines of a dead holder's log shown with the error.
const LOG_LINES: usize = 5;

/// How long a holder may take to tear down after SIGTERM: more than the
/// [`crate::frontend::fuse::LAZY_GRACE`] it serves a lazily detached file
/// system.
pub const HOLDER_GRACE: Duration = Duration::from_secs(10);

/// What `scratchd attach` asks of its holder.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// The attachment's id, naming its record, log and FUSE mount point.
    pub id: String,
    /// The export's URI, with the export.
    pub uri: String,
    pub connections: usize,
    /// `--write-behind` (a holder of an older attach: auto).
    #[serde(default)]
    pub write_behind: WriteBehindMode,
    /// The mount point (canonical).
    pub mount: PathBuf,
    pub mount_options: String,
    /// The file system's type (a holder of an older attach: ext4).
    #[serde(default = "default_fs_type")]
    pub fs_type: String,
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

/// Starts a holder for `request` and waits for its answer; the block
/// device. A holder that failed cleaned up after itself; what one that
/// died left is cleaned up here.
pub(crate) fn start(state: &StateDir, request: &KeepRequest) -> Result<PathBuf, AttachError> {
    let request = Request {
        id: request.id.to_owned(),
        uri: request.target.to_string(),
        connections: request.connections,
        write_behind: request.write_behind,
        mount: request.mount.to_owned(),
        mount_options: request.mount_options.to_owned(),
        fs_type: request.fs_type.to_owned(),
        verbose: request.verbose,
    };
    let log = state.open_log(&request.id)?;
    let exe = std::env::current_exe().map_err(AttachError::Spawn)?;
    let mut command = Command::new(exe);
    // It has its request; it starts nothing that should see the names.
    for var in SECRET_VARS {
        command.env_remove(var);
    }
    let mut child = command
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(AttachError::Spawn)?;
    debug!(pid = child.id(), id = %request.id, "holder started");
    let answer = ask(&mut child, &request);
    match answer {
        Some(Answer::Ready(device)) => Ok(device),
        failed => {
            let status = child.wait().map_err(AttachError::Spawn)?;
            let error = match failed {
                Some(Answer::Failed(message)) => AttachError::Holder(message),
                _ => AttachError::HolderDied {
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
fn ask(child: &mut Child, request: &Request) -> Option<Answer> {
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

/// SIGTERM to the holder, and waits for it to go; SIGKILL after
/// [`HOLDER_GRACE`].
pub(crate) fn stop(holder: Process) -> Result<(), DetachError> {
    let failed = |source: io::Error| DetachError::Holder {
        pid: holder.pid,
        source,
    };
    let Some(pid) = Pid::from_raw(holder.pid as i32) else {
        return Ok(());
    };
    // The descriptor pins the process: checked once, signals through it
    // can reach no other process that later gets the same pid.
    let pidfd = match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(failed(e.into())),
    };
    if !holder.alive() {
        return Ok(());
    }
    // A record names a pid; only a scratchd process, started when the
    // record says, is signalled (checked after the pidfd pins it).
    if !holder.runs_this_program() {
        // Or it is exiting, and its executable no longer reads (the kernel
        // lets it go a moment before the exit shows on the pidfd): a holder
        // ends by itself when it sees its directory unmounted, as a detach
        // does just before this (seen in twenty attach cycles).
        if wait_for_exit(&pidfd, Duration::from_secs(1)) {
            return Ok(());
        }
        warn!(
            pid = holder.pid,
            "the record's holder is not a scratchd process; not signalled"
        );
        return Err(failed(io::Error::other("not a scratchd process")));
    }
    rustix::process::pidfd_send_signal(&pidfd, Signal::TERM).map_err(|e| failed(e.into()))?;
    if wait_for_exit(&pidfd, HOLDER_GRACE) {
        return Ok(());
    }
    warn!(
        pid = holder.pid,
        "the holder did not stop within {HOLDER_GRACE:?}; killing it"
    );
    rustix::process::pidfd_send_signal(&pidfd, Signal::KILL).map_err(|e| failed(e.into()))?;
    wait_for_exit(&pidfd, Duration::from_secs(5));
    Ok(())
}

/// Waits up to `within` for the process behind `pidfd` to exit; whether it
/// did. (It is not our child: its exit shows as the descriptor becoming
/// readable.)
fn wait_for_exit(pidfd: &OwnedFd, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            Err(e) => {
                warn!(error = %e, "cannot wait for the holder");
                return false;
            }
        }
    }
}

/// Why a holder could not attach.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("cannot read the request: {0}")]
    Request(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("cannot read this process's start time: {0}")]
    Process(#[source] io::Error),
    #[error("cannot catch signals: {0}")]
    Signals(#[source] io::Error),
    #[error("stopped by signal {0} while attaching")]
    Stopped(i32),
}

/// The holder process (`scratchd attach-holder`), from its start: out of
/// the caller's session and directory, the stopping signals caught, its
/// request read. The binary sets up logging ([`Holder::verbose`]) and then
/// [`Holder::run`]s it.
pub struct Holder {
    stops: Result<Signals, HolderError>,
    request: Result<Request, HolderError>,
}

impl Holder {
    pub fn begin() -> Holder {
        // Before anything: out of the caller's session and directory.
        let _ = rustix::process::setsid();
        let _ = std::env::set_current_dir("/");
        // Caught from the start: a detach while attaching undoes the attach.
        let stops = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(HolderError::Signals);
        Holder {
            stops,
            request: read_request(),
        }
    }

    /// The verbosity `scratchd attach` was given (0 if the request did not
    /// come).
    pub fn verbose(&self) -> u8 {
        self.request.as_ref().map_or(0, |r| r.verbose)
    }

    /// Attaches, answers `scratchd attach`, and holds the attachment until
    /// a stopping signal; the process's exit status. `describe` puts an
    /// error and its causes on one line, for the answer.
    pub fn run(self, describe: fn(&dyn Error) -> String) -> i32 {
        let Holder { stops, request } = self;
        let name = request
            .as_ref()
            .ok()
            .and_then(|r| Target::parse(&r.uri).ok());
        let name = name.map(|target| target.export).unwrap_or_default();
        let held = stops.and_then(|stops| attach(request?, stops));
        let mut held = match held {
            Ok(held) => held,
            Err(e) => {
                // One line: mount's own messages may have several.
                let message = describe(&e).replace('\n', "; ");
                // The server's refusal names the export: not in the log.
                warn!("{}", hide_name(&message, &name));
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
        if let Some(client) = held.attached.client() {
            watch_server(std::sync::Arc::downgrade(client));
        }
        held.watch_unmount();
        match held.stops.forever().next() {
            Some(signal) => info!(signal, "detaching"),
            None => info!("the disk was unmounted from outside; detaching"),
        }
        held.release();
        0
    }
}

/// `text` with the disk's name replaced by its fingerprint.
fn hide_name(text: &str, name: &str) -> String {
    match name.is_empty() {
        true => text.to_owned(),
        false => text.replace(name, &format!("<disk {}>", fingerprint(name))),
    }
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
    attached: FuseAttached,
    /// The mounted file system, whose unmount from outside ends the hold.
    fs: Option<FsId>,
}

impl Held {
    /// Ends the wait for a stopping signal once the file system is
    /// unmounted from outside ([`crate::mount_watch`]).
    fn watch_unmount(&self) {
        let Some(fs) = self.fs else {
            warn!("the mount is not in the mount table: an unmount from outside goes unnoticed");
            return;
        };
        let stops = self.stops.handle();
        if let Err(e) = mount_watch::on_unmount(fs, move || stops.close()) {
            warn!(
                error = &e as &dyn Error,
                "an unmount from outside goes unnoticed"
            );
        }
    }

    /// Tears down in order (see the module docs) and removes the record.
    fn release(self) {
        let Held {
            state,
            id,
            attached,
            ..
        } = self;
        let started = Instant::now();
        // Disconnects cleanly (DISC) last, so the server knows the disk is
        // let go.
        Box::new(attached).detach();
        state.remove(&id);
        info!(took = ?started.elapsed(), "detached");
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
        kind: FrontEnd::Fuse,
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
    let setup = Setup {
        mount: &request.mount,
        mount_options: Some(&request.mount_options),
        fs_type: &request.fs_type,
        connections: request.connections,
        write_behind: request.write_behind,
        private_dir: &fuse_dir,
        label: &request.id,
        // The FUSE front end has none.
        request_timeout: crate::frontend::kernel::REQUEST_TIMEOUT,
    };
    // Nothing to watch: see the module docs.
    let attached = FuseAttached::attach(Disk::Server(&target), &setup, &mut |_| Ok(()))?;
    record.device = Some(attached.device_path().to_owned());
    state.write(&record)?;
    if let Some(signal) = stops.pending().next() {
        return Err(HolderError::Stopped(signal));
    }
    // The name is the disk's key: info shows its fingerprint, debug the name.
    debug!(export = %record.export, "the disk's name");
    info!(
        disk = %fingerprint(&record.export),
        device = %attached.device_path().display(),
        mount = %request.mount.display(),
        "attached"
    );
    // Ours only if our device is what is mounted there.
    let fs = (ns::mount_source(&request.mount).as_deref() == Some(attached.device_path()))
        .then(|| FsId::mounted_at(&request.mount))
        .flatten();
    std::mem::forget(claimed);
    Ok(Held {
        state,
        id: request.id,
        stops,
        attached,
        fs,
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

fn default_fs_type() -> String {
    "ext4".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's refusal names the export; the holder's log must not.
    #[test]
    fn logged_errors_show_the_fingerprint_not_the_name() {
        let message = r#"unix:/s refused export "build-42" (GO: ERR_UNKNOWN)"#;
        assert_eq!(
            hide_name(message, "build-42"),
            r#"unix:/s refused export "<disk 9bf1b543>" (GO: ERR_UNKNOWN)"#
        );
        assert_eq!(hide_name(message, ""), message, "no name, nothing hidden");
    }
}
