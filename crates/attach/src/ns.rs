//! Private mounts, unmounting, and what is mounted where (mounting a
//! disk is [`crate::mount`]'s).
//!
//! `scratchd run` moves itself into a mount namespace of its own before it
//! mounts anything (its FUSE file and the scratch filesystem). The build
//! command it starts inherits the namespace, so it sees the mounts; nobody
//! else does, and the kernel tears them down with the namespace when its
//! last process exits, even after `kill -9`. With autoclear loop devices
//! ([`crate::loopdev`]), nothing of an attached disk can outlive its run.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use tracing::warn;

/// Moves this process into a new mount namespace whose mounts propagate
/// nowhere, but which follows the host's unmounts. Must run before the
/// process starts any thread (the kernel refuses to unshare a file-system
/// context shared with other threads).
pub fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: plain system call with a flag argument.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Hosts mount / shared (systemd): without this, mounts made here would
    // propagate back to the host's namespace. Slave, not private: the new
    // namespace holds a copy of every mount of the host's, other builds'
    // disks included, and a private copy would keep such a disk mounted
    // (its nbd device connected, its FUSE file system alive) for as long
    // as this run lasts, however often the host unmounts it (Koji's
    // `umount` of a build root); as a slave, the host's unmounts reach it.
    let root = c"/";
    // SAFETY: valid NUL-terminated paths; null source, type and data are
    // allowed for a propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How [`unmount`] got a file system off its mount point.
#[derive(Debug)]
pub enum Unmounted {
    /// Gone, written back.
    Clean,
    /// Detached while still in use: it lives on until its last user lets
    /// go, and can still be written back through its root.
    Lazily(DetachedRoot),
}

/// The root directory of a file system that a lazy unmount took off every
/// path, opened just before: it lives on while a leftover process uses it,
/// and only through this can that one file system be written back. (A
/// `sync` of every file system instead waits for all of them, such as
/// another disk whose server stopped answering, for minutes.)
#[derive(Debug)]
pub struct DetachedRoot(Option<OwnedFd>);

impl DetachedRoot {
    /// Opens `dir`'s root before it is detached (`None` if it cannot be
    /// opened: then [`DetachedRoot::write_back`] falls back to `sync`).
    fn open(dir: &Path) -> DetachedRoot {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        DetachedRoot(rustix::fs::open(dir, flags, Mode::empty()).ok())
    }

    /// Writes the file system back and waits for it (`syncfs`); `sync` if
    /// its root was not kept.
    pub fn write_back(&self) -> io::Result<()> {
        match &self.0 {
            Some(root) => rustix::fs::syncfs(root).map_err(io::Error::from),
            None => {
                rustix::fs::sync();
                Ok(())
            }
        }
    }
}

/// Unmounts `dir`, never through a symlink at its last component (a user
/// who owns the parent could otherwise point it at another mount). A file
/// system still busy (a process of the build left
/// behind with a file open) is retried for a while, then detached lazily:
/// it goes once the last user lets go, and cannot outlive the namespace.
pub fn unmount(dir: &Path) -> io::Result<Unmounted> {
    unmount_with(dir, false)
}

/// [`unmount`], and if the file system has to be detached lazily, its root
/// is kept open to write it back ([`DetachedRoot`]). Only for a file system
/// the kernel serves alone: opening the root of a FUSE mount asks its
/// server, which may hang.
pub fn unmount_keeping_root(dir: &Path) -> io::Result<Unmounted> {
    unmount_with(dir, true)
}

fn unmount_with(dir: &Path, keep_root: bool) -> io::Result<Unmounted> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    for _ in 0..20 {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(path.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
            return Ok(Unmounted::Clean);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        thread::sleep(Duration::from_millis(50));
    }
    warn!(dir = %dir.display(), "file system still busy; detaching it lazily");
    match keep_root {
        true => unmount_lazily_keeping_root(dir),
        false => unmount_lazily(dir).map(|()| DetachedRoot(None)),
    }
    .map(Unmounted::Lazily)
}

/// Detaches the file system at `dir` at once, however busy (`umount -l`),
/// keeping its root open so that it can still be written back. Only for a
/// file system that answers: opening the root of a FUSE mount whose server
/// hangs would hang too.
pub fn unmount_lazily_keeping_root(dir: &Path) -> io::Result<DetachedRoot> {
    let root = DetachedRoot::open(dir);
    unmount_lazily(dir)?;
    Ok(root)
}

/// Detaches the file system at `dir` at once, however busy (`umount -l`):
/// for mounts whose disk is gone, which nobody can write back anyway.
pub fn unmount_lazily(dir: &Path) -> io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The topmost mount at a directory, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// What is mounted, such as `/dev/loop3` (or `scratchd`, a FUSE mount's
    /// name).
    pub source: PathBuf,
    /// The file system's device number (`st_dev` of its files), read
    /// without touching the file system, which may not answer.
    pub major: u32,
    pub minor: u32,
}

/// What is mounted at `dir` (the topmost mount there) in this process's
/// mount namespace; `None` when `dir` is not a mount point.
pub fn mount_at(dir: &Path) -> Option<MountEntry> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_in(&table, dir)
}

/// The source of [`mount_at`]: `/dev/loop3` for a loop device's mount.
pub fn mount_source(dir: &Path) -> Option<PathBuf> {
    mount_at(dir).map(|m| m.source)
}

/// [`mount_at`] in the text of a `/proc/PID/mountinfo`.
fn mount_in(table: &str, dir: &Path) -> Option<MountEntry> {
    let dir = dir.as_os_str().as_bytes();
    // Later lines are mounted on top of earlier ones at the same place.
    table.lines().rev().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [TAGS...] - TYPE SOURCE SUPER
        let (fields, rest) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        if unescape(fields.get(4)?) != dir {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        let source = rest.split(' ').nth(1)?;
        Some(MountEntry {
            source: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(source))),
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    })
}

/// The kernel writes space, tab, newline and backslash in mountinfo as
/// `\ooo` octal escapes.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Makes the kernel kill the command's process (SIGKILL) when this one dies,
/// however it dies: a `kill -9`ed run must not leave its build running on a
/// disk whose server is gone. (Processes the command started and that
/// outlive it keep only the run's private mounts, which the kernel removes
/// when they exit.)
pub fn kill_with_parent(command: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (prctl, getppid, kill).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent.as_raw_nonzero().get() {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_sources_come_from_the_topmost_mount() {
        let table = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
40 22 7:3 / /mnt/a\\040b rw,noatime shared:5 - ext4 /dev/loop3 rw
41 40 7:4 / /mnt/a\\040b rw,noatime - ext4 /dev/loop4 rw
";
        assert_eq!(
            mount_in(table, Path::new("/mnt/a b")),
            Some(MountEntry {
                source: PathBuf::from("/dev/loop4"),
                major: 7,
                minor: 4
            })
        );
        assert_eq!(
            mount_in(table, Path::new("/proc")).map(|m| m.source),
            Some(PathBuf::from("proc"))
        );
        assert_eq!(mount_in(table, Path::new("/mnt")), None);
    }
}
