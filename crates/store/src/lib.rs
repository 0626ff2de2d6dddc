//! Storage backends for scratchd, behind one small trait.
//!
//! The server never knows what holds an export's bytes: it range-checks a
//! request against [`BlockDevice::size`], then calls one method of the trait.
//! Backends know nothing of NBD either; they speak bytes, ranges and
//! `std::io::Error`, and the server maps errno values to NBD error codes.
//!
//! Layout:
//! - [`memory`]: a sparse in-memory disk shared by every connection.
//! - [`file`](mod@file): an existing regular file or block device.
//! - [`cow`]: snapshots of a disk, and copy-on-write clones of them.
//! - [`gate`]: lets a snapshot see every write whole or not at all.
//! - [`sync`]: lock helpers that recover from poisoning, shared by every crate.
//! - [`errors`]: error replies by errno, counted per device by whoever
//!   answers its requests.
//! - `testing` (feature `testing`): the model-based suite every device's
//!   tests run.

use std::io;

pub mod cow;
pub mod errors;
pub mod file;
pub mod gate;
pub mod memory;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use errors::ErrorCounts;
pub use file::FileDevice;
pub use memory::MemoryDevice;

/// What a backend can do; the server turns this into NBD transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and zeroing are refused with `EPERM`.
    pub read_only: bool,
    /// `flush` and FUA make data durable (false: they are accepted no-ops).
    pub durable_flush: bool,
    /// `trim` can give space back.
    pub trim: bool,
    /// `zero` without `may_trim` or `fast` is always possible; `fast` zeroing
    /// (no slower than a write would be) is possible when this is true.
    pub fast_zero: bool,
    /// Every handle sees every completed write at once (one shared store or
    /// page cache), so clients may open several connections.
    pub multi_conn: bool,
    /// Calls may sleep on I/O (disk, fsync). The server then runs them on
    /// worker threads so a slow request does not hold up fast ones; when false
    /// it runs them inline on the connection's thread, which is cheaper.
    pub may_block: bool,
}

/// How to zero a range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The backend may deallocate the range (NBD: no NO_HOLE flag).
    pub may_trim: bool,
    /// Fail with `EOPNOTSUPP` rather than fall back to something slower than a
    /// plain write of zeros would be (NBD FAST_ZERO).
    pub fast: bool,
}

/// Allocation state of a run of bytes, as reported by [`BlockDevice::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Backed by storage; contents may be anything.
    Data,
    /// Not backed by storage; reads as zeros.
    Hole,
}

/// One run of bytes of the same [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub kind: ExtentKind,
}

/// A disk: a fixed-size range of bytes that many connections may use at once.
///
/// Callers guarantee `offset + len <= size()` for every call; backends may
/// still check and return `EINVAL`. Every method takes `&self`: concurrent
/// calls on disjoint ranges must not serialise on one lock. Concurrent calls
/// on overlapping ranges may interleave in any order (NBD leaves the outcome
/// unspecified), but must never corrupt the backend's own bookkeeping.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes; fixed for the life of the device.
    fn size(&self) -> u64;

    fn capabilities(&self) -> Capabilities;

    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Stores `data` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Hints that the range is no longer needed. Afterwards it reads as zeros
    /// or as its old contents (NBD allows both): memory gives zeros, a file
    /// gives zeros where its filesystem can punch holes.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Makes the range read as zeros.
    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, fua: bool) -> io::Result<()>;

    /// Appends extents that exactly cover `[offset, offset + len)` to `out`,
    /// in order, without gaps, each with `len > 0`, adjacent ones of different
    /// kinds (merged). Nothing is appended when `len == 0`.
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()>;

    /// Hands the `len` bytes at `offset` to `sink` in order, in one or more
    /// slices of the backend's own memory, so that a reply can go from
    /// storage to the socket without a copy in between. Returns `None` when
    /// the backend has no such memory (callers then use [`BlockDevice::read`]
    /// into a buffer of their own); errors from `sink` are passed through.
    fn read_to(
        &self,
        offset: u64,
        len: usize,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        let _ = (offset, len, sink);
        None
    }

    /// The error of a write this device acknowledged before it was done
    /// (write-behind), once one failed: it is latched, and every later
    /// write and flush fails with it too. For a front end's close(), which
    /// must not report success over a lost write.
    fn deferred_error(&self) -> io::Result<()> {
        Ok(())
    }

    /// Whether writes are acknowledged before they are done: then a front
    /// end must pass flushes on even where nothing is durable, as they are
    /// where a failed write is reported.
    fn writes_behind(&self) -> bool {
        false
    }

    /// Receives `len` bytes from `src` straight into the backend's memory at
    /// `offset` (durably with `fua`), sparing the copy through an
    /// intermediate buffer. Returns `None` when the backend has no such memory
    /// (callers then use [`BlockDevice::write`]). When storage refuses the
    /// write (`ENOSPC`), it does so before reading anything from `src`.
    fn write_from(
        &self,
        offset: u64,
        len: usize,
        src: &mut dyn io::Read,
        fua: bool,
    ) -> Option<io::Result<()>> {
        let _ = (offset, len, src, fua);
        None
    }

    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
}

/// Splits `[start, end)` into maximal runs of blocks (`1 << shift` bytes
/// each) that share a state, clipped to the range: `(run start, run end,
/// state)`. `run(block, end_block)` gives the state of `block` and the first
/// block in `(block, end_block]` whose state differs (or `end_block`). For
/// backends that keep a bit per block, including those built on top of this
/// crate's.
pub fn block_runs<'a>(
    start: u64,
    end: u64,
    shift: u32,
    run: impl Fn(u64, u64) -> (bool, u64) + 'a,
) -> impl Iterator<Item = (u64, u64, bool)> + 'a {
    let end_block = end.div_ceil(1 << shift);
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let (state, run_end) = run(pos >> shift, end_block);
        let stop = (run_end << shift).min(end);
        let piece = (pos, stop, state);
        pos = stop;
        Some(piece)
    })
}

/// Checks `[offset, offset + len)` against a device of `size` bytes and
/// returns the end of the range, or `EINVAL`. For every backend, including
/// those built on top of this crate's.
pub fn check_range(size: u64, offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .filter(|&end| end <= size)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Appends a run of `len` bytes of `kind` to `out`, merging it into the last
/// extent when that one has the same kind and index `first` or later (earlier
/// entries belong to the caller and are left alone). Backends use it to keep
/// the [`BlockDevice::extents`] contract (merged, no empty extents).
pub fn push_extent(out: &mut Vec<Extent>, first: usize, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if out.len() > first {
        if let Some(last) = out.last_mut().filter(|last| last.kind == kind) {
            last.len += len;
            return;
        }
    }
    out.push(Extent { len, kind });
}
