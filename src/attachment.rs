//! A disk as a mounted block device: what `scratchd run` (in a private
//! mount namespace, for one command) and `scratchd attach` (in the
//! caller's namespace, until `scratchd detach`) share.
//!
//! Two front ends ([`AttachKind`]):
//! - [`Attached`]: the disk as a FUSE file served by threads of this
//!   process, a direct-I/O autoclear loop device on that file, and the
//!   mount. The process must serve the file for as long as the mount is
//!   used.
//! - [`KernelAttached`]: a disk on a server as the kernel's `/dev/nbdN`,
//!   our client's negotiated sockets handed over by netlink; the kernel
//!   serves it alone, with no thread of ours in the data path.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_attach::fuse::FuseFile;
use scratchd_attach::loopdev::LoopDevice;
use scratchd_attach::nbd_kernel::{self, NbdDevice};
use scratchd_attach::ns;
use scratchd_client::{Client, Options, Replies, Target};
use scratchd_store::BlockDevice;
use tracing::{debug, warn};

/// How long a file system that was still busy when it was unmounted, and
/// so detached lazily, is served before the disk is cut off (its last
/// writes then fail: nobody will read them).
pub const LAZY_GRACE: Duration = Duration::from_secs(5);

/// How long the kernel holds I/O when every connection to the server is
/// dead, waiting for new sockets (`NBD_CMD_RECONFIGURE`): nothing of ours
/// reconnects yet, so this is only a short grace before the build's I/O
/// fails.
const KERNEL_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// How a disk becomes a mounted block device: the options `scratchd run`
/// and `scratchd attach` share.
#[derive(clap::Args)]
pub struct FrontEndArgs {
    /// Mount options.
    #[arg(long, value_name = "OPTS", default_value = "noatime")]
    pub mount_options: String,
    /// Connections to the server (when it allows several), and threads
    /// serving the disk's FUSE file.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,
    /// How the disk becomes a block device: fuse (a FUSE file and a loop
    /// device), kernel (the kernel's nbd driver, over netlink; needs a disk
    /// on a server and the nbd module), or auto (kernel where it can be
    /// used, else fuse).
    #[arg(long, value_name = "HOW", default_value = "auto")]
    pub attach: String,
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
    #[error("cannot mount the disk's FUSE file: {0}")]
    Fuse(#[source] io::Error),
    #[error("cannot hand the FUSE connection to its watchdog: {0}")]
    Watch(#[source] io::Error),
    #[error("cannot attach a loop device: {0}")]
    Loop(#[source] io::Error),
    #[error(transparent)]
    Mount(#[from] ns::MountError),
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

/// The front end that makes the disk a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// A FUSE file and a loop device ([`Attached`]).
    Fuse,
    /// The kernel's nbd driver with our client's sockets ([`KernelAttached`]).
    Kernel,
}

/// `--attach`: auto takes the kernel's nbd driver for a disk on a server
/// when the driver is there (`kernel_available`, asked only then), else
/// FUSE; a local disk has no sockets to hand to the kernel, and the kernel
/// cannot take over a TLS session.
pub fn choose_attach(
    attach: &str,
    server: bool,
    tls: bool,
    kernel_available: impl FnOnce() -> bool,
) -> Result<AttachKind, AttachError> {
    match attach {
        "fuse" => Ok(AttachKind::Fuse),
        "kernel" if server && tls => Err(AttachError::Usage(
            "--attach kernel cannot take over a TLS connection (nbds://); use --attach fuse"
                .to_owned(),
        )),
        "kernel" if server => Ok(AttachKind::Kernel),
        "kernel" => Err(AttachError::Usage(
            "--attach kernel needs --server (a local disk has no sockets to hand to the kernel)"
                .to_owned(),
        )),
        "auto" if server && !tls && kernel_available() => Ok(AttachKind::Kernel),
        "auto" => Ok(AttachKind::Fuse),
        other => Err(AttachError::Usage(format!(
            "--attach {other}: expected auto, kernel or fuse"
        ))),
    }
}

/// Connects our client to the disk `target` names, over up to
/// `connections` connections (several only when the server allows
/// multi-conn).
pub fn connect_remote(target: &Target, connections: usize) -> Result<Client, AttachError> {
    let client = Client::connect_with(target, &client_options(connections))?;
    tracing::info!(
        server = %target,
        connections = client.connection_count(),
        size = client.size(),
        "connected"
    );
    Ok(client)
}

fn client_options(connections: usize) -> Options {
    Options {
        connections: connections.max(1),
        ..Default::default()
    }
}

/// 128 random bits from the kernel's generator, in hex: names nobody can
/// guess (see docs/RUN.md), and identifiers that are never reused.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if let Err(e) = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        // Only reached without getrandom(2) (Linux < 3.17); still unique
        // on this host for this process's lifetime.
        warn!(error = %e, "no random bytes; naming after the process and time");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return format!("{:08x}{:024x}", std::process::id(), now.as_nanos());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where and how [`Attached::attach`] puts a disk.
pub struct FuseSetup<'a> {
    /// An empty directory for the FUSE mount holding the disk's file.
    pub fuse_dir: &'a Path,
    /// Where the disk's file system is mounted.
    pub mount: &'a Path,
    /// Mount options; `None` leaves the block device unmounted (a disk
    /// with no file system).
    pub mount_options: Option<&'a str>,
    /// Threads serving the FUSE file.
    pub threads: usize,
}

/// A disk attached through FUSE and a loop device, and mounted;
/// [`Attached::detach`] (or drop) undoes it.
pub struct Attached {
    mount: PathBuf,
    mounted: bool,
    device: LoopDevice,
    fuse: Option<FuseFile>,
}

impl Attached {
    /// Serves `device` as a FUSE file, attaches a loop device to it and
    /// mounts that. `watch` is told the FUSE connection's number before
    /// anything depends on it (for a watchdog that aborts it should this
    /// process die).
    pub fn attach(
        device: Arc<dyn BlockDevice>,
        setup: &FuseSetup,
        watch: impl FnOnce(u32) -> io::Result<()>,
    ) -> Result<Self, AttachError> {
        let read_only = device.capabilities().read_only;
        let block_size = logical_block_size(device.as_ref()).map_err(AttachError::Probe)?;
        let fuse =
            FuseFile::mount(device, setup.fuse_dir, setup.threads).map_err(AttachError::Fuse)?;
        watch(fuse.connection().map_err(AttachError::Fuse)?).map_err(AttachError::Watch)?;
        let loopdev =
            LoopDevice::attach(fuse.path(), read_only, block_size).map_err(AttachError::Loop)?;
        let mut attached = Attached {
            mount: setup.mount.to_owned(),
            mounted: false,
            device: loopdev,
            fuse: Some(fuse),
        };
        if let Some(options) = setup.mount_options {
            ns::mount(attached.device.path(), &attached.mount, options)?;
            attached.mounted = true;
            // The mount holds the loop device now; ours would keep it
            // attached after the mount is gone.
            attached.device.release();
        }
        Ok(attached)
    }

    /// Where the file system is (or would be) mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The loop device, `/dev/loopN`.
    pub fn device_path(&self) -> &Path {
        self.device.path()
    }

    pub fn direct_io(&self) -> bool {
        self.device.direct_io()
    }

    /// Unmounts, lets the loop device go and unmounts the FUSE file.
    pub fn detach(mut self) {
        self.undo();
    }

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
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Unmounts `dir` if `device` is what is mounted there: someone may have
/// unmounted it already (`scratchd detach` does, before it stops the
/// holder), and then mounted something else at the same place.
pub fn unmount_if_ours(dir: &Path, device: &Path) {
    if ns::mount_source(dir).as_deref() != Some(device) {
        debug!(mount = %dir.display(), "not mounted (any more)");
        return;
    }
    if let Err(e) = ns::unmount(dir) {
        warn!(mount = %dir.display(), error = %e, "cannot unmount");
    }
}

/// A disk on a server as the kernel's `/dev/nbdN`, mounted;
/// [`KernelAttached::detach`] (or drop) unmounts and disconnects it.
pub struct KernelAttached {
    mount: PathBuf,
    mounted: bool,
    device_path: PathBuf,
    device: Option<NbdDevice>,
}

/// Connects to `target` over up to `connections` connections, hands the
/// sockets to the kernel (the device's sysfs `backend` reads `backend`)
/// and mounts the device at `mount`.
pub fn attach_kernel(
    target: &Target,
    connections: usize,
    mount: &Path,
    mount_options: &str,
    backend: String,
) -> Result<KernelAttached, AttachError> {
    let options = client_options(connections);
    // A connection of our own reads the file system's sector size (as the
    // FUSE path does), and holds the export open until the kernel's are.
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
    let block_size =
        nbd_kernel::choose_block_size(info.block_size.map(|b| (b.min, b.max)), largest)?;
    let config = nbd_kernel::Config {
        index: None,
        size: info.size,
        block_size,
        server_flags: info.flags.0,
        timeout: None,
        dead_conn_timeout: KERNEL_DEAD_CONN_TIMEOUT,
        backend: Some(backend),
    };
    let streams = handshaken.into_fds().ok_or_else(|| {
        AttachError::Usage("the kernel cannot take over TLS connections".to_owned())
    })?;
    let device = nbd_kernel::connect(streams, &config)?;
    let mut attached = KernelAttached {
        mount: mount.to_owned(),
        mounted: false,
        device_path: device.path(),
        device: Some(device),
    };
    ns::mount(&attached.device_path, &attached.mount, mount_options)?;
    attached.mounted = true;
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

impl KernelAttached {
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// `/dev/nbdN`.
    pub fn device_path(&self) -> &Path {
        &self.device_path
    }

    /// Leaves the device connected and mounted, for `scratchd detach` to
    /// undo later; returns its index.
    pub fn keep(mut self) -> Option<u32> {
        self.mounted = false;
        self.device.take().map(NbdDevice::keep)
    }

    pub fn detach(mut self) {
        self.undo();
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

impl Drop for KernelAttached {
    fn drop(&mut self) {
        self.undo();
    }
}

/// The block device's logical block size: the disk's preferred 4096 unless
/// the file system on it was made for smaller sectors (an ext2/3/4 with
/// 1 or 2 KiB blocks, an xfs with 512-byte sectors), which will not mount
/// on a device whose sectors are larger than its own.
fn logical_block_size(device: &dyn BlockDevice) -> io::Result<u32> {
    let mut head = vec![0u8; 2048.min(device.size() as usize)];
    device.read(0, &mut head)?;
    Ok(filesystem_sector_limit(&head)
        .unwrap_or(4096)
        .clamp(512, 4096))
}

/// The largest sector size the file system whose first bytes are `head`
/// mounts on, if it is one that cares.
fn filesystem_sector_limit(head: &[u8]) -> Option<u32> {
    let be16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let le16 = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le32 = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.starts_with(b"XFSB") {
        // sb_sectsize, big-endian, at byte 102 of the superblock.
        return be16(102).map(u32::from);
    }
    // ext2/3/4: magic 0xEF53 at 56 in the superblock at 1024, block size
    // 1024 << s_log_block_size at 24.
    if le16(1024 + 56) == Some(0xEF53) {
        return le32(1024 + 24)
            .filter(|&log| log <= 6)
            .map(|log| 1024 << log);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_limits_come_from_the_superblock() {
        let mut ext = vec![0u8; 2048];
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[1024 + 24] = 2; // 4096-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(4096));
        ext[1024 + 24] = 0; // 1024-byte blocks
        assert_eq!(filesystem_sector_limit(&ext), Some(1024));
        let mut xfs = vec![0u8; 2048];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[102..104].copy_from_slice(&512u16.to_be_bytes());
        assert_eq!(filesystem_sector_limit(&xfs), Some(512));
        assert_eq!(filesystem_sector_limit(&[0u8; 2048]), None);
        assert_eq!(filesystem_sector_limit(&[0u8; 10]), None);
    }

    #[test]
    fn attach_choice() {
        let never = || -> bool { panic!("availability asked without --server") };
        assert_eq!(
            choose_attach("fuse", true, false, || true).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", false, false, never).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", true, false, || false).unwrap(),
            AttachKind::Fuse
        );
        assert_eq!(
            choose_attach("auto", true, false, || true).unwrap(),
            AttachKind::Kernel
        );
        assert_eq!(
            choose_attach("kernel", true, false, || false).unwrap(),
            AttachKind::Kernel
        );
        assert!(matches!(
            choose_attach("kernel", false, false, never),
            Err(AttachError::Usage(_))
        ));
        assert_eq!(
            choose_attach("auto", true, true, never).unwrap(),
            AttachKind::Fuse
        );
        assert!(matches!(
            choose_attach("kernel", true, true, never),
            Err(AttachError::Usage(_))
        ));
        assert!(matches!(
            choose_attach("nbd", true, false, || true),
            Err(AttachError::Usage(_))
        ));
    }

    #[test]
    fn random_ids_carry_128_bits() {
        let (a, b) = (random_id(), random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
