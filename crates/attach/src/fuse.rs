//! A block device as one file in a FUSE mount, for hosts without an `nbd`
//! kernel module.
//!
//! The mount holds a single regular file, `disk`, whose bytes are the
//! device's. A loop device on that file gives the kernel a block device
//! (see [`crate::loopdev`]). The FUSE connection runs several threads,
//! each with its own cloned `/dev/fuse` descriptor, so the loop device's
//! concurrent requests are served in parallel; the device is called
//! directly, with no socket in between.
//!
//! Mapping: `read`/`write` are the device's; `fsync` is its `flush`, and
//! `flush` (close) reports its [`BlockDevice::deferred_error`]; `fallocate` with `PUNCH_HOLE` is a trim, `ZERO_RANGE` a
//! zeroing that may deallocate, plain allocation a no-op (the device
//! allocates on write). The file cannot be resized, renamed or removed.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL,
    WriteFlags,
};
use scratchd_store::{BlockDevice, ZeroFlags};
use tracing::{debug, warn};

/// The name of the one file in the mount.
pub const FILE_NAME: &str = "disk";
/// Largest write the kernel sends in one request: a loop device's 1 MiB
/// requests then arrive whole.
const MAX_WRITE: u32 = 1024 * 1024;
/// Requests the kernel may have outstanding (loop devices queue many).
const MAX_BACKGROUND: u16 = 128;
/// Attributes never change behind the kernel's back: cache them long.
const TTL: Duration = Duration::from_secs(3600);

/// Handles of the file opened read-only, and for writing: only the close
/// of the latter reports a write that failed after it was acknowledged.
const READING: FileHandle = FileHandle(0);
const WRITING: FileHandle = FileHandle(1);

const ROOT: INodeNo = INodeNo(1);
const FILE: INodeNo = INodeNo(2);

/// How long [`FuseFile::unmount`] waits for the kernel to release the
/// file's last open handle (a loop device that just let go of it releases
/// it from a work queue, a moment later) before cutting the connection.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// A mounted FUSE file serving a device; unmounted on drop.
pub struct FuseFile {
    session: Option<BackgroundSession>,
    path: PathBuf,
    open: Arc<OpenHandles>,
}

/// The file's open handles, counted between the replies to `open` and to
/// `release`, so that teardown can wait until the kernel has none: a reply
/// to a request of an aborted connection fails (the kernel no longer knows
/// the request) and fuser logs it as an error.
#[derive(Default)]
struct OpenHandles {
    count: Mutex<usize>,
    changed: Condvar,
}

impl OpenHandles {
    fn opened(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn released(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Waits up to `limit` for the last handle to go; true if none is open.
    fn wait_none(&self, limit: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .changed
            .wait_timeout_while(count, limit, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

impl FuseFile {
    /// Mounts `device` as `DIR/disk` in the empty directory `dir`, served by
    /// `threads` threads.
    pub fn mount(device: Arc<dyn BlockDevice>, dir: &Path, threads: usize) -> io::Result<Self> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("scratchd".to_owned()),
            MountOption::Subtype("scratchd".to_owned()),
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        let open = Arc::new(OpenHandles::default());
        let fs = DiskFs {
            device,
            mounted: SystemTime::now(),
            open: open.clone(),
        };
        let session = fuser::spawn_mount(fs, dir, &config)?;
        Ok(FuseFile {
            session: Some(session),
            path: dir.join(FILE_NAME),
            open,
        })
    }

    /// The kernel's number for this FUSE connection (its directory in
    /// `/sys/fs/fuse/connections`).
    pub fn connection(&self) -> io::Result<u32> {
        let dir = self.path.parent().unwrap_or(&self.path);
        let dev = rustix::fs::stat(dir)?.st_dev;
        Ok(connection_number(
            rustix::fs::major(dev),
            rustix::fs::minor(dev),
        ))
    }

    /// The file whose bytes are the device's.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits a moment for the file's last handle to be released, then
    /// aborts the connection, so that whatever still reads or writes the
    /// file (a lazily detached file system above a loop device, writing
    /// itself back) fails at once instead of waiting for threads that are
    /// about to end; then unmounts and waits for the session's threads.
    pub fn unmount(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if !self.open.wait_none(RELEASE_GRACE) {
            debug!("the FUSE file is still open; aborting its connection");
        }
        if let Ok(id) = self.connection() {
            if let Err(e) = abort_connection(id) {
                debug!(error = %e, "cannot abort the FUSE connection");
            }
        }
        match session.umount_and_join() {
            // The file is still open (a loop device that has not let go
            // yet). The connection is aborted, so nothing can wait on it:
            // detach the mount lazily, and it goes with the file's last
            // user. The session's threads end on their own.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let dir = self.path.parent().unwrap_or(&self.path);
                warn!(dir = %dir.display(), "FUSE file still in use; unmounting it lazily");
                crate::ns::unmount_lazily(dir)
            }
            other => other,
        }
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

struct DiskFs {
    device: Arc<dyn BlockDevice>,
    mounted: SystemTime,
    open: Arc<OpenHandles>,
}

thread_local! {
    /// Each FUSE thread's read buffer, kept between requests so that steady
    /// reads allocate nothing.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            let writable = !self.device.capabilities().read_only;
            let perm = if writable { 0o600 } else { 0o400 };
            (FileType::RegularFile, perm, self.device.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind,
            perm,
            nlink,
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large requests and many of them in flight; refusals only cost speed.
        let _ = config.add_capabilities(InitFlags::FUSE_MAX_PAGES);
        // The loop device writes with direct, asynchronous I/O: without
        // this the kernel waits for each FUSE request before the loop
        // device may send the next, one request in flight at a time.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A disk's size is fixed; times and modes are ignored (as on a
        // block device node).
        match size {
            Some(s) if s != self.device.size() => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &self.attr(ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open.opened();
        if ino == FILE {
            let fh = match flags.0 & libc::O_ACCMODE {
                libc::O_RDONLY => READING,
                _ => WRITING,
            };
            // The kernel may keep pages of the file cached across opens:
            // only this process changes it.
            reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Counted after the reply is written: teardown waits for this.
        reply.ok();
        self.open.released();
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (size as u64).min(self.device.size().saturating_sub(offset)) as usize;
        READ_BUF.with_borrow_mut(|buf| {
            buf.resize(len, 0);
            match self.device.read(offset, &mut buf[..len]) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => {
                    debug!(offset, len, error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        match self.device.write(offset, data, fua) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                debug!(offset, len = data.len(), error = %e, "write failed");
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): nothing to make durable (fsync is the durability
        // point), but a write acknowledged early that failed since fails
        // the close of a handle that may have written.
        if fh != WRITING {
            reply.ok();
            return;
        }
        match self.device.deferred_error() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if !self.device.capabilities().durable_flush && !self.device.writes_behind() {
            // Nothing to make durable (a scratch disk's flush is a no-op):
            // ENOSYS makes the kernel treat this and every later fsync of
            // the file as done without asking, saving a round trip per
            // flush of the file system above. Not with write-behind: an
            // fsync is where a write that failed after its acknowledgement
            // is reported (and costs no round trip to the server there).
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.device.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                debug!(error = %e, "fsync failed");
                reply.error(errno(&e))
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.device.trim(offset, length, false)
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            let flags = ZeroFlags {
                may_trim: true,
                fast: false,
            };
            self.device.zero(offset, length, flags, false)
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Preallocation: the device allocates on write, and refuses
            // with ENOSPC then.
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        };
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes: ENOSYS tells the kernel to stop asking.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The kernel names a FUSE connection by its internal dev_t: major << 20 |
/// minor.
fn connection_number(major: u32, minor: u32) -> u32 {
    (major << 20) | minor
}

/// The connection of the FUSE mount at `dir`, if one is mounted there;
/// found in mountinfo, without a request to the file system, whose server
/// may be dead or stuck.
pub fn connection_at(dir: &Path) -> Option<u32> {
    crate::ns::mount_at(dir).map(|m| connection_number(m.major, m.minor))
}

/// Aborts FUSE connection `id`: every request waiting on it, and every later
/// one, fails at once. For a connection whose server died without
/// unmounting, whose file systems would otherwise wait for it forever.
pub fn abort_connection(id: u32) -> io::Result<()> {
    let control = Path::new("/sys/fs/fuse/connections");
    let abort = control.join(id.to_string()).join("abort");
    if !abort.exists() {
        // fusectl is not mounted on every host; mount it (in the caller's
        // mount namespace) to reach the connection. By system call: root's
        // PATH is the caller's to choose.
        let _ = rustix::mount::mount(
            "fusectl",
            control,
            "fusectl",
            rustix::mount::MountFlags::empty(),
            None,
        );
    }
    std::fs::write(abort, "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use scratchd_store::MemoryDevice;
    use std::time::Instant;

    /// The kernel releases a loop device's file a moment after the loop
    /// device lets go; aborting the connection before that made the reply
    /// to the release fail. Here a plain open file stands in for the loop
    /// device: unmounting must wait for its release, not cut it off.
    #[test]
    fn unmount_waits_for_the_last_release() {
        if !Path::new("/dev/fuse").exists() || !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED unmount_waits_for_the_last_release: needs root and /dev/fuse");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let device = Arc::new(MemoryDevice::new(1 << 20).unwrap());
        let fuse = FuseFile::mount(device, dir.path(), 1).unwrap();
        let file = std::fs::File::open(fuse.path()).unwrap();
        let hold = Duration::from_millis(300);
        let closer = std::thread::spawn(move || {
            std::thread::sleep(hold);
            drop(file);
            Instant::now()
        });
        let started = Instant::now();
        fuse.unmount().unwrap();
        let unmounted = Instant::now();
        let closed = closer.join().unwrap();
        assert!(
            unmounted >= closed,
            "unmounted {:?} before the file was closed",
            closed - unmounted
        );
        assert!(
            started.elapsed() < hold + RELEASE_GRACE,
            "waited past the grace"
        );
        assert!(crate::ns::mount_at(dir.path()).is_none(), "still mounted");
    }
}
