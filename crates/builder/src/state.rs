//! Attachment records: what `scratchd attach` made, for `scratchd detach`
//! to find and undo.
//!
//! One JSON file per attachment, `ID.json`, in the state directory
//! (`/run/scratchd-builder`; [`DIR_ENV`] names another), written
//! atomically (under a fresh name created exclusively, then renamed over
//! it), beside:
//! - `ID.fuse/`: the FUSE mount point holding the disk's file (FUSE
//!   attachments);
//! - `ID.log`: the holder's standard error (its log);
//! - `lock`: locked while a new attachment claims its mount point, so that
//!   two attaches cannot both take one directory.
//!
//! Root acts on what a record says (signals its holder, unmounts its
//! mount), so the directory must be root's alone: it is opened as a
//! [`TrustedDir`] (every component of its path root's, written by root
//! alone, no symlink; refused otherwise, never repaired) and every file in
//! it is reached from that descriptor without following symlinks. It is
//! not the server's `RuntimeDirectory` (`/run/scratchd`, which belongs to
//! the service's user and which systemd empties at every restart), so
//! records outlive a server restart. A record must also make sense before
//! it is used: its id is the file's, hex, and it names only this
//! directory's FUSE mount point and loop or nbd devices.
//!
//! `/run` is a tmpfs: records do not survive a reboot, and neither do the
//! mounts they describe.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use scratchd_attach::ns;
use scratchd_attach::trusted_dir::{TrustError, TrustedDir};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::frontend::FrontEnd;

/// Where records live unless [`DIR_ENV`] says otherwise: a directory of
/// root's own, beside (not inside) the server's `/run/scratchd`.
pub const DEFAULT_DIR: &str = "/run/scratchd-builder";
/// The environment variable naming another state directory (tests run in
/// parallel, each with its own); it must pass the same checks.
pub const DIR_ENV: &str = "SCRATCHD_STATE_DIR";

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("state directory: {source}")]
pub struct StateError {
    #[source]
    source: TrustError,
}

impl From<TrustError> for StateError {
    fn from(source: TrustError) -> Self {
        StateError { source }
    }
}

/// Why a mount point cannot be attached to.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{} is already attached ({})", mount.display(), device.as_deref().unwrap_or(Path::new("being attached")).display())]
    Attached {
        mount: PathBuf,
        device: Option<PathBuf>,
    },
    #[error("{} is already a mount point (of {})", mount.display(), mounted.display())]
    MountPoint { mount: PathBuf, mounted: PathBuf },
    #[error(transparent)]
    State(#[from] StateError),
}

/// A process, told apart from a later one with the same pid by its start
/// time (clock ticks after boot, field 22 of `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub start_time: u64,
}

impl Process {
    /// This process.
    pub fn current() -> io::Result<Process> {
        let pid = std::process::id();
        Process::of(pid).ok_or_else(|| io::Error::other(format!("no /proc/{pid}/stat")))
    }

    /// The process that has `pid` now, if any.
    pub fn of(pid: u32) -> Option<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start_time = start_time(&stat)?;
        Some(Process { pid, start_time })
    }

    /// Whether this very process still runs. A zombie, which has released
    /// everything it held, counts as gone; so does a process with SIGKILL
    /// pending: it is dying, and may be stuck doing so (a holder killed
    /// while unmounting DIR waits on its own FUSE file, whose connection
    /// the kernel aborts only once the holder is gone).
    pub fn alive(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok();
        stat.is_some_and(|s| start_time(&s) == Some(self.start_time) && !is_zombie(&s))
            && !self.killed()
    }

    /// Whether the process runs the program this one runs (its
    /// `/proc/PID/exe` is ours: the same file, or the same path when an
    /// upgrade replaced it since).
    pub fn runs_this_program(&self) -> bool {
        let theirs = std::fs::read_link(format!("/proc/{}/exe", self.pid));
        let ours = std::fs::read_link("/proc/self/exe");
        match (theirs, ours) {
            (Ok(theirs), Ok(ours)) => same_program(&theirs, &ours),
            _ => false,
        }
    }

    /// Whether SIGKILL is pending for the process (`ShdPnd`, the signals
    /// pending for the whole process, in `/proc/PID/status`).
    fn killed(&self) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        status.is_ok_and(|s| sigkill_pending(&s))
    }
}

/// The kernel marks a replaced executable's link "PATH (deleted)".
fn same_program(theirs: &Path, ours: &Path) -> bool {
    let plain = |p: &Path| {
        let text = p.to_string_lossy().into_owned();
        text.strip_suffix(" (deleted)")
            .map(str::to_owned)
            .unwrap_or(text)
    };
    plain(theirs) == plain(ours)
}

fn sigkill_pending(status: &str) -> bool {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok());
    // Signal N is bit N - 1.
    mask.is_some_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0)
}

/// The fields after the command name, which may itself hold spaces and
/// parentheses: everything after the last `)`.
fn stat_fields(stat: &str) -> impl Iterator<Item = &str> {
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    rest.split_whitespace()
}

fn start_time(stat: &str) -> Option<u64> {
    // Field 22 overall is the 20th after the name (field 2).
    stat_fields(stat).nth(19)?.parse().ok()
}

fn is_zombie(stat: &str) -> bool {
    stat_fields(stat).next() == Some("Z")
}

/// One attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// The front end that attached it, which knows how to detach it.
    pub kind: FrontEnd,
    /// Where the disk's file system is mounted (canonical path).
    pub mount: PathBuf,
    /// `/dev/loopN` or `/dev/nbdN`; `None` while it is being attached.
    pub device: Option<PathBuf>,
    /// The export's name.
    pub export: String,
    /// The export's URI (with the export, without credentials).
    pub uri: String,
    /// The process the attachment depends on: the holder of a FUSE
    /// attachment; for a kernel one, the `scratchd attach` making it, until
    /// it is made (then `None`: the kernel holds it).
    pub holder: Option<Process>,
    /// FUSE: the mount point holding the disk's file.
    pub fuse_dir: Option<PathBuf>,
    /// Kernel: the backend identifier the device shows in sysfs, which
    /// tells our device from a later one with the same number.
    pub backend: Option<String>,
}

impl Record {
    /// A kernel attachment of `/dev/nbd12` at `/mnt`, for tests to vary.
    #[cfg(test)]
    pub(crate) fn kernel_example() -> Record {
        Record {
            id: "x".into(),
            kind: FrontEnd::Kernel,
            mount: "/mnt".into(),
            device: Some("/dev/nbd12".into()),
            export: "e".into(),
            uri: "nbd://h/e".into(),
            holder: None,
            fuse_dir: None,
            backend: Some("scratchd-attach:x".into()),
        }
    }

    /// Whether `path` (canonical) is this attachment's mount point or
    /// block device.
    pub fn names(&self, path: &Path) -> bool {
        self.mount == path || self.device.as_deref() == Some(path)
    }
}

/// The state directory.
pub struct StateDir {
    dir: TrustedDir,
}

/// The state directory's lock, held until dropped.
pub struct Lock {
    _file: File,
}

impl StateDir {
    /// Opens the state directory, making it (mode 0700: records name disks,
    /// whose names are their keys) when needed; refuses one that anyone
    /// but root could change.
    pub fn open() -> Result<StateDir, StateError> {
        // Set but empty counts as unset, as for most variables of the kind.
        let path = std::env::var_os(DIR_ENV)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Ok(StateDir {
            dir: TrustedDir::open_or_create(&path)?,
        })
    }

    /// The directory (its path has no symlink: mount points in it are
    /// found in mountinfo by it).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The FUSE mount point of attachment `id`.
    pub fn fuse_dir(&self, id: &str) -> PathBuf {
        self.path().join(format!("{id}.fuse"))
    }

    /// Makes attachment `id`'s FUSE mount point.
    pub fn make_fuse_dir(&self, id: &str) -> Result<PathBuf, StateError> {
        self.dir.make_dir(&format!("{id}.fuse"))?;
        Ok(self.fuse_dir(id))
    }

    /// The holder's log of attachment `id`.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.path().join(format!("{id}.log"))
    }

    /// Opens attachment `id`'s log for its holder to append to.
    pub fn open_log(&self, id: &str) -> Result<File, StateError> {
        Ok(self.dir.open_append(&format!("{id}.log"))?)
    }

    /// Writes `record` atomically: a reader sees the old one or the new
    /// one, never half of either.
    pub fn write(&self, record: &Record) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(record).map_err(|e| TrustError::Io {
            path: self.path().join(&record.id),
            source: e.into(),
        })?;
        // No fsync: the directory is on a tmpfs, which no crash keeps.
        Ok(self
            .dir
            .write_atomically(&format!("{}.json", record.id), &text)?)
    }

    /// Removes attachment `id`'s record, log and (empty) FUSE mount point;
    /// what is already gone is no error.
    pub fn remove(&self, id: &str) {
        let _ = self.dir.remove_dir(&format!("{id}.fuse"));
        let _ = self.dir.remove(&format!("{id}.log"));
        let _ = self.dir.remove(&format!("{id}.json"));
    }

    /// Every record; unreadable or senseless ones are skipped with a
    /// warning.
    pub fn records(&self) -> Vec<Record> {
        let names = match self.dir.names() {
            Ok(names) => names,
            Err(e) => {
                warn!(error = %e, "cannot list the state directory");
                return Vec::new();
            }
        };
        names
            .iter()
            .filter_map(|name| name.strip_suffix(".json"))
            .filter(|id| !id.starts_with('.'))
            .filter_map(|id| self.get(id))
            .collect()
    }

    /// Removes logs and half-written records that no record owns and that
    /// nobody touched for `quiet`: what an attach killed together with its
    /// holder before the record existed left. (A younger one may belong to
    /// an attach under way.) Returns how many went.
    pub fn remove_orphans(&self, quiet: std::time::Duration) -> usize {
        let Ok(names) = self.dir.names() else {
            return 0;
        };
        let mut removed = 0;
        for name in names {
            let id = match (name.strip_suffix(".log"), name.strip_suffix(".tmp")) {
                (Some(id), _) => id,
                // `.ID.json.RANDOM.tmp`, as TrustedDir stages a write.
                (None, Some(staged)) => staged
                    .trim_start_matches('.')
                    .split('.')
                    .next()
                    .unwrap_or(""),
                (None, None) => continue,
            };
            let owned = self.dir.age(&format!("{id}.json")).is_some();
            let idle = self.dir.age(&name);
            if owned || idle.map_or(true, |idle| idle < quiet) {
                continue;
            }
            if self.dir.remove(&name).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// The record of attachment `id`, if it is there and makes sense.
    pub fn get(&self, id: &str) -> Option<Record> {
        if !valid_id(id) {
            warn!(id, "a record whose name is not an attachment id; ignored");
            return None;
        }
        let text = match self.dir.read(&format!("{id}.json")) {
            Ok(text) => text?,
            Err(e) => {
                warn!(id, error = %e, "unreadable record");
                return None;
            }
        };
        let record: Record = match serde_json::from_slice(&text) {
            Ok(record) => record,
            Err(e) => {
                warn!(id, error = %e, "unreadable record");
                return None;
            }
        };
        match self.check(id, &record) {
            Ok(()) => Some(record),
            Err(why) => {
                warn!(id, why, "a record that makes no sense; ignored");
                None
            }
        }
    }

    /// What a record may name: its own id, this directory's FUSE mount
    /// point, an absolute mount point, a loop or nbd device.
    fn check(&self, id: &str, record: &Record) -> Result<(), &'static str> {
        if record.id != id {
            return Err("its id is not its file's");
        }
        if !record.mount.is_absolute() {
            return Err("its mount point is not an absolute path");
        }
        if record
            .fuse_dir
            .as_ref()
            .is_some_and(|d| *d != self.fuse_dir(id))
        {
            return Err("its FUSE mount point is not its own in the state directory");
        }
        if let Some(device) = &record.device {
            if !is_block_device_name(device) {
                return Err("its device is not /dev/loopN or /dev/nbdN");
            }
        }
        Ok(())
    }

    /// The attachment mounted at, or attached as, `path` (canonical).
    pub fn find(&self, path: &Path) -> Option<Record> {
        self.records().into_iter().find(|r| r.names(path))
    }

    /// Locks the state directory until the returned guard is dropped.
    fn lock(&self) -> Result<Lock, StateError> {
        let file = self.dir.open_file("lock", true)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            TrustError::Io {
                path: self.path().join("lock"),
                source: e.into(),
            }
        })?;
        Ok(Lock { _file: file })
    }

    /// Writes `record`, the first of a new attachment, if its mount point
    /// is free: neither attached by another record nor a mount point
    /// already.
    pub fn claim(&self, record: &Record) -> Result<(), ClaimError> {
        let _lock = self.lock()?;
        if let Some(other) = self.find(&record.mount) {
            return Err(ClaimError::Attached {
                mount: record.mount.clone(),
                device: other.device,
            });
        }
        if let Some(mounted) = ns::mount_source(&record.mount) {
            return Err(ClaimError::MountPoint {
                mount: record.mount.clone(),
                mounted,
            });
        }
        self.write(record)?;
        Ok(())
    }
}

/// An attachment id: hex, as [`crate::id`] makes them.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `/dev/loopN` or `/dev/nbdN`: the devices attachments are made of.
fn is_block_device_name(path: &Path) -> bool {
    let Some(name) = path.to_str().and_then(|p| p.strip_prefix("/dev/")) else {
        return false;
    };
    let digits = name
        .strip_prefix("loop")
        .or_else(|| name.strip_prefix("nbd"));
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_come_after_the_last_parenthesis() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(start_time(stat), Some(987654));
        assert!(!is_zombie(stat));
        assert!(is_zombie("7 (sh) Z 1 7"));
        assert_eq!(start_time("7 (sh"), None);
        assert!(sigkill_pending(
            "State:\tD (disk sleep)\nShdPnd:\t0000000000000100\n"
        ));
        assert!(
            !sigkill_pending("ShdPnd:\t0000000000004000\n"),
            "SIGTERM only"
        );
        let me = Process::current().unwrap();
        assert!(me.alive());
        assert!(me.runs_this_program());
        let init = Process::of(1).unwrap();
        assert!(!init.runs_this_program(), "init is not scratchd");
        assert!(same_program(
            Path::new("/usr/bin/scratchd (deleted)"),
            Path::new("/usr/bin/scratchd")
        ));
        let reused = Process {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive(), "another start time is another process");
    }

    /// A state directory of the test's own, under /run (root's, 0755):
    /// the checks refuse one under /tmp, which everyone may write.
    fn test_state(test: &str) -> Option<(tempfile::TempDir, StateDir)> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED {test}: needs root (the state directory must be root's)");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("scratchd-state-test")
            .tempdir_in("/run")
            .unwrap();
        let state = StateDir {
            dir: TrustedDir::open_or_create(dir.path()).unwrap(),
        };
        Some((dir, state))
    }

    #[test]
    fn orphan_logs_go_once_quiet_and_owned_ones_stay() {
        let Some((dir, state)) = test_state("orphan_logs_go_once_quiet_and_owned_ones_stay") else {
            return;
        };
        let owned = Record {
            id: "0e1d".into(),
            kind: FrontEnd::Fuse,
            mount: "/mnt/a".into(),
            device: None,
            export: "a".into(),
            uri: "nbd+unix:///a?socket=/run/s".into(),
            holder: None,
            fuse_dir: None,
            backend: None,
        };
        state.write(&owned).unwrap();
        for file in ["0e1d.log", "0bad.log", ".0f00.json.1234.tmp", "lock"] {
            std::fs::write(dir.path().join(file), b"x").unwrap();
        }
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(state.remove_orphans(hour), 0, "too young to be orphans");
        assert_eq!(state.remove_orphans(std::time::Duration::ZERO), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["0e1d.json", "0e1d.log", "lock"]);
    }

    #[test]
    fn records_round_trip_and_are_found_by_mount_or_device() {
        let Some((dir, state)) = test_state("records_round_trip_and_are_found_by_mount_or_device")
        else {
            return;
        };
        let record = Record {
            id: "abc".into(),
            kind: FrontEnd::Fuse,
            mount: "/mnt/build".into(),
            device: Some("/dev/loop7".into()),
            export: "koji-1".into(),
            uri: "nbd+unix:///koji-1?socket=/run/s".into(),
            holder: Some(Process {
                pid: 1,
                start_time: 2,
            }),
            fuse_dir: Some(state.fuse_dir("abc")),
            backend: None,
        };
        state.write(&record).unwrap();
        let text = std::fs::read_to_string(dir.path().join("abc.json")).unwrap();
        assert!(text.contains("\"kind\": \"fuse\""), "{text}");
        assert_eq!(state.find(Path::new("/mnt/build")), Some(record.clone()));
        assert_eq!(state.find(Path::new("/dev/loop7")), Some(record.clone()));
        assert_eq!(state.find(Path::new("/mnt")), None);
        assert_eq!(state.get("abc"), Some(record));
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();
        assert_eq!(state.records().len(), 1, "unreadable records are skipped");
        state.remove("abc");
        assert_eq!(state.get("abc"), None);
    }

    /// Records that name what is not theirs are ignored, whoever wrote
    /// them: another id, another FUSE mount point, a device that is no
    /// loop or nbd device, a file name that is not an id.
    #[test]
    fn senseless_records_are_ignored() {
        let Some((dir, state)) = test_state("senseless_records_are_ignored") else {
            return;
        };
        let good = Record {
            id: "aa".into(),
            kind: FrontEnd::Fuse,
            mount: "/mnt/build".into(),
            device: Some("/dev/loop7".into()),
            export: "e".into(),
            uri: "nbd+unix:///e?socket=/run/s".into(),
            holder: None,
            fuse_dir: Some(state.fuse_dir("aa")),
            backend: None,
        };
        state.write(&good).unwrap();
        assert_eq!(state.get("aa"), Some(good.clone()));
        let forged = [
            Record {
                id: "bb".into(),
                ..good.clone()
            },
            Record {
                fuse_dir: Some("/home/victim/fuse".into()),
                ..good.clone()
            },
            Record {
                device: Some("/dev/sda".into()),
                ..good.clone()
            },
            Record {
                mount: "relative".into(),
                ..good.clone()
            },
        ];
        for record in forged {
            let text = serde_json::to_vec(&record).unwrap();
            std::fs::write(dir.path().join("aa.json"), text).unwrap();
            assert_eq!(state.get("aa"), None, "{record:?}");
        }
        assert_eq!(state.get("../precious"), None);
        std::fs::write(dir.path().join("not-hex.json"), b"{}").unwrap();
        assert!(state.records().is_empty());
    }

    /// Records as the binary wrote them before the front ends moved into
    /// this crate: their `kind` names the front end.
    #[test]
    fn records_of_earlier_versions_parse() {
        let kernel = r#"{
  "id": "0f1e",
  "kind": "kernel",
  "mount": "/mnt/build",
  "device": "/dev/nbd3",
  "export": "koji-1",
  "uri": "nbd://h/koji-1",
  "holder": null,
  "fuse_dir": null,
  "backend": "scratchd-attach:0f1e"
}"#;
        let record: Record = serde_json::from_str(kernel).unwrap();
        assert_eq!(record.kind, FrontEnd::Kernel);
        assert_eq!(record.backend.as_deref(), Some("scratchd-attach:0f1e"));
        let fuse = r#"{"id":"a","kind":"fuse","mount":"/m","device":null,"export":"e",
            "uri":"nbd+unix:///e?socket=/s","holder":{"pid":7,"start_time":9},
            "fuse_dir":"/run/scratchd/attach/a.fuse","backend":null}"#;
        let record: Record = serde_json::from_str(fuse).unwrap();
        assert_eq!(record.kind, FrontEnd::Fuse);
        assert_eq!(
            record.holder,
            Some(Process {
                pid: 7,
                start_time: 9
            })
        );
        // And a record written now reads as one written then.
        let written: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(written["kind"], "fuse");
        assert!(serde_json::from_str::<Record>(&kernel.replace("kernel\"", "ublk\"")).is_err());
    }
}
