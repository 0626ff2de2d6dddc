//! Making a new, formatted scratch disk.
//!
//! Nothing ever gets a name in the file system, so nothing can be left
//! behind, whatever happens to the process:
//!
//! - `backing=memory`: a memfd of the disk's size is formatted, then its data
//!   extents (`SEEK_DATA`/`SEEK_HOLE`) are copied into a budgeted
//!   [`MemoryDevice`], skipping all-zero blocks, and the memfd is closed.
//! - `backing=dir:PATH`: an unnamed file (`O_TMPFILE`, or on file systems
//!   without it a random name unlinked at once) is sized, formatted, and
//!   served by a [`FileDevice`] opened through `/proc/self/fd`.
//! - `backing=memory,spill=dir:PATH`: a budgeted [`MemoryDevice`] and such
//!   an unnamed file of the same size, joined in a [`SpillDevice`]; a second
//!   unnamed file in PATH is formatted and loaded as for `memory` (a file,
//!   not a memfd, so that a full memory budget does not stop the creation),
//!   so what the memory budget does not hold of the metadata lands in the
//!   spill file.
//!
//! What the format command writes is charged to the budget of where it
//! lives (memory for the memfd, `--disk-limit` for files) while it runs: a
//! `command=` could otherwise fill RAM or disk outside the budget. The
//! command is watched every few milliseconds and killed when its image
//! outgrows the budget. A separate image's charge is given back only after
//! the copy has charged its own blocks, so the peak of both is within the
//! budget.
//!
//! [`DiskFactory`] is what the registry and the pool see, so tests can swap
//! in a fast fake.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{fstat, memfd_create, seek, MemfdFlags, SeekFrom};
use rustix::io::Errno;
use scratchd_store::cow::Snapshot;
use scratchd_store::memory::Budget;
use scratchd_store::{BlockDevice, Capabilities, FileDevice, MemoryDevice};

use crate::device::{scratch_capabilities, BudgetedFile, Budgets, ScratchDevice};
use crate::format::{Format, FormatError, Watch};
use crate::spill::SpillDevice;

/// Why a new disk could not be made. The message is one line: it goes to
/// the log and, after "cannot create the scratch disk: ", to the client.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("cannot create a file in {}: {source}", dir.display())]
    CreateFile { dir: PathBuf, source: io::Error },
    #[error("cannot size the disk file: {0}")]
    SizeFile(#[source] io::Error),
    #[error("cannot reopen the disk file: {0}")]
    ReopenFile(#[source] io::Error),
    /// The disk file could not be charged to the disk budget.
    #[error(transparent)]
    ChargeFile(io::Error),
    #[error("the disk budget is exhausted")]
    DiskBudgetExhausted(#[source] io::Error),
    #[error("memfd_create: {0}")]
    Memfd(#[source] io::Error),
    #[error("cannot size the memfd: {0}")]
    SizeMemfd(#[source] io::Error),
    #[error("cannot create a {size}-byte memory disk: {source}")]
    Memory { size: u64, source: io::Error },
    /// The memory and the spill file could not be joined.
    #[error(transparent)]
    Spill(io::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The formatted image outgrew its budget after the last watch.
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot load the formatted disk: {0}")]
    Load(#[source] io::Error),
    /// A snapshot could not be copied, or a clone not made.
    #[error("cannot copy the snapshot: {0}")]
    Snapshot(#[source] io::Error),
    /// The owner's share cannot hold a new snapshot.
    #[error(transparent)]
    Share(crate::device::ClaimError),
    /// A snapshot of a disk of another size was asked to start a disk.
    #[error("a snapshot of {snapshot} bytes cannot start a disk of {disk} bytes")]
    SnapshotSize { snapshot: u64, disk: u64 },
    /// Loading the formatted image into a memory disk hit the memory budget.
    #[error("the memory budget is exhausted ({used} of {limit} bytes in use)")]
    MemoryBudgetExhausted {
        used: u64,
        limit: u64,
        source: io::Error,
    },
    /// Loading the formatted image into a spill disk found the memory budget
    /// full and the spill file refusing the rest.
    #[error("no space for the formatted disk: the memory budget is full and the spill file in {} refused the rest", dir.display())]
    SpillFull { dir: PathBuf, source: io::Error },
}

/// Makes new, formatted disks, snapshots of disks, and clones of those.
pub trait DiskFactory: Send + Sync {
    /// A new disk, ready to serve.
    fn create(&self) -> Result<ScratchDevice, CreateError>;
    /// A snapshot of `dev`'s contents, held where this factory's disks
    /// live and charged to the same budgets, once, within `shares` (its
    /// owner's). By default in memory charged to nothing, which only
    /// factories without budgets (tests) may keep.
    fn snapshot_of(&self, dev: &ScratchDevice, shares: &Budgets) -> Result<Snapshot, CreateError> {
        let _ = shares;
        dev.snapshot_into(unbudgeted(dev.size())?)
            .map_err(CreateError::Snapshot)
    }
    /// A new disk that starts as `base` and holds only what it writes;
    /// no copy and no format, whatever the size. By default in memory
    /// charged to nothing, as for [`DiskFactory::snapshot_of`].
    fn clone_of(&self, base: &Arc<Snapshot>) -> Result<ScratchDevice, CreateError> {
        unbudgeted(base.size())?
            .into_clone(base.clone())
            .map_err(CreateError::Snapshot)
    }
    /// Size of the disks made.
    fn size(&self) -> u64;
    /// What the disks made can do (for INFO on names without a disk).
    fn capabilities(&self) -> Capabilities;
    /// The server-wide budgets the disks are charged to, for owners' shares
    /// of them; none by default.
    fn budgets(&self) -> Budgets {
        Budgets::default()
    }
}

/// A blank memory disk of `size` bytes that charges no budget.
fn unbudgeted(size: u64) -> Result<ScratchDevice, CreateError> {
    MemoryDevice::new(size)
        .map(ScratchDevice::memory)
        .map_err(|source| CreateError::Memory { size, source })
}

/// Where a [`Maker`] places its disks (RAM, a directory, or RAM spilling
/// to a directory), with the budgets they are charged to: the runtime form
/// of [`Backing`](crate::config::Backing).
pub enum Placement {
    Memory(Arc<Budget>),
    Dir {
        path: PathBuf,
        budget: Option<Arc<Budget>>,
    },
    /// RAM charged to `memory`, then a file in `path` charged to `disk`.
    Spill {
        path: PathBuf,
        memory: Arc<Budget>,
        disk: Option<Arc<Budget>>,
    },
}

/// The real [`DiskFactory`]: a placement and a formatter.
pub struct Maker {
    pub size: u64,
    /// Most bytes one disk may allocate (`quota=`), in RAM and in its file
    /// each: a runaway build gets ENOSPC on its own disk before it can take
    /// the shared budget from the others.
    pub quota: Option<u64>,
    pub placement: Placement,
    pub format: Box<dyn Format>,
}

impl Maker {
    /// Checks that disks can be made at all (the directory exists and takes
    /// unnamed files), so that a bad `backing=` fails at startup.
    pub fn check(&self) -> io::Result<()> {
        match &self.placement {
            Placement::Memory(_) => MemoryDevice::new(self.size).map(drop),
            Placement::Dir { path, .. } => tempfile::tempfile_in(path).map(drop),
            Placement::Spill { path, .. } => {
                MemoryDevice::new(self.size)?;
                tempfile::tempfile_in(path).map(drop)
            }
        }
    }

    /// A sparse unnamed file of the disk's size in `path`, and a path to
    /// open it by.
    fn unnamed_file(&self, path: &Path) -> Result<(File, PathBuf), CreateError> {
        let inode = tempfile::tempfile_in(path).map_err(|source| CreateError::CreateFile {
            dir: path.to_owned(),
            source,
        })?;
        inode.set_len(self.size).map_err(CreateError::SizeFile)?;
        let fd_path = proc_path(&inode);
        Ok((inode, fd_path))
    }

    /// Runs the format command on `image` (unless the format is blank),
    /// charging what the image allocates to `budget` while it runs, so that
    /// a command filling it is stopped at the budget instead of using RAM or
    /// space outside it. The charge lasts as long as the returned guard:
    /// callers drop it once the disk has charged its own blocks, so that
    /// image and disk together stay within the budget.
    fn format_charged<'a>(
        &self,
        image: &'a File,
        budget: Option<(&'a Budget, &'static str)>,
    ) -> Result<ImageCharge<'a>, CreateError> {
        let mut charge = ImageCharge {
            image,
            budget,
            charged: 0,
        };
        if self.format.is_blank() {
            return Ok(charge);
        }
        let mut watch = || charge.update();
        let watch: Option<Watch> = match budget {
            Some(_) => Some(&mut watch),
            None => None,
        };
        self.format.format(&proc_path(image), self.size, watch)?;
        // The command may have written more since the last check.
        charge.update()?;
        Ok(charge)
    }

    /// Formats `image` (see [`format_charged`](Self::format_charged)) and
    /// loads its data into `dev`; `no_space` turns a load failing with
    /// `ENOSPC` into the error that says which budget was full.
    fn format_into(
        &self,
        formatted: bool,
        dev: &dyn BlockDevice,
        image: &File,
        budget: Option<(&Budget, &'static str)>,
        no_space: impl FnOnce(io::Error) -> CreateError,
    ) -> Result<(), CreateError> {
        if !formatted || self.format.is_blank() {
            return Ok(());
        }
        let charge = self.format_charged(image, budget)?;
        let loaded = import(image, dev).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => no_space(e),
            _ => CreateError::Load(e),
        });
        drop(charge);
        loaded
    }

    /// A memfd of the disk's size, for formatting a disk that lives in RAM.
    fn memfd(&self) -> Result<File, CreateError> {
        let memfd = memfd_create("scratchd-disk", MemfdFlags::CLOEXEC)
            .map(File::from)
            .map_err(|e| CreateError::Memfd(e.into()))?;
        memfd.set_len(self.size).map_err(CreateError::SizeMemfd)?;
        Ok(memfd)
    }

    fn create_spilling(
        &self,
        formatted: bool,
        path: &Path,
        memory: &Arc<Budget>,
        disk: &Option<Arc<Budget>>,
    ) -> Result<ScratchDevice, CreateError> {
        let own = Budgets {
            memory: Some(memory.clone()),
            disk: disk.clone(),
        }
        .for_one_disk(self.quota);
        let own_memory = own.memory.clone().unwrap_or_else(|| memory.clone());
        let (inode, fd_path) = self.unnamed_file(path)?;
        let file = FileDevice::open(&fd_path, false).map_err(CreateError::ReopenFile)?;
        let file =
            BudgetedFile::new(file, inode, own.disk.clone()).map_err(CreateError::ChargeFile)?;
        let mem = MemoryDevice::with_budget(self.size, own_memory.clone())
            .map_err(|source| self.memory_error(source))?;
        let dev = SpillDevice::new(mem, own_memory, file).map_err(CreateError::Spill)?;
        // Formatted in a second unnamed file beside the spill file, not in
        // RAM: a spill disk must be creatable when the memory budget is full.
        let (image, _) = self.unnamed_file(path)?;
        let disk_budget = disk.as_deref().map(|b| (b, "disk"));
        self.format_into(formatted, &dev, &image, disk_budget, |source| {
            CreateError::SpillFull {
                dir: path.to_owned(),
                source,
            }
        })?;
        Ok(ScratchDevice::spill(dev).charging(own))
    }

    fn create_in_memory(
        &self,
        formatted: bool,
        budget: &Arc<Budget>,
    ) -> Result<ScratchDevice, CreateError> {
        let own = Arc::new(Budget::within(
            budget.clone(),
            self.quota.unwrap_or(u64::MAX),
        ));
        let dev = MemoryDevice::with_budget(self.size, own.clone())
            .map_err(|source| self.memory_error(source))?;
        let memfd = self.memfd()?;
        self.format_into(
            formatted,
            &dev,
            &memfd,
            Some((budget, "memory")),
            |source| CreateError::MemoryBudgetExhausted {
                used: budget.used(),
                limit: budget.limit(),
                source,
            },
        )?;
        Ok(ScratchDevice::memory(dev).charging(Budgets {
            memory: Some(own),
            disk: None,
        }))
    }

    fn memory_error(&self, source: io::Error) -> CreateError {
        CreateError::Memory {
            size: self.size,
            source,
        }
    }

    fn create_in_dir(
        &self,
        formatted: bool,
        path: &Path,
        budget: &Option<Arc<Budget>>,
    ) -> Result<ScratchDevice, CreateError> {
        let (inode, fd_path) = self.unnamed_file(path)?;
        // The image is the disk itself: its charge ends here and the disk
        // charges the same blocks just below.
        if formatted {
            drop(self.format_charged(&inode, budget.as_deref().map(|b| (b, "disk")))?);
        }
        let dev = FileDevice::open(&fd_path, false).map_err(CreateError::ReopenFile)?;
        let own = Budgets {
            memory: None,
            disk: budget.clone(),
        }
        .for_one_disk(self.quota);
        let dev = BudgetedFile::new(dev, inode, own.disk.clone()).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ENOSPC) => CreateError::DiskBudgetExhausted(e),
                _ => CreateError::ChargeFile(e),
            }
        })?;
        Ok(ScratchDevice::file(dev).charging(own))
    }
}

impl Maker {
    /// A new disk of the placement, formatted or left blank (all holes).
    fn make(&self, formatted: bool) -> Result<ScratchDevice, CreateError> {
        match &self.placement {
            Placement::Memory(budget) => self.create_in_memory(formatted, budget),
            Placement::Dir { path, budget } => self.create_in_dir(formatted, path, budget),
            Placement::Spill { path, memory, disk } => {
                self.create_spilling(formatted, path, memory, disk)
            }
        }
    }
}

impl DiskFactory for Maker {
    fn create(&self) -> Result<ScratchDevice, CreateError> {
        self.make(true)
    }

    fn snapshot_of(&self, dev: &ScratchDevice, shares: &Budgets) -> Result<Snapshot, CreateError> {
        let into = self.make(false)?;
        into.claim(shares).map_err(CreateError::Share)?;
        dev.snapshot_into(into).map_err(CreateError::Snapshot)
    }

    fn clone_of(&self, base: &Arc<Snapshot>) -> Result<ScratchDevice, CreateError> {
        if base.size() != self.size {
            return Err(CreateError::SnapshotSize {
                snapshot: base.size(),
                disk: self.size,
            });
        }
        self.make(false)?
            .into_clone(base.clone())
            .map_err(CreateError::Snapshot)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn budgets(&self) -> Budgets {
        match &self.placement {
            Placement::Memory(memory) => Budgets {
                memory: Some(memory.clone()),
                disk: None,
            },
            Placement::Dir { budget, .. } => Budgets {
                memory: None,
                disk: budget.clone(),
            },
            Placement::Spill { memory, disk, .. } => Budgets {
                memory: Some(memory.clone()),
                disk: disk.clone(),
            },
        }
    }

    fn capabilities(&self) -> Capabilities {
        let backend = match &self.placement {
            Placement::Memory(_) => MemoryDevice::new(0).map(|d| d.capabilities()),
            Placement::Dir { path, .. } => tempfile::tempfile_in(path)
                .and_then(|f| FileDevice::open(&proc_path(&f), false))
                .map(|d| d.capabilities()),
            Placement::Spill { .. } => Ok(SpillDevice::CAPABILITIES),
        };
        // A failed probe is answered with what the backend normally offers;
        // creating the disk will report the real problem.
        scratch_capabilities(backend.unwrap_or(Capabilities {
            read_only: false,
            durable_flush: false,
            trim: true,
            fast_zero: true,
            multi_conn: true,
            may_block: !matches!(self.placement, Placement::Memory(_)),
        }))
    }
}

/// Why a disk image being formatted could not stay within its budget.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot measure the disk image: {0}")]
    Measure(#[source] io::Error),
    /// The image holds more than the budget can take.
    #[error("the format command exceeded the {kind} budget (its disk holds {allocated} bytes, other disks {others}, limit {limit})")]
    OverBudget {
        /// What the budget counts: "memory" or "disk".
        kind: &'static str,
        allocated: u64,
        others: u64,
        limit: u64,
    },
}

/// What a disk image being formatted holds (RAM for a memfd, space for a
/// file), charged to a budget for as long as this lives.
struct ImageCharge<'a> {
    image: &'a File,
    /// The budget, and what it counts ("memory", "disk"), for messages.
    budget: Option<(&'a Budget, &'static str)>,
    /// Bytes taken from the budget.
    charged: u64,
}

impl ImageCharge<'_> {
    /// Brings the charge to the image's allocated bytes; fails when the
    /// budget cannot take the growth.
    fn update(&mut self) -> Result<(), ImageError> {
        let Some((budget, kind)) = self.budget else {
            return Ok(());
        };
        let stat = fstat(self.image).map_err(|e| ImageError::Measure(e.into()))?;
        let allocated = stat.st_blocks as u64 * 512;
        if allocated < self.charged {
            budget.release(self.charged - allocated);
        } else if !budget.try_reserve(allocated - self.charged) {
            return Err(ImageError::OverBudget {
                kind,
                allocated,
                others: budget.used().saturating_sub(self.charged),
                limit: budget.limit(),
            });
        }
        self.charged = allocated;
        Ok(())
    }
}

impl Drop for ImageCharge<'_> {
    fn drop(&mut self) {
        if let Some((budget, _)) = self.budget {
            budget.release(self.charged);
        }
    }
}

/// A path through which a child process (or this one) can open `file`.
pub(crate) fn proc_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ))
}

/// Copies the data extents of `file` into `dev`, skipping all-zero blocks.
fn import(file: &File, dev: &dyn BlockDevice) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    const BLOCK: usize = 4096;
    let size = dev.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(data) => data,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(hole) => hole.min(size),
            Err(e) => return Err(e.into()),
        };
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(CHUNK) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at)?;
            // Write runs of blocks that are not all zeros.
            let mut run: Option<usize> = None;
            for (i, block) in chunk.chunks(BLOCK).enumerate() {
                let zero = block.iter().all(|&b| b == 0);
                match (zero, run) {
                    (false, None) => run = Some(i * BLOCK),
                    (true, Some(start)) => {
                        dev.write(at + start as u64, &chunk[start..i * BLOCK], false)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run {
                dev.write(at + start as u64, &chunk[start..], false)?;
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use scratchd_store::testing::{self, Expect, Op};

    use super::*;
    use crate::config::{FormatKind, FormatSpec};

    fn spec(kind: FormatKind) -> Box<dyn Format> {
        Box::new(FormatSpec {
            kind,
            fs_type: "ext4".into(),
            label: None,
            env: vec![],
            timeout: Duration::from_secs(10),
        })
    }

    /// Every budget `placement` charges disks to.
    fn budgets(placement: &Placement) -> Vec<&Arc<Budget>> {
        match placement {
            Placement::Memory(b) => vec![b],
            Placement::Dir { budget, .. } => budget.iter().collect(),
            Placement::Spill { memory, disk, .. } => disk.iter().chain([memory]).collect(),
        }
    }

    #[test]
    fn import_copies_only_nonzero_blocks() {
        let maker = Maker {
            quota: None,
            size: 64 << 20,
            placement: Placement::Memory(Arc::new(Budget::new(u64::MAX))),
            format: spec(FormatKind::Command(
                "printf abc | dd of=$disk bs=1 seek=5000 conv=notrunc 2>/dev/null; \
                 head -c 8192 /dev/zero | dd of=$disk bs=1 seek=1048576 conv=notrunc 2>/dev/null"
                    .into(),
            )),
        };
        let dev = maker.create().unwrap();
        assert_eq!(dev.allocated_bytes(), 4096);
        let mut buf = [0u8; 3];
        dev.read(5000, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
    }

    #[test]
    fn mkfs_ext4_makes_a_filesystem_in_memory_in_a_dir_and_spilling() {
        let dir = tempfile::tempdir().unwrap();
        for placement in [
            // Far more than the ~300 KiB of metadata.
            Placement::Memory(Arc::new(Budget::new(16 << 20))),
            Placement::Dir {
                path: dir.path().to_owned(),
                budget: None,
            },
            // A budget far smaller than the metadata (which, with 4 KiB
            // blocks, is about 44 KiB here): most of it spills (the image is
            // formatted in a file, so it needs no memory).
            Placement::Spill {
                path: dir.path().to_owned(),
                memory: Arc::new(Budget::new(16 << 10)),
                disk: Some(Arc::new(Budget::new(64 << 20))),
            },
        ] {
            let maker = Maker {
                quota: None,
                size: 64 << 20,
                placement,
                format: spec(FormatKind::Filesystem("ext4".into())),
            };
            let dev = maker.create().unwrap();
            let mut magic = [0u8; 2];
            dev.read(1080, &mut magic).unwrap();
            assert_eq!(u16::from_le_bytes(magic), 0xEF53);
            assert!(dev.allocated_bytes() > 0);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            // The image's charge is gone; the disk's own blocks are left.
            let budgets = match &maker.placement {
                Placement::Memory(budget) => {
                    assert_eq!(budget.used(), dev.allocated_bytes());
                    vec![budget]
                }
                Placement::Spill {
                    memory,
                    disk: Some(disk),
                    ..
                } => {
                    assert_eq!(memory.used(), memory.limit());
                    assert_eq!(memory.used() + disk.used(), dev.allocated_bytes());
                    vec![memory, disk]
                }
                _ => continue,
            };
            drop(dev);
            assert!(budgets.iter().all(|b| b.used() == 0));
        }
    }

    /// A format command writing far past the budget into its image (a
    /// memfd, the disk file, or the spill disk's image file) is killed, with
    /// its helpers, as soon as the watch sees it, and nothing stays charged.
    #[test]
    fn a_format_command_outgrowing_the_budget_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (pid_file, done_file) = (dir.path().join("pid"), dir.path().join("done"));
        let backing = tempfile::tempdir().unwrap();
        let budget = || Arc::new(Budget::new(16 << 20));
        for (placement, kind) in [
            (Placement::Memory(budget()), "memory"),
            (
                Placement::Dir {
                    path: backing.path().to_owned(),
                    budget: Some(budget()),
                },
                "disk",
            ),
            (
                Placement::Spill {
                    path: backing.path().to_owned(),
                    memory: budget(),
                    disk: Some(budget()),
                },
                "disk",
            ),
        ] {
            // 256 MiB, one MiB per dd, in a background job of the command.
            let maker = Maker {
                quota: None,
                size: 256 << 20,
                placement,
                format: spec(FormatKind::Command(format!(
                    "(i=0; while [ $i -lt 256 ]; do \
                       dd if=/dev/zero of=$disk bs=1M count=1 seek=$i conv=notrunc 2>/dev/null; \
                       i=$((i+1)); done) & echo $! > {}; wait; touch {}",
                    pid_file.display(),
                    done_file.display()
                ))),
            };
            match maker.create().unwrap_err() {
                CreateError::Format(FormatError::Stopped {
                    reason: ImageError::OverBudget { kind: stopped, .. },
                    ..
                }) => assert_eq!(stopped, kind),
                other => panic!("{kind}: {other:?}"),
            }
            let budgets = budgets(&maker.placement);
            assert!(budgets.iter().all(|b| b.used() == 0), "{kind}: charge left");
            assert!(!done_file.exists(), "the command ran to its end");
            assert_eq!(std::fs::read_dir(backing.path()).unwrap().count(), 0);
            // The background writer was killed with the group (and then
            // reaped by init, so allow a moment for its zombie to go).
            let writer = std::fs::read_to_string(&pid_file).unwrap();
            let stat = format!("/proc/{}/stat", writer.trim());
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the writer still runs"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn a_budget_too_small_for_the_filesystem_fails_creation() {
        let budget = Arc::new(Budget::new(8192));
        let maker = Maker {
            quota: None,
            size: 64 << 20,
            placement: Placement::Memory(budget.clone()),
            format: spec(FormatKind::Filesystem("ext4".into())),
        };
        let err = maker.create().unwrap_err();
        assert!(
            matches!(
                err,
                CreateError::MemoryBudgetExhausted { .. }
                    | CreateError::Format(FormatError::Stopped {
                        reason: ImageError::OverBudget { kind: "memory", .. },
                        ..
                    })
                    | CreateError::Image(ImageError::OverBudget { kind: "memory", .. })
            ),
            "{err:?}"
        );
        assert_eq!(budget.used(), 0);
    }

    /// Runs the store's model suite on a blank disk of `size` bytes made
    /// by a [`Maker`] with `placement`, as the registry gets it; afterwards
    /// the disk's budgets must be whole again once it is dropped.
    fn model_case(
        size: u64,
        ops: &[Op],
        placement: Placement,
        may_fill: bool,
    ) -> Result<(), TestCaseError> {
        let maker = Maker {
            quota: None,
            size,
            placement,
            format: spec(FormatKind::None),
        };
        let dev = maker.create().unwrap();
        let memory = match &maker.placement {
            Placement::Memory(budget) | Placement::Spill { memory: budget, .. } => Some(budget),
            Placement::Dir { .. } => None,
        };
        let expect = Expect {
            trim_zeroes: true,
            may_fill,
            trim_may_fill: false,
        };
        testing::check_with(&dev, ops, expect, || {
            memory.map_or(Ok(()), |budget| testing::within_budget(budget))
        })?;
        drop(dev);
        let budgets = budgets(&maker.placement);
        prop_assert!(
            budgets.iter().all(|b| b.used() == 0),
            "a budget kept a charge"
        );
        Ok(())
    }

    /// The clone suite over a [`Maker`]: snapshots and clones live where
    /// its disks do and charge its budgets.
    struct MakerCow {
        maker: Maker,
        /// Every snapshot made, to see which are still alive.
        snapshots: Vec<std::sync::Weak<Snapshot>>,
    }

    /// Bytes in data extents of `dev`.
    fn data_bytes(dev: &dyn BlockDevice) -> u64 {
        let mut out = Vec::new();
        dev.extents(0, dev.size(), &mut out).unwrap();
        out.iter()
            .filter(|e| e.kind == scratchd_store::ExtentKind::Data)
            .map(|e| e.len)
            .sum()
    }

    fn io_error(e: CreateError) -> io::Error {
        match e {
            CreateError::Snapshot(e) => e,
            other => io::Error::other(other),
        }
    }

    impl testing::Cow for MakerCow {
        type Disk = ScratchDevice;
        type Snap = Arc<Snapshot>;

        fn snapshot(&mut self, disk: &ScratchDevice) -> io::Result<Arc<Snapshot>> {
            let shares = Budgets::default();
            let snap = Arc::new(self.maker.snapshot_of(disk, &shares).map_err(io_error)?);
            self.snapshots.push(Arc::downgrade(&snap));
            Ok(snap)
        }

        fn clone_of(&mut self, snap: &Arc<Snapshot>) -> io::Result<ScratchDevice> {
            self.maker.clone_of(snap).map_err(io_error)
        }

        /// In RAM: the budget holds each disk's private bytes and each
        /// live snapshot's data (to the block) once. Anywhere: no budget
        /// is overdrawn.
        fn check(&mut self, disks: &[ScratchDevice], _: &[Arc<Snapshot>]) -> Result<(), String> {
            for budget in budgets(&self.maker.placement) {
                testing::within_budget(budget)?;
            }
            let Placement::Memory(budget) = &self.maker.placement else {
                return Ok(());
            };
            let private: u64 = disks.iter().map(ScratchDevice::allocated_bytes).sum();
            let live = self.snapshots.iter().filter_map(std::sync::Weak::upgrade);
            let (mut low, mut high) = (private, private);
            for snap in live {
                let data = data_bytes(snap.device());
                low += data;
                high += data.next_multiple_of(4096);
            }
            if !(low..=high).contains(&budget.used()) {
                return Err(format!(
                    "{} bytes charged, {low} to {high} held",
                    budget.used()
                ));
            }
            Ok(())
        }
    }

    /// Runs the clone suite over a [`Maker`] with `placement`, whose first
    /// disk is blank; afterwards every budget must be whole again.
    fn clone_case(
        size: u64,
        steps: &[testing::CloneStep],
        placement: Placement,
        may_fill: bool,
    ) -> Result<(), TestCaseError> {
        let maker = Maker {
            quota: None,
            size,
            placement,
            format: spec(FormatKind::None),
        };
        let first = maker.create().unwrap();
        let mut cow = MakerCow {
            maker,
            snapshots: Vec::new(),
        };
        let expect = Expect {
            trim_zeroes: true,
            may_fill,
            trim_may_fill: may_fill,
        };
        testing::check_clones(&mut cow, first, steps, expect)?;
        prop_assert!(cow.snapshots.iter().all(|s| s.strong_count() == 0));
        let budgets = budgets(&cow.maker.placement);
        prop_assert!(
            budgets.iter().all(|b| b.used() == 0),
            "a budget kept a charge"
        );
        Ok(())
    }

    #[test]
    fn a_clone_of_another_size_is_refused() {
        let maker = |size| Maker {
            quota: None,
            size,
            placement: Placement::Memory(Arc::new(Budget::new(u64::MAX))),
            format: spec(FormatKind::None),
        };
        let snap = Arc::new(
            maker(1 << 20)
                .snapshot_of(&maker(1 << 20).create().unwrap(), &Budgets::default())
                .unwrap(),
        );
        assert!(matches!(
            maker(2 << 20).clone_of(&snap),
            Err(CreateError::SnapshotSize { .. })
        ));
    }

    /// Unnamed files in `dir`, with a disk budget of `blocks` if any.
    fn dir_placement(dir: &std::path::Path, blocks: Option<u64>) -> Placement {
        Placement::Dir {
            path: dir.to_owned(),
            budget: blocks.map(|b| Arc::new(Budget::new(b * 4096))),
        }
    }

    /// RAM up to `blocks`, then unnamed files in `dir`.
    fn spill_placement(dir: &std::path::Path, blocks: u64) -> Placement {
        Placement::Spill {
            path: dir.to_owned(),
            memory: Arc::new(Budget::new(blocks * 4096)),
            disk: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Clones in RAM, with a budget of 0 to 64 blocks.
        #[test]
        fn memory_clones_behave_like_the_model(
            (size, steps) in testing::sized_clone_steps(32 << 10, 128 << 10),
            blocks in 0u64..=64,
        ) {
            let budget = Arc::new(Budget::new(blocks * 4096));
            clone_case(size, &steps, Placement::Memory(budget), true)?;
        }

        /// Clones in unnamed files, with or without a disk budget.
        #[test]
        fn dir_clones_behave_like_the_model(
            (size, steps) in testing::sized_clone_steps(32 << 10, 128 << 10),
            blocks in prop::option::of(0u64..=64),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let placement = dir_placement(dir.path(), blocks);
            clone_case(size, &steps, placement, blocks.is_some())?;
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }

        /// Clones in RAM that spill to files.
        #[test]
        fn spilling_clones_behave_like_the_model(
            (size, steps) in testing::sized_clone_steps(32 << 10, 128 << 10),
            blocks in 0u64..=64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let placement = spill_placement(dir.path(), blocks);
            clone_case(size, &steps, placement, false)?;
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// In RAM, with a budget of 0 to 64 blocks (writes past it fail).
        #[test]
        fn memory_disks_behave_like_the_model(
            (size, ops) in testing::sized_ops(64 << 10, 256 << 10),
            blocks in 0u64..=64,
        ) {
            let budget = Arc::new(Budget::new(blocks * 4096));
            model_case(size, &ops, Placement::Memory(budget), true)?;
        }

        /// In an unnamed file (`dir:`), with or without a disk budget.
        #[test]
        fn dir_disks_behave_like_the_model(
            (size, ops) in testing::sized_ops(64 << 10, 256 << 10),
            blocks in prop::option::of(0u64..=64),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let placement = dir_placement(dir.path(), blocks);
            model_case(size, &ops, placement, blocks.is_some())?;
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }

        /// In RAM up to a budget of 0 to 64 blocks, then in a file: no
        /// write fails.
        #[test]
        fn spilling_disks_behave_like_the_model(
            (size, ops) in testing::sized_ops(64 << 10, 256 << 10),
            blocks in 0u64..=64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let placement = spill_placement(dir.path(), blocks);
            model_case(size, &ops, placement, false)?;
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}
