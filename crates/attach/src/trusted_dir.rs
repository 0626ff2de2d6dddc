//! A directory only root can change, for state that root acts on.
//!
//! The builder side runs as root next to untrusted build jobs and keeps
//! records of what it attached (which process holds a disk, what is
//! mounted where). Whoever can write such a record, or swap a component of
//! the path to it, can make root signal, unmount or delete what the record
//! names. So a state directory is trusted only when every directory from
//! `/` down to it is owned by root, is not writable by group or others, and
//! is not a symlink; it is opened once, by descriptor, and every file in it
//! is reached from that descriptor without following symlinks. A directory
//! that fails a check is refused with the component and the reason, never
//! repaired (repairing would follow whatever an attacker put there).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, CWD};

/// An open directory that passed the checks.
#[derive(Debug)]
pub struct TrustedDir {
    dir: OwnedFd,
    path: PathBuf,
}

/// Why a directory is not trusted, or a file in it not usable.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: {reason}", path.display())]
    Untrusted { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name:?} is not a plain file name")]
    BadName { name: String },
}

/// Permission bits that let someone other than the owner change a
/// directory's entries.
const OTHERS_WRITE: u32 = 0o022;

impl TrustedDir {
    /// Opens `path` (absolute), creating its last component (mode 0700)
    /// when missing; every directory on the way must be root's and written
    /// by root alone, and none may be a symlink.
    pub fn open_or_create(path: &Path) -> Result<TrustedDir, TrustError> {
        let untrusted = |at: &Path, reason: String| TrustError::Untrusted {
            path: at.to_owned(),
            reason,
        };
        if !path.is_absolute() {
            return Err(untrusted(path, "not an absolute path".into()));
        }
        let mut at = PathBuf::from("/");
        let mut dir = open_dir(CWD, Path::new("/"), &at)?;
        check_dir(&dir, &at)?;
        let names: Vec<_> = path.components().skip(1).collect();
        for (i, component) in names.iter().enumerate() {
            let Component::Normal(name) = component else {
                return Err(untrusted(path, "'.' or '..' in the path".into()));
            };
            at.push(name);
            let last = i + 1 == names.len();
            if last {
                match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_error(&at, e)),
                }
            }
            dir = open_dir(&dir, Path::new(name), &at)?;
            check_dir(&dir, &at)?;
        }
        Ok(TrustedDir {
            dir,
            path: path.to_owned(),
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The contents of file `name`, or `None` if there is none.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, TrustError> {
        let file = match self.open(name, OFlags::RDONLY, Mode::empty()) {
            Ok(file) => file,
            Err(TrustError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        std::fs::File::from(file)
            .read_to_end(&mut bytes)
            .map_err(|e| TrustError::Io {
                path: self.path.join(name),
                source: e,
            })?;
        Ok(Some(bytes))
    }

    /// Replaces file `name` with `bytes` at once: written under a fresh
    /// name (created exclusively, so nothing prepared under it is
    /// followed or overwritten), then renamed over it.
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<(), TrustError> {
        check_name(name)?;
        let staged = format!(".{name}.{}.tmp", random_suffix());
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
        let file = self.open(&staged, flags, Mode::from_raw_mode(0o600))?;
        let written = std::fs::File::from(file).write_all(bytes);
        let renamed = written.map_err(|e| self.io(&staged, e)).and_then(|()| {
            rustix::fs::renameat(&self.dir, staged.as_str(), &self.dir, name)
                .map_err(|e| io_error(&self.path.join(name), e))
        });
        if renamed.is_err() {
            let _ = rustix::fs::unlinkat(&self.dir, staged.as_str(), rustix::fs::AtFlags::empty());
        }
        renamed
    }

    /// Removes file `name`; gone already is fine.
    pub fn remove(&self, name: &str) -> Result<(), TrustError> {
        check_name(name)?;
        match rustix::fs::unlinkat(&self.dir, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_error(&self.path.join(name), e)),
        }
    }

    /// The names of the files in the directory (not `.` and `..`).
    pub fn names(&self) -> Result<Vec<String>, TrustError> {
        let dir = rustix::fs::openat(
            &self.dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_error(&self.path, e))?;
        let mut names = Vec::new();
        let entries = rustix::fs::Dir::read_from(&dir).map_err(|e| io_error(&self.path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(&self.path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Opens (creating, mode 0600, if missing) file `name` for an
    /// exclusive lock or other use; never through a symlink.
    pub fn open_file(&self, name: &str, create: bool) -> Result<std::fs::File, TrustError> {
        let mut flags = OFlags::RDWR;
        if create {
            flags |= OFlags::CREATE;
        }
        Ok(self.open(name, flags, Mode::from_raw_mode(0o600))?.into())
    }

    /// Opens file `name` for appending (a log), creating it (0600) if
    /// missing; never through a symlink.
    pub fn open_append(&self, name: &str) -> Result<std::fs::File, TrustError> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND;
        Ok(self.open(name, flags, Mode::from_raw_mode(0o600))?.into())
    }

    /// Makes directory `name` (mode 0700); one there already is fine if it
    /// is a directory.
    pub fn make_dir(&self, name: &str) -> Result<(), TrustError> {
        check_name(name)?;
        match rustix::fs::mkdirat(&self.dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(io_error(&self.path.join(name), e)),
        }
    }

    /// Removes the empty directory `name`; gone already is fine.
    pub fn remove_dir(&self, name: &str) -> Result<(), TrustError> {
        check_name(name)?;
        match rustix::fs::unlinkat(&self.dir, name, rustix::fs::AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_error(&self.path.join(name), e)),
        }
    }

    /// How long ago file `name` was last modified, if it exists.
    pub fn age(&self, name: &str) -> Option<std::time::Duration> {
        check_name(name).ok()?;
        let stat =
            rustix::fs::statat(&self.dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).ok()?;
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::new(stat.st_mtime as u64, stat.st_mtime_nsec as u32);
        modified.elapsed().ok()
    }

    fn open(&self, name: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, TrustError> {
        check_name(name)?;
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
        let fd = rustix::fs::openat(&self.dir, name, flags, mode)
            .map_err(|e| io_error(&self.path.join(name), e))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_error(&self.path.join(name), e))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(TrustError::Untrusted {
                path: self.path.join(name),
                reason: "not a regular file".into(),
            });
        }
        Ok(fd)
    }

    fn io(&self, name: &str, source: io::Error) -> TrustError {
        TrustError::Io {
            path: self.path.join(name),
            source,
        }
    }
}

impl AsFd for TrustedDir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

/// Opens directory `name` under `parent`, refusing a symlink.
fn open_dir<Fd: AsFd>(parent: Fd, name: &Path, at: &Path) -> Result<OwnedFd, TrustError> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|e| match e {
        // O_NOFOLLOW|O_PATH on a symlink opens the link, and O_DIRECTORY
        // then fails: say what it is.
        rustix::io::Errno::NOTDIR if is_symlink(at) => TrustError::Untrusted {
            path: at.to_owned(),
            reason: "a symlink".into(),
        },
        e => io_error(at, e),
    })
}

fn is_symlink(path: &Path) -> bool {
    path.symlink_metadata()
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
}

/// Root's, and changed by root alone.
fn check_dir(dir: &OwnedFd, at: &Path) -> Result<(), TrustError> {
    let stat = rustix::fs::fstat(dir).map_err(|e| io_error(at, e))?;
    let untrusted = |reason: String| TrustError::Untrusted {
        path: at.to_owned(),
        reason,
    };
    if stat.st_uid != 0 {
        return Err(untrusted(format!(
            "owned by uid {}, not root: another user could change what root acts on",
            stat.st_uid
        )));
    }
    if stat.st_mode & OTHERS_WRITE != 0 {
        return Err(untrusted(format!(
            "mode {:o}: writable by group or others",
            stat.st_mode & 0o7777
        )));
    }
    Ok(())
}

/// A name inside the directory: no path separators, no `.` or `..`, no
/// NUL, printable.
fn check_name(name: &str) -> Result<(), TrustError> {
    let fine = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+".contains(&b));
    match fine {
        true => Ok(()),
        false => Err(TrustError::BadName {
            name: name.to_owned(),
        }),
    }
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(path: &Path, e: rustix::io::Errno) -> TrustError {
    TrustError::Io {
        path: path.to_owned(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// A fresh directory of root's, 0755, under a trusted parent.
    fn base(test: &str) -> Option<tempfile::TempDir> {
        if !is_root() {
            eprintln!("SKIPPED {test}: needs root (the checks want root-owned directories)");
            return None;
        }
        // /tmp is world-writable (sticky), so it fails the checks: /run is
        // root's, 0755, on every systemd host.
        let dir = tempfile::Builder::new()
            .prefix("scratchd-trusted-dir-test")
            .tempdir_in("/run")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(dir)
    }

    #[test]
    fn names_are_plain() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["lock", "3f2a.json", ".3f2a.json.tmp", "holder-1.log"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn a_relative_path_is_refused() {
        assert!(TrustedDir::open_or_create(Path::new("run/x")).is_err());
    }

    #[test]
    fn a_fresh_directory_is_made_private_and_files_round_trip() {
        let Some(base) = base("a_fresh_directory_is_made_private_and_files_round_trip") else {
            return;
        };
        let path = base.path().join("state");
        let dir = TrustedDir::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        assert_eq!(dir.read("a.json").unwrap(), None);
        dir.write_atomically("a.json", b"one").unwrap();
        dir.write_atomically("a.json", b"two").unwrap();
        assert_eq!(dir.read("a.json").unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(dir.names().unwrap(), vec!["a.json".to_owned()]);
        dir.remove("a.json").unwrap();
        dir.remove("a.json").unwrap();
        assert!(dir.names().unwrap().is_empty());
        // Opened again: the same checks pass.
        TrustedDir::open_or_create(&path).unwrap();
    }

    #[test]
    fn another_users_or_a_writable_or_a_symlinked_component_is_refused() {
        let Some(base) = base("another_users_or_a_writable_or_a_symlinked_component_is_refused")
        else {
            return;
        };
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = TrustedDir::open_or_create(&theirs.join("state")).unwrap_err();
        assert!(err.to_string().contains("uid 65534"), "{err}");
        assert!(
            !theirs.join("state").exists(),
            "created below an untrusted parent"
        );

        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = TrustedDir::open_or_create(&open.join("state")).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );

        let real = base.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = base.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = TrustedDir::open_or_create(&link.join("state")).unwrap_err();
        assert!(err.to_string().contains("a symlink"), "{err}");
        assert!(!real.join("state").exists(), "followed the symlink");

        // The state directory itself, if someone else made it first.
        let premade = base.path().join("premade");
        std::fs::create_dir(&premade).unwrap();
        std::os::unix::fs::chown(&premade, Some(65534), None).unwrap();
        assert!(TrustedDir::open_or_create(&premade).is_err());
    }

    #[test]
    fn symlinks_and_odd_files_inside_are_not_followed() {
        let Some(base) = base("symlinks_and_odd_files_inside_are_not_followed") else {
            return;
        };
        let dir = TrustedDir::open_or_create(&base.path().join("state")).unwrap();
        let precious = base.path().join("precious");
        std::fs::write(&precious, b"keep").unwrap();
        std::os::unix::fs::symlink(&precious, dir.path().join("rec.json")).unwrap();
        assert!(dir.read("rec.json").is_err());
        assert!(dir.open_file("rec.json", true).is_err());
        dir.write_atomically("rec.json", b"new").unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let err = dir.read("sub").unwrap_err();
        assert!(matches!(
            err,
            TrustError::Io { .. } | TrustError::Untrusted { .. }
        ));
    }
}
