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
use tracing::{debug, info, warn};

use super::{
    mount_disk, AttachError, Attachment, Disk, Driver, FrontEnd, KeepRequest, Origin, Setup,
};
use crate::detach::{self, DetachError};
use crate::id::fingerprint;
use crate::remote;
use crate::sector::logical_block_size;
use crate::state::{Process, Record, StateDir};

/// How long the kernel holds I/O when every connection to the server is
/// dead, waiting for new sockets (`NBD_CMD_RECONFIGURE`): nothing of ours
/// reconnects yet, so this is only a short grace before the build's I/O
/// fails.
const DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// The kernel's per-request timeout (`NBD_ATTR_TIMEOUT`) unless `--timeout`
/// gives another. The kernel's own default, 30 s, made a stalled server
/// lose connections for good (with several connections the kernel marks a
/// connection dead when one of its requests times out, and nothing of ours
/// gives it a new one): a server stall up to this long costs nothing. It
/// is also how long a request in flight to a vanished server waits before
/// it fails (plus [`DEAD_CONN_TIMEOUT`]); new requests fail sooner, once
/// TCP has found the connection dead ([`nbd_kernel::TCP_DEAD_AFTER`]), and
/// how long a detach of such an attachment waits for its writeback.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a new device's sockets may wait for their receive works to
/// start (see [`nbd_kernel::wait_for_receivers`]): milliseconds on a
/// healthy host; seconds under emulation.
const RECEIVERS_LIMIT: Duration = Duration::from_secs(3);

/// The longest `--timeout`: an hour of a build's I/O waiting on a server
/// is already more than any build wants, and far longer values overflow
/// the kernel's timer (seconds times HZ in 32 bits of jiffies: 49 days at
/// HZ=1000), which would leave a short timeout instead.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why a `--timeout` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestTimeoutError {
    /// The kernel counts whole seconds, and 0 would mean its own default.
    #[error(
        "a request timeout of {0:?} is not a whole number of seconds from 1s to {max}s",
        max = MAX_REQUEST_TIMEOUT.as_secs()
    )]
    OutOfRange(Duration),
}

/// `timeout` if the kernel can take it as the request timeout: whole
/// seconds, at least one (0 is the kernel's "default", 30 s) and at most
/// [`MAX_REQUEST_TIMEOUT`].
pub fn check_request_timeout(timeout: Duration) -> Result<Duration, RequestTimeoutError> {
    let whole = timeout.subsec_nanos() == 0;
    match whole && (Duration::from_secs(1)..=MAX_REQUEST_TIMEOUT).contains(&timeout) {
        true => Ok(timeout),
        false => Err(RequestTimeoutError::OutOfRange(timeout)),
    }
}

/// The start of a `scratchd run`'s device label: `scratchd-run:PID:START:`
/// (the run's process and its start time, so that a sweep can tell a dead
/// run's device), then a random part.
const RUN_LABEL: &str = "scratchd-run:";

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
            write_behind: request.write_behind,
            private_dir: &state.fuse_dir(request.id),
            label: &label,
            request_timeout: request.request_timeout,
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
        // As a FUSE attachment's holder logs it: the name is the disk's key,
        // so info shows its fingerprint, debug the name.
        debug!(export = %record.export, "the disk's name");
        info!(
            disk = %fingerprint(&record.export),
            device = %attached.device_path.display(),
            mount = %request.mount.display(),
            "attached"
        );
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
        if detach::mounted_at_its_dir(record) {
            write_back(&record.mount);
        }
        // A lazy unmount leaves the file system alive while busy; what it
        // still holds is written back before the disconnect.
        if let Some(ns::Unmounted::Lazily(root)) = detach::unmount_dir(record)? {
            write_back_detached(&root);
        }
        disconnect_if_ours(record);
        state.remove(&record.id);
        Ok(())
    }

    /// The kernel still has the device, with this attachment's label (if
    /// someone unmounted it, disconnect-on-close took it away).
    fn attached_without_holder(&self, record: &Record) -> bool {
        self.device_is_ours(record)
    }

    /// The device still shows this attachment's label.
    fn device_is_ours(&self, record: &Record) -> bool {
        record.backend.is_some()
            && nbd_index(record).and_then(nbd_kernel::backend_of) == record.backend
    }

    /// The device is found by its label, since an attach killed before it
    /// wrote its record recorded none.
    fn clean_up(&self, record: &Record) {
        let found = record.backend.as_deref().and_then(device_labelled);
        let record = Record {
            device: found.map(device_path).or_else(|| record.device.clone()),
            ..record.clone()
        };
        if detach::mounted_at_its_dir(&record) {
            match ns::unmount_lazily_keeping_root(&record.mount) {
                Ok(root) => write_back_detached(&root),
                Err(e) => warn!(mount = %record.mount.display(), error = %e, "cannot unmount"),
            }
        }
        disconnect_if_ours(&record);
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

/// [`connect_device`], again while the kernel leaves sockets unread (see
/// [`nbd_kernel::wait_for_receivers`]): twice with the connections asked
/// for, then with one, whose lone receive work nothing can hold up.
fn connect_with_receivers(
    target: &Target,
    options: &Options,
    largest: u32,
    setup: &Setup,
) -> Result<(NbdDevice, bool), AttachError> {
    let with = |connections| Options {
        connections,
        ..options.clone()
    };
    if options.connections > 1 {
        for _ in 0..2 {
            let (device, read_only, sockets) =
                connect_device(target, &with(options.connections), largest, setup)?;
            match nbd_kernel::wait_for_receivers(device.index(), sockets, RECEIVERS_LIMIT) {
                Ok(()) => return Ok((device, read_only)),
                Err(e) => {
                    warn!(error = %e, "connecting the device again");
                    device.disconnect()?;
                }
            }
        }
    }
    let (device, read_only, _) = connect_device(target, &with(1), largest, setup)?;
    Ok((device, read_only))
}

/// Negotiates with `target` and hands the sockets to the kernel; the
/// device, whether it is read-only, and how many sockets it got.
fn connect_device(
    target: &Target,
    options: &Options,
    largest: u32,
    setup: &Setup,
) -> Result<(NbdDevice, bool, usize), AttachError> {
    // The kernel speaks simple replies only, and asks no block status.
    let handshaken = Client::handshake_only(
        target,
        &Options {
            replies: Replies::Simple,
            block_status: false,
            ..options.clone()
        },
    )?;
    let info = handshaken.info.clone();
    let block_size =
        nbd_kernel::choose_block_size(info.block_size.map(|b| (b.min, b.max)), largest)?;
    let config = nbd_kernel::Config {
        index: None,
        size: info.size,
        block_size,
        server_flags: info.flags.0,
        timeout: Some(setup.request_timeout),
        dead_conn_timeout: DEAD_CONN_TIMEOUT,
        backend: Some(setup.label.to_owned()),
    };
    let streams = handshaken.into_fds().ok_or_else(|| {
        AttachError::Usage("the kernel cannot take over TLS connections".to_owned())
    })?;
    let sockets = streams.len();
    let device = nbd_kernel::connect(streams, &config)?;
    Ok((device, info.read_only(), sockets))
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
        let (device, handshaken_read_only) =
            connect_with_receivers(target, &options, largest, setup)?;
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
            write_back(&self.mount);
            match ns::unmount_keeping_root(&self.mount) {
                Ok(ns::Unmounted::Clean) => {}
                // Still alive while a leftover process uses it: what it
                // holds now is written back before the disconnect.
                Ok(ns::Unmounted::Lazily(root)) => write_back_detached(&root),
                Err(e) => warn!(mount = %self.mount.display(), error = %e, "cannot unmount"),
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

/// Writes back the file system mounted at `dir` and waits for it
/// (`syncfs`): an unmount that ends up lazy, followed by a disconnect,
/// would otherwise lose what is still dirty.
fn write_back(dir: &Path) {
    let synced = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::empty(),
    )
    .and_then(rustix::fs::syncfs);
    if let Err(e) = synced {
        warn!(mount = %dir.display(), error = %e, "cannot write back the file system");
    }
}

/// Writes back a file system that a lazy unmount took off every path but
/// that still lives (a leftover process uses it), and waits for it: that
/// one file system, through its root kept open, not every one (`sync`
/// would also wait for other disks whose servers stopped answering).
fn write_back_detached(root: &ns::DetachedRoot) {
    if let Err(e) = root.write_back() {
        warn!(error = %e, "cannot write back the lazily unmounted file system");
    }
}

/// `/dev/nbd<index>`.
fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The `(index, label)` of every connected nbd device that shows a label.
fn labelled_devices() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("nbd")?.parse().ok())
        .filter_map(|index| Some((index, nbd_kernel::backend_of(index)?)))
        .filter(|(_, label)| !label.is_empty())
        .collect()
}

/// The nbd device the kernel shows with `label`.
fn device_labelled(label: &str) -> Option<u32> {
    labelled_devices()
        .into_iter()
        .find_map(|(index, shown)| (shown == label).then_some(index))
}

/// The label of a `scratchd run` by `run` ([`RUN_LABEL`]).
pub(crate) fn run_label(run: Process) -> String {
    format!(
        "{RUN_LABEL}{}:{}:{}",
        run.pid,
        run.start_time,
        crate::id::random_id()
    )
}

/// The run whose label this is, if it is a run's.
pub(crate) fn run_of_label(label: &str) -> Option<Process> {
    let mut parts = label.strip_prefix(RUN_LABEL)?.split(':');
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    Some(Process { pid, start_time })
}

/// Disconnects the devices of runs that died with them connected (killed
/// between the connect and the reconfigure that ties the device to its
/// mount): nothing else would, and each holds a `/dev/nbdN` and the
/// server's export. Returns how many. A run has no record; its label
/// names its process, and a device whose run lives is left alone.
pub(crate) fn disconnect_dead_runs_devices() -> usize {
    let mut disconnected = 0;
    for (index, label) in labelled_devices() {
        let Some(run) = run_of_label(&label) else {
            continue;
        };
        if run.alive() {
            continue;
        }
        info!(index, label, "disconnecting the device of a dead run");
        match nbd_kernel::disconnect(index) {
            Ok(()) => disconnected += 1,
            Err(e) => warn!(index, error = %e, "cannot disconnect the nbd device"),
        }
    }
    disconnected
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
    fn request_timeouts_are_whole_seconds_from_one_to_an_hour() {
        let secs = Duration::from_secs;
        for ok in [secs(1), secs(120), MAX_REQUEST_TIMEOUT] {
            assert_eq!(check_request_timeout(ok), Ok(ok));
        }
        for bad in [
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_millis(1500),
            MAX_REQUEST_TIMEOUT + secs(1),
            secs(u64::MAX),
        ] {
            assert_eq!(
                check_request_timeout(bad),
                Err(RequestTimeoutError::OutOfRange(bad))
            );
        }
        assert!(check_request_timeout(REQUEST_TIMEOUT).is_ok());
    }

    #[test]
    fn nbd_indexes_come_from_the_device_name() {
        let mut record = Record::kernel_example();
        assert_eq!(nbd_index(&record), Some(12));
        // No such device here: the kernel shows no backend, so it is gone.
        assert!(!Kernel.attached_without_holder(&record));
        record.device = Some("/dev/loop3".into());
        assert_eq!(nbd_index(&record), None);
    }

    #[test]
    fn a_run_label_names_its_process() {
        let me = Process::current().unwrap();
        let label = run_label(me);
        assert!(
            label.starts_with(&format!("scratchd-run:{}:", me.pid)),
            "{label}"
        );
        let named = run_of_label(&label).unwrap();
        assert_eq!((named.pid, named.start_time), (me.pid, me.start_time));
        assert!(named.alive());
        // Another process of the same pid is not the run.
        let reused = format!("scratchd-run:{}:{}:x", me.pid, me.start_time + 1);
        assert!(!run_of_label(&reused).unwrap().alive());
        assert!(run_of_label("scratchd-attach:abc").is_none());
        assert!(run_of_label("scratchd-run:12:x").is_none());
    }
}
