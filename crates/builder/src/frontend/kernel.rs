//! The kernel front end: a disk on a server as the kernel's `/dev/nbdN`,
//! our client's negotiated sockets handed over by generic netlink
//! ([`scratchd_attach::nbd_kernel`]). The kernel serves the device alone,
//! with no thread of ours in the data path, so nothing of ours needs to
//! stay: a run needs no watchdog (a killed run's mount going makes the
//! kernel disconnect the device, see
//! [`scratchd_attach::nbd_kernel::NbdDevice::disconnect_on_close`]), and a
//! kept attachment no holder.
//!
//! Needs a disk on a server (a local disk has no sockets to hand over), no
//! TLS (the kernel cannot take over a TLS session) and the nbd module. The
//! device's sysfs `backend` is the attachment's label: `detach` disconnects
//! a device only while it still shows that label, not a later attachment
//! that got the same number.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use scratchd_attach::nbd_kernel::{self, NbdDevice};
use scratchd_attach::ns;
use scratchd_client::{Client, Options, Replies, Target};
use tracing::{debug, warn};

use super::{
    mount_disk, AttachError, Attachment, Disk, Driver, FrontEnd, KeepRequest, Origin, Setup,
};
use crate::detach::{self, DetachError};
use crate::remote;
use crate::sector::logical_block_size;
use crate::state::{Process, Record, StateDir};

/// How long the kernel holds I/O when every connection to the server is
/// dead, waiting for new sockets (`NBD_CMD_RECONFIGURE`): nothing of ours
/// reconnects yet, so this is only a short grace before the build's I/O
/// fails.
const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// The kernel front end's [`Driver`].
pub(crate) struct Kernel;

impl Driver for Kernel {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn refuses(&self, origin: Origin) -> Option<String> {
        match origin {
            Origin::Local => Some(
                "--attach kernel needs --server (a local disk has no sockets to hand to the \
                 kernel)"
                    .to_owned(),
            ),
            Origin::Server { tls: true } => Some(
                "--attach kernel cannot take over a TLS connection (nbds://); use --attach fuse"
                    .to_owned(),
            ),
            Origin::Server { tls: false } => None,
        }
    }

    fn available(&self) -> bool {
        nbd_kernel::kernel_nbd_available()
    }

    fn served_here(&self) -> bool {
        false
    }

    fn attach(
        &self,
        disk: Disk,
        setup: &Setup,
        _watch: &mut dyn FnMut(u32) -> io::Result<()>,
    ) -> Result<Box<dyn Attachment>, AttachError> {
        let Disk::Server(target) = disk else {
            return Err(AttachError::Usage(
                self.refuses(Origin::Local).unwrap_or_default(),
            ));
        };
        Ok(Box::new(KernelAttached::attach(target, setup)?))
    }

    /// Hands the disk to the kernel and mounts it; no process stays. The
    /// record is claimed first (with this process as its holder, so that a
    /// sweep leaves it alone while it is being made).
    fn attach_kept(&self, state: &StateDir, request: &KeepRequest) -> Result<PathBuf, AttachError> {
        let label = format!("scratchd-attach:{}", request.id);
        let mut record = Record {
            id: request.id.to_owned(),
            kind: FrontEnd::Kernel,
            mount: request.mount.to_owned(),
            device: None,
            export: request.target.export.clone(),
            uri: request.target.to_string(),
            holder: Some(Process::current().map_err(AttachError::Process)?),
            fuse_dir: None,
            backend: Some(label.clone()),
        };
        state.claim(&record)?;
        let setup = Setup {
            mount: request.mount,
            mount_options: Some(request.mount_options),
            fs_type: request.fs_type,
            connections: request.connections,
            private_dir: &state.fuse_dir(request.id),
            label: &label,
        };
        let attached = KernelAttached::attach(request.target, &setup)
            .inspect_err(|_| state.remove(request.id))?;
        record.device = Some(attached.device_path.clone());
        record.holder = None;
        if let Err(e) = state.write(&record) {
            Box::new(attached).detach();
            state.remove(request.id);
            return Err(e.into());
        }
        let device = attached.device_path.clone();
        attached.keep();
        Ok(device)
    }

    /// A record with a live holder is still being attached by that process.
    fn detach(
        &self,
        state: &StateDir,
        record: &Record,
        holder: Option<Process>,
    ) -> Result<(), DetachError> {
        if let Some(holder) = holder {
            return Err(DetachError::Attaching {
                dir: record.mount.clone(),
                pid: holder.pid,
            });
        }
        detach::unmount_dir(record)?;
        disconnect_if_ours(record);
        state.remove(&record.id);
        Ok(())
    }

    /// The kernel still has the device, with this attachment's label (if
    /// someone unmounted it, disconnect-on-close took it away).
    fn attached_without_holder(&self, record: &Record) -> bool {
        nbd_index(record).and_then(nbd_kernel::backend_of) == record.backend
    }

    fn clean_up(&self, record: &Record) {
        detach::unmount_lazily_if_ours(record);
        disconnect_if_ours(record);
    }
}

/// A disk on a server as the kernel's `/dev/nbdN`, mounted;
/// [`Attachment::detach`] (or drop) unmounts and disconnects it.
pub(crate) struct KernelAttached {
    mount: PathBuf,
    mounted: bool,
    device_path: PathBuf,
    device: Option<NbdDevice>,
}

impl KernelAttached {
    /// Connects to `target` over up to `setup.connections` connections,
    /// hands the sockets to the kernel (the device's sysfs `backend` reads
    /// `setup.label`) and mounts the device.
    fn attach(target: &Target, setup: &Setup) -> Result<KernelAttached, AttachError> {
        let options = remote::options(setup.connections);
        // A connection of our own reads the file system's sector size (as
        // the FUSE front end does), and holds the export open until the
        // kernel's are.
        let probe = Client::connect_with(
            target,
            &Options {
                connections: 1,
                ..options.clone()
            },
        )?;
        let largest = logical_block_size(&probe).map_err(AttachError::Probe)?;
        // The kernel speaks simple replies only, and asks no block status.
        let handshaken = Client::handshake_only(
            target,
            &Options {
                replies: Replies::Simple,
                block_status: false,
                ..options
            },
        )?;
        let info = handshaken.info.clone();
        let handshaken_read_only = info.read_only();
        let block_size =
            nbd_kernel::choose_block_size(info.block_size.map(|b| (b.min, b.max)), largest)?;
        let config = nbd_kernel::Config {
            index: None,
            size: info.size,
            block_size,
            server_flags: info.flags.0,
            timeout: None,
            dead_conn_timeout: DEAD_CONN_TIMEOUT,
            backend: Some(setup.label.to_owned()),
        };
        let streams = handshaken.into_fds().ok_or_else(|| {
            AttachError::Usage("the kernel cannot take over TLS connections".to_owned())
        })?;
        let device = nbd_kernel::connect(streams, &config)?;
        let mut attached = KernelAttached {
            mount: setup.mount.to_owned(),
            mounted: false,
            device_path: device.path(),
            device: Some(device),
        };
        if let Some(options) = setup.mount_options {
            let (device, read_only) = (&attached.device_path, handshaken_read_only);
            mount_disk(device, &attached.mount, setup.fs_type, options, read_only)?;
            attached.mounted = true;
        }
        if let Some(device) = &mut attached.device {
            if let Err(e) = device.disconnect_on_close() {
                warn!(error = %e, "the device will stay connected if its mount goes unnoticed");
            }
        }
        if let Err(e) = probe.close() {
            debug!(error = %e, "closing the probe connection");
        }
        Ok(attached)
    }

    /// Leaves the device connected and mounted, for `scratchd detach` to
    /// undo later; returns its index.
    fn keep(mut self) -> Option<u32> {
        self.mounted = false;
        self.device.take().map(NbdDevice::keep)
    }

    fn undo(&mut self) {
        if self.mounted {
            self.mounted = false;
            if let Err(e) = ns::unmount(&self.mount) {
                warn!(mount = %self.mount.display(), error = %e, "cannot unmount");
            }
        }
        if let Some(device) = self.device.take() {
            if let Err(e) = device.disconnect() {
                warn!(device = %self.device_path.display(), error = %e, "cannot disconnect");
            }
        }
    }
}

impl Attachment for KernelAttached {
    fn mount(&self) -> &Path {
        &self.mount
    }

    /// `/dev/nbdN`.
    fn device_path(&self) -> &Path {
        &self.device_path
    }

    fn detach(mut self: Box<Self>) {
        self.undo();
    }
}

impl Drop for KernelAttached {
    fn drop(&mut self) {
        self.undo();
    }
}

/// `NBD_CMD_DISCONNECT` for a kernel attachment's device, if the kernel
/// still shows it as ours (disconnect-on-close usually took it away with
/// the mount already).
fn disconnect_if_ours(record: &Record) {
    let Some(index) = nbd_index(record) else {
        return;
    };
    if nbd_kernel::backend_of(index) != record.backend {
        return;
    }
    if let Err(e) = nbd_kernel::disconnect(index) {
        warn!(index, error = %e, "cannot disconnect the nbd device");
    }
}

/// N of a kernel attachment's `/dev/nbdN`.
fn nbd_index(record: &Record) -> Option<u32> {
    let name = record.device.as_ref()?.file_name()?.to_str()?;
    name.strip_prefix("nbd")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_indexes_come_from_the_device_name() {
        let mut record = Record {
            id: "x".into(),
            kind: FrontEnd::Kernel,
            mount: "/mnt".into(),
            device: Some("/dev/nbd12".into()),
            export: "e".into(),
            uri: "nbd://h/e".into(),
            holder: None,
            fuse_dir: None,
            backend: Some("scratchd-attach:x".into()),
        };
        assert_eq!(nbd_index(&record), Some(12));
        // No such device here: the kernel shows no backend, so it is gone.
        assert!(!Kernel.attached_without_holder(&record));
        record.device = Some("/dev/loop3".into());
        assert_eq!(nbd_index(&record), None);
    }
}
