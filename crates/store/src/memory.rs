//! A sparse in-memory disk shared by every connection.
//!
//! # Design
//!
//! The disk's bytes live in one private anonymous mapping of its size, made
//! with `MAP_NORESERVE`. The kernel supplies sparseness: a page costs nothing
//! until it is first written, and `MADV_DONTNEED` hands it back at once and
//! makes it read as zeros again, which is exactly what trim needs. Transparent
//! huge pages are switched off for the mapping so that a 4 KiB write costs
//! 4 KiB of memory rather than 2 MiB, which keeps the [`Budget`] honest.
//!
//! Beside the mapping, an allocation bitmap holds one bit per block: 4 KiB, or
//! the system page size where that is larger, because `madvise` works on whole
//! pages. Reads of unallocated blocks are answered with zeros without touching
//! the mapping (a touch would fault a page in), and `extents` comes straight
//! from the bitmap. The bitmap has two levels: a fixed array of pointers to
//! leaves of 512 `AtomicU64` words (32768 blocks, 128 MiB of disk each). A
//! leaf is created by the first write under it and published with a
//! compare-and-swap, so a 2 TiB disk that is never written costs 128 KiB of
//! pointers.
//!
//! Nothing on the data path takes a lock. Bitmap words change only through
//! atomic read-modify-write operations, and data moves with plain memory
//! copies, so requests on disjoint ranges run in parallel on every core.
//!
//! # Accounting
//!
//! [`MemoryDevice::allocated_bytes`] and the optional shared [`Budget`] count
//! allocated blocks. Each call counts only the bits that its own
//! compare-and-swap set or its own `fetch_and` cleared, so no interleaving can
//! make the counts drift. Charges are made before a bit is set and refunds
//! after it is cleared (the bit operations order the counter updates), so
//! neither counter ever drops below the true value and neither can underflow;
//! once calls have finished, both are exact.
//!
//! # Overlapping requests
//!
//! NBD leaves the outcome of concurrent overlapping requests unspecified; this
//! backend guarantees only that such requests cannot corrupt its bookkeeping.
//! Overlapping copies may mix bytes from both requests. A write racing a trim
//! of the same block can also copy its data into the block after the trim
//! cleared the block's bit. The block then reads as zeros, which is one of the
//! outcomes NBD allows. The bytes stay in the mapping, unaccounted (one block
//! per such race), until the block is allocated and trimmed again or the disk
//! is dropped, and a later partial write to the block makes them visible
//! again. They are the same client's bytes from a request whose result was
//! unspecified, so nothing leaks between clients or disks. Ruling this out
//! would need a lock or a sequence count per block on every write, which is
//! the cost this design exists to avoid.

use std::fmt;
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::mm::{self, Advice, MapFlags, ProtFlags};

use crate::{
    block_runs, check_range, push_extent, BlockDevice, Capabilities, Extent, ExtentKind, ZeroFlags,
};

/// Smallest allocation block; the system page size is used where larger.
const MIN_BLOCK_SIZE: u64 = 4096;
/// Writes that allocate at least this much have their pages faulted in
/// ahead of the copy.
const PREFAULT_MIN: u64 = 64 * 1024;
/// Zeros handed out for unallocated ranges by `read_to`.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
/// Bitmap words per leaf.
const LEAF_WORDS: usize = 512;
/// Blocks covered by one leaf.
const LEAF_BLOCKS: u64 = LEAF_WORDS as u64 * 64;

/// A byte budget shared by several [`MemoryDevice`]s, capping the memory that
/// all of them together may hold.
///
/// Devices reserve the bytes of each block before they allocate it and release
/// them when the block is trimmed or the device is dropped.
///
/// Budgets nest: one made [`within`](Budget::within) another is a part of
/// it, and every byte taken from the part is taken from the whole too, so a
/// reservation succeeds only when it fits at every level. Scratch disks use
/// this for per-owner shares: each disk charges a budget of its own, which
/// sits within the server's budget and, once the disk has an owner, within
/// that owner's share ([`narrow`](Budget::narrow)).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    /// The budget this one is part of, charged along with it.
    parent: Option<Arc<Budget>>,
    /// A part of `parent` that takes its place once set (see
    /// [`Budget::narrow`]); set at most once, so reading it needs no lock.
    narrowed: OnceLock<Arc<Budget>>,
}

/// Why [`Budget::narrow`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarrowError {
    /// The share is not a part of this budget's parent, or this budget
    /// was narrowed before: a caller bug.
    #[error("the share is not within this budget's parent, or the budget was narrowed before")]
    NotWithin,
    /// The share cannot take what this budget already holds.
    #[error("{needed} bytes do not fit in a share with {available} left")]
    Full { needed: u64, available: u64 },
}

impl Budget {
    /// A budget of `limit_bytes`, none of it used.
    pub fn new(limit_bytes: u64) -> Self {
        Self {
            limit: limit_bytes,
            used: AtomicU64::new(0),
            parent: None,
            narrowed: OnceLock::new(),
        }
    }

    /// A budget of `limit_bytes` that is a part of `parent`: whatever it
    /// reserves, `parent` must have room for too.
    pub fn within(parent: Arc<Budget>, limit_bytes: u64) -> Self {
        Self {
            parent: Some(parent),
            ..Self::new(limit_bytes)
        }
    }

    /// The budget charged along with this one, if any.
    fn up(&self) -> Option<&Budget> {
        self.narrowed.get().or(self.parent.as_ref()).map(|b| &**b)
    }

    /// Takes `n` bytes if the total stays within the limit, here and in
    /// every budget this one is part of; returns whether it did. No total
    /// ever exceeds its limit, whatever the concurrency.
    pub fn try_reserve(&self, n: u64) -> bool {
        // Writes to allocated blocks reserve nothing; they must not contend
        // for the shared counter.
        if n == 0 {
            return true;
        }
        if !self.take_here(n) {
            return false;
        }
        if let Some(up) = self.up() {
            if !up.try_reserve(n) {
                self.release_here(n);
                return false;
            }
        }
        true
    }

    /// [`Budget::try_reserve`] on this level only.
    fn take_here(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken with [`Budget::try_reserve`], here and in
    /// every budget this one is part of. Giving back more than is held is a
    /// caller bug; the count then stops at zero.
    pub fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.release_here(n);
        if let Some(up) = self.up() {
            up.release(n);
        }
    }

    fn release_here(&self, n: u64) {
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most that may be reserved at once.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes that could be reserved now: the least room left at any level.
    pub fn available(&self) -> u64 {
        let here = self.limit.saturating_sub(self.used());
        self.up().map_or(here, |up| here.min(up.available()))
    }

    /// Moves this budget under `share`, a part of its parent (made with
    /// [`Budget::within`] the same parent): what it holds now is charged to
    /// `share` (the parent holds it already), and from now on everything it
    /// reserves or releases goes through `share`. Scratch disks use it when
    /// a disk made in advance gets its owner.
    ///
    /// Call it before the budget's device serves requests: a reservation
    /// made while the budget moves may be charged to the parent only.
    ///
    /// # Errors
    ///
    /// [`NarrowError::Full`] when `share` has no room for what this budget
    /// holds (nothing changes then), [`NarrowError::NotWithin`] when `share`
    /// is not a part of this budget's parent or this budget moved before.
    pub fn narrow(&self, share: &Arc<Budget>) -> Result<(), NarrowError> {
        let same_parent = match (&self.parent, &share.parent) {
            (Some(mine), Some(its)) => Arc::ptr_eq(mine, its),
            _ => false,
        };
        if !same_parent || self.narrowed.get().is_some() {
            return Err(NarrowError::NotWithin);
        }
        let needed = self.used();
        if !share.take_here(needed) {
            return Err(NarrowError::Full {
                needed,
                available: share.limit.saturating_sub(share.used()),
            });
        }
        if self.narrowed.set(share.clone()).is_err() {
            share.release_here(needed);
            return Err(NarrowError::NotWithin);
        }
        Ok(())
    }
}

/// A sparse disk held in memory, shared by every connection to its export.
///
/// See the [module documentation](self) for the design.
pub struct MemoryDevice {
    size: u64,
    /// log2 of the block size.
    block_shift: u32,
    map: Mapping,
    bitmap: Bitmap,
    /// Bytes of allocated blocks.
    allocated: AtomicU64,
    budget: Option<Arc<Budget>>,
}

impl fmt::Debug for MemoryDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDevice")
            .field("size", &self.size)
            .field("block_size", &self.block_size())
            .field("allocated_bytes", &self.allocated_bytes())
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl MemoryDevice {
    /// A zero-filled disk of `size` bytes that holds no memory until written.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when `size` does not fit in the
    /// address space, or the error of `mmap`.
    pub fn new(size: u64) -> io::Result<Self> {
        Self::build(size, None)
    }

    /// Like [`MemoryDevice::new`], but every allocated block is charged to
    /// `budget`: writes that would exceed it fail with `ENOSPC`.
    ///
    /// # Errors
    ///
    /// As for [`MemoryDevice::new`].
    pub fn with_budget(size: u64, budget: Arc<Budget>) -> io::Result<Self> {
        Self::build(size, Some(budget))
    }

    fn build(size: u64, budget: Option<Arc<Budget>>) -> io::Result<Self> {
        let block_size = allocation_block_size();
        let map_len = size
            .checked_next_multiple_of(block_size)
            .and_then(|len| usize::try_from(len).ok())
            .filter(|&len| len <= isize::MAX as usize)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a memory disk of {size} bytes does not fit in the address space"),
                )
            })?;
        let block_shift = block_size.trailing_zeros();
        Ok(Self {
            size,
            block_shift,
            bitmap: Bitmap::new(map_len as u64 >> block_shift),
            map: Mapping::new(map_len)?,
            allocated: AtomicU64::new(0),
            budget,
        })
    }

    /// Bytes of memory the disk holds: allocated blocks times the block size.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// The allocation granularity: 4 KiB, or the system page size if larger.
    /// Trims and extents are exact only at this granularity.
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// Number of the block holding byte `offset`.
    fn block_of(&self, offset: u64) -> u64 {
        offset >> self.block_shift
    }

    /// Number of the first block that starts at or after `offset`.
    fn block_after(&self, offset: u64) -> u64 {
        offset.div_ceil(self.block_size())
    }

    fn block_start(&self, block: u64) -> u64 {
        block << self.block_shift
    }

    /// The blocks wholly inside `[offset, end)`, as a range that may be empty.
    /// The last block counts as whole when the range reaches the end of the
    /// disk, since its bytes past the end are never seen.
    fn whole_blocks(&self, offset: u64, end: u64) -> (u64, u64) {
        let last = if end == self.size {
            self.block_after(end)
        } else {
            self.block_of(end)
        };
        (self.block_after(offset), last)
    }

    /// Pointer to byte `offset` of the mapping; in bounds for `offset <= size`.
    fn at(&self, offset: u64) -> *mut u8 {
        // `offset <= size <= map.len`, so the conversion is lossless.
        self.map.base.wrapping_add(offset as usize)
    }

    /// Splits `[start, end)` into maximal runs of allocated or unallocated
    /// blocks, clipped to the range: `(run start, run end, allocated)`.
    fn runs(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        block_runs(start, end, self.block_shift, |block, end_block| {
            self.bitmap.run(block, end_block)
        })
    }

    fn reserve(&self, bytes: u64) -> bool {
        match &self.budget {
            Some(budget) => budget.try_reserve(bytes),
            None => true,
        }
    }

    fn refund(&self, bytes: u64) {
        if let Some(budget) = &self.budget {
            budget.release(bytes);
        }
    }

    /// Marks blocks `[first, end)` allocated, charging the budget for the ones
    /// that were not.
    ///
    /// Fails with `ENOSPC`, changing nothing, when the budget cannot cover
    /// them. (Only if a concurrent trim frees some of the blocks after they
    /// were counted, and the budget is then exhausted by someone else, can it
    /// fail after allocating some blocks; those still read as before.)
    ///
    /// Returns the bytes of the blocks this call allocated.
    fn allocate(&self, first: u64, end: u64) -> io::Result<u64> {
        let mut allocated_here = 0;
        // Bytes reserved from the budget and not yet matched by a set bit.
        let mut held = 0;
        if self.budget.is_some() {
            held = self.block_start(self.bitmap.count_clear(first, end));
            if !self.reserve(held) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let mut result = Ok(());
        'spans: for (leaf_index, lo, hi) in leaf_spans(first, end) {
            let leaf = self.bitmap.leaf_or_insert(leaf_index);
            for (word_index, mask) in word_masks(lo, hi) {
                let word = &leaf.words[word_index];
                let mut current = word.load(Ordering::Relaxed);
                loop {
                    let new = mask & !current;
                    if new == 0 {
                        break;
                    }
                    let bytes = self.block_start(u64::from(new.count_ones()));
                    // Charge before setting the bits, so that a trim clearing
                    // them at once never refunds more than was charged.
                    if bytes > held {
                        // Without a budget this reserves nothing. With one,
                        // `held` covers these blocks unless a concurrent trim
                        // freed some after they were counted.
                        if !self.reserve(bytes - held) {
                            result = Err(io::Error::from_raw_os_error(libc::ENOSPC));
                            break 'spans;
                        }
                        held = bytes;
                    }
                    self.allocated.fetch_add(bytes, Ordering::Relaxed);
                    match word.compare_exchange_weak(
                        current,
                        current | new,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            held -= bytes;
                            allocated_here += bytes;
                            break;
                        }
                        Err(actual) => {
                            self.allocated.fetch_sub(bytes, Ordering::Relaxed);
                            current = actual;
                        }
                    }
                }
            }
        }
        self.refund(held);
        result.map(|()| allocated_here)
    }

    /// Before a write fills `[offset, end)`, of which `new_bytes` were just
    /// allocated: when that is a lot, faults the pages in with one system
    /// call rather than one page fault per 4 KiB during the copy (first
    /// touch dominates the cost of writing fresh memory).
    fn prefault(&self, offset: u64, end: u64, new_bytes: u64) {
        if new_bytes < PREFAULT_MIN {
            return;
        }
        // Whole blocks only; blocks are whole pages (see `discard`).
        let start = self.block_start(self.block_after(offset));
        let stop = self.block_start(self.block_of(end));
        if start < stop {
            // SAFETY: `[start, stop)` is whole pages inside the mapping.
            // MADV_POPULATE_WRITE only faults them in (zero-filled if new);
            // it changes no byte. Failure (an old kernel) just skips it.
            let _ = unsafe {
                mm::madvise(
                    self.at(start).cast(),
                    (stop - start) as usize,
                    Advice::LinuxPopulateWrite,
                )
            };
        }
    }

    /// Marks blocks `[first, end)` unallocated and gives their memory back to
    /// the system, then refunds the budget.
    fn deallocate(&self, first: u64, end: u64) -> io::Result<()> {
        let mut cleared_blocks = 0;
        // From the first to the last block this call cleared. Blocks between
        // them that were not allocated are released too, which costs the
        // kernel little (it skips unpopulated page tables) and saves a system
        // call per allocated run.
        let mut span: Option<(u64, u64)> = None;
        for (leaf_index, lo, hi) in leaf_spans(first, end) {
            let Some(leaf) = self.bitmap.leaf(leaf_index) else {
                continue;
            };
            let leaf_base = leaf_index as u64 * LEAF_BLOCKS;
            for (word_index, mask) in word_masks(lo, hi) {
                let word = &leaf.words[word_index];
                // A plain load first spares unallocated words a cache-line
                // write, which other cores would otherwise have to fetch back.
                if word.load(Ordering::Relaxed) & mask == 0 {
                    continue;
                }
                let cleared = word.fetch_and(!mask, Ordering::AcqRel) & mask;
                if cleared == 0 {
                    continue;
                }
                cleared_blocks += u64::from(cleared.count_ones());
                let word_base = leaf_base + word_index as u64 * 64;
                let lo = word_base + u64::from(cleared.trailing_zeros());
                let hi = word_base + 64 - u64::from(cleared.leading_zeros());
                span = Some(span.map_or((lo, hi), |(start, _)| (start, hi)));
            }
        }
        let result = match span {
            Some((lo, hi)) => self.discard(lo, hi),
            None => Ok(()),
        };
        let bytes = self.block_start(cleared_blocks);
        self.allocated.fetch_sub(bytes, Ordering::Relaxed);
        self.refund(bytes);
        result
    }

    /// Drops the pages of blocks `[first, end)`: they read as zeros after.
    fn discard(&self, first: u64, end: u64) -> io::Result<()> {
        let start = self.block_start(first);
        let len = self.block_start(end - first) as usize;
        // SAFETY: blocks start on page boundaries (the block size is a multiple
        // of the page size and the mapping is page aligned), and block numbers
        // stay below `map.len / block_size`, so the range is whole pages of our
        // own private anonymous mapping. MADV_DONTNEED only replaces their
        // contents with zeros; no Rust reference into the mapping exists.
        unsafe { mm::madvise(self.at(start).cast(), len, Advice::LinuxDontNeed) }?;
        Ok(())
    }

    /// Writes zeros over `[start, end)` where it lies in allocated blocks; an
    /// empty or reversed range does nothing.
    fn zero_allocated(&self, start: u64, end: u64) {
        for (start, stop, allocated) in self.runs(start, end) {
            if allocated {
                self.fill_zeros(start, stop);
            }
        }
    }

    /// Writes zeros over `[start, end)`; an empty or reversed range does nothing.
    fn fill_zeros(&self, start: u64, end: u64) {
        if start < end {
            // SAFETY: callers pass ranges within `[0, size]`, which lies in the
            // mapping. Other threads touch these bytes only for overlapping
            // requests, whose result NBD leaves unspecified; a byte has no
            // invalid values, so the worst outcome is mixed data.
            unsafe { ptr::write_bytes(self.at(start), 0, (end - start) as usize) };
        }
    }

    /// Makes `[offset, end)` read as zeros, freeing every whole block in it.
    fn punch(&self, offset: u64, end: u64) -> io::Result<()> {
        self.zero_by_blocks(
            offset,
            end,
            |start, stop| self.zero_allocated(start, stop),
            |first, last| self.deallocate(first, last),
        )
    }

    /// Makes `[offset, end)` read as zeros and allocated.
    fn zero_allocate(&self, offset: u64, end: u64) -> io::Result<()> {
        if offset == end {
            return Ok(());
        }
        self.allocate(self.block_of(offset), self.block_after(end))?;
        self.zero_by_blocks(
            offset,
            end,
            |start, stop| self.fill_zeros(start, stop),
            // Whole blocks stay allocated but need no memory until written.
            |first, last| self.discard(first, last),
        )
    }

    /// Zeros `[offset, end)` in two parts: `partial` zeros the bytes before
    /// the first and after the last whole block (two ranges, either may be
    /// empty), then `whole` the whole blocks `[first, last)`, if there are any.
    fn zero_by_blocks(
        &self,
        offset: u64,
        end: u64,
        partial: impl Fn(u64, u64),
        whole: impl FnOnce(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let (first, last) = self.whole_blocks(offset, end);
        let head_end = self.block_start(first).min(end);
        partial(offset, head_end);
        partial(self.block_start(last).max(head_end), end);
        if first < last {
            whole(first, last)?;
        }
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            durable_flush: false,
            trim: true,
            fast_zero: true,
            multi_conn: true,
            may_block: false,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = check_range(self.size, offset, buf.len() as u64)?;
        for (start, stop, allocated) in self.runs(offset, end) {
            let chunk = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if allocated {
                // SAFETY: `[start, stop)` lies within `[0, size]`, inside the
                // mapping, and `chunk` is a distinct Rust buffer of the same
                // length. Concurrent writers touch these bytes only for
                // overlapping requests (see `fill_zeros`).
                unsafe {
                    ptr::copy_nonoverlapping(self.at(start), chunk.as_mut_ptr(), chunk.len())
                };
            } else {
                chunk.fill(0);
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let end = check_range(self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let new_bytes = self.allocate(self.block_of(offset), self.block_after(end))?;
        self.prefault(offset, end, new_bytes);
        // SAFETY: `[offset, end)` lies within `[0, size]`, inside the mapping,
        // and `data` is a distinct Rust buffer. Concurrent readers and writers
        // touch these bytes only for overlapping requests (see `fill_zeros`).
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.at(offset), data.len()) };
        Ok(())
    }

    fn read_to(
        &self,
        offset: u64,
        len: usize,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        Some((|| {
            let end = check_range(self.size, offset, len as u64)?;
            for (start, stop, allocated) in self.runs(offset, end) {
                if allocated {
                    // SAFETY: `[start, stop)` lies within `[0, size]`, inside
                    // the mapping, which lives as long as `self`. The slice is
                    // only copied out (to a buffer or the kernel) before this
                    // call returns; other threads write these bytes only for
                    // overlapping requests (see `fill_zeros`).
                    let bytes = unsafe {
                        std::slice::from_raw_parts(self.at(start), (stop - start) as usize)
                    };
                    sink(bytes)?;
                } else {
                    let mut left = stop - start;
                    while left > 0 {
                        let n = left.min(ZEROES.len() as u64) as usize;
                        sink(&ZEROES[..n])?;
                        left -= n as u64;
                    }
                }
            }
            Ok(())
        })())
    }

    fn write_from(
        &self,
        offset: u64,
        len: usize,
        src: &mut dyn io::Read,
        _fua: bool,
    ) -> Option<io::Result<()>> {
        Some((|| {
            let end = check_range(self.size, offset, len as u64)?;
            if len == 0 {
                return Ok(());
            }
            let new_bytes = self.allocate(self.block_of(offset), self.block_after(end))?;
            self.prefault(offset, end, new_bytes);
            let mut at = offset;
            while at < end {
                // SAFETY: `[at, end)` lies within `[0, size]`, inside the
                // mapping, and the slice does not outlive this iteration. Only
                // `src` writes into it (the kernel, for a socket); other
                // threads touch these bytes only for overlapping requests
                // (see `fill_zeros`).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(self.at(at), (end - at) as usize) };
                match src.read(dst) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => at += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let end = check_range(self.size, offset, len)?;
        self.punch(offset, end)
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, _fua: bool) -> io::Result<()> {
        let end = check_range(self.size, offset, len)?;
        if flags.may_trim {
            self.punch(offset, end)
        } else {
            self.zero_allocate(offset, end)
        }
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = check_range(self.size, offset, len)?;
        let first = out.len();
        for (start, stop, allocated) in self.runs(offset, end) {
            let kind = if allocated {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            push_extent(out, first, stop - start, kind);
        }
        Ok(())
    }
}

impl Drop for MemoryDevice {
    fn drop(&mut self) {
        // No call is running, so the count is exact.
        let held = *self.allocated.get_mut();
        self.refund(held);
    }
}

/// The block size of every [`MemoryDevice`]: 4 KiB, or the system page
/// size where that is larger. Copy-on-write clones use it too, so that a
/// clone's private blocks are its memory device's blocks.
pub(crate) fn allocation_block_size() -> u64 {
    system_page_size().max(MIN_BLOCK_SIZE)
}

/// The system page size, or 0 if it cannot be known.
fn system_page_size() -> u64 {
    // SAFETY: sysconf only reads a system parameter.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(0)
}

/// The private anonymous mapping that holds a device's bytes.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value. Shared access goes
// through raw pointers only, and `MemoryDevice` confines concurrent access to
// the same bytes to overlapping requests, whose outcome NBD leaves unspecified.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes, or nothing at all when `len` is 0.
    fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                base: ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        // SAFETY: a new anonymous mapping at an address the kernel picks
        // cannot alias any existing memory.
        let base = unsafe {
            mm::mmap_anonymous(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        // Best effort: a kernel without transparent huge pages refuses the
        // advice, and then there is nothing to switch off.
        // SAFETY: `[base, base + len)` is the mapping just made.
        let _ = unsafe { mm::madvise(base, len, Advice::LinuxNoHugepage) };
        Ok(Self {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `[base, base + len)` is the mapping made in `new`, and no
        // pointer into it outlives `self`.
        if let Err(err) = unsafe { mm::munmap(self.base.cast(), self.len) } {
            tracing::warn!("munmap of a {}-byte memory disk failed: {err}", self.len);
        }
    }
}

/// One bit per block, set when the block is allocated (for a memory
/// device) or no longer shared with a snapshot (for a clone).
pub(crate) struct Bitmap {
    /// Null until the first allocation under the leaf; then owned by `self`.
    leaves: Box<[AtomicPtr<Leaf>]>,
}

/// Bits for [`LEAF_BLOCKS`] consecutive blocks; bit `i % 64` of word `i / 64`
/// is block `i` of the leaf.
struct Leaf {
    words: [AtomicU64; LEAF_WORDS],
}

impl Bitmap {
    pub(crate) fn new(blocks: u64) -> Self {
        let leaves = blocks.div_ceil(LEAF_BLOCKS);
        Self {
            leaves: (0..leaves)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
        }
    }

    fn leaf(&self, index: usize) -> Option<&Leaf> {
        let leaf = self.leaves[index].load(Ordering::Acquire);
        // SAFETY: a non-null pointer in `leaves` came from `Box::into_raw` in
        // `leaf_or_insert` and was published with release ordering (paired
        // with the acquire load above); it is freed only in `drop`, which
        // needs `&mut self`, so it outlives this borrow.
        unsafe { leaf.as_ref() }
    }

    fn leaf_or_insert(&self, index: usize) -> &Leaf {
        if let Some(leaf) = self.leaf(index) {
            return leaf;
        }
        let new = Box::into_raw(Box::new(Leaf {
            words: [const { AtomicU64::new(0) }; LEAF_WORDS],
        }));
        match self.leaves[index].compare_exchange(
            ptr::null_mut(),
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            // SAFETY: `new` is now published in `leaves` and, like every leaf
            // there, lives until `drop`.
            Ok(_) => unsafe { &*new },
            Err(existing) => {
                // SAFETY: `new` came from `Box::into_raw` above and was never
                // shared, so this is its only owner.
                drop(unsafe { Box::from_raw(new) });
                // SAFETY: `existing` is non-null (the exchange failed), was
                // published by another thread with release ordering (paired
                // with the acquire failure ordering), and lives until `drop`.
                unsafe { &*existing }
            }
        }
    }

    /// Sets the bits of blocks `[first, end)`, whatever they were.
    pub(crate) fn set_range(&self, first: u64, end: u64) {
        for (leaf_index, lo, hi) in leaf_spans(first, end) {
            let leaf = self.leaf_or_insert(leaf_index);
            for (word_index, mask) in word_masks(lo, hi) {
                leaf.words[word_index].fetch_or(mask, Ordering::AcqRel);
            }
        }
    }

    /// Whether `block` is allocated.
    pub(crate) fn is_set(&self, block: u64) -> bool {
        let local = block % LEAF_BLOCKS;
        self.leaf((block / LEAF_BLOCKS) as usize)
            .is_some_and(|leaf| {
                leaf.words[(local / 64) as usize].load(Ordering::Acquire) >> (local % 64) & 1 == 1
            })
    }

    /// Number of unallocated blocks in `[first, end)`.
    fn count_clear(&self, first: u64, end: u64) -> u64 {
        leaf_spans(first, end)
            .map(|(leaf_index, lo, hi)| match self.leaf(leaf_index) {
                None => hi - lo,
                Some(leaf) => word_masks(lo, hi)
                    .map(|(word_index, mask)| {
                        let word = leaf.words[word_index].load(Ordering::Relaxed);
                        u64::from((mask & !word).count_ones())
                    })
                    .sum(),
            })
            .sum()
    }

    /// The state of block `start` and the end of the run of blocks in that
    /// state, at most `end` (which must exceed `start`). Skips whole words,
    /// and whole missing leaves, at a time.
    pub(crate) fn run(&self, start: u64, end: u64) -> (bool, u64) {
        let allocated = self.is_set(start);
        // XOR with this turns the blocks in the other state into set bits.
        let flip = if allocated { u64::MAX } else { 0 };
        let mut pos = start + 1;
        while pos < end {
            let leaf_index = pos / LEAF_BLOCKS;
            let leaf_end = ((leaf_index + 1) * LEAF_BLOCKS).min(end);
            let Some(leaf) = self.leaf(leaf_index as usize) else {
                if allocated {
                    return (allocated, pos);
                }
                pos = leaf_end;
                continue;
            };
            while pos < leaf_end {
                let bit = pos % 64;
                let word = leaf.words[(pos % LEAF_BLOCKS / 64) as usize].load(Ordering::Acquire);
                let other = (word ^ flip) >> bit;
                if other != 0 {
                    return (
                        allocated,
                        (pos + u64::from(other.trailing_zeros())).min(end),
                    );
                }
                pos += 64 - bit;
            }
        }
        (allocated, end)
    }
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        for leaf in self.leaves.iter_mut() {
            let leaf = *leaf.get_mut();
            if !leaf.is_null() {
                // SAFETY: non-null leaves came from `Box::into_raw` and are
                // owned by the bitmap; `&mut self` rules out other users.
                drop(unsafe { Box::from_raw(leaf) });
            }
        }
    }
}

/// Splits blocks `[first, end)` by leaf: `(leaf index, first block within the
/// leaf, end block within the leaf)`.
fn leaf_spans(first: u64, end: u64) -> impl Iterator<Item = (usize, u64, u64)> {
    let mut pos = first;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let leaf_index = pos / LEAF_BLOCKS;
        let leaf_start = leaf_index * LEAF_BLOCKS;
        let stop = (leaf_start + LEAF_BLOCKS).min(end);
        let span = (leaf_index as usize, pos - leaf_start, stop - leaf_start);
        pos = stop;
        Some(span)
    })
}

/// Splits the blocks `[lo, hi)` of one leaf by word: `(word index, mask of the
/// range's bits in that word)`.
fn word_masks(lo: u64, hi: u64) -> impl Iterator<Item = (usize, u64)> {
    let words = if lo < hi {
        lo / 64..hi.div_ceil(64)
    } else {
        0..0
    };
    words.map(move |word| {
        let base = word * 64;
        let from = lo.max(base) - base;
        let to = hi.min(base + 64) - base;
        let below_to = if to == 64 { u64::MAX } else { (1 << to) - 1 };
        (word as usize, below_to & (u64::MAX << from))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Expect};
    use proptest::prelude::*;
    use std::thread;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn errno(err: &io::Error) -> Option<i32> {
        err.raw_os_error()
    }

    fn extents(dev: &MemoryDevice, offset: u64, len: u64) -> Vec<(ExtentKind, u64)> {
        let mut out = Vec::new();
        dev.extents(offset, len, &mut out).unwrap();
        out.iter().map(|e| (e.kind, e.len)).collect()
    }

    /// Pages of `[offset, offset + len)` of the mapping that are resident.
    fn resident_pages(dev: &MemoryDevice, offset: u64, len: u64) -> usize {
        let page = system_page_size() as usize;
        let mut vec = vec![0u8; (len as usize).div_ceil(page)];
        // SAFETY: the range is page aligned and inside the device's mapping,
        // and `vec` has one byte per page of it, as mincore requires.
        let rc =
            unsafe { libc::mincore(dev.at(offset).cast(), len as usize, vec.as_mut_ptr().cast()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn word_masks_cover_exactly() {
        assert_eq!(word_masks(0, 64).collect::<Vec<_>>(), [(0, u64::MAX)]);
        assert_eq!(word_masks(3, 5).collect::<Vec<_>>(), [(0, 0b11000)]);
        assert_eq!(
            word_masks(60, 130).collect::<Vec<_>>(),
            [(0, 0xf << 60), (1, u64::MAX), (2, 0b11)]
        );
        assert_eq!(word_masks(7, 7).count(), 0);
    }

    #[test]
    fn allocated_bytes_follow_writes_and_trims() {
        for size in [64 * KIB, 64 * KIB + 100] {
            let dev = MemoryDevice::new(size).unwrap();
            let bs = dev.block_size();
            assert_eq!(dev.allocated_bytes(), 0);
            dev.write(0, &[1], false).unwrap();
            assert_eq!(dev.allocated_bytes(), bs);
            // Straddles a block boundary: two blocks, one of them new.
            dev.write(bs - 1, &[2, 3], false).unwrap();
            assert_eq!(dev.allocated_bytes(), 2 * bs);
            // The last, partial block.
            dev.write(size - 1, &[4], false).unwrap();
            assert_eq!(dev.allocated_bytes(), 3 * bs);
            // A trim that covers no whole block only zeros bytes.
            dev.trim(1, 10, false).unwrap();
            assert_eq!(dev.allocated_bytes(), 3 * bs);
            dev.trim(0, size, false).unwrap();
            assert_eq!(dev.allocated_bytes(), 0);
            assert_eq!(extents(&dev, 0, size), [(ExtentKind::Hole, size)]);
        }
    }

    #[test]
    fn reads_of_holes_do_not_touch_memory() {
        let dev = MemoryDevice::new(MIB).unwrap();
        let mut buf = vec![1u8; MIB as usize];
        dev.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(resident_pages(&dev, 0, MIB), 0);
    }

    #[test]
    fn trim_gives_memory_back() {
        let dev = MemoryDevice::new(MIB).unwrap();
        let bs = dev.block_size();
        dev.write(0, &vec![7; (4 * bs) as usize], false).unwrap();
        assert!(resident_pages(&dev, 0, MIB) > 0);
        dev.trim(0, 4 * bs, false).unwrap();
        assert_eq!(resident_pages(&dev, 0, MIB), 0);
    }

    #[test]
    fn extents_follow_blocks() {
        use ExtentKind::{Data, Hole};
        let dev = MemoryDevice::new(MIB + 10).unwrap();
        let bs = dev.block_size();
        dev.write(bs + 5, &[1; 10], false).unwrap();
        dev.write(3 * bs, &vec![1; 2 * bs as usize], false).unwrap();
        assert_eq!(
            extents(&dev, 0, MIB + 10),
            [
                (Hole, bs),
                (Data, bs),
                (Hole, bs),
                (Data, 2 * bs),
                (Hole, MIB + 10 - 5 * bs)
            ]
        );
        // Unaligned ends: each block's state covers all of its bytes.
        assert_eq!(
            extents(&dev, bs + 100, 3 * bs),
            [(Data, bs - 100), (Hole, bs), (Data, bs + 100)]
        );
        assert_eq!(extents(&dev, 5, 1), [(Hole, 1)]);
        assert_eq!(extents(&dev, 0, 0), []);
        // Extents are appended; earlier entries are left alone.
        let mut out = vec![Extent { len: 1, kind: Hole }];
        dev.extents(0, bs, &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn zero_modes() {
        let dev = MemoryDevice::new(MIB).unwrap();
        let bs = dev.block_size();
        dev.write(0, &vec![9; MIB as usize], false).unwrap();
        let punch = ZeroFlags {
            may_trim: true,
            fast: true,
        };
        dev.zero(100, 3 * bs, punch, false).unwrap();
        assert_eq!(dev.allocated_bytes(), MIB - 2 * bs);
        let no_hole = ZeroFlags {
            may_trim: false,
            fast: true,
        };
        dev.zero(8 * bs, 2 * bs, no_hole, false).unwrap();
        dev.zero(MIB - 10, 10, no_hole, false).unwrap();
        assert_eq!(dev.allocated_bytes(), MIB - 2 * bs);
        let mut buf = vec![0u8; MIB as usize];
        dev.read(0, &mut buf).unwrap();
        let zeroed = |i: usize| {
            (100..100 + 3 * bs as usize).contains(&i)
                || (8 * bs as usize..10 * bs as usize).contains(&i)
                || i >= MIB as usize - 10
        };
        for (i, &b) in buf.iter().enumerate() {
            assert_eq!(b, if zeroed(i) { 0 } else { 9 }, "byte {i}");
        }
        // NO_HOLE on a hole allocates it.
        dev.trim(0, MIB, false).unwrap();
        dev.zero(bs, bs, no_hole, false).unwrap();
        assert_eq!(dev.allocated_bytes(), bs);
        assert_eq!(
            extents(&dev, 0, 3 * bs),
            [
                (ExtentKind::Hole, bs),
                (ExtentKind::Data, bs),
                (ExtentKind::Hole, bs)
            ]
        );
    }

    #[test]
    fn out_of_range_is_einval_and_empty_disks_work() {
        let dev = MemoryDevice::new(100).unwrap();
        let mut buf = [0u8; 2];
        let err = dev.read(99, &mut buf).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL));
        let err = dev.write(u64::MAX, &buf, false).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL));
        let err = dev.trim(50, u64::MAX, false).unwrap_err();
        assert_eq!(errno(&err), Some(libc::EINVAL));

        let empty = MemoryDevice::new(0).unwrap();
        empty.read(0, &mut []).unwrap();
        empty.write(0, &[], false).unwrap();
        empty.trim(0, 0, false).unwrap();
        empty.zero(0, 0, ZeroFlags::default(), false).unwrap();
        assert_eq!(extents(&empty, 0, 0), []);
        assert_eq!(
            empty.write(0, &[1], false).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );

        let err = MemoryDevice::new(u64::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn budget_refuses_writes_past_its_limit() {
        let budget = Arc::new(Budget::new(3 * 4096));
        let dev = MemoryDevice::with_budget(MIB, budget.clone()).unwrap();
        let bs = dev.block_size();
        if bs != 4096 {
            return; // The limit above is in 4 KiB blocks.
        }
        dev.write(0, &vec![1; 2 * bs as usize], false).unwrap();
        assert_eq!(budget.used(), 2 * bs);
        // Two new blocks do not fit; nothing may change.
        let err = dev
            .write(bs + 1, &vec![2; 2 * bs as usize], false)
            .unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOSPC));
        let err = dev
            .zero(4 * bs, 2 * bs, ZeroFlags::default(), false)
            .unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOSPC));
        assert_eq!(budget.used(), 2 * bs);
        assert_eq!(dev.allocated_bytes(), 2 * bs);
        let mut buf = vec![0u8; 4 * bs as usize];
        dev.read(0, &mut buf).unwrap();
        assert!(buf[..2 * bs as usize].iter().all(|&b| b == 1));
        assert!(buf[2 * bs as usize..].iter().all(|&b| b == 0));
        // Overwriting allocated blocks needs no budget.
        dev.write(0, &vec![3; 2 * bs as usize], false).unwrap();
        // A second disk shares the budget.
        let other = MemoryDevice::with_budget(MIB, budget.clone()).unwrap();
        other.write(0, &[1], false).unwrap();
        assert_eq!(
            other.write(bs, &[1], false).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        // Trimming frees budget for the other disk.
        dev.trim(0, bs, false).unwrap();
        assert_eq!(budget.used(), 2 * bs);
        other.write(bs, &[1], false).unwrap();
        assert_eq!(budget.used(), 3 * bs);
        drop(other);
        assert_eq!(budget.used(), bs);
        drop(dev);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn nested_budgets_charge_every_level_and_narrow_once() {
        let server = Arc::new(Budget::new(10));
        let alice = Arc::new(Budget::within(server.clone(), 6));
        let bob = Arc::new(Budget::within(server.clone(), 6));
        // A disk made in advance charges the server only.
        let disk = Budget::within(server.clone(), u64::MAX);
        assert!(disk.try_reserve(2));
        assert_eq!((disk.used(), server.used(), alice.used()), (2, 2, 0));
        assert_eq!(disk.narrow(&alice), Ok(()));
        assert_eq!((disk.used(), server.used(), alice.used()), (2, 2, 2));
        assert_eq!(disk.narrow(&alice), Err(NarrowError::NotWithin));
        assert_eq!(disk.available(), 4);
        // Past alice's share, though the server has room.
        assert!(!disk.try_reserve(5));
        assert_eq!((disk.used(), server.used(), alice.used()), (2, 2, 2));
        assert!(disk.try_reserve(4));
        assert!(bob.try_reserve(4));
        // Past the server's limit, though bob's share has room.
        assert!(!bob.try_reserve(1));
        assert_eq!((server.used(), bob.used()), (10, 4));
        disk.release(6);
        assert_eq!((disk.used(), server.used(), alice.used()), (0, 4, 0));
        // A share of another budget, or a full one, is refused.
        let other = Arc::new(Budget::within(Arc::new(Budget::new(10)), 10));
        let disk = Budget::within(server.clone(), u64::MAX);
        assert_eq!(disk.narrow(&other), Err(NarrowError::NotWithin));
        assert!(disk.try_reserve(3));
        let full = Arc::new(Budget::within(server.clone(), 2));
        assert_eq!(
            disk.narrow(&full),
            Err(NarrowError::Full {
                needed: 3,
                available: 2
            })
        );
        assert_eq!((full.used(), server.used()), (0, 7));
    }

    #[test]
    fn budget_counts_exactly() {
        let budget = Budget::new(10);
        assert!(budget.try_reserve(0));
        assert!(budget.try_reserve(6));
        assert!(!budget.try_reserve(5));
        assert!(!budget.try_reserve(u64::MAX));
        assert!(budget.try_reserve(4));
        assert_eq!((budget.used(), budget.limit()), (10, 10));
        budget.release(10);
        assert_eq!(budget.used(), 0);
        budget.release(1);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn terabyte_disk_costs_nothing_until_written() {
        const TIB: u64 = 1 << 40;
        let dev = MemoryDevice::new(TIB).unwrap();
        let bs = dev.block_size();
        dev.write(0, b"first", false).unwrap();
        dev.write(TIB - 4, b"last", false).unwrap();
        assert_eq!(dev.allocated_bytes(), 2 * bs);
        let mut buf = [0u8; 5];
        dev.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"first");
        dev.read(TIB - 4, &mut buf[..4]).unwrap();
        assert_eq!(&buf[..4], b"last");
        dev.read(TIB / 2, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
        // Two leaves exist; the other 8190 pointers are still null.
        let leaves = dev.bitmap.leaves.iter();
        assert_eq!(
            leaves
                .filter(|l| !l.load(Ordering::Relaxed).is_null())
                .count(),
            2
        );
        assert_eq!(resident_pages(&dev, 0, MIB), 1);
        assert_eq!(resident_pages(&dev, TIB / 2, MIB), 0);
        assert_eq!(resident_pages(&dev, TIB - MIB, MIB), 1);
        assert_eq!(
            extents(&dev, 0, TIB),
            [
                (ExtentKind::Data, bs),
                (ExtentKind::Hole, TIB - 2 * bs),
                (ExtentKind::Data, bs)
            ]
        );
        dev.trim(0, TIB, false).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
        assert_eq!(resident_pages(&dev, TIB - MIB, MIB), 0);
    }

    #[test]
    fn concurrent_writers_on_disjoint_sectors() {
        const THREADS: usize = 4;
        const SECTOR: usize = 512;
        let size = 4 * MIB;
        let dev = MemoryDevice::new(size).unwrap();
        // Thread t writes every THREADS-th sector, so threads share every
        // block and every bitmap word but never a byte.
        thread::scope(|s| {
            for t in 0..THREADS {
                let dev = &dev;
                s.spawn(move || {
                    for sector in (t..size as usize / SECTOR).step_by(THREADS) {
                        let data = [(sector % 251) as u8 + 1; SECTOR];
                        dev.write((sector * SECTOR) as u64, &data, false).unwrap();
                    }
                });
            }
        });
        let mut buf = vec![0u8; size as usize];
        dev.read(0, &mut buf).unwrap();
        for (sector, chunk) in buf.chunks(SECTOR).enumerate() {
            assert!(
                chunk.iter().all(|&b| b == (sector % 251) as u8 + 1),
                "sector {sector}"
            );
        }
        assert_eq!(dev.allocated_bytes(), size);
    }

    #[test]
    fn racing_writes_and_trims_keep_counts_exact() {
        let size = 256 * KIB;
        let budget = Arc::new(Budget::new(size / 2));
        let dev = MemoryDevice::with_budget(size, budget.clone()).unwrap();
        let bs = dev.block_size();
        thread::scope(|s| {
            for t in 0..4u64 {
                let dev = &dev;
                s.spawn(move || {
                    let mut x = t + 1;
                    for _ in 0..20_000 {
                        // xorshift: cheap, deterministic per thread.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let offset = x % size;
                        let len = (x >> 32) % (4 * bs).min(size - offset);
                        let result = match x % 4 {
                            0 => dev.trim(offset, len, false),
                            1 => dev.zero(offset, len, ZeroFlags::default(), false),
                            _ => dev.write(offset, &vec![1; len as usize], false),
                        };
                        if let Err(err) = result {
                            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
                        }
                    }
                });
            }
        });
        assert!(budget.used() <= budget.limit());
        assert_eq!(budget.used(), dev.allocated_bytes());
        assert_eq!(data_bytes(&dev), dev.allocated_bytes());
        dev.trim(0, size, false).unwrap();
        assert_eq!((dev.allocated_bytes(), budget.used()), (0, 0));
    }

    /// Bytes in data extents, over the whole disk.
    fn data_bytes(dev: &MemoryDevice) -> u64 {
        let mut out = Vec::new();
        dev.extents(0, dev.size(), &mut out).unwrap();
        out.iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.len)
            .sum()
    }

    /// Checks that the counters agree with the bitmap, then that trimming
    /// everything returns them to zero.
    fn check_accounting(dev: &MemoryDevice, budget: Option<&Budget>) -> Result<(), TestCaseError> {
        let size = dev.size();
        let data = data_bytes(dev);
        // The last block may reach past the end of the disk.
        let allocated = dev.allocated_bytes();
        prop_assert!(data <= allocated && allocated < data + dev.block_size());
        if let Some(budget) = budget {
            prop_assert_eq!(budget.used(), allocated);
            prop_assert!(budget.used() <= budget.limit());
        }
        dev.trim(0, size, false).unwrap();
        prop_assert_eq!(dev.allocated_bytes(), 0);
        if let Some(budget) = budget {
            prop_assert_eq!(budget.used(), 0);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn behaves_like_the_model((size, ops) in testing::sized_ops(64 * KIB, MIB)) {
            let dev = MemoryDevice::new(size).unwrap();
            testing::check(&dev, &ops, Expect { trim_zeroes: true, may_fill: false, trim_may_fill: false })?;
            check_accounting(&dev, None)?;
        }

        #[test]
        fn behaves_like_the_model_within_a_budget(
            (size, ops) in testing::sized_ops(64 * KIB, 256 * KIB),
            blocks in 0u64..32,
        ) {
            let budget = Arc::new(Budget::new(blocks * 4096));
            let dev = MemoryDevice::with_budget(size, budget.clone()).unwrap();
            let expect = Expect { trim_zeroes: true, may_fill: true, trim_may_fill: false };
            testing::check_with(&dev, &ops, expect, || testing::within_budget(&budget))?;
            check_accounting(&dev, Some(&budget))?;
        }
    }
}
