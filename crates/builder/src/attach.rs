//! `scratchd attach`: mounts a disk on a server at a directory in the
//! caller's mount namespace, where every process sees it, and returns;
//! `scratchd detach` ([`crate::detach`]) undoes it. For tools that manage
//! a disk's lifetime themselves (Koji runs mock several times per build on
//! one disk; the server keeps the disk for its `linger` after the last
//! connection), where `scratchd run` gives one command a private disk for
//! its own lifetime.
//!
//! How the attachment outlives this process is its front end's
//! ([`crate::frontend`]): for FUSE + loop (`--attach fuse`, and `auto`
//! without the nbd module or with TLS) a background holder process
//! ([`crate::holder`]) serves the disk's FUSE file until detached; the
//! kernel's nbd driver (`--attach kernel`, and `auto` where the module is
//! loaded) needs no process of ours once it has the sockets.
//!
//! Each attachment has a record in the state directory ([`crate::state`]).
//! Before attaching, `attach` sweeps away what attachments whose holder
//! died left (as `scratchd detach --stale` does).

use std::io;
use std::path::{Path, PathBuf};

use scratchd_client::Target;
use tracing::info;

use crate::detach;
use crate::frontend::{AttachError, FrontEndOptions, KeepRequest, Origin};
use crate::id::random_id;
use crate::state::{StateDir, StateError};

/// What `scratchd attach` is asked.
pub struct AttachRequest {
    /// Where to mount the disk's file system (an existing, empty directory;
    /// not a mount point already).
    pub mount: PathBuf,
    /// The server and export.
    pub uri: String,
    /// The export, overriding the URI's.
    pub name: Option<String>,
    pub front_end: FrontEndOptions,
    /// The verbosity a holder process logs with.
    pub verbose: u8,
}

/// Why an attach failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachCommandError {
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
    #[error("attach needs root or CAP_SYS_ADMIN: it mounts a file system and attaches a device")]
    NotPrivileged,
}

impl AttachCommandError {
    /// Whether the caller asked for something impossible (exit status 2)
    /// rather than something failing.
    pub fn is_usage(&self) -> bool {
        match self {
            AttachCommandError::Usage(_) => true,
            AttachCommandError::Attach(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// Attaches; returns the block device.
pub fn attach(request: &AttachRequest) -> Result<PathBuf, AttachCommandError> {
    // First: the state directory's checks would refuse anyone else too,
    // but say less clearly why.
    if !privileged() {
        return Err(AttachCommandError::NotPrivileged);
    }
    let target = export_target(request)?;
    let front_end = request.front_end.attach.choose(Origin::of(Some(&target)))?;
    let mount = mount_dir(&request.mount)?;
    let state = StateDir::open()?;
    let swept = detach::sweep_stale(&state);
    if swept > 0 {
        info!(swept, "removed stale attachments");
    }
    let keep = KeepRequest {
        id: &random_id(),
        target: &target,
        mount: &mount,
        mount_options: &request.front_end.mount_options,
        fs_type: &request.front_end.fs_type,
        connections: request.front_end.connections,
        write_behind: request.front_end.write_behind,
        verbose: request.verbose,
    };
    // Held until the holder's connections have the disk.
    let _seed = match &request.front_end.from {
        Some(from) => Some(crate::remote::seed(&target, from).map_err(AttachError::Server)?),
        None => None,
    };
    Ok(front_end.driver().attach_kept(&state, &keep)?)
}

/// The URI's server with the export `--name` or the URI's; one of them
/// must name one.
fn export_target(request: &AttachRequest) -> Result<Target, AttachCommandError> {
    let mut target = Target::parse(&request.uri).map_err(|e| AttachError::Server(e.into()))?;
    if let Some(name) = &request.name {
        target.export.clone_from(name);
    }
    if target.export.is_empty() {
        return Err(AttachCommandError::Usage(format!(
            "{:?} names no export: give it in the URI (nbd+unix:///NAME?socket=PATH, \
             nbd://HOST/NAME) or with --name",
            request.uri
        )));
    }
    Ok(target)
}

/// The mount point, canonical (records are found by it), which must be an
/// existing directory.
fn mount_dir(dir: &Path) -> Result<PathBuf, AttachCommandError> {
    let failed = |source| AttachCommandError::Dir {
        dir: dir.to_owned(),
        source,
    };
    let canonical = std::fs::canonicalize(dir).map_err(failed)?;
    if !canonical.is_dir() {
        return Err(failed(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    // A symlink on the way could be replaced by whoever owns its
    // directory, between this check and the mount or at the next attach:
    // the mount point is given as the real path it is.
    let absolute = std::path::absolute(dir).map_err(failed)?;
    if lexically_normal(&absolute) != canonical {
        return Err(AttachCommandError::Usage(format!(
            "{} has a symlink in its path: give the real path ({}), which nobody \
             but its owners can redirect",
            dir.display(),
            canonical.display()
        )));
    }
    Ok(canonical)
}

/// `path` without `.` components and trailing slashes (`..` is left: it
/// would need the file system to resolve, and then differs from the
/// canonical path, which is refused).
fn lexically_normal(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Root, or a process with CAP_SYS_ADMIN (bit 21 of the effective set in
/// `/proc/self/status`).
fn privileged() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    effective.is_some_and(|caps| caps & (1 << 21) != 0)
}
