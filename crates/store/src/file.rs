//! A disk backed by an existing regular file or block device.
//!
//! Every connection shares one descriptor. Reads and writes are positioned
//! (`pread`/`pwrite`), so nothing on the data path takes a lock, and the
//! kernel's page cache makes each completed write visible to every connection
//! at once. Flush and FUA use `fdatasync`.
//!
//! Trimming and zeroing use `fallocate`, whose support depends on the
//! filesystem: tmpfs punches holes but refuses `ZERO_RANGE`, and some
//! filesystems refuse both. A refused mode is remembered in a flag, so a
//! refusal costs one system call for the life of the device, and zeroing falls
//! back in this order:
//!
//! - may trim: punch a hole; else zero the range; else write zeros.
//! - no hole: zero the range; else punch a hole and allocate it again; else
//!   write zeros.
//!
//! Writing zeros costs as much as a write, so a `fast` request fails with
//! `EOPNOTSUPP` instead. Trim is advisory: where holes cannot be punched it
//! does nothing, and the range keeps its contents (NBD allows that).
//!
//! On a block device, `fallocate` needs ranges aligned to the logical block
//! size. The aligned middle of a request goes to `fallocate`; an unaligned
//! edge (less than one block) is written with zeros when zeroing and left
//! alone when trimming.
//!
//! Extents come from `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)`. Where those
//! are not supported, every range is reported as data, which is always true.
//! (The seeks move the shared file offset, which nothing else uses.)

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::{check_range, push_extent, BlockDevice, Capabilities, Extent, ExtentKind, ZeroFlags};

/// Zeros are written from this buffer, one chunk per call, when nothing
/// faster works. It lives in `.bss` and costs nothing until read.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A disk stored in an existing regular file or block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    size: u64,
    read_only: bool,
    /// `fallocate` ranges must be multiples of this: the logical block size of
    /// a block device, 1 for a regular file.
    align: u64,
    refused: Refused,
}

/// Operations the filesystem refused once and so are not tried again.
#[derive(Debug, Default)]
struct Refused {
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    allocate: AtomicBool,
    seek_data: AtomicBool,
}

impl FileDevice {
    /// Opens the regular file or block device at `path` as a disk of its
    /// current size. With `read_only` the file is opened `O_RDONLY`, and
    /// writes, trims and zeroing fail with `EPERM`.
    ///
    /// # Errors
    ///
    /// Other kinds of file (directories, FIFOs, sockets, character devices)
    /// are refused with [`io::ErrorKind::InvalidInput`]; failures to open or
    /// inspect the file are passed on.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        // Check before opening: opening a FIFO would wait for a writer, and
        // opening a directory for writing fails with a vaguer error.
        check_kind(path, std::fs::metadata(path)?.file_type())?;
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        // Check again in case the path was replaced in between.
        let metadata = file.metadata()?;
        check_kind(path, metadata.file_type())?;
        let (size, align) = if metadata.file_type().is_block_device() {
            let size = rfs::seek(&file, SeekFrom::End(0))?;
            (size, u64::from(rfs::ioctl_blksszget(&file)?).max(1))
        } else {
            (metadata.len(), 1)
        };
        Ok(Self {
            file,
            size,
            read_only,
            align,
            refused: Refused::default(),
        })
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            rfs::fdatasync(&self.file)?;
        }
        Ok(())
    }

    /// The part of `[offset, end)` that `fallocate` accepts, `[start, stop)`,
    /// such that `offset <= start <= stop <= end`; it is empty (`start ==
    /// stop == end`) when the range holds no whole logical block.
    fn aligned(&self, offset: u64, end: u64) -> (u64, u64) {
        let start = offset.next_multiple_of(self.align);
        let stop = end - end % self.align;
        if start < stop {
            (start, stop)
        } else {
            (end, end)
        }
    }

    /// Calls `fallocate` unless the filesystem refused `mode` before, and
    /// returns whether it ran. A refusal is recorded in `refused`.
    fn fallocate(
        &self,
        refused: &AtomicBool,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        if refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match rfs::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(true),
            Err(err) if err == Errno::OPNOTSUPP || err == Errno::NOSYS => {
                tracing::debug!("fallocate({mode:?}) refused ({err}); not trying it again");
                refused.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Zeros `[offset, offset + len)` with `fallocate` where the filesystem
    /// allows, and returns whether it did.
    fn zero_in_place(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<bool> {
        let refused = &self.refused;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if may_trim && self.fallocate(&refused.punch_hole, punch, offset, len)? {
            return Ok(true);
        }
        let zero_range = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if self.fallocate(&refused.zero_range, zero_range, offset, len)? {
            return Ok(true);
        }
        // Without ZERO_RANGE (tmpfs, for one): a hole reads as zeros, and
        // allocating it again keeps the promise of no hole. If allocating is
        // refused (once per device), the caller writes zeros over the hole,
        // or a `fast` request fails with the range zeroed but unallocated,
        // which a failed request may leave.
        if !may_trim
            && !refused.allocate.load(Ordering::Relaxed)
            && self.fallocate(&refused.punch_hole, punch, offset, len)?
        {
            return self.fallocate(&refused.allocate, FallocateFlags::KEEP_SIZE, offset, len);
        }
        Ok(false)
    }

    /// Writes zeros over `[start, end)`; an empty range does nothing.
    fn write_zeros(&self, mut start: u64, end: u64) -> io::Result<()> {
        while start < end {
            let n = (end - start).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], start)?;
            start += n as u64;
        }
        Ok(())
    }

    /// Appends the extents of `[offset, end)` from `SEEK_DATA`/`SEEK_HOLE`.
    fn seek_extents(
        &self,
        offset: u64,
        end: u64,
        first: usize,
        out: &mut Vec<Extent>,
    ) -> Result<(), Errno> {
        let mut pos = offset;
        while pos < end {
            let data = match rfs::seek(&self.file, SeekFrom::Data(pos)) {
                Ok(data) => data.clamp(pos, end),
                // No data at or after `pos`.
                Err(err) if err == Errno::NXIO => end,
                Err(err) => return Err(err),
            };
            push_extent(out, first, data - pos, ExtentKind::Hole);
            if data == end {
                break;
            }
            let hole = match rfs::seek(&self.file, SeekFrom::Hole(data)) {
                // At least one byte, even if a concurrent trim just made
                // `data` a hole: reporting data is never wrong, and the loop
                // must advance.
                Ok(hole) => hole.clamp(data + 1, end),
                // The file shrank under us; the rest is past its end.
                Err(err) if err == Errno::NXIO => end,
                Err(err) => return Err(err),
            };
            push_extent(out, first, hole - data, ExtentKind::Data);
            pos = hole;
        }
        Ok(())
    }
}

/// Accepts regular files and block devices only.
fn check_kind(path: &Path, file_type: std::fs::FileType) -> io::Result<()> {
    if file_type.is_file() || file_type.is_block_device() {
        return Ok(());
    }
    let kind = if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else {
        "of an unknown kind"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {kind}; a disk must be a regular file or a block device",
            path.display()
        ),
    ))
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let refused = &self.refused;
        Capabilities {
            read_only: self.read_only,
            durable_flush: true,
            trim: true,
            // Optimistic until both are refused; a `fast` request that would
            // need writes fails with EOPNOTSUPP, as NBD allows.
            fast_zero: !(refused.zero_range.load(Ordering::Relaxed)
                && refused.punch_hole.load(Ordering::Relaxed)),
            multi_conn: true,
            may_block: true,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(rfs::fdatasync(&self.file)?)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let end = check_range(self.size, offset, len)?;
        let (start, stop) = self.aligned(offset, end);
        if start < stop {
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            self.fallocate(&self.refused.punch_hole, punch, start, stop - start)?;
        }
        self.sync_if(fua)
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        let end = check_range(self.size, offset, len)?;
        let (start, stop) = self.aligned(offset, end);
        let middle_done =
            start == stop || self.zero_in_place(start, stop - start, flags.may_trim)?;
        if middle_done {
            // Edges under one logical block each, only on block devices:
            // no slower than the write of zeros the client might have sent.
            self.write_zeros(offset, start)?;
            self.write_zeros(stop, end)?;
        } else if flags.fast {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        } else {
            self.write_zeros(offset, end)?;
        }
        self.sync_if(fua)
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = check_range(self.size, offset, len)?;
        let first = out.len();
        if !self.refused.seek_data.load(Ordering::Relaxed) {
            match self.seek_extents(offset, end, first, out) {
                Ok(()) => return Ok(()),
                Err(err) if err == Errno::INVAL || err == Errno::OPNOTSUPP => {
                    tracing::debug!("SEEK_DATA refused ({err}); reporting all data from now on");
                    self.refused.seek_data.store(true, Ordering::Relaxed);
                    out.truncate(first);
                }
                Err(err) => return Err(err.into()),
            }
        }
        push_extent(out, first, len, ExtentKind::Data);
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        // A length of 0 would mean "to the end of the file".
        if let Some(len) = NonZeroU64::new(len) {
            // Only a hint: a failure changes nothing for the client.
            let _ = rfs::fadvise(&self.file, offset, Some(len), rfs::Advice::WillNeed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Expect};
    use proptest::prelude::*;
    use std::path::PathBuf;
    use tempfile::NamedTempFile;

    const KIB: u64 = 1024;

    /// A zero-filled temporary file of `size` bytes in `dir`, opened read-write.
    fn device_in(dir: &Path, size: u64) -> (NamedTempFile, FileDevice) {
        let tmp = NamedTempFile::new_in(dir).unwrap();
        tmp.as_file().set_len(size).unwrap();
        let dev = FileDevice::open(tmp.path(), false).unwrap();
        (tmp, dev)
    }

    /// A tmpfs directory if there is one (tmpfs refuses ZERO_RANGE), else the
    /// temporary directory.
    fn tmpfs_dir() -> PathBuf {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        }
    }

    /// A directory on a disk filesystem (ext4, xfs, overlay...).
    fn disk_dir() -> PathBuf {
        let var_tmp = Path::new("/var/tmp");
        if var_tmp.is_dir() {
            var_tmp.to_owned()
        } else {
            std::env::current_dir().unwrap()
        }
    }

    fn errno(result: io::Result<()>) -> Option<i32> {
        result.unwrap_err().raw_os_error()
    }

    #[test]
    fn read_only_refuses_changes() {
        let (tmp, _) = device_in(&std::env::temp_dir(), 8 * KIB);
        std::fs::write(tmp.path(), [5u8; 8 * KIB as usize]).unwrap();
        let dev = FileDevice::open(tmp.path(), true).unwrap();
        let access = rfs::fcntl_getfl(&dev.file).unwrap() & rfs::OFlags::ACCMODE;
        assert_eq!(access, rfs::OFlags::RDONLY);
        assert!(dev.capabilities().read_only);
        assert_eq!(errno(dev.write(0, &[1], false)), Some(libc::EPERM));
        assert_eq!(errno(dev.trim(0, 4096, false)), Some(libc::EPERM));
        let flags = ZeroFlags::default();
        assert_eq!(errno(dev.zero(0, 4096, flags, false)), Some(libc::EPERM));
        let mut buf = [0u8; 16];
        dev.read(100, &mut buf).unwrap();
        assert_eq!(buf, [5; 16]);
        dev.flush().unwrap();
    }

    #[test]
    fn refuses_other_kinds_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rfs::mknodat(
            rfs::CWD,
            &fifo,
            rfs::FileType::Fifo,
            rfs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for path in [dir.path(), fifo.as_path(), Path::new("/dev/null")] {
            for read_only in [false, true] {
                let err = FileDevice::open(path, read_only).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{path:?}: {err}");
                assert!(err.to_string().contains("regular file"), "{err}");
            }
        }
        let err = FileDevice::open(&dir.path().join("missing"), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn fast_zero_that_needs_writes_is_refused() {
        let (_tmp, dev) = device_in(&std::env::temp_dir(), 64 * KIB);
        dev.write(0, &vec![7; 64 * KIB as usize], false).unwrap();
        dev.refused.punch_hole.store(true, Ordering::Relaxed);
        dev.refused.zero_range.store(true, Ordering::Relaxed);
        assert!(!dev.capabilities().fast_zero);
        for may_trim in [false, true] {
            let fast = ZeroFlags {
                may_trim,
                fast: true,
            };
            assert_eq!(
                errno(dev.zero(100, 8 * KIB, fast, false)),
                Some(libc::EOPNOTSUPP)
            );
        }
        let mut buf = vec![0u8; 64 * KIB as usize];
        dev.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        // Without `fast`, zeros are written.
        dev.zero(100, 8 * KIB, ZeroFlags::default(), true).unwrap();
        dev.read(0, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(
                b,
                if (100..100 + 8 * KIB as usize).contains(&i) {
                    0
                } else {
                    7
                }
            );
        }
        // A trim without hole punching changes nothing, and succeeds.
        dev.trim(0, 64 * KIB, false).unwrap();
        dev.read(0, &mut buf).unwrap();
        assert_eq!(buf[0], 7);
    }

    #[test]
    fn no_hole_zero_falls_back_to_punch_and_allocate() {
        let (tmp, dev) = device_in(&std::env::temp_dir(), 64 * KIB);
        dev.write(0, &vec![7; 64 * KIB as usize], false).unwrap();
        dev.refused.zero_range.store(true, Ordering::Relaxed);
        let no_hole = ZeroFlags {
            may_trim: false,
            fast: true,
        };
        dev.zero(4 * KIB, 8 * KIB, no_hole, false).unwrap();
        let mut buf = vec![0u8; 64 * KIB as usize];
        dev.read(0, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let zeroed = (4 * KIB as usize..12 * KIB as usize).contains(&i);
            assert_eq!(b, if zeroed { 0 } else { 7 });
        }
        // The range is allocated again: the file holds as many blocks as
        // before (st_blocks counts 512-byte units).
        let meta = std::fs::metadata(tmp.path()).unwrap();
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) * 512 >= 64 * KIB);
    }

    #[test]
    fn tmpfs_refusal_of_zero_range_is_remembered() {
        let (_tmp, dev) = device_in(&tmpfs_dir(), 64 * KIB);
        // The field's and the constant's types differ between targets.
        #[allow(clippy::unnecessary_cast)]
        let on_tmpfs = rfs::fstatfs(&dev.file).unwrap().f_type as i64 == libc::TMPFS_MAGIC as i64;
        dev.write(0, &vec![7; 64 * KIB as usize], false).unwrap();
        for offset in [0, 16 * KIB] {
            dev.zero(offset, 8 * KIB, ZeroFlags::default(), false)
                .unwrap();
        }
        let mut buf = vec![0u8; 24 * KIB as usize];
        dev.read(0, &mut buf).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(
                b,
                if (8 * KIB as usize..16 * KIB as usize).contains(&i) {
                    7
                } else {
                    0
                }
            );
        }
        let refused = &dev.refused;
        if on_tmpfs {
            assert!(refused.zero_range.load(Ordering::Relaxed));
        }
        // What worked is not marked refused.
        assert!(!refused.punch_hole.load(Ordering::Relaxed));
        assert!(!refused.allocate.load(Ordering::Relaxed));
        assert!(dev.capabilities().fast_zero);
    }

    #[test]
    fn extents_report_holes_and_data() {
        let (_tmp, dev) = device_in(&disk_dir(), 1024 * KIB);
        dev.write(512 * KIB, &[1; 4096], false).unwrap();
        let mut out = Vec::new();
        dev.extents(0, 1024 * KIB, &mut out).unwrap();
        let data: Vec<_> = out.iter().filter(|e| e.kind == ExtentKind::Data).collect();
        // Filesystems round to their block size, but a fresh file's
        // untouched start is a hole wherever SEEK_HOLE works.
        assert!(!data.is_empty());
        assert_eq!(out.iter().map(|e| e.len).sum::<u64>(), 1024 * KIB);
        assert_eq!(out[0].kind, ExtentKind::Hole);
        // Clipped to the requested range.
        out.clear();
        dev.extents(512 * KIB + 10, 100, &mut out).unwrap();
        assert_eq!(
            out,
            [Extent {
                len: 100,
                kind: ExtentKind::Data
            }]
        );
        // Without SEEK_DATA everything is data.
        dev.refused.seek_data.store(true, Ordering::Relaxed);
        out.clear();
        dev.extents(0, 1024 * KIB, &mut out).unwrap();
        assert_eq!(
            out,
            [Extent {
                len: 1024 * KIB,
                kind: ExtentKind::Data
            }]
        );
    }

    #[test]
    fn out_of_range_is_einval() {
        let (_tmp, dev) = device_in(&std::env::temp_dir(), 100);
        let mut buf = [0u8; 2];
        assert_eq!(
            dev.read(99, &mut buf).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(errno(dev.write(u64::MAX, &buf, false)), Some(libc::EINVAL));
        assert_eq!(errno(dev.trim(1, u64::MAX, false)), Some(libc::EINVAL));
        assert_eq!(errno(dev.cache(101, 0)), Some(libc::EINVAL));
        dev.cache(0, 100).unwrap();
        let mut out = Vec::new();
        dev.extents(100, 0, &mut out).unwrap();
        assert!(out.is_empty());
    }

    /// Runs the model test on a file in `dir`, with some `fallocate` modes
    /// marked refused up front (punch hole, zero range, allocate).
    fn model_case(
        dir: &Path,
        size: u64,
        ops: &[testing::Op],
        refuse: [bool; 3],
    ) -> Result<(), TestCaseError> {
        let (_tmp, dev) = device_in(dir, size);
        let refused = &dev.refused;
        refused.punch_hole.store(refuse[0], Ordering::Relaxed);
        refused.zero_range.store(refuse[1], Ordering::Relaxed);
        refused.allocate.store(refuse[2], Ordering::Relaxed);
        let expect = Expect {
            trim_zeroes: !refuse[0],
            may_fill: false,
            trim_may_fill: false,
        };
        testing::check(&dev, ops, expect)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn behaves_like_the_model_on_tmpfs((size, ops) in testing::sized_ops(64 * KIB, 512 * KIB)) {
            model_case(&tmpfs_dir(), size, &ops, [false; 3])?;
        }

        #[test]
        fn behaves_like_the_model_on_disk((size, ops) in testing::sized_ops(64 * KIB, 512 * KIB)) {
            model_case(&disk_dir(), size, &ops, [false; 3])?;
        }

        #[test]
        fn behaves_like_the_model_without_zero_range(
            (size, ops) in testing::sized_ops(64 * KIB, 512 * KIB),
        ) {
            model_case(&std::env::temp_dir(), size, &ops, [false, true, true])?;
        }

        #[test]
        fn behaves_like_the_model_without_fallocate(
            (size, ops) in testing::sized_ops(64 * KIB, 512 * KIB),
        ) {
            model_case(&std::env::temp_dir(), size, &ops, [true; 3])?;
        }
    }
}
