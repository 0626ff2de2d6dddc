//! The front ends: how a disk becomes a mounted block device. One type
//! names them ([`FrontEnd`], also the kind of a state record), and each is
//! implemented in a module of its own:
//! - [`fuse`]: the disk as a FUSE file served by threads of this process,
//!   a direct-I/O autoclear loop device on that file, and the mount; the
//!   process must serve the file for as long as the mount is used (a
//!   holder process keeps an attachment that outlives its command);
//! - [`kernel`]: a disk on a server as the kernel's `/dev/nbdN`, our
//!   client's negotiated sockets handed over by netlink; the kernel serves
//!   it alone, with no thread of ours in the data path.
//!
//! What a front end does is the [`Driver`] trait: attach a disk for this
//! process's lifetime (`scratchd run`), attach one that stays attached
//! after this process (`scratchd attach`), and, given the record of such
//! an attachment, detach it, tell whether it is still attached once its
//! holder is gone, and clean up what a dead one left.
//!
//! Adding a front end (ublk, say) is a module implementing [`Driver`], a
//! variant of [`FrontEnd`], and its arm in [`FrontEnd::driver`] and place
//! in [`FrontEnd::PREFERENCE`]: `--attach`'s values, `auto`'s choice,
//! `run`, `attach`, `detach` and the stale sweep follow from those.

pub mod fuse;
pub mod kernel;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use scratchd_attach::{mount, nbd_kernel};
use scratchd_client::Target;
use scratchd_store::BlockDevice;
use serde::{Deserialize, Serialize};

use crate::detach::DetachError;
use crate::state::{ClaimError, Process, Record, StateDir, StateError};

/// A way to make a disk a mounted block device. Serialised as a state
/// record's `kind` (`"fuse"`, `"kernel"`): records written by earlier
/// versions read back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontEnd {
    /// A FUSE file and a loop device ([`fuse`]).
    Fuse,
    /// The kernel's nbd driver with our client's sockets ([`kernel`]).
    Kernel,
}

impl FrontEnd {
    /// Every front end, in the order `--attach auto` tries them: the first
    /// that can serve the disk and that this host has wins.
    pub const PREFERENCE: [FrontEnd; 2] = [FrontEnd::Kernel, FrontEnd::Fuse];

    /// The registration: each front end's implementation.
    pub(crate) fn driver(self) -> &'static dyn Driver {
        match self {
            FrontEnd::Fuse => &fuse::Fuse,
            FrontEnd::Kernel => &kernel::Kernel,
        }
    }

    /// Its name in `--attach` and in state records.
    pub fn name(self) -> &'static str {
        self.driver().name()
    }
}

impl fmt::Display for FrontEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--attach`: a front end by name, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// The first of [`FrontEnd::PREFERENCE`] that can serve the disk here.
    #[default]
    Auto,
    /// This one, or a usage error if it cannot serve the disk.
    Only(FrontEnd),
}

impl AttachMode {
    /// The front end for a disk from `origin`, asking the host whether it
    /// has a front end ([`Driver::available`]) only for one that could
    /// serve the disk, and only for `auto`.
    pub fn choose(self, origin: Origin) -> Result<FrontEnd, AttachError> {
        self.choose_with(origin, |front_end| front_end.driver().available())
    }

    fn choose_with(
        self,
        origin: Origin,
        available: impl Fn(FrontEnd) -> bool,
    ) -> Result<FrontEnd, AttachError> {
        match self {
            AttachMode::Only(front_end) => match front_end.driver().refuses(origin) {
                Some(why) => Err(AttachError::Usage(why)),
                None => Ok(front_end),
            },
            AttachMode::Auto => FrontEnd::PREFERENCE
                .into_iter()
                .find(|f| f.driver().refuses(origin).is_none() && available(*f))
                .ok_or_else(|| AttachError::Usage("no front end can attach this disk".to_owned())),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachMode::Auto => f.write_str("auto"),
            AttachMode::Only(front_end) => front_end.fmt(f),
        }
    }
}

impl FromStr for AttachMode {
    type Err = String;

    /// `auto` or a front end's name; the error lists them all.
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(AttachMode::Auto);
        }
        FrontEnd::PREFERENCE
            .into_iter()
            .find(|f| f.name() == text)
            .map(AttachMode::Only)
            .ok_or_else(expected_modes)
    }
}

/// "expected auto, kernel or fuse", from the registry.
fn expected_modes() -> String {
    let mut names = vec!["auto"];
    names.extend(FrontEnd::PREFERENCE.map(FrontEnd::name));
    let last = names.pop().unwrap_or_default();
    format!("expected {} or {last}", names.join(", "))
}

/// `--write-behind`: whether our client acknowledges a write of a disk on a
/// server once it is sent, not when the server answers (see
/// `scratchd_client::write_behind`). The FUSE front end's; the kernel's
/// nbd driver queues on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteBehindMode {
    /// On for a scratch disk, off for an export that may be durable: on
    /// exactly when the server advertises no FLUSH (scratchd's scratch
    /// disks; see docs/CLIENT.md for why that signal).
    #[default]
    Auto,
    On,
    Off,
}

impl WriteBehindMode {
    /// Whether to write behind on an export whose server does (or does
    /// not) advertise FLUSH.
    pub fn enabled(self, server_flushes: bool) -> bool {
        match self {
            WriteBehindMode::Auto => !server_flushes,
            WriteBehindMode::On => true,
            WriteBehindMode::Off => false,
        }
    }
}

impl fmt::Display for WriteBehindMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteBehindMode::Auto => "auto",
            WriteBehindMode::On => "on",
            WriteBehindMode::Off => "off",
        })
    }
}

impl FromStr for WriteBehindMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(WriteBehindMode::Auto),
            "on" => Ok(WriteBehindMode::On),
            "off" => Ok(WriteBehindMode::Off),
            _ => Err("expected auto, on or off".to_owned()),
        }
    }
}

/// How a disk becomes a mounted block device: the options `scratchd run`
/// and `scratchd attach` share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontEndOptions {
    /// `--attach`.
    pub attach: AttachMode,
    /// Connections to the server (when it allows several), and threads
    /// serving the disk where this process serves it.
    pub connections: usize,
    /// `--write-behind`.
    pub write_behind: WriteBehindMode,
    pub mount_options: String,
    /// The disk's file system type (`--type`): the mount names it, so the
    /// kernel never probes a disk with every driver it has.
    pub fs_type: String,
    /// `--from`: a disk on a server that is made now starts as this
    /// snapshot (see [`crate::remote::seed`]).
    pub from: Option<String>,
}

/// Where the disk to attach comes from: what decides which front ends can
/// serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A disk of this process's own (`scratchd run` without `--server`).
    Local,
    /// A disk on a server, reached over TLS or not.
    Server { tls: bool },
}

impl Origin {
    /// The origin of a disk on `server`, or a local one.
    pub fn of(server: Option<&Target>) -> Origin {
        match server {
            Some(target) => Origin::Server {
                tls: target.tls.is_some(),
            },
            None => Origin::Local,
        }
    }
}

/// The disk to attach.
pub enum Disk<'a> {
    /// A device of this process's own.
    Local(Arc<dyn BlockDevice>),
    /// The export a target names, on its server.
    Server(&'a Target),
}

/// Where and how a front end attaches a disk.
pub struct Setup<'a> {
    /// Where the disk's file system is mounted.
    pub mount: &'a Path,
    /// Mount options; `None` leaves the block device unmounted (a disk with
    /// no file system).
    pub mount_options: Option<&'a str>,
    /// The file system's type, for the mount.
    pub fs_type: &'a str,
    /// Connections to the server (when it allows several), and threads
    /// serving the disk where this process serves it.
    pub connections: usize,
    /// Write-behind for a disk on a server (FUSE only).
    pub write_behind: WriteBehindMode,
    /// A directory for a front end that needs one of its own (FUSE: the
    /// mount point of the disk's file), made by it: it must not exist.
    pub private_dir: &'a Path,
    /// What the attachment calls itself where every local user sees it
    /// (the kernel's sysfs `backend` of an nbd device), and how a later
    /// `detach` tells it from another one on the same device: never the
    /// export's name, which is the disk's key.
    pub label: &'a str,
}

/// What `scratchd attach` asks of a front end: an attachment that stays
/// after this process exits.
pub struct KeepRequest<'a> {
    /// The attachment's id: its record's name in the state directory.
    pub id: &'a str,
    pub target: &'a Target,
    /// The mount point (canonical).
    pub mount: &'a Path,
    pub mount_options: &'a str,
    pub fs_type: &'a str,
    pub connections: usize,
    pub write_behind: WriteBehindMode,
    /// The verbosity a process that keeps the attachment logs with.
    pub verbose: u8,
}

/// A disk attached and mounted by this process; [`Attachment::detach`]
/// (or drop) undoes it.
pub trait Attachment {
    /// Where the file system is (or would be) mounted.
    fn mount(&self) -> &Path;
    /// The block device, `/dev/loopN` or `/dev/nbdN`.
    fn device_path(&self) -> &Path;
    /// Unmounts, lets the device go and lets the disk go.
    fn detach(self: Box<Self>);
}

/// One front end's implementation (see the module docs).
pub(crate) trait Driver: Sync {
    /// Its name in `--attach` and in state records (as [`FrontEnd`]'s
    /// serde name).
    fn name(&self) -> &'static str;

    /// Why it cannot serve a disk from `origin`, if it cannot: a usage
    /// error when asked for by name, passed over by `auto`.
    fn refuses(&self, origin: Origin) -> Option<String>;

    /// Whether this host has what it needs (asked by `auto` only).
    fn available(&self) -> bool;

    /// Whether its data path runs in this process: then a process killed
    /// while the disk is mounted leaves a file system waiting on it, and a
    /// run needs a watchdog.
    fn served_here(&self) -> bool;

    /// Attaches `disk` for as long as this process holds the result.
    /// `watch` is told the number of the kernel connection this process
    /// serves, before anything depends on it (for a watchdog that aborts it
    /// should this process die).
    fn attach(
        &self,
        disk: Disk,
        setup: &Setup,
        watch: &mut dyn FnMut(u32) -> io::Result<()>,
    ) -> Result<Box<dyn Attachment>, AttachError>;

    /// Attaches and keeps it attached after this process exits, with a
    /// record in `state` until it is detached; returns the block device.
    fn attach_kept(&self, state: &StateDir, request: &KeepRequest) -> Result<PathBuf, AttachError>;

    /// Detaches a kept attachment; `holder` is its record's holder if that
    /// still runs. Removes the record.
    fn detach(
        &self,
        state: &StateDir,
        record: &Record,
        holder: Option<Process>,
    ) -> Result<(), DetachError>;

    /// Whether the attachment of a record without a holder is still there.
    fn attached_without_holder(&self, record: &Record) -> bool;

    /// Removes what a dead attachment left (mounts, devices), each only if
    /// it is still this attachment's; not the record.
    fn clean_up(&self, record: &Record);
}

/// Why a disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Server(#[from] scratchd_client::Error),
    #[error(transparent)]
    Kernel(#[from] nbd_kernel::Error),
    #[error("cannot read the disk: {0}")]
    Probe(#[source] io::Error),
    #[error("cannot make the FUSE mount point: {0}")]
    FuseDir(#[source] io::Error),
    #[error("cannot mount the disk's FUSE file: {0}")]
    Fuse(#[source] io::Error),
    #[error("cannot hand the FUSE connection to its watchdog: {0}")]
    Watch(#[source] io::Error),
    #[error("cannot attach a loop device: {0}")]
    Loop(#[source] io::Error),
    #[error(transparent)]
    Mount(#[from] mount::MountError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Claim(#[from] ClaimError),
    #[error("cannot read this process's start time: {0}")]
    Process(#[source] io::Error),
    #[error("cannot start the holder process: {0}")]
    Spawn(#[source] io::Error),
    /// The holder's own message (its error and causes, on one line).
    #[error("{0}")]
    Holder(String),
    #[error("the holder process ended without attaching ({status}){log}")]
    HolderDied {
        status: std::process::ExitStatus,
        log: String,
    },
}

/// Mounts the file system on `device` at `dir` as untrusted media:
/// `nosuid,nodev`, of type `fs_type` only, onto the directory as it is when
/// opened here (see [`scratchd_attach::mount`]).
pub(crate) fn mount_disk(
    device: &Path,
    dir: &Path,
    fs_type: &str,
    options: &str,
    read_only: bool,
) -> Result<(), AttachError> {
    let spec = mount::MountSpec::new(fs_type, options, read_only)?;
    let at = mount::MountPoint::open(dir)?;
    mount::mount_device(device, &spec, &at)?;
    Ok(())
}

impl AttachError {
    /// Whether the caller asked for something impossible (exit status 2)
    /// rather than something failing.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            AttachError::Usage(_) | AttachError::Server(scratchd_client::Error::Uri(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_modes_parse_from_the_registry() {
        assert_eq!("auto".parse(), Ok(AttachMode::Auto));
        assert_eq!("fuse".parse(), Ok(AttachMode::Only(FrontEnd::Fuse)));
        assert_eq!("kernel".parse(), Ok(AttachMode::Only(FrontEnd::Kernel)));
        assert_eq!(
            "nbd".parse::<AttachMode>(),
            Err("expected auto, kernel or fuse".to_owned())
        );
        assert_eq!(AttachMode::default(), AttachMode::Auto);
        for front_end in FrontEnd::PREFERENCE {
            let mode = AttachMode::Only(front_end);
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
    }

    /// `auto` follows the server's FLUSH flag; the names round-trip.
    #[test]
    fn write_behind_modes_parse_and_auto_follows_the_flush_flag() {
        use WriteBehindMode::*;
        for mode in [Auto, On, Off] {
            assert_eq!(mode.to_string().parse(), Ok(mode));
        }
        assert_eq!(
            "yes".parse::<WriteBehindMode>(),
            Err("expected auto, on or off".to_owned())
        );
        assert_eq!(WriteBehindMode::default(), Auto);
        assert!(Auto.enabled(false) && !Auto.enabled(true));
        assert!(On.enabled(true) && On.enabled(false));
        assert!(!Off.enabled(true) && !Off.enabled(false));
    }

    /// The match fails to compile when a front end is added: list it in
    /// the preference too.
    #[test]
    fn every_front_end_is_registered() {
        let registered = |f: FrontEnd| match f {
            FrontEnd::Fuse | FrontEnd::Kernel => FrontEnd::PREFERENCE.contains(&f),
        };
        assert!(FrontEnd::PREFERENCE.into_iter().all(registered));
        assert!(registered(FrontEnd::Fuse) && registered(FrontEnd::Kernel));
        let names: std::collections::HashSet<_> = FrontEnd::PREFERENCE
            .map(FrontEnd::name)
            .into_iter()
            .collect();
        assert_eq!(names.len(), FrontEnd::PREFERENCE.len(), "names are unique");
        assert!(!names.contains("auto"));
    }

    #[test]
    fn names_are_the_record_kinds() {
        for front_end in FrontEnd::PREFERENCE {
            let json = serde_json::to_string(&front_end).unwrap();
            assert_eq!(json, format!("\"{}\"", front_end.name()));
            assert_eq!(serde_json::from_str::<FrontEnd>(&json).unwrap(), front_end);
        }
    }

    #[test]
    fn attach_choice() {
        let server = Origin::Server { tls: false };
        let tls = Origin::Server { tls: true };
        // The kernel's availability is asked only when it could be used.
        let never = |f: FrontEnd| f != FrontEnd::Kernel || panic!("asked for the kernel");
        let with = |kernel: bool| move |f: FrontEnd| f == FrontEnd::Fuse || kernel;
        let choose = |mode: &str, origin, available: &dyn Fn(FrontEnd) -> bool| {
            mode.parse::<AttachMode>()
                .unwrap()
                .choose_with(origin, available)
        };
        assert_eq!(choose("fuse", server, &with(true)).unwrap(), FrontEnd::Fuse);
        assert_eq!(
            choose("auto", Origin::Local, &never).unwrap(),
            FrontEnd::Fuse
        );
        assert_eq!(
            choose("auto", server, &with(false)).unwrap(),
            FrontEnd::Fuse
        );
        assert_eq!(
            choose("auto", server, &with(true)).unwrap(),
            FrontEnd::Kernel
        );
        assert_eq!(
            choose("kernel", server, &with(false)).unwrap(),
            FrontEnd::Kernel
        );
        assert!(matches!(
            choose("kernel", Origin::Local, &never),
            Err(AttachError::Usage(m)) if m.contains("needs --server")
        ));
        assert_eq!(choose("auto", tls, &never).unwrap(), FrontEnd::Fuse);
        assert!(matches!(
            choose("kernel", tls, &never),
            Err(AttachError::Usage(m)) if m.contains("TLS")
        ));
    }
}
