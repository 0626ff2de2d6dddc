//! Attachment records: what `scratchd attach` made, for `scratchd detach`
//! to find and undo.
//!
//! One JSON file per attachment, `ID.json`, in the state directory
//! (`/run/scratchd/attach`, mode 0700; [`DIR_ENV`] overrides it), written
//! atomically (a temporary file renamed over it), beside:
//! - `ID.fuse/`: the FUSE mount point holding the disk's file (FUSE
//!   attachments);
//! - `ID.log`: the holder's standard error (its log);
//! - `lock`: locked while a new attachment claims its mount point, so that
//!   two attaches cannot both take one directory.
//!
//! `/run` is a tmpfs: records do not survive a reboot, and neither do the
//! mounts they describe.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use scratchd_attach::ns;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::frontend::FrontEnd;

/// Where records live unless [`DIR_ENV`] says otherwise.
pub const DEFAULT_DIR: &str = "/run/scratchd/attach";
/// The environment variable naming another state directory (tests run in
/// parallel, each with its own).
pub const DIR_ENV: &str = "SCRATCHD_STATE_DIR";

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
#[error("state directory {}: {source}", dir.display())]
pub struct StateError {
    dir: PathBuf,
    #[source]
    source: io::Error,
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

    /// Whether SIGKILL is pending for the process (`ShdPnd`, the signals
    /// pending for the whole process, in `/proc/PID/status`).
    fn killed(&self) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        status.is_ok_and(|s| sigkill_pending(&s))
    }
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
    /// Whether `path` (canonical) is this attachment's mount point or
    /// block device.
    pub fn names(&self, path: &Path) -> bool {
        self.mount == path || self.device.as_deref() == Some(path)
    }
}

/// The state directory.
pub struct StateDir {
    path: PathBuf,
}

/// The state directory's lock, held until dropped.
pub struct Lock {
    _file: File,
}

impl StateDir {
    /// Opens the state directory, making it (mode 0700: records name disks,
    /// whose names are their keys) when needed.
    pub fn open() -> Result<StateDir, StateError> {
        // Set but empty counts as unset, as for most variables of the kind.
        let path = std::env::var_os(DIR_ENV)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let state = StateDir { path };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state.path)
            .map_err(|e| state.error(e))?;
        // A directory made by someone else, or with a wider umask above.
        std::fs::set_permissions(&state.path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| state.error(e))?;
        // Mount points in it are found in mountinfo, which has real paths.
        let path = std::fs::canonicalize(&state.path).map_err(|e| state.error(e))?;
        Ok(StateDir { path })
    }

    fn error(&self, source: io::Error) -> StateError {
        StateError {
            dir: self.path.clone(),
            source,
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.json"))
    }

    /// The FUSE mount point of attachment `id`.
    pub fn fuse_dir(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.fuse"))
    }

    /// The holder's log of attachment `id`.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.path.join(format!("{id}.log"))
    }

    /// Writes `record` atomically: a reader sees the old one or the new
    /// one, never half of either.
    pub fn write(&self, record: &Record) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(record).map_err(|e| self.error(e.into()))?;
        let temp = self.path.join(format!(".{}.json.tmp", record.id));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| self.error(e))?;
        // No fsync: the directory is on a tmpfs, which no crash keeps.
        file.write_all(&text).map_err(|e| self.error(e))?;
        std::fs::rename(&temp, self.record_path(&record.id)).map_err(|e| self.error(e))
    }

    /// Removes attachment `id`'s record, log and (empty) FUSE mount point;
    /// what is already gone is no error.
    pub fn remove(&self, id: &str) {
        let _ = std::fs::remove_dir(self.fuse_dir(id));
        let _ = std::fs::remove_file(self.log_path(id));
        let _ = std::fs::remove_file(self.record_path(id));
    }

    /// Every record; unreadable ones are skipped with a warning.
    pub fn records(&self) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match std::fs::read(&path).map(|text| serde_json::from_slice::<Record>(&text)) {
                Ok(Ok(record)) => records.push(record),
                // Removed meanwhile (a holder that just detached).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Ok(Err(e)) => warn!(record = %path.display(), error = %e, "unreadable record"),
                Err(e) => warn!(record = %path.display(), error = %e, "unreadable record"),
            }
        }
        records
    }

    /// Removes logs and half-written records that no record owns and that
    /// nobody touched for `quiet`: what an attach killed together with its
    /// holder before the record existed left. (A younger one may belong to
    /// an attach under way.) Returns how many went.
    pub fn remove_orphans(&self, quiet: std::time::Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let id = match (name.strip_suffix(".log"), name.strip_suffix(".json.tmp")) {
                (Some(id), _) => id,
                (None, Some(tmp)) => tmp.trim_start_matches('.'),
                (None, None) => continue,
            };
            let idle = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if self.record_path(id).exists() || idle.map_or(true, |idle| idle < quiet) {
                continue;
            }
            if std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// The record of attachment `id`, if it is still there.
    pub fn get(&self, id: &str) -> Option<Record> {
        let text = std::fs::read(self.record_path(id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The attachment mounted at, or attached as, `path` (canonical).
    pub fn find(&self, path: &Path) -> Option<Record> {
        self.records().into_iter().find(|r| r.names(path))
    }

    /// Locks the state directory until the returned guard is dropped.
    fn lock(&self) -> Result<Lock, StateError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.join("lock"))
            .map_err(|e| self.error(e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.error(e.into()))?;
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
        let reused = Process {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.alive(), "another start time is another process");
    }

    #[test]
    fn orphan_logs_go_once_quiet_and_owned_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir {
            path: dir.path().to_owned(),
        };
        let owned = Record {
            id: "owned".into(),
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
        for file in ["owned.log", "orphan.log", ".half.json.tmp", "lock"] {
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
        assert_eq!(left, ["lock", "owned.json", "owned.log"]);
    }

    #[test]
    fn records_round_trip_and_are_found_by_mount_or_device() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir {
            path: dir.path().to_owned(),
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
