//! Noticing that a kept attachment's file system was unmounted from
//! outside (Koji mode): kojid tears a build root down with its own
//! `umount` (lazy or not) and never calls `scratchd detach`, so the holder
//! must see the mount go and release what it holds.
//!
//! No polling loop: the kernel marks `/proc/self/mountinfo` with
//! `POLLPRI` (and `POLLERR`) whenever this mount namespace's mount table
//! changes, so a thread sleeps in `poll(2)` until something was mounted or
//! unmounted, then reads the table again. The file system is known by its
//! device number (`MAJ:MIN` in the table, `st_dev` of its files), taken
//! from its mount when it was mounted: a mount stacked on top of it, or a
//! bind mount of it elsewhere, leaves it in the table, and it counts as
//! gone only when no mount of it is left. A lazy unmount takes it out of
//! the table at once, while the file system lives on until its last user
//! lets go; the holder's release waits for that (the loop device goes with
//! the file system) before it stops serving the disk.
//!
//! The holder made the mount, so the table it reads is the mount
//! namespace the mount is in.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;

use rustix::event::{PollFd, PollFlags};
use scratchd_attach::ns;
use tracing::{debug, warn};

/// The table of this process's mount namespace.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// A file system's device number, as the mount table writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsId {
    pub major: u32,
    pub minor: u32,
}

impl FsId {
    /// The file system mounted (topmost) at `dir`, if any.
    pub fn mounted_at(dir: &Path) -> Option<FsId> {
        ns::mount_at(dir).map(|m| FsId {
            major: m.major,
            minor: m.minor,
        })
    }

    /// Whether any mount in the text of a mountinfo table is of this file
    /// system.
    fn in_table(self, table: &str) -> bool {
        let wanted = format!("{}:{}", self.major, self.minor);
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT ...
        table
            .lines()
            .any(|line| line.split(' ').nth(2) == Some(wanted.as_str()))
    }
}

/// Why the mount table cannot be watched (the attachment then stays until
/// `scratchd detach`, as without Koji mode).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot read {MOUNTINFO}")]
    Read(#[source] io::Error),
    #[error("cannot wait for changes of {MOUNTINFO}")]
    Poll(#[source] io::Error),
}

/// Starts a thread that calls `gone` once no mount of `fs` is left in this
/// mount namespace (at once if there is none now).
pub fn on_unmount(fs: FsId, gone: impl FnOnce() + Send + 'static) -> Result<(), WatchError> {
    let table = File::open(MOUNTINFO).map_err(WatchError::Read)?;
    std::thread::Builder::new()
        .name("mount-watch".into())
        .spawn(move || match wait_until_gone(table, fs) {
            Ok(()) => {
                debug!(?fs, "the file system was unmounted from outside");
                gone();
            }
            // Without the watch the attachment stays until detached.
            Err(e) => warn!(
                error = &e as &dyn std::error::Error,
                "cannot watch the mount table: an unmount from outside goes unnoticed"
            ),
        })
        .map_err(|e| WatchError::Read(io::Error::other(e)))?;
    Ok(())
}

/// Returns once `fs` is in no line of the table behind `table`. The
/// kernel's change mark is reset by each `poll`, and was set at open: a
/// change between reading the table and polling wakes the poll at once.
fn wait_until_gone(mut table: File, fs: FsId) -> Result<(), WatchError> {
    let mut text = String::new();
    loop {
        text.clear();
        table.rewind().map_err(WatchError::Read)?;
        table.read_to_string(&mut text).map_err(WatchError::Read)?;
        if !fs.in_table(&text) {
            return Ok(());
        }
        wait_for_change(&table)?;
    }
}

/// Sleeps until the mount table changes.
fn wait_for_change(table: &File) -> Result<(), WatchError> {
    loop {
        // POLLIN is always set on the table; only PRI marks a change.
        let mut fds = [PollFd::new(table, PollFlags::PRI)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(WatchError::Poll(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
97 22 7:3 / /mnt/build rw,noatime - ext4 /dev/loop3 rw
98 97 7:30 / /mnt/build/over rw - ext4 /dev/loop30 rw
";

    #[test]
    fn a_file_system_is_found_by_its_device_number_only() {
        assert!(FsId { major: 7, minor: 3 }.in_table(TABLE));
        assert!(FsId {
            major: 7,
            minor: 30
        }
        .in_table(TABLE));
        assert!(!FsId {
            major: 7,
            minor: 33
        }
        .in_table(TABLE));
        // Not the parent id field, nor a part of a number.
        assert!(!FsId { major: 0, minor: 2 }.in_table(TABLE));
        assert!(!FsId {
            major: 1,
            minor: 22
        }
        .in_table(TABLE));
    }

    #[test]
    fn an_absent_file_system_is_gone_at_once() {
        let table = File::open(MOUNTINFO).unwrap();
        let nowhere = FsId {
            major: u32::MAX,
            minor: 0,
        };
        wait_until_gone(table, nowhere).unwrap();
    }
}
