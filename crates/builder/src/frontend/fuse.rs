//! The FUSE front end: the disk as a FUSE file served by threads of this
//! process ([`scratchd_attach::fuse`]), a direct-I/O autoclear loop device
//! on that file ([`scratchd_attach::loopdev`]), and the mount. Works for a
//! disk of this process's own and for one on a server (over TLS too), on
//! any host with FUSE.
//!
//! The process must serve the file for as long as the mount is used: a
//! run does, with a watchdog for when it is killed (see [`crate::run`]);
//! an attachment that outlives its command is kept by a holder process
//! ([`crate::holder`]). Its record names the holder, the loop device and
//! the FUSE mount point, so that `detach` can stop the holder, and undo
//! what a dead one left: abort its FUSE connection (nothing then waits on
//! the disk), unmount DIR lazily, detach the loop device if it is still on
//! this attachment's file, unmount the FUSE file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_attach::fuse::{self, FuseFile};
use scratchd_attach::loopdev::{self, LoopDevice};
use scratchd_attach::ns;
use scratchd_client::{Client, Window, WriteBehind};
use scratchd_store::BlockDevice;
use tracing::{debug, warn};

use super::{mount_disk, AttachError, Attachment, Disk, Driver, KeepRequest, Origin, Setup};
use crate::detach::{self, DetachError};
use crate::holder;
use crate::remote;
use crate::sector::logical_block_size;
use crate::state::{Process, Record, StateDir};

/// How long a file system that was still busy when it was unmounted, and
/// so detached lazily, is served before the disk is cut off (its last
/// writes then fail: nobody will read them).
pub const LAZY_GRACE: Duration = Duration::from_secs(5);

/// The FUSE front end's [`Driver`].
pub(crate) struct Fuse;

impl Driver for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn refuses(&self, _: Origin) -> Option<String> {
        None
    }

    /// Whether FUSE works shows when it is used: it is the front end of
    /// last resort.
    fn available(&self) -> bool {
        true
    }

    fn served_here(&self) -> bool {
        true
    }

    fn attach(
        &self,
        disk: Disk,
        setup: &Setup,
        watch: &mut dyn FnMut(u32) -> io::Result<()>,
    ) -> Result<Box<dyn Attachment>, AttachError> {
        Ok(Box::new(FuseAttached::attach(disk, setup, watch)?))
    }

    /// A holder process serves the file (see [`crate::holder`]).
    fn attach_kept(&self, state: &StateDir, request: &KeepRequest) -> Result<PathBuf, AttachError> {
        holder::start(state, request)
    }

    fn detach(
        &self,
        state: &StateDir,
        record: &Record,
        holder: Option<Process>,
    ) -> Result<(), DetachError> {
        let Some(holder) = holder else {
            detach::clean_up(state, record);
            return Ok(());
        };
        detach::unmount_dir(record)?;
        holder::stop(holder)?;
        // A holder that finished removed its record; one that was killed
        // left what a stale attachment leaves.
        if let Some(left) = state.get(&record.id) {
            detach::clean_up(state, &left);
        }
        Ok(())
    }

    /// Without its holder nothing serves the file.
    fn attached_without_holder(&self, _: &Record) -> bool {
        false
    }

    fn clean_up(&self, record: &Record) {
        abort_connection(record);
        detach::unmount_lazily_if_ours(record);
        release(record);
    }
}

/// A disk attached through FUSE and a loop device, and mounted;
/// [`Attachment::detach`] (or drop) undoes it.
pub(crate) struct FuseAttached {
    mount: PathBuf,
    mounted: bool,
    device: LoopDevice,
    fuse: Option<FuseFile>,
    /// The client of a disk on a server, disconnected cleanly last.
    client: Option<Arc<Client>>,
    /// Write-behind on that client, drained before it disconnects.
    write_behind: Option<Arc<WriteBehind>>,
}

impl FuseAttached {
    /// Serves the disk as a FUSE file in `setup.private_dir` (made here),
    /// attaches a loop device to it and mounts that.
    pub(crate) fn attach(
        disk: Disk,
        setup: &Setup,
        watch: &mut dyn FnMut(u32) -> io::Result<()>,
    ) -> Result<Self, AttachError> {
        std::fs::create_dir(setup.private_dir).map_err(AttachError::FuseDir)?;
        let (device, client, write_behind) = match disk {
            Disk::Local(device) => (device, None, None),
            Disk::Server(target) => {
                let client = Arc::new(remote::connect(target, setup.connections)?);
                match write_behind(&client, setup) {
                    Some(wb) => (wb.clone() as _, Some(client), Some(wb)),
                    None => (client.clone() as _, Some(client), None),
                }
            }
        };
        let read_only = device.capabilities().read_only;
        let block_size = logical_block_size(device.as_ref()).map_err(AttachError::Probe)?;
        let fuse = FuseFile::mount(device, setup.private_dir, setup.connections)
            .map_err(AttachError::Fuse)?;
        watch(fuse.connection().map_err(AttachError::Fuse)?).map_err(AttachError::Watch)?;
        let loopdev =
            LoopDevice::attach(fuse.path(), read_only, block_size).map_err(AttachError::Loop)?;
        debug!(device = %loopdev.path().display(), direct_io = loopdev.direct_io(), "loop device attached");
        let mut attached = FuseAttached {
            mount: setup.mount.to_owned(),
            mounted: false,
            device: loopdev,
            fuse: Some(fuse),
            client,
            write_behind,
        };
        if let Some(options) = setup.mount_options {
            let device = attached.device.path();
            mount_disk(device, &attached.mount, setup.fs_type, options, read_only)?;
            attached.mounted = true;
            // The mount holds the loop device now; ours would keep it
            // attached after the mount is gone.
            attached.device.release();
        }
        Ok(attached)
    }

    /// The client of a disk on a server.
    pub(crate) fn client(&self) -> Option<&Arc<Client>> {
        self.client.as_ref()
    }

    /// Unmounts, lets the loop device go, unmounts the FUSE file and
    /// disconnects from the server.
    fn undo(&mut self) {
        if self.mounted {
            self.mounted = false;
            unmount_if_ours(&self.mount, self.device.path());
        }
        self.device.release();
        // A file system detached lazily (here, or by `scratchd detach`)
        // lives on until its last user lets go, and writes itself back
        // then: keep serving it a little. Otherwise the loop device is
        // gone already (autoclear) and this costs one look at sysfs.
        let started = Instant::now();
        while self.device.attached() && started.elapsed() < LAZY_GRACE {
            std::thread::sleep(Duration::from_millis(5));
        }
        match self.device.attached() {
            true => warn!(
                device = %self.device.path().display(),
                "the loop device is still in use after {LAZY_GRACE:?}; cutting it off"
            ),
            false => debug!(waited = ?started.elapsed(), "loop device detached"),
        }
        if let Some(fuse) = self.fuse.take() {
            if let Err(e) = fuse.unmount() {
                warn!(error = %e, "cannot unmount the FUSE file");
            }
        }
        if let Some(wb) = self.write_behind.take() {
            // Nothing is lost silently: a write the server refused after
            // the file system was told it was done is logged here, if the
            // build did not see it fail a later write or fsync.
            if let Err(e) = wb.drain() {
                warn!(error = %e, "a write acknowledged early failed on the server");
            }
        }
        if let Some(client) = self.client.take() {
            remote::close(client);
        }
    }
}

/// Write-behind on `client` if `--write-behind` and the export call for it.
fn write_behind(client: &Arc<Client>, setup: &Setup) -> Option<Arc<WriteBehind>> {
    let server_flushes = client.capabilities().durable_flush;
    let on = setup.write_behind.enabled(server_flushes);
    debug!(mode = %setup.write_behind, server_flushes, on, "write-behind");
    on.then(|| Arc::new(WriteBehind::new(client.clone(), Window::default())))
}

impl Attachment for FuseAttached {
    fn mount(&self) -> &Path {
        &self.mount
    }

    /// The loop device, `/dev/loopN`.
    fn device_path(&self) -> &Path {
        self.device.path()
    }

    fn detach(mut self: Box<Self>) {
        self.undo();
    }
}

impl Drop for FuseAttached {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Unmounts `dir` if `device` is what is mounted there: someone may have
/// unmounted it already (`scratchd detach` does, before it stops the
/// holder), and then mounted something else at the same place.
fn unmount_if_ours(dir: &Path, device: &Path) {
    if ns::mount_source(dir).as_deref() != Some(device) {
        debug!(mount = %dir.display(), "not mounted (any more)");
        return;
    }
    if let Err(e) = ns::unmount(dir) {
        warn!(mount = %dir.display(), error = %e, "cannot unmount");
    }
}

/// Aborts the attachment's FUSE connection. A killed holder's connection is
/// aborted already (the kernel does it when the last `/dev/fuse`
/// descriptor closes), unless one of its threads is stuck in an
/// uninterruptible wait on its own file system (unmounting DIR when it was
/// killed): then the holder cannot finish dying, and this frees it. After
/// it, nothing can wait on the disk.
fn abort_connection(record: &Record) {
    let Some(id) = record.fuse_dir.as_deref().and_then(fuse::connection_at) else {
        return;
    };
    if let Err(e) = fuse::abort_connection(id) {
        debug!(id, error = %e, "cannot abort the FUSE connection");
    }
}

/// The loop device (if still on this attachment's file) and the dead FUSE
/// mount.
fn release(record: &Record) {
    let Some(fuse_dir) = &record.fuse_dir else {
        return;
    };
    if let Some(device) = &record.device {
        match loopdev::detach_if_backed_by(device, &fuse_dir.join(fuse::FILE_NAME)) {
            Ok(true) => debug!(device = %device.display(), "loop device detached"),
            Ok(false) => {}
            Err(e) => warn!(device = %device.display(), error = %e, "cannot detach"),
        }
    }
    if ns::mount_at(fuse_dir).is_some() {
        if let Err(e) = ns::unmount_lazily(fuse_dir) {
            warn!(dir = %fuse_dir.display(), error = %e, "cannot unmount the FUSE file");
        }
    }
}
