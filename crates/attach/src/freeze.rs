//! Freezing a mounted file system (FIFREEZE) while a snapshot of its disk
//! is taken, so that the snapshot holds a clean file system: the kernel
//! writes everything out, then holds every new write until the thaw.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen file system; thawed when dropped.
#[derive(Debug)]
pub struct Frozen {
    dir: File,
    path: PathBuf,
}

/// Freezes the file system mounted at `dir` (any directory of it).
///
/// # Errors
///
/// When `dir` cannot be opened, or the kernel refuses: `EPERM` without
/// CAP_SYS_ADMIN, `EOPNOTSUPP` for a file system that cannot freeze,
/// `EBUSY` if it is frozen already.
pub fn freeze(dir: &Path) -> io::Result<Frozen> {
    let file = File::open(dir)?;
    // SAFETY: FIFREEZE takes no argument the kernel reads or writes (the
    // int in its number is unused); the descriptor is ours and open.
    if unsafe { libc::ioctl(file.as_raw_fd(), FIFREEZE as _, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Frozen {
        dir: file,
        path: dir.to_owned(),
    })
}

impl Frozen {
    /// Thaws the file system, reporting a failure.
    ///
    /// # Errors
    ///
    /// The kernel's refusal to thaw.
    pub fn thaw(self) -> io::Result<()> {
        let result = thaw(&self.dir);
        std::mem::forget(self);
        result
    }
}

fn thaw(dir: &File) -> io::Result<()> {
    // SAFETY: as for FIFREEZE.
    if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = thaw(&self.dir) {
            tracing::warn!(dir = %self.path.display(), "cannot thaw the file system: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_not_a_mount_of_a_freezable_fs_is_refused_or_thawed() {
        // /proc cannot freeze; the error says so rather than hanging.
        let err = freeze(Path::new("/proc")).unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
        assert!(freeze(Path::new("/nonexistent-scratchd")).is_err());
    }
}
