//! Making a new, formatted scratch disk.
//!
//! Nothing ever gets a name in the file system, so nothing can be left
//! behind, whatever happens to the process:
//!
//! - `backing=memory`: a memfd of the disk's size is formatted, then its data
//!   extents (`SEEK_DATA`/`SEEK_HOLE`) are copied into a budgeted
//!   [`MemoryDevice`], skipping all-zero blocks, and the memfd is closed.
//!   The memfd's pages are charged to the budget too, while it exists: the
//!   format command is watched every few milliseconds and killed when they
//!   outgrow the budget (a `command=` could otherwise fill RAM), and the
//!   charge is given back only after the copy has charged its own pages, so
//!   the peak of both is within the budget. A budget too small for either
//!   fails the creation with a clear error.
//! - `backing=dir:PATH`: an unnamed file (`O_TMPFILE`, or on file systems
//!   without it a random name unlinked at once) is sized, formatted, and
//!   served by a [`FileDevice`] opened through `/proc/self/fd`.
//! - `backing=memory,spill=dir:PATH`: a budgeted [`MemoryDevice`] and such
//!   an unnamed file of the same size, joined in a [`SpillDevice`]; the
//!   memfd is formatted (charged to the memory budget, which must hold it)
//!   and loaded as for `memory`, so what the budget does not hold of the
//!   file system's metadata already lands in the file.
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
use scratchd_store::memory::Budget;
use scratchd_store::{BlockDevice, Capabilities, FileDevice, MemoryDevice};

use crate::device::{scratch_capabilities, BudgetedFile, ScratchDevice};
use crate::format::Format;
use crate::spill::SpillDevice;

/// Makes new, formatted disks.
pub trait DiskFactory: Send + Sync {
    /// A new disk, ready to serve; the error is a one-line reason.
    fn create(&self) -> Result<ScratchDevice, String>;
    /// Size of the disks made.
    fn size(&self) -> u64;
    /// What the disks made can do (for INFO on names without a disk).
    fn capabilities(&self) -> Capabilities;
}

/// Where a [`Maker`]'s disks live, with their budget.
pub enum Store {
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

/// The real [`DiskFactory`]: a store and a formatter.
pub struct Maker {
    pub size: u64,
    pub store: Store,
    pub format: Box<dyn Format>,
}

impl Maker {
    /// Checks that disks can be made at all (the directory exists and takes
    /// unnamed files), so that a bad `backing=` fails at startup.
    pub fn check(&self) -> io::Result<()> {
        match &self.store {
            Store::Memory(_) => MemoryDevice::new(self.size).map(drop),
            Store::Dir { path, .. } => tempfile::tempfile_in(path).map(drop),
            Store::Spill { path, .. } => {
                MemoryDevice::new(self.size)?;
                tempfile::tempfile_in(path).map(drop)
            }
        }
    }

    /// A sparse unnamed file of the disk's size in `path`, and a path to
    /// open it by.
    fn unnamed_file(&self, path: &Path) -> Result<(File, PathBuf), String> {
        let inode = tempfile::tempfile_in(path)
            .map_err(|e| format!("cannot create a file in {}: {e}", path.display()))?;
        inode
            .set_len(self.size)
            .map_err(|e| format!("cannot size the disk file: {e}"))?;
        let fd_path = proc_path(&inode);
        Ok((inode, fd_path))
    }

    /// Formats a memfd, charging its pages to `budget`, and loads it into
    /// `dev`; `no_space` says why the load failed with `ENOSPC`.
    fn format_into(
        &self,
        dev: &dyn BlockDevice,
        budget: &Budget,
        no_space: impl FnOnce() -> String,
    ) -> Result<(), String> {
        if self.format.is_blank() {
            return Ok(());
        }
        let memfd = memfd_create("scratchd-disk", MemfdFlags::CLOEXEC)
            .map(File::from)
            .map_err(|e| format!("memfd_create: {e}"))?;
        memfd
            .set_len(self.size)
            .map_err(|e| format!("cannot size the memfd: {e}"))?;
        // Charged while the command runs, so that a command filling the
        // memfd is stopped at the budget instead of using RAM outside it.
        let mut charge = MemfdCharge {
            memfd: &memfd,
            budget,
            charged: 0,
        };
        let mut watch = || charge.update();
        self.format
            .format(&proc_path(&memfd), self.size, Some(&mut watch))?;
        // The command may have written more since the last check.
        charge.update()?;
        let loaded = import(&memfd, dev).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => no_space(),
            _ => format!("cannot load the formatted disk: {e}"),
        });
        // Only now: the copy has charged its own pages, so memfd and copy
        // together were within the budget.
        drop(charge);
        loaded
    }

    fn create_spilling(
        &self,
        path: &Path,
        memory: &Arc<Budget>,
        disk: &Option<Arc<Budget>>,
    ) -> Result<ScratchDevice, String> {
        let (inode, fd_path) = self.unnamed_file(path)?;
        let file = FileDevice::open(&fd_path, false)
            .map_err(|e| format!("cannot reopen the disk file: {e}"))?;
        let file = BudgetedFile::new(file, inode, disk.clone()).map_err(|e| e.to_string())?;
        let mem = MemoryDevice::with_budget(self.size, memory.clone())
            .map_err(|e| format!("cannot create a {}-byte memory disk: {e}", self.size))?;
        let dev = SpillDevice::new(mem, memory.clone(), file).map_err(|e| e.to_string())?;
        self.format_into(&dev, memory, || {
            format!(
                "no space for the formatted disk: the memory budget is full and the spill file in {} refused the rest",
                path.display()
            )
        })?;
        Ok(ScratchDevice::spill(dev))
    }

    fn create_in_memory(&self, budget: &Arc<Budget>) -> Result<ScratchDevice, String> {
        let dev = MemoryDevice::with_budget(self.size, budget.clone())
            .map_err(|e| format!("cannot create a {}-byte memory disk: {e}", self.size))?;
        self.format_into(&dev, budget, || {
            format!(
                "the memory budget is exhausted ({} of {} bytes in use)",
                budget.used(),
                budget.limit()
            )
        })?;
        Ok(ScratchDevice::memory(dev))
    }

    fn create_in_dir(
        &self,
        path: &Path,
        budget: &Option<Arc<Budget>>,
    ) -> Result<ScratchDevice, String> {
        let (inode, fd_path) = self.unnamed_file(path)?;
        self.format.format(&fd_path, self.size, None)?;
        let dev = FileDevice::open(&fd_path, false)
            .map_err(|e| format!("cannot reopen the disk file: {e}"))?;
        let dev =
            BudgetedFile::new(dev, inode, budget.clone()).map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => "the disk budget is exhausted".to_string(),
                _ => e.to_string(),
            })?;
        Ok(ScratchDevice::file(dev))
    }
}

impl DiskFactory for Maker {
    fn create(&self) -> Result<ScratchDevice, String> {
        match &self.store {
            Store::Memory(budget) => self.create_in_memory(budget),
            Store::Dir { path, budget } => self.create_in_dir(path, budget),
            Store::Spill { path, memory, disk } => self.create_spilling(path, memory, disk),
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let store = match &self.store {
            Store::Memory(_) => MemoryDevice::new(0).map(|d| d.capabilities()),
            Store::Dir { path, .. } => tempfile::tempfile_in(path)
                .and_then(|f| FileDevice::open(&proc_path(&f), false))
                .map(|d| d.capabilities()),
            Store::Spill { .. } => Ok(SpillDevice::CAPABILITIES),
        };
        // A failed probe is answered with what the store normally offers;
        // creating the disk will report the real problem.
        scratch_capabilities(store.unwrap_or(Capabilities {
            read_only: false,
            durable_flush: false,
            trim: true,
            fast_zero: true,
            multi_conn: true,
            may_block: !matches!(self.store, Store::Memory(_)),
        }))
    }
}

/// The memory a memfd holds, charged to a budget for as long as this lives.
struct MemfdCharge<'a> {
    memfd: &'a File,
    budget: &'a Budget,
    /// Bytes taken from `budget`.
    charged: u64,
}

impl MemfdCharge<'_> {
    /// Brings the charge to the memfd's allocated bytes; fails when the
    /// budget cannot take the growth.
    fn update(&mut self) -> Result<(), String> {
        let stat = fstat(self.memfd).map_err(|e| format!("cannot measure the memfd: {e}"))?;
        let allocated = stat.st_blocks as u64 * 512;
        if allocated < self.charged {
            self.budget.release(self.charged - allocated);
        } else if !self.budget.try_reserve(allocated - self.charged) {
            let others = self.budget.used().saturating_sub(self.charged);
            return Err(format!(
                "the format command exceeded the memory budget (its disk holds {allocated} bytes, other disks {others}, limit {})",
                self.budget.limit()
            ));
        }
        self.charged = allocated;
        Ok(())
    }
}

impl Drop for MemfdCharge<'_> {
    fn drop(&mut self) {
        self.budget.release(self.charged);
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

    #[test]
    fn import_copies_only_nonzero_blocks() {
        let maker = Maker {
            size: 64 << 20,
            store: Store::Memory(Arc::new(Budget::new(u64::MAX))),
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
        for store in [
            // Far more than the ~300 KiB of metadata.
            Store::Memory(Arc::new(Budget::new(16 << 20))),
            Store::Dir {
                path: dir.path().to_owned(),
                budget: None,
            },
            // Room for the memfd, not for a copy beside it: the copy spills.
            Store::Spill {
                path: dir.path().to_owned(),
                memory: Arc::new(Budget::new(512 << 10)),
                disk: None,
            },
        ] {
            let maker = Maker {
                size: 64 << 20,
                store,
                format: spec(FormatKind::Filesystem("ext4".into())),
            };
            let dev = maker.create().unwrap();
            let mut magic = [0u8; 2];
            dev.read(1080, &mut magic).unwrap();
            assert_eq!(u16::from_le_bytes(magic), 0xEF53);
            assert!(dev.allocated_bytes() > 0);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            // The memfd's charge is gone; the disk's own memory is left.
            let budget = match &maker.store {
                Store::Memory(budget) => {
                    assert_eq!(budget.used(), dev.allocated_bytes());
                    budget
                }
                Store::Spill { memory, .. } => {
                    assert!((1..dev.allocated_bytes()).contains(&memory.used()));
                    memory
                }
                Store::Dir { .. } => continue,
            };
            drop(dev);
            assert_eq!(budget.used(), 0);
        }
    }

    /// A format command writing far past the budget into the memfd is
    /// killed, with its helpers, as soon as the watch sees it.
    #[test]
    fn a_format_command_outgrowing_the_budget_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let (pid_file, done_file) = (dir.path().join("pid"), dir.path().join("done"));
        let budget = Arc::new(Budget::new(16 << 20));
        let maker = Maker {
            size: 256 << 20,
            store: Store::Memory(budget.clone()),
            format: spec(FormatKind::Command(format!(
                "dd if=/dev/urandom of=$disk bs=1M count=64 conv=notrunc 2>/dev/null & \
                 echo $! > {}; wait; touch {}",
                pid_file.display(),
                done_file.display()
            ))),
        };
        let err = maker.create().unwrap_err();
        assert!(
            err.starts_with("the format command exceeded the memory budget"),
            "{err}"
        );
        assert_eq!(budget.used(), 0);
        assert!(!done_file.exists(), "the command ran to its end");
        // The background dd was killed with the group (and then reaped by
        // init, so allow a moment for its zombie to go).
        let dd = std::fs::read_to_string(&pid_file).unwrap();
        let stat = format!("/proc/{}/stat", dd.trim());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
            assert!(std::time::Instant::now() < deadline, "dd still runs");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_budget_too_small_for_the_filesystem_fails_creation() {
        let budget = Arc::new(Budget::new(8192));
        let maker = Maker {
            size: 64 << 20,
            store: Store::Memory(budget.clone()),
            format: spec(FormatKind::Filesystem("ext4".into())),
        };
        let err = maker.create().unwrap_err();
        assert!(err.contains("memory budget"), "{err}");
        assert_eq!(budget.used(), 0);
    }
}
