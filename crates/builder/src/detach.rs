//! `scratchd detach DIR|DEVICE`: undoes a kept attachment; `--stale`
//! removes what attachments whose holder died left behind; `--all`
//! detaches every attachment. What is undone, and how, is the front end's
//! (the record's `kind`, [`crate::frontend`]); this module finds the
//! records and holds what front ends share.
//!
//! A live FUSE attachment: unmount DIR (lazily if still busy after a
//! second), then SIGTERM to the holder, which lets the loop device go,
//! unmounts its FUSE file, disconnects from the server (whose linger starts
//! then) and removes the record; after [`crate::holder::HOLDER_GRACE`] it
//! is killed and its leftovers are removed as a stale attachment's.
//!
//! A stale attachment (its holder died: `kill -9`, OOM killer; or a kernel
//! one whose device the kernel no longer shows as its own): its FUSE
//! connection died with it (the kernel aborts a connection when the last
//! `/dev/fuse` descriptor closes), so the file system on DIR fails every
//! I/O that reaches the disk and nothing hangs; what is left is a mount
//! at DIR, perhaps a loop device, the dead FUSE mount and the record.
//! They go in that order: DIR lazily (its writeback fails at once), the
//! loop device (only if still backed by this attachment's file), the FUSE
//! mount, then the record, log and directory.

use std::io;
use std::path::{Path, PathBuf};

use scratchd_attach::ns;
use tracing::{debug, info, warn};

use crate::state::{Process, Record, StateDir, StateError};

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

/// What `scratchd detach` is asked to detach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detach {
    /// The attachment mounted at, or attached as, this path.
    Path(PathBuf),
    /// What dead attachments left.
    Stale,
    /// Every attachment.
    All,
}

/// `scratchd detach`.
pub fn detach(what: &Detach) -> Result<(), DetachError> {
    let state = StateDir::open()?;
    match what {
        Detach::Path(path) => detach_path(&state, path),
        Detach::Stale => {
            sweep_stale(&state);
            Ok(())
        }
        Detach::All => detach_all(&state),
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
    detach_record(state, &record)
}

/// Detaches every attachment; the first error is returned, after trying
/// them all.
fn detach_all(state: &StateDir) -> Result<(), DetachError> {
    let mut first = Ok(());
    for record in state.records() {
        if let Err(e) = detach_record(state, &record) {
            warn!(
                mount = %record.mount.display(),
                error = &e as &dyn std::error::Error,
                "cannot detach"
            );
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Undoes one attachment, as its front end does.
pub fn detach_record(state: &StateDir, record: &Record) -> Result<(), DetachError> {
    let holder = record.holder.filter(Process::alive);
    record.kind.driver().detach(state, record, holder)?;
    info!(mount = %record.mount.display(), "detached");
    Ok(())
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
    let devices = crate::frontend::kernel::disconnect_dead_runs_devices();
    if devices > 0 {
        info!(devices, "disconnected the nbd devices of killed runs");
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

/// Whether nothing keeps the attachment any more: its holder died, or,
/// without a holder, its front end no longer finds it.
fn is_stale(record: &Record) -> bool {
    match record.holder {
        Some(holder) => !holder.alive(),
        None => !record.kind.driver().attached_without_holder(record),
    }
}

/// Removes a dead attachment's leftovers, each only if it is still this
/// attachment's (see the module docs), and its record.
pub fn clean_up(state: &StateDir, record: &Record) {
    record.kind.driver().clean_up(record);
    state.remove(&record.id);
}

/// Whether the attachment's file system is what is mounted at its
/// directory: the mount's source is the record's device, and that device
/// is still this attachment's ([`crate::frontend::Driver::device_is_ours`]):
/// a device a dead attachment let go may carry someone else's disk since,
/// mounted at the same place.
pub(crate) fn mounted_at_its_dir(record: &Record) -> bool {
    let Some(device) = &record.device else {
        return false;
    };
    ns::mount_source(&record.mount).as_ref() == Some(device)
        && record.kind.driver().device_is_ours(record)
}

/// Unmounts the attachment's file system, if it is still what is mounted
/// at its directory (retried while busy for a second, then lazily); how,
/// or `None` if it was not mounted there.
pub(crate) fn unmount_dir(record: &Record) -> Result<Option<ns::Unmounted>, DetachError> {
    if !mounted_at_its_dir(record) {
        return Ok(None);
    }
    // A file system the kernel serves alone can be opened to be written
    // back after a lazy unmount; one served by a process of ours not safely.
    let unmounted = match record.kind.driver().served_here() {
        true => ns::unmount(&record.mount),
        false => ns::unmount_keeping_root(&record.mount),
    };
    match unmounted {
        Ok(how) => {
            debug!(mount = %record.mount.display(), ?how, "unmounted");
            Ok(Some(how))
        }
        Err(source) => Err(DetachError::Unmount {
            dir: record.mount.clone(),
            source,
        }),
    }
}

/// Unmounts a dead attachment's file system lazily (its writeback fails at
/// once), if it is still what is mounted at its directory.
pub(crate) fn unmount_lazily_if_ours(record: &Record) {
    if mounted_at_its_dir(record) {
        if let Err(e) = ns::unmount_lazily(&record.mount) {
            warn!(mount = %record.mount.display(), error = %e, "cannot unmount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::FrontEnd;

    #[test]
    fn a_kernel_record_whose_device_is_gone_is_stale() {
        let record = Record::kernel_example();
        // No such device here: the kernel shows no backend.
        assert!(is_stale(&record));
        let fuse = Record {
            kind: FrontEnd::Fuse,
            ..record.clone()
        };
        assert!(is_stale(&fuse), "a FUSE attachment without its holder");
        let attaching = Record {
            holder: Some(Process::current().unwrap()),
            ..record
        };
        assert!(!is_stale(&attaching), "its attach is under way");
    }
}
