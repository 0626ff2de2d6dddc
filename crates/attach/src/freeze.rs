//! Freezing a mounted file system (FIFREEZE) while a snapshot of its disk
//! is taken, so that the snapshot holds a clean file system: the kernel
//! writes everything out, then holds every new write until the thaw.
//!
//! Freezing is done as root on a path someone else may have a hand in, and
//! a frozen file system that is never thawed hangs every writer for ever
//! (in uninterruptible sleep). So:
//! - the directory is opened once, without following any symlink, and
//!   must be the root of its mount ([`MountRoot::open`]); what is frozen
//!   is that descriptor's file system, whose device the caller checks
//!   ([`MountRoot::device`]) before anything is frozen: a directory
//!   swapped after the open changes nothing;
//! - before the freeze, a guard process is forked that thaws the file
//!   system when this process goes without saying it is done: `kill -9`,
//!   a crash or a signal's default action all close its end of a pipe.
//!   The guard leaves the process group and ignores the signals a
//!   terminal or a group kill sends, so it outlives what kills the caller;
//!   what kills both at once (a cgroup kill) leaves the file system frozen
//!   until `fsfreeze --unfreeze DIR` (docs/SECURITY.md).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags, CWD};

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// What the parent writes to the guard when it has thawed (or never
/// froze): the guard then leaves without thawing anything.
const DONE: u8 = b'd';

/// Why a directory cannot be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("{}: not an absolute path", path.display())]
    NotAbsolute { path: PathBuf },
    #[error("cannot open {} (without following symlinks: none may be on the way)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot stat {}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not the mount point of a file system (give the disk's mount point)", path.display())]
    NotMountRoot { path: PathBuf },
    #[error("cannot start the process that thaws {} should this one die", path.display())]
    Guard {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot freeze the file system at {}", path.display())]
    Freeze {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A directory opened as the root of a mounted file system.
#[derive(Debug)]
pub struct MountRoot {
    dir: File,
    path: PathBuf,
    /// The file system's device, `(major, minor)`.
    device: (u32, u32),
}

impl MountRoot {
    /// Opens `path`, which must be absolute, resolve without any symlink,
    /// and be the root of a mount.
    ///
    /// # Errors
    ///
    /// Each of those conditions, or the system's refusal to open or stat.
    pub fn open(path: &Path) -> Result<MountRoot, FreezeError> {
        if !path.is_absolute() {
            return Err(FreezeError::NotAbsolute {
                path: path.to_owned(),
            });
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let dir = rustix::fs::openat2(CWD, path, flags, Mode::empty(), resolve).map_err(|e| {
            FreezeError::Open {
                path: path.to_owned(),
                source: e.into(),
            }
        })?;
        let stat = rustix::fs::statx(&dir, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
            .map_err(|e| FreezeError::Stat {
                path: path.to_owned(),
                source: e.into(),
            })?;
        // Kernels before 5.8 do not report the attribute: refused, since
        // it cannot be told.
        let root = StatxAttributes::MOUNT_ROOT;
        if !(stat.stx_attributes_mask.contains(root) && stat.stx_attributes.contains(root)) {
            return Err(FreezeError::NotMountRoot {
                path: path.to_owned(),
            });
        }
        Ok(MountRoot {
            dir: File::from(dir),
            path: path.to_owned(),
            device: (stat.stx_dev_major, stat.stx_dev_minor),
        })
    }

    /// The device of the file system, `(major, minor)`: what the caller
    /// checks before it freezes.
    pub fn device(&self) -> (u32, u32) {
        self.device
    }

    /// The path it was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Freezes the file system, with a guard that thaws it should this
    /// process die before [`Frozen::thaw`] (or drop).
    ///
    /// # Errors
    ///
    /// The guard cannot be started, or the kernel refuses: `EPERM` without
    /// CAP_SYS_ADMIN, `EOPNOTSUPP` for a file system that cannot freeze,
    /// `EBUSY` if it is frozen already.
    pub fn freeze(self) -> Result<Frozen, FreezeError> {
        let guard = Guard::start(&self.dir).map_err(|source| FreezeError::Guard {
            path: self.path.clone(),
            source,
        })?;
        if let Err(source) = ioctl(&self.dir, FIFREEZE) {
            // Not ours to thaw: someone else's freeze (EBUSY) stays.
            guard.dismiss();
            return Err(FreezeError::Freeze {
                path: self.path,
                source,
            });
        }
        Ok(Frozen {
            root: self,
            guard: Some(guard),
        })
    }
}

/// A frozen file system; thawed when dropped.
#[derive(Debug)]
pub struct Frozen {
    root: MountRoot,
    guard: Option<Guard>,
}

impl Frozen {
    /// Thaws the file system, reporting a failure (`EINVAL`: someone else
    /// thawed it meanwhile).
    ///
    /// # Errors
    ///
    /// The kernel's refusal to thaw.
    pub fn thaw(mut self) -> io::Result<()> {
        self.thaw_once()
    }

    fn thaw_once(&mut self) -> io::Result<()> {
        let Some(guard) = self.guard.take() else {
            return Ok(());
        };
        let result = ioctl(&self.root.dir, FITHAW);
        // Dismissed after the thaw, so that no moment is left with the file
        // system frozen and nothing bound to thaw it.
        guard.dismiss();
        result
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_once() {
            tracing::warn!(dir = %self.root.path.display(), "cannot thaw the file system: {e}");
        }
    }
}

/// The process that thaws the file system if this one goes without
/// dismissing it: it waits on a pipe whose only writer is this process.
#[derive(Debug)]
struct Guard {
    pid: libc::pid_t,
    /// The writing end: [`DONE`] dismisses the guard; its closing without
    /// [`DONE`] (this process died) makes the guard thaw.
    done: OwnedFd,
}

impl Guard {
    fn start(dir: &File) -> io::Result<Guard> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (dir_fd, read_fd, write_fd) = (dir.as_raw_fd(), read.as_raw_fd(), write.as_raw_fd());
        // SAFETY: the child runs only async-signal-safe system calls
        // (`guard_main`) and leaves with `_exit`, so forking a process that
        // may have other threads is sound.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => guard_main(dir_fd, read_fd, write_fd),
            pid => Ok(Guard { pid, done: write }),
        }
    }

    /// Tells the guard to leave without thawing, and waits for it.
    fn dismiss(self) {
        let done = [DONE];
        let _ = rustix::io::write(&self.done, &done);
        drop(self.done);
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is ours to write.
        while unsafe { libc::waitpid(self.pid, &mut status, 0) } < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
}

/// The guard: leaves the caller's session (a group kill or a terminal's
/// signals do not reach it), waits for a word or the end of the pipe, and
/// thaws on the end. Only async-signal-safe calls, then `_exit`.
fn guard_main(dir: RawFd, read: RawFd, write: RawFd) -> ! {
    // SAFETY: plain system calls on descriptors this process inherited;
    // none allocates or takes a lock.
    unsafe {
        libc::close(write);
        libc::setsid();
        for signal in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(signal, libc::SIG_IGN);
        }
        let mut word = 0u8;
        loop {
            let n = libc::read(read, std::ptr::addr_of_mut!(word).cast(), 1);
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n != 1 || word != DONE {
                libc::ioctl(dir, FITHAW as _, 0);
            }
            libc::_exit(0);
        }
    }
}

fn ioctl(dir: &File, request: libc::c_ulong) -> io::Result<()> {
    // SAFETY: FIFREEZE and FITHAW take no argument the kernel reads or
    // writes (the int in their numbers is unused); the descriptor is open.
    if unsafe { libc::ioctl(dir.as_fd().as_raw_fd(), request as _, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_root_of_a_mount_opens() {
        assert!(matches!(
            MountRoot::open(Path::new("proc")),
            Err(FreezeError::NotAbsolute { .. })
        ));
        assert!(MountRoot::open(Path::new("/proc")).is_ok());
        assert!(
            matches!(
                MountRoot::open(Path::new("/proc/self/fd")),
                Err(FreezeError::Open { .. })
            ),
            "a symlink on the way"
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            MountRoot::open(dir.path()),
            Err(FreezeError::NotMountRoot { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/", &link).unwrap();
        assert!(matches!(
            MountRoot::open(&link),
            Err(FreezeError::Open { .. })
        ));
    }

    #[test]
    fn a_file_system_that_cannot_freeze_is_refused() {
        // /proc cannot freeze; the error says so rather than hanging.
        let err = MountRoot::open(Path::new("/proc"))
            .unwrap()
            .freeze()
            .unwrap_err();
        let FreezeError::Freeze { source, .. } = err else {
            panic!("{err}");
        };
        assert!(source.raw_os_error().is_some(), "{source}");
    }
}
