//! `scratchd snapshot take --freeze DIR`: which file systems root may
//! freeze for a snapshot. Freezing one nobody thaws hangs its writers for
//! ever, and DIR is a path an unprivileged user may have a hand in (mock's
//! build roots are under a directory mock's group writes), so DIR must be,
//! at the moment it is opened and checked by its descriptor (never by its
//! path again):
//! - the mount point of a file system (no symlink on the way: see
//!   [`scratchd_attach::freeze`]),
//! - on the block device of a scratchd disk: the device of an attachment
//!   recorded in the state directory that is still that attachment's
//!   (its loop device on its FUSE file, its nbd device with its label),
//!   and then of the disk being snapshotted; or the device of a live
//!   `scratchd run` (its nbd label, or its loop device on the FUSE file in
//!   the run's work directory), for a run's command that snapshots its own
//!   disk.
//!
//! The host's `/`, `/tmp` or any other file system is refused before
//! anything is frozen.

use std::path::{Path, PathBuf};

use scratchd_attach::freeze::{FreezeError, Frozen, MountRoot};
use scratchd_attach::{loopdev, nbd_kernel};

use crate::state::{Process, Record, StateDir, StateError};

/// Why a directory is not frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeRefusal {
    #[error("only root may freeze a file system")]
    NotRoot,
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error("cannot tell which device {} is on", dir.display())]
    Device {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "{} is not the mount point of a scratchd disk (an attachment's or a run's): \
         its file system ({device}: {why}) is not frozen",
        dir.display()
    )]
    NotScratchd {
        dir: PathBuf,
        device: String,
        why: String,
    },
    #[error(
        "{} is the mount point of attachment {id}, whose disk is not the one \
         being snapshotted: not frozen",
        dir.display()
    )]
    OtherDisk { dir: PathBuf, id: String },
}

/// Freezes the file system mounted at `dir` if it is the disk `disk`'s
/// (see the module docs); thawed when the result is dropped or thawed.
///
/// # Errors
///
/// A refusal, or the kernel's.
pub fn freeze_disk(dir: &Path, disk: &str) -> Result<Frozen, FreezeRefusal> {
    if !rustix::process::geteuid().is_root() {
        return Err(FreezeRefusal::NotRoot);
    }
    let root = MountRoot::open(dir)?;
    let device = device_name(root.device()).map_err(|source| FreezeRefusal::Device {
        dir: dir.to_owned(),
        source,
    })?;
    check_owner(&StateDir::open()?.records(), dir, &device, disk)?;
    Ok(root.freeze()?)
}

/// The kernel's name of the block device `(major, minor)`, as `/dev/NAME`
/// (its `/sys/dev/block` link).
fn device_name((major, minor): (u32, u32)) -> std::io::Result<PathBuf> {
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))?;
    let name = link
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{}: no device name", link.display())))?;
    Ok(Path::new("/dev").join(name))
}

/// Accepts `device` if it is the attachment of `disk` among `records`, or a
/// live run's.
fn check_owner(
    records: &[Record],
    dir: &Path,
    device: &Path,
    disk: &str,
) -> Result<(), FreezeRefusal> {
    let attachment = records.iter().find(|r| {
        r.device.as_deref() == Some(device) && r.mount == dir && r.kind.driver().device_is_ours(r)
    });
    match attachment {
        Some(record) if record.export == disk => Ok(()),
        Some(record) => Err(FreezeRefusal::OtherDisk {
            dir: dir.to_owned(),
            id: record.id.clone(),
        }),
        None => live_runs(device).map_err(|why| FreezeRefusal::NotScratchd {
            dir: dir.to_owned(),
            device: device.display().to_string(),
            why,
        }),
    }
}

/// Accepts `device` if it is the disk of a `scratchd run` that still
/// runs; else says why not.
fn live_runs(device: &Path) -> Result<(), String> {
    let name = device.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let run = if let Some(index) = name.strip_prefix("nbd") {
        let label = index.parse().ok().and_then(nbd_kernel::backend_of);
        let run = label
            .as_deref()
            .and_then(crate::frontend::kernel::run_of_label);
        run.ok_or_else(|| format!("no attachment's, and its label {label:?} is no run's"))?
    } else if name.starts_with("loop") {
        let file = loopdev::backing_file(device);
        let run = file.as_deref().and_then(run_of_fuse_file);
        run.ok_or_else(|| format!("no attachment's, and its file {file:?} is no run's"))?
    } else {
        return Err("neither a loop nor an nbd device".to_owned());
    };
    // The label and the FUSE file are root's doing (only root configures
    // nbd and loop devices), and a run's device goes with its run; what is
    // left to check is that the run still runs (its start time, for an
    // nbd label). Not also by its executable's path: in the qemu guests,
    // read from inside the run, the run's `/proc/PID/exe` did not compare
    // equal to ours (kernel 6.12; why is not established).
    match run.alive() {
        true => Ok(()),
        false => Err(format!("the run {} has ended", run.pid)),
    }
}

/// The run whose FUSE file this is: `…/scratchd-run.PID.XXXX/fuse/disk`
/// ([`crate::run`]'s work directory), the run's process as it is now.
fn run_of_fuse_file(file: &Path) -> Option<Process> {
    let fuse_dir = file.parent()?;
    if file.file_name()? != scratchd_attach::fuse::FILE_NAME || fuse_dir.file_name()? != "fuse" {
        return None;
    }
    let work = fuse_dir.parent()?.file_name()?.to_str()?;
    let pid = work
        .strip_prefix(crate::run::WORK_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    Process::of(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_found_by_its_work_directory() {
        let me = Process::current().unwrap();
        let file = format!("/tmp/scratchd-run.{}.AbC123/fuse/disk", me.pid);
        assert_eq!(run_of_fuse_file(Path::new(&file)), Some(me));
        for other in [
            format!("/tmp/scratchd-run.{}.AbC123/fuse/other", me.pid),
            format!("/tmp/scratchd-run.{}.AbC123/mnt/disk", me.pid),
            format!("/tmp/elsewhere.{}.AbC123/fuse/disk", me.pid),
            "/tmp/scratchd-run.x.AbC123/fuse/disk".to_owned(),
        ] {
            assert_eq!(run_of_fuse_file(Path::new(&other)), None, "{other}");
        }
    }

    #[test]
    fn the_root_file_system_is_no_scratchd_disk() {
        let root = MountRoot::open(Path::new("/")).unwrap();
        let device = device_name(root.device());
        // A container's / may be an overlay without a block device.
        let Ok(device) = device else { return };
        let refused = check_owner(&[], Path::new("/"), &device, "x");
        assert!(
            matches!(refused, Err(FreezeRefusal::NotScratchd { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn an_attachment_of_another_disk_is_refused() {
        // A kernel attachment whose device shows no label here is not ours:
        // refused as no scratchd disk, whatever its export.
        let record = Record::kernel_example();
        let refused = check_owner(
            std::slice::from_ref(&record),
            &record.mount,
            Path::new("/dev/nbd12"),
            "e",
        );
        assert!(matches!(refused, Err(FreezeRefusal::NotScratchd { .. })));
    }
}
