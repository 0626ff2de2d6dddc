//! `scratchd detach DIR|DEVICE`: undoes an attachment; `--stale` removes
//! what attachments whose holder died left behind; `--all` detaches every
//! attachment.
//!
//! A live FUSE attachment: unmount DIR (lazily if still busy after a
//! second), then SIGTERM to the holder, which lets the loop device go,
//! unmounts its FUSE file, disconnects from the server (whose linger starts
//! then) and removes the record; after [`HOLDER_GRACE`] it is killed and
//! its leftovers are removed as a stale attachment's.
//!
//! A stale attachment (its holder died: `kill -9`, OOM killer): its FUSE
//! connection died with it (the kernel aborts a connection when the last
//! `/dev/fuse` descriptor closes), so the file system on DIR fails every
//! I/O that reaches the disk and nothing hangs; what is left is a mount
//! at DIR, perhaps a loop device, the dead FUSE mount and the record.
//! They go in that order: DIR lazily (its writeback fails at once), the
//! loop device (only if still backed by this attachment's file), the FUSE
//! mount, then the record, log and directory.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal};
use scratchd_attach::{fuse, loopdev, nbd_kernel, ns};
use tracing::{debug, info, warn};

use super::state::{Kind, Process, Record, StateDir, StateError};
use crate::with_causes;

/// How long a holder may take to tear down after SIGTERM: more than the
/// [`crate::attachment::LAZY_GRACE`] it serves a lazily detached file
/// system.
pub const HOLDER_GRACE: Duration = Duration::from_secs(10);

#[derive(Args)]
#[command(group = clap::ArgGroup::new("what").required(true))]
pub struct DetachArgs {
    /// The attachment's mount point or block device.
    #[arg(value_name = "DIR|DEVICE", group = "what")]
    target: Option<PathBuf>,
    /// Remove what attachments whose holder died left behind (mount, loop
    /// device, FUSE mount, record).
    #[arg(long, group = "what")]
    stale: bool,
    /// Detach every attachment.
    #[arg(long, group = "what")]
    all: bool,
    /// More log output (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Why an attachment could not be detached.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{} is not attached (no record of it as a mount point or device)", .0.display())]
    Unknown(PathBuf),
    #[error("cannot unmount {}", dir.display())]
    Unmount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is still being attached by process {pid}; try again", dir.display())]
    Attaching { dir: PathBuf, pid: u32 },
    #[error("cannot stop the holder (process {pid})")]
    Holder {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

pub fn main(args: DetachArgs) -> i32 {
    crate::serve::init_logging(args.verbose, None);
    let result = StateDir::open()
        .map_err(DetachError::from)
        .and_then(|state| {
            if args.stale {
                sweep_stale(&state);
                Ok(())
            } else if args.all {
                detach_all(&state)
            } else {
                let target = args.target.as_deref().expect("clap requires one");
                detach_path(&state, target)
            }
        });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("scratchd detach: {}", with_causes(&e));
            1
        }
    }
}

/// Detaches the attachment mounted at, or attached as, `path`.
fn detach_path(state: &StateDir, path: &Path) -> Result<(), DetachError> {
    // A mount point whose disk is dead may not even stat: then the path as
    // given, made absolute.
    let canonical = std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_owned());
    let record = state
        .find(&canonical)
        .ok_or_else(|| DetachError::Unknown(path.to_owned()))?;
    detach(state, &record)
}

/// Detaches every attachment; the first error is returned, after trying
/// them all.
fn detach_all(state: &StateDir) -> Result<(), DetachError> {
    let mut first = Ok(());
    for record in state.records() {
        if let Err(e) = detach(state, &record) {
            warn!(mount = %record.mount.display(), error = %with_causes(&e), "cannot detach");
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Undoes one attachment.
pub fn detach(state: &StateDir, record: &Record) -> Result<(), DetachError> {
    let holder = record.holder.filter(Process::alive);
    match (record.kind, holder) {
        (Kind::Fuse, Some(holder)) => {
            unmount_dir(record)?;
            stop_holder(holder)?;
            // A holder that finished removed its record; one that was
            // killed left what a stale attachment leaves.
            if let Some(left) = state.get(&record.id) {
                clean_up(state, &left);
            }
        }
        (Kind::Kernel, Some(holder)) => {
            return Err(DetachError::Attaching {
                dir: record.mount.clone(),
                pid: holder.pid,
            })
        }
        (Kind::Kernel, None) => {
            unmount_dir(record)?;
            disconnect_if_ours(record);
            state.remove(&record.id);
        }
        (Kind::Fuse, None) => clean_up(state, record),
    }
    info!(mount = %record.mount.display(), "detached");
    Ok(())
}

/// Unmounts the attachment's file system, if it is still what is mounted
/// at its directory (retried while busy for a second, then lazily).
fn unmount_dir(record: &Record) -> Result<(), DetachError> {
    let Some(device) = &record.device else {
        return Ok(());
    };
    if ns::mount_source(&record.mount).as_ref() != Some(device) {
        return Ok(());
    }
    match ns::unmount(&record.mount) {
        Ok(how) => {
            debug!(mount = %record.mount.display(), ?how, "unmounted");
            Ok(())
        }
        Err(source) => Err(DetachError::Unmount {
            dir: record.mount.clone(),
            source,
        }),
    }
}

/// SIGTERM to the holder, and waits for it to go; SIGKILL after
/// [`HOLDER_GRACE`].
fn stop_holder(holder: Process) -> Result<(), DetachError> {
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

/// How long a log without a record is left alone: an attach writes its
/// holder's log a moment before the holder claims the record.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes what attachments whose holder died left behind (see the module
/// docs); returns how many it removed. Live attachments are not touched.
pub fn sweep_stale(state: &StateDir) -> usize {
    let stale: Vec<Record> = state.records().into_iter().filter(is_stale).collect();
    for record in &stale {
        info!(mount = %record.mount.display(), id = %record.id, "removing a stale attachment");
        clean_up(state, record);
    }
    let orphans = state.remove_orphans(ORPHAN_AGE);
    if orphans > 0 {
        info!(
            orphans,
            "removed logs of attaches that died before their record"
        );
    }
    stale.len()
}

/// Whether nothing keeps the attachment any more: its holder died, or the
/// kernel no longer has its device (someone unmounted it, and
/// disconnect-on-close took the device away).
fn is_stale(record: &Record) -> bool {
    match (record.holder, record.kind) {
        (Some(holder), _) => !holder.alive(),
        (None, Kind::Kernel) => {
            nbd_index(record).and_then(nbd_kernel::backend_of) != record.backend
        }
        (None, Kind::Fuse) => true,
    }
}

/// Removes a dead attachment's leftovers, each only if it is still this
/// attachment's (see the module docs).
pub fn clean_up(state: &StateDir, record: &Record) {
    if record.kind == Kind::Fuse {
        abort_fuse(record);
    }
    if let Some(device) = &record.device {
        if ns::mount_source(&record.mount).as_ref() == Some(device) {
            if let Err(e) = ns::unmount_lazily(&record.mount) {
                warn!(mount = %record.mount.display(), error = %e, "cannot unmount");
            }
        }
    }
    match record.kind {
        Kind::Fuse => release_fuse(record),
        Kind::Kernel => disconnect_if_ours(record),
    }
    state.remove(&record.id);
}

/// Aborts the attachment's FUSE connection. A killed holder's connection is
/// aborted already (the kernel does it when the last `/dev/fuse`
/// descriptor closes), unless one of its threads is stuck in an
/// uninterruptible wait on its own file system (unmounting DIR when it was
/// killed): then the holder cannot finish dying, and this frees it. After
/// it, nothing can wait on the disk.
fn abort_fuse(record: &Record) {
    let Some(id) = record.fuse_dir.as_deref().and_then(fuse::connection_at) else {
        return;
    };
    if let Err(e) = fuse::abort_connection(id) {
        debug!(id, error = %e, "cannot abort the FUSE connection");
    }
}

/// The loop device (if still on this attachment's file) and the dead FUSE
/// mount.
fn release_fuse(record: &Record) {
    let Some(fuse_dir) = &record.fuse_dir else {
        return;
    };
    if let Some(device) = &record.device {
        match loopdev::detach_if_backed_by(device, &fuse_dir.join(fuse::FILE_NAME)) {
            Ok(true) => debug!(device = %device.display(), "loop device detached"),
            Ok(false) => {}
            Err(e) => warn!(device = %device.display(), error = %e, "cannot detach"),
        }
    }
    if ns::mount_at(fuse_dir).is_some() {
        if let Err(e) = ns::unmount_lazily(fuse_dir) {
            warn!(dir = %fuse_dir.display(), error = %e, "cannot unmount the FUSE file");
        }
    }
}

/// `NBD_CMD_DISCONNECT` for a kernel attachment's device, if the kernel
/// still shows it as ours (disconnect-on-close usually took it away with
/// the mount already).
fn disconnect_if_ours(record: &Record) {
    let Some(index) = nbd_index(record) else {
        return;
    };
    if nbd_kernel::backend_of(index) != record.backend {
        return;
    }
    if let Err(e) = nbd_kernel::disconnect(index) {
        warn!(index, error = %e, "cannot disconnect the nbd device");
    }
}

/// N of a kernel attachment's `/dev/nbdN`.
fn nbd_index(record: &Record) -> Option<u32> {
    let name = record.device.as_ref()?.file_name()?.to_str()?;
    name.strip_prefix("nbd")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_indexes_come_from_the_device_name() {
        let mut record = Record {
            id: "x".into(),
            kind: Kind::Kernel,
            mount: "/mnt".into(),
            device: Some("/dev/nbd12".into()),
            export: "e".into(),
            uri: "nbd://h/e".into(),
            holder: None,
            fuse_dir: None,
            backend: Some("scratchd-attach:x".into()),
        };
        assert_eq!(nbd_index(&record), Some(12));
        // No such device here: the kernel shows no backend, so it is stale.
        assert!(is_stale(&record));
        record.device = Some("/dev/loop3".into());
        assert_eq!(nbd_index(&record), None);
    }
}
