//! [`ScratchDevice`]: the block device every scratch disk serves, and the
//! disk-space accounting of file-backed disks.
//!
//! A scratch disk is thrown away with its build, so durability is wasted
//! work: FLUSH succeeds at once and FUA is stripped before the backend sees a
//! write (both are counted). Everything else is delegated to the backend, a
//! [`MemoryDevice`], a [`FileDevice`] or a [`SpillDevice`] (both), through a
//! `match` rather than a trait object, and counted in relaxed atomics.
//!
//! # Disk budget
//!
//! A file's allocation is known only after the fact (`st_blocks`), so a
//! budgeted file works in two steps: before a write or a `NO_HOLE` zeroing,
//! it reserves the whole range rounded out to 4 KiB blocks (or, when that
//! does not fit, only the holes inside the range, found with `SEEK_DATA`);
//! after the call it sets its charge to `st_blocks * 512` plus what calls
//! still in progress have reserved. The budget can therefore be exceeded only
//! by what the file system allocates beyond the data itself (extent tree
//! blocks), and a write is refused only when the data it may add does not
//! fit.
//!
//! # Owners' shares
//!
//! Every disk charges budgets of its own ([`Budgets`], unlimited), made
//! within the server's budgets, so that it can be moved under its owner's
//! share when it gets an owner ([`ScratchDevice::claim`]): a disk from the
//! pool was made before anyone asked for it. From then on a write that
//! needs more than the owner's share has left fails with `ENOSPC`, like
//! one past the server's budget.

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use scratchd_store::cow::{CloneDevice, Snapshot};
use scratchd_store::gate::WriteGate;
use scratchd_store::memory::{Budget, NarrowError};
use scratchd_store::sync;
use scratchd_store::{
    BlockDevice, Capabilities, ErrorCounts, Extent, ExtentKind, FileDevice, MemoryDevice, ZeroFlags,
};

use crate::spill::SpillDevice;
use crate::stats::{Stats, StatsSnapshot};

/// Reservations are made in units of this many bytes.
const BLOCK: u64 = 4096;

/// A scratch disk's storage with flush/FUA dropped and every call counted.
#[derive(Debug)]
pub struct ScratchDevice {
    backend: Backend,
    stats: Stats,
    /// Held by every call that changes the disk, closed while a snapshot
    /// of it is taken, so that the snapshot holds each write whole or not
    /// at all.
    gate: WriteGate,
    /// The budgets this disk alone charges (within the server's), to move
    /// under an owner's shares.
    own: Budgets,
}

/// A budget per kind of storage: the server's, an owner's share of them,
/// or one disk's own.
#[derive(Debug, Clone, Default)]
pub struct Budgets {
    /// RAM (`--memory-limit`).
    pub memory: Option<Arc<Budget>>,
    /// Space of disk files (`--disk-limit`).
    pub disk: Option<Arc<Budget>>,
}

impl Budgets {
    /// Budgets of their own for one disk, each within one of `self` (a
    /// budget of its own even without one, when there is a `quota`), each
    /// at most `quota` bytes.
    pub fn for_one_disk(&self, quota: Option<u64>) -> Budgets {
        let limit = quota.unwrap_or(u64::MAX);
        let mine = |b: &Option<Arc<Budget>>| match b {
            Some(b) => Some(Arc::new(Budget::within(b.clone(), limit))),
            None => quota.map(|q| Arc::new(Budget::new(q))),
        };
        Budgets {
            memory: mine(&self.memory),
            disk: mine(&self.disk),
        }
    }

    /// Shares of `limits` bytes (memory, disk) within `self`; a share only
    /// where both a budget and a limit exist.
    pub fn shares(&self, memory: Option<u64>, disk: Option<u64>) -> Budgets {
        let share = |b: &Option<Arc<Budget>>, limit: Option<u64>| match (b, limit) {
            (Some(b), Some(limit)) => Some(Arc::new(Budget::within(b.clone(), limit))),
            _ => None,
        };
        Budgets {
            memory: share(&self.memory, memory),
            disk: share(&self.disk, disk),
        }
    }
}

/// Why a disk could not be moved under its owner's shares.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} share of this client is too small for a new disk: {source}")]
pub struct ClaimError {
    /// "memory" or "disk".
    pub kind: &'static str,
    pub source: NarrowError,
}

/// The device that holds a scratch disk's bytes.
#[derive(Debug)]
enum Backend {
    Memory(MemoryDevice),
    File(BudgetedFile),
    Spill(SpillDevice),
    /// A snapshot's contents, written privately into a blank backend of
    /// the disk's placement.
    Clone(Box<CloneDevice<Backend>>),
}

/// Runs `$body` with `$dev` bound to the backend as a `&dyn`-free reference.
macro_rules! delegate {
    ($self:expr, $dev:ident => $body:expr) => {
        match $self {
            Backend::Memory($dev) => $body,
            Backend::File($dev) => $body,
            Backend::Spill($dev) => $body,
            Backend::Clone($dev) => $body,
        }
    };
}

impl Backend {
    /// Memory or disk space it holds now (a clone: what it wrote itself).
    fn allocated_bytes(&self) -> u64 {
        match self {
            Backend::Memory(dev) => dev.allocated_bytes(),
            Backend::File(dev) => dev.allocated(),
            Backend::Spill(dev) => dev.allocated_bytes(),
            Backend::Clone(dev) => dev.private().allocated_bytes(),
        }
    }
}

impl BlockDevice for Backend {
    fn size(&self) -> u64 {
        delegate!(self, dev => dev.size())
    }

    fn capabilities(&self) -> Capabilities {
        delegate!(self, dev => dev.capabilities())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        delegate!(self, dev => dev.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        delegate!(self, dev => dev.write(offset, data, fua))
    }

    fn flush(&self) -> io::Result<()> {
        delegate!(self, dev => dev.flush())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        delegate!(self, dev => dev.trim(offset, len, fua))
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        delegate!(self, dev => dev.zero(offset, len, flags, fua))
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        delegate!(self, dev => dev.extents(offset, len, out))
    }

    fn read_to(
        &self,
        offset: u64,
        len: usize,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        delegate!(self, dev => dev.read_to(offset, len, sink))
    }

    fn write_from(
        &self,
        offset: u64,
        len: usize,
        src: &mut dyn io::Read,
        fua: bool,
    ) -> Option<io::Result<()>> {
        delegate!(self, dev => dev.write_from(offset, len, src, fua))
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        delegate!(self, dev => dev.cache(offset, len))
    }
}

impl ScratchDevice {
    /// A disk held in memory.
    pub fn memory(dev: MemoryDevice) -> Self {
        Self::with_backend(Backend::Memory(dev))
    }

    /// A disk held in a file.
    pub(crate) fn file(dev: BudgetedFile) -> Self {
        Self::with_backend(Backend::File(dev))
    }

    /// A disk in memory that spills to a file.
    pub(crate) fn spill(dev: SpillDevice) -> Self {
        Self::with_backend(Backend::Spill(dev))
    }

    fn with_backend(backend: Backend) -> Self {
        ScratchDevice {
            backend,
            stats: Stats::default(),
            gate: WriteGate::default(),
            own: Budgets::default(),
        }
    }

    /// An operator's image file (or block device), read-only, to take a
    /// snapshot of.
    ///
    /// # Errors
    ///
    /// When it cannot be opened.
    pub(crate) fn image(path: &std::path::Path) -> io::Result<ScratchDevice> {
        let dev = FileDevice::open(path, true)?;
        let inode = File::open(path)?;
        Ok(Self::file(BudgetedFile::new(dev, inode, None)?))
    }

    /// Turns this disk, blank and serving no one, into a clone of `base`
    /// that writes into it: its budgets are the clone's.
    ///
    /// # Errors
    ///
    /// `EINVAL` when the sizes differ.
    pub(crate) fn into_clone(self, base: Arc<Snapshot>) -> io::Result<ScratchDevice> {
        let clone = CloneDevice::new(base, self.backend)?;
        Ok(Self::with_backend(Backend::Clone(Box::new(clone))).charging(self.own))
    }

    /// A snapshot of the disk's contents, copied into `into` (a blank disk
    /// of the same size, whose budgets then hold the snapshot's bytes).
    /// Writes wait while it is taken, so it holds each whole or not at all.
    ///
    /// # Errors
    ///
    /// As for [`Snapshot::copy`]: `ENOSPC` when `into`'s budget is full.
    pub fn snapshot_into(&self, into: ScratchDevice) -> io::Result<Snapshot> {
        let _frozen = self.gate.freeze();
        Snapshot::copy(&self.backend, Box::new(into))
    }

    /// The snapshot the disk is a clone of, if it is one.
    pub fn base(&self) -> Option<&Arc<Snapshot>> {
        match &self.backend {
            Backend::Clone(dev) => Some(dev.snapshot()),
            _ => None,
        }
    }

    /// Records the disk's own budgets (those its backend charges), for
    /// [`claim`](Self::claim).
    pub(crate) fn charging(self, own: Budgets) -> Self {
        ScratchDevice { own, ..self }
    }

    /// Moves the disk's charges under an owner's `shares` (where both the
    /// disk and the owner have a budget of that kind). Call it before the
    /// disk serves anyone.
    ///
    /// # Errors
    ///
    /// When a share cannot hold what the disk already holds (its format).
    pub fn claim(&self, shares: &Budgets) -> Result<(), ClaimError> {
        let kinds = [
            ("memory", &self.own.memory, &shares.memory),
            ("disk", &self.own.disk, &shares.disk),
        ];
        for (kind, own, share) in kinds {
            if let (Some(own), Some(share)) = (own, share) {
                own.narrow(share)
                    .map_err(|source| ClaimError { kind, source })?;
            }
        }
        Ok(())
    }

    /// Memory or disk space the disk holds now.
    /// A clone counts only what it holds privately.
    pub fn allocated_bytes(&self) -> u64 {
        self.backend.allocated_bytes()
    }

    /// The I/O counters and the allocation; connection counts and age are
    /// the registry's to fill in.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            allocated_bytes: self.allocated_bytes(),
            shared_bytes: self.base().map_or(0, |b| b.data_bytes()),
            ..self.stats.snapshot()
        }
    }

    /// The disk's error replies by errno, which whoever answers its
    /// requests charges (the server's connections, through the exports
    /// layer).
    pub fn errors(&self) -> Arc<ErrorCounts> {
        self.stats.errors.clone()
    }

    fn drop_fua(&self, fua: bool) {
        if fua {
            self.stats
                .fua_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What a scratch disk advertises, given its backend's capabilities.
pub(crate) fn scratch_capabilities(backend: Capabilities) -> Capabilities {
    Capabilities {
        durable_flush: false,
        multi_conn: true,
        ..backend
    }
}

impl BlockDevice for ScratchDevice {
    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn capabilities(&self) -> Capabilities {
        scratch_capabilities(self.backend.capabilities())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.backend.read(offset, buf)?;
        self.stats.read.add(buf.len() as u64);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.drop_fua(fua);
        let _pass = self.gate.enter();
        self.backend.write(offset, data, false)?;
        self.stats.written.add(data.len() as u64);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.stats
            .flushes_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.drop_fua(fua);
        let _pass = self.gate.enter();
        self.backend.trim(offset, len, false)?;
        self.stats.trimmed.add(len);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        self.drop_fua(fua);
        let _pass = self.gate.enter();
        self.backend.zero(offset, len, flags, false)?;
        self.stats.zeroed.add(len);
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.backend.extents(offset, len, out)
    }

    fn read_to(
        &self,
        offset: u64,
        len: usize,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        let result = self.backend.read_to(offset, len, sink)?;
        if result.is_ok() {
            self.stats.read.add(len as u64);
        }
        Some(result)
    }

    fn write_from(
        &self,
        offset: u64,
        len: usize,
        src: &mut dyn io::Read,
        fua: bool,
    ) -> Option<io::Result<()>> {
        let _pass = self.gate.enter();
        let result = self.backend.write_from(offset, len, src, false)?;
        self.drop_fua(fua);
        if result.is_ok() {
            self.stats.written.add(len as u64);
        }
        Some(result)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.backend.cache(offset, len)
    }
}

/// A [`FileDevice`] whose allocation is charged to a shared [`Budget`] (see
/// the [module documentation](self)).
#[derive(Debug)]
pub(crate) struct BudgetedFile {
    dev: FileDevice,
    /// The same file, kept for `fstat`.
    inode: File,
    budget: Option<Arc<Budget>>,
    charge: Mutex<Charge>,
}

/// Bytes this file holds in its budget.
#[derive(Debug, Default)]
struct Charge {
    /// Everything held.
    held: u64,
    /// The part reserved by calls still running.
    pending: u64,
}

impl BudgetedFile {
    /// Wraps `dev`, whose file is also open as `inode`, charging its current
    /// allocation to `budget`.
    ///
    /// # Errors
    ///
    /// `ENOSPC` when the budget cannot hold what the file already uses.
    pub(crate) fn new(
        dev: FileDevice,
        inode: File,
        budget: Option<Arc<Budget>>,
    ) -> io::Result<Self> {
        let file = BudgetedFile {
            dev,
            inode,
            budget,
            charge: Mutex::new(Charge::default()),
        };
        if let Some(budget) = &file.budget {
            let used = file.allocated();
            if !budget.try_reserve(used) {
                return Err(enospc());
            }
            file.lock().held = used;
        }
        Ok(file)
    }

    /// Bytes the file system has allocated to the file.
    pub(crate) fn allocated(&self) -> u64 {
        rustix::fs::fstat(&self.inode).map_or(0, |st| st.st_blocks as u64 * 512)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Charge> {
        sync::lock(&self.charge)
    }

    /// Runs `op`, which may allocate up to `[offset, offset + len)`, within
    /// the budget.
    fn charged(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(budget) = &self.budget else {
            return op();
        };
        let mut estimate = blocks_spanned(offset, len);
        if !budget.try_reserve(estimate) {
            // Near the limit: only holes can grow the file.
            estimate = self.hole_bytes(offset, len)?;
            if !budget.try_reserve(estimate) {
                return Err(enospc());
            }
        }
        {
            let mut c = self.lock();
            c.held += estimate;
            c.pending += estimate;
        }
        let result = op();
        let mut c = self.lock();
        c.pending -= estimate;
        self.reconcile(budget, &mut c);
        result
    }

    /// Sets the charge to the file's allocation plus pending reservations.
    fn reconcile(&self, budget: &Budget, c: &mut Charge) {
        let target = self.allocated() + c.pending;
        if c.held > target {
            budget.release(c.held - target);
            c.held = target;
        } else if c.held < target && budget.try_reserve(target - c.held) {
            // The file system allocated more than the data (metadata).
            c.held = target;
        }
    }

    /// Bytes of `[offset, offset + len)` in holes, in whole blocks.
    fn hole_bytes(&self, offset: u64, len: u64) -> io::Result<u64> {
        let mut extents = Vec::new();
        self.dev.extents(offset, len, &mut extents)?;
        let mut pos = offset;
        let mut holes = 0;
        for e in extents {
            if e.kind == ExtentKind::Hole {
                holes += blocks_spanned(pos, e.len);
            }
            pos += e.len;
        }
        Ok(holes)
    }

    /// Gives back what a trim or a hole-punching zero freed.
    fn after_free(&self, result: io::Result<()>) -> io::Result<()> {
        if let Some(budget) = &self.budget {
            self.reconcile(budget, &mut self.lock());
        }
        result
    }
}

impl Drop for BudgetedFile {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.lock().held);
        }
    }
}

impl BlockDevice for BudgetedFile {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn capabilities(&self) -> Capabilities {
        self.dev.capabilities()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dev.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.charged(offset, data.len() as u64, || {
            self.dev.write(offset, data, fua)
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.dev.flush()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.after_free(self.dev.trim(offset, len, fua))
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()> {
        if flags.may_trim {
            self.after_free(self.dev.zero(offset, len, flags, fua))
        } else {
            self.charged(offset, len, || self.dev.zero(offset, len, flags, fua))
        }
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        self.dev.extents(offset, len, out)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev.cache(offset, len)
    }
}

/// Bytes of the 4 KiB blocks that `[offset, offset + len)` touches.
fn blocks_spanned(offset: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = offset / BLOCK;
    let end = offset.saturating_add(len).div_ceil(BLOCK);
    (end - first) * BLOCK
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_and_fua_are_dropped_and_counted() {
        let dev = ScratchDevice::memory(MemoryDevice::new(1 << 20).unwrap());
        let caps = dev.capabilities();
        assert!(caps.multi_conn && !caps.durable_flush);
        dev.write(0, &[1; 4096], true).unwrap();
        dev.write(8192, &[2; 100], false).unwrap();
        dev.flush().unwrap();
        dev.trim(0, 4096, true).unwrap();
        dev.zero(0, 10, ZeroFlags::default(), false).unwrap();
        let mut buf = [0u8; 100];
        dev.read(8192, &mut buf).unwrap();
        // The zero-copy paths are delegated and counted too.
        let mut src: &[u8] = &[5; 4096];
        dev.write_from(16384, 4096, &mut src, true)
            .unwrap()
            .unwrap();
        let mut seen = 0;
        dev.read_to(16384, 4096, &mut |b| {
            seen += b.iter().filter(|&&x| x == 5).count();
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(seen, 4096);
        let s = dev.stats();
        assert_eq!((s.io.writes, s.io.written_bytes), (3, 8292));
        assert_eq!((s.io.reads, s.io.read_bytes), (2, 4196));
        assert_eq!(
            (
                s.io.trims,
                s.io.trimmed_bytes,
                s.io.zeroes,
                s.io.zeroed_bytes
            ),
            (1, 4096, 1, 10)
        );
        assert_eq!((s.io.flushes_dropped, s.io.fua_dropped), (1, 3));
        assert_eq!(s.allocated_bytes, dev.allocated_bytes());
    }

    #[test]
    fn budgeted_file_refuses_writes_past_its_budget_and_refunds_trims() {
        let dir = tempfile::tempdir().unwrap();
        let inode = tempfile::tempfile_in(dir.path()).unwrap();
        inode.set_len(16 << 20).unwrap();
        let path = crate::disk::proc_path(&inode);
        let budget = Arc::new(Budget::new(1 << 20));
        let dev = BudgetedFile::new(
            FileDevice::open(&path, false).unwrap(),
            inode,
            Some(budget.clone()),
        )
        .unwrap();
        dev.write(0, &vec![1; 512 << 10], false).unwrap();
        assert!(budget.used() >= 512 << 10 && budget.used() <= 1 << 20);
        // Overwrites need no new space even at the limit.
        dev.write(0, &vec![2; 512 << 10], false).unwrap();
        let err = dev.write(4 << 20, &vec![3; 1 << 20], false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        dev.trim(0, 512 << 10, false).unwrap();
        assert_eq!(budget.used(), dev.allocated());
        dev.write(4 << 20, &vec![3; 768 << 10], false).unwrap();
        drop(dev);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn blocks() {
        assert_eq!(blocks_spanned(0, 0), 0);
        assert_eq!(blocks_spanned(0, 1), 4096);
        assert_eq!(blocks_spanned(4095, 2), 8192);
        assert_eq!(blocks_spanned(4096, 4096), 4096);
    }
}
