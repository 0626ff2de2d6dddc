//! Loop devices: a file as a block device.
//!
//! Configured in one `LOOP_CONFIGURE` call, with two flags that matter:
//! - **direct I/O**: the loop device reads and writes its file with
//!   `O_DIRECT`, so nothing is cached twice (once above the loop device,
//!   once in the file's page cache), and its logical block size is the
//!   device's preferred 4096 bytes. Where the file refuses direct I/O, the
//!   device is configured buffered and a warning says so.
//! - **autoclear**: the kernel detaches the device when its last user closes
//!   it. Once it is mounted, the mount is that user, so the loop device goes
//!   with the mount, even if this process is killed (see [`crate::ns`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tracing::warn;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// Attempts at claiming a free device, which another process may take
/// between our asking and our configuring it.
const CLAIM_ATTEMPTS: usize = 8;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. With autoclear it detaches itself once its last
/// user (the mount) closes it; dropping this handle closes ours.
pub struct LoopDevice {
    path: PathBuf,
    /// Open until the device is in use elsewhere; autoclear would otherwise
    /// detach it as soon as it is configured.
    device: Option<File>,
    direct_io: bool,
}

impl LoopDevice {
    /// Attaches `file` (read-write unless `read_only`) with direct I/O and
    /// `block_size`-byte logical blocks where the file allows.
    pub fn attach(file: &Path, read_only: bool, block_size: u32) -> io::Result<Self> {
        let backing = OpenOptions::new().read(true).write(!read_only).open(file)?;
        let mut last = None;
        for _ in 0..CLAIM_ATTEMPTS {
            let (path, device) = free_device()?;
            match configure(&device, &backing, read_only, block_size, true) {
                Ok(()) => {
                    return Ok(LoopDevice {
                        path,
                        device: Some(device),
                        direct_io: true,
                    })
                }
                // Taken by someone else meanwhile: ask again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    warn!(file = %file.display(), "direct I/O refused; loop device is buffered");
                    configure(&device, &backing, read_only, 512, false)?;
                    return Ok(LoopDevice {
                        path,
                        device: Some(device),
                        direct_io: false,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Whether the kernel still has the device attached (autoclear detaches
    /// it when its last user closes it).
    pub fn attached(&self) -> bool {
        backing_file(&self.path).is_some()
    }

    /// Closes this handle: from now on the device lives only as long as
    /// someone else (a mount) holds it open.
    pub fn release(&mut self) {
        self.device = None;
    }
}

/// The file `/dev/loopN` reads and writes, as the kernel shows it; `None`
/// when the device is not attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?;
    let path = Path::new("/sys/block").join(name).join("loop/backing_file");
    let text = std::fs::read_to_string(path).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n')))
}

/// Detaches `device` if it is attached to `file` (and not to whatever the
/// kernel gave the same number to since): for the loop device of a
/// process that died. A device still in use (mounted) is only marked
/// autoclear by the kernel, and goes when its last user lets go. Returns
/// whether it was ours.
pub fn detach_if_backed_by(device: &Path, file: &Path) -> io::Result<bool> {
    if backing_file(device).as_deref() != Some(file) {
        return Ok(false);
    }
    let handle = OpenOptions::new().read(true).open(device)?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(handle.as_raw_fd(), LOOP_CLR_FD) } < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: it went (autoclear) between our look and the ioctl.
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(e);
        }
    }
    Ok(true)
}

/// Asks `/dev/loop-control` for a free device and opens it.
fn free_device() -> io::Result<(PathBuf, File)> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
    let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let path = PathBuf::from(format!("/dev/loop{n}"));
    let device = OpenOptions::new().read(true).write(true).open(&path)?;
    Ok((path, device))
}

fn configure(
    device: &File,
    backing: &File,
    read_only: bool,
    block_size: u32,
    direct_io: bool,
) -> io::Result<()> {
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    if read_only {
        flags |= 1; // LO_FLAGS_READ_ONLY
    }
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size,
        info: LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset: 0,
            sizelimit: 0,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags,
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
    // `config` is (same layout, see `<linux/loop.h>`), alive for the call.
    let r = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structures_match_the_kernels() {
        // sizeof(struct loop_info64) and sizeof(struct loop_config) on Linux.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
