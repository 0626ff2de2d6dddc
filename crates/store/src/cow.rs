//! Snapshots of a disk's contents, and new disks that start as a snapshot
//! and are written privately (copy-on-write).
//!
//! # Design
//!
//! A [`Snapshot`] is a device of its own, filled once by [`Snapshot::copy`]
//! from the disk it is taken of and never written again. Its holes stay
//! holes, and all-zero blocks are not copied at all, so it holds the bytes
//! of the disk's data once, charged to whatever budget its own device
//! charges. Taking one costs a copy of the disk's data; making a clone of
//! it costs nothing of the kind, whatever the size.
//!
//! A [`CloneDevice`] is the snapshot (shared, behind an `Arc`) plus a
//! private device of the same size (a [`MemoryDevice`](crate::MemoryDevice),
//! a file, ...) that starts empty, and one bit per block (the memory
//! device's block: 4 KiB or the page size): set when the block is the
//! clone's own, clear while it still reads through to the snapshot. A block
//! becomes the clone's own on the first write, trim or zeroing that
//! touches it, and stays so:
//!
//! - a write, or a zeroing, that covers whole blocks writes them in the
//!   private device, then sets their bits;
//! - a request that covers part of a shared block first copies that block
//!   from the snapshot into the private device ("copy-up"), then sets its
//!   bit, then works on the private device as on any disk;
//! - a trim (and a zeroing that may trim) sets the bits of the whole
//!   blocks first and trims them in the private device, where they were
//!   never written (or are trimmed now): they read as zeros, never as the
//!   snapshot's data, and hold nothing.
//!
//! Reads and block status go, run by run of blocks in the same state, to
//! the private device or to the snapshot, so block status is as exact as
//! each of them is: a shared block reports the snapshot's state, an own
//! block the private device's.
//!
//! # Accounting
//!
//! The clone charges only its private device, which holds only the blocks
//! written, copied up or zeroed without trimming: each clone pays for what
//! it wrote privately, at block granularity, and the snapshot's bytes are
//! paid once by the snapshot. A full budget fails the write (or the
//! copy-up) with `ENOSPC`, and then nothing the client can see has changed.
//!
//! # Concurrency
//!
//! Nothing on the path of a request to own blocks takes a lock. A copy-up
//! takes one of a few mutexes chosen by block number, so that two requests
//! on disjoint bytes of the same shared block cannot both copy it (the
//! second copy would erase the first request's bytes). Requests that
//! overlap have unspecified results, as NBD allows, but never break the
//! bookkeeping: a bit is only ever set, and the private device keeps its
//! own counts exact.

use std::io;
use std::sync::{Arc, Mutex};

use crate::memory::{allocation_block_size, Bitmap};
use crate::sync;
use crate::{
    block_runs, check_range, push_extent, BlockDevice, Capabilities, Extent, ExtentKind, ZeroFlags,
};

/// Bytes copied per read-write round trip while a snapshot is taken.
const COPY_CHUNK: u64 = 1 << 20;
/// Extents asked for at a time while a snapshot is taken.
const EXTENT_WINDOW: u64 = 1 << 30;
/// Mutexes serialising copy-ups, by block number.
const STRIPES: usize = 64;

/// A disk's contents, frozen: the device it lives in is written only by
/// [`Snapshot::copy`]. Shared by the clones made of it (`Arc`), so it lives
/// until the last of them is gone.
pub struct Snapshot {
    /// The frozen bytes; never written after the copy.
    data: Box<dyn BlockDevice>,
    /// log2 of the copy-on-write block size of clones.
    block_shift: u32,
    /// Bytes of data copied in (all-zero blocks left out).
    data_bytes: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("size", &self.data.size())
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Copies the contents of `src` into `into`, an empty (all-holes)
    /// device of the same size, and freezes them there. Only data extents
    /// are read, and all-zero blocks are not written, so the snapshot
    /// holds no more than the data.
    ///
    /// The caller keeps `src` from being written meanwhile (a
    /// [`WriteGate`](crate::gate::WriteGate)) if the snapshot must be
    /// consistent.
    ///
    /// # Errors
    ///
    /// `EINVAL` when the sizes differ; the error of a read of `src` or a
    /// write of `into` (`ENOSPC` when its budget is full).
    pub fn copy(src: &dyn BlockDevice, into: Box<dyn BlockDevice>) -> io::Result<Snapshot> {
        if src.size() != into.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a snapshot of a {}-byte disk cannot live in a {}-byte device",
                    src.size(),
                    into.size()
                ),
            ));
        }
        let block = allocation_block_size();
        let mut buf = vec![0u8; COPY_CHUNK as usize];
        let mut data_bytes = 0;
        for (start, end) in data_ranges(src)? {
            let mut at = start;
            while at < end {
                let n = (end - at).min(COPY_CHUNK);
                let chunk = &mut buf[..n as usize];
                src.read(at, chunk)?;
                data_bytes += copy_nonzero_blocks(&*into, at, chunk, block)?;
                at += n;
            }
        }
        Ok(Snapshot {
            data: into,
            block_shift: block.trailing_zeros(),
            data_bytes,
        })
    }

    /// Size in bytes of the disk it was taken of.
    pub fn size(&self) -> u64 {
        self.data.size()
    }

    /// Bytes of data it holds: what its clones share.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The copy-on-write block size of its clones.
    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// The frozen contents, for reading (an export of the snapshot itself,
    /// say, or a snapshot of a snapshot).
    pub fn device(&self) -> &dyn BlockDevice {
        &*self.data
    }
}

/// The data extents of `dev`, as `(start, end)` byte ranges in order.
fn data_ranges(dev: &dyn BlockDevice) -> io::Result<Vec<(u64, u64)>> {
    let size = dev.size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut extents = Vec::new();
    let mut window = 0;
    while window < size {
        let len = (size - window).min(EXTENT_WINDOW);
        extents.clear();
        dev.extents(window, len, &mut extents)?;
        let mut pos = window;
        for extent in &extents {
            let end = pos + extent.len;
            if extent.kind == ExtentKind::Data {
                match ranges.last_mut() {
                    Some(last) if last.1 == pos => last.1 = end,
                    _ => ranges.push((pos, end)),
                }
            }
            pos = end;
        }
        window += len;
    }
    Ok(ranges)
}

/// Writes `chunk`, which belongs at `offset`, into `into`, skipping the
/// blocks (of `block` bytes, aligned to the disk) that are all zeros;
/// returns the bytes written.
fn copy_nonzero_blocks(
    into: &dyn BlockDevice,
    offset: u64,
    chunk: &[u8],
    block: u64,
) -> io::Result<u64> {
    let mut written = 0;
    let mut pos = 0usize;
    let mut run: Option<usize> = None;
    while pos < chunk.len() {
        let at = offset + pos as u64;
        let stop = ((at / block + 1) * block - offset).min(chunk.len() as u64) as usize;
        let zero = chunk[pos..stop].iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(start)) => {
                into.write(offset + start as u64, &chunk[start..pos], false)?;
                written += (pos - start) as u64;
                run = None;
            }
            _ => {}
        }
        pos = stop;
    }
    if let Some(start) = run {
        into.write(offset + start as u64, &chunk[start..], false)?;
        written += (chunk.len() - start) as u64;
    }
    Ok(written)
}

/// A disk that starts as a [`Snapshot`]'s contents and keeps its own
/// writes in a private device: see the [module documentation](self).
pub struct CloneDevice<P> {
    base: Arc<Snapshot>,
    /// Holds the blocks that are the clone's own; as large as `base`.
    private: P,
    /// A bit per block: set when the block no longer reads through to
    /// `base`.
    own: Bitmap,
    /// Serialise copy-ups of the same block (see the module documentation).
    stripes: Box<[Mutex<()>]>,
}

impl<P> std::fmt::Debug for CloneDevice<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneDevice")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl<P: BlockDevice> CloneDevice<P> {
    /// A clone of `base` that writes into `private`, an empty device of the
    /// same size. Costs a bitmap's root (a pointer per 128 MiB), whatever
    /// the size.
    ///
    /// # Errors
    ///
    /// `EINVAL` when the sizes differ.
    pub fn new(base: Arc<Snapshot>, private: P) -> io::Result<Self> {
        if base.size() != private.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a clone of a {}-byte snapshot cannot write into a {}-byte device",
                    base.size(),
                    private.size()
                ),
            ));
        }
        let blocks = base.size().div_ceil(base.block_size());
        Ok(Self {
            own: Bitmap::new(blocks),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            base,
            private,
        })
    }

    /// The snapshot it reads through to.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.base
    }

    /// The device holding its own blocks.
    pub fn private(&self) -> &P {
        &self.private
    }

    fn shift(&self) -> u32 {
        self.base.block_shift
    }

    fn block_size(&self) -> u64 {
        self.base.block_size()
    }

    /// Maximal runs of own or shared blocks in `[start, end)`, clipped to
    /// it: `(run start, run end, own)`.
    fn runs(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        block_runs(start, end, self.shift(), |block, end_block| {
            self.own.run(block, end_block)
        })
    }

    /// The blocks wholly inside `[offset, end)`; the last block of the disk
    /// counts as whole when the range reaches the end.
    fn whole_blocks(&self, offset: u64, end: u64) -> (u64, u64) {
        let bs = self.block_size();
        let last = if end == self.base.size() {
            end.div_ceil(bs)
        } else {
            end / bs
        };
        (offset.div_ceil(bs), last)
    }

    /// Copies up the blocks that `[offset, end)` covers only in part.
    fn copy_up_edges(&self, offset: u64, end: u64) -> io::Result<()> {
        if offset == end {
            return Ok(());
        }
        let (whole_first, whole_end) = self.whole_blocks(offset, end);
        let partial = |block: u64| !(whole_first..whole_end).contains(&block);
        let first = offset >> self.shift();
        let last = (end - 1) >> self.shift();
        if partial(first) {
            self.copy_up(first)?;
        }
        if last != first && partial(last) {
            self.copy_up(last)?;
        }
        Ok(())
    }

    /// Makes `block` the clone's own, with the snapshot's bytes, unless it
    /// is already.
    fn copy_up(&self, block: u64) -> io::Result<()> {
        if self.own.is_set(block) {
            return Ok(());
        }
        let _guard = sync::lock(&self.stripes[block as usize % STRIPES]);
        if self.own.is_set(block) {
            return Ok(());
        }
        let start = block << self.shift();
        let end = (start + self.block_size()).min(self.base.size());
        let mut buf = vec![0u8; (end - start) as usize];
        self.base.data.read(start, &mut buf)?;
        self.private.write(start, &buf, false)?;
        self.own.set_range(block, block + 1);
        Ok(())
    }

    /// Marks the whole blocks of `[offset, end)` the clone's own.
    fn take_whole(&self, offset: u64, end: u64) {
        let (first, last) = self.whole_blocks(offset, end);
        if first < last {
            self.own.set_range(first, last);
        }
    }
}

impl<P: BlockDevice> BlockDevice for CloneDevice<P> {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn capabilities(&self) -> Capabilities {
        let private = self.private.capabilities();
        Capabilities {
            read_only: false,
            trim: true,
            multi_conn: true,
            may_block: private.may_block || self.base.data.capabilities().may_block,
            ..private
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = check_range(self.size(), offset, buf.len() as u64)?;
        for (start, stop, own) in self.runs(offset, end) {
            let chunk = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if own {
                self.private.read(start, chunk)?;
            } else {
                self.base.data.read(start, chunk)?;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let end = check_range(self.size(), offset, data.len() as u64)?;
        self.copy_up_edges(offset, end)?;
        self.private.write(offset, data, false)?;
        self.take_whole(offset, end);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.private.flush()
    }

    /// Unlike a plain disk's, a clone's trim always zeros: a block that
    /// read as the snapshot's data must not come back as it.
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let flags = ZeroFlags {
            may_trim: true,
            fast: false,
        };
        self.zero(offset, len, flags, false)
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, _fua: bool) -> io::Result<()> {
        let end = check_range(self.size(), offset, len)?;
        self.copy_up_edges(offset, end)?;
        if flags.may_trim {
            // Own first: a trimmed block must never again read through.
            self.take_whole(offset, end);
            self.private.zero(offset, len, flags, false)
        } else {
            self.private.zero(offset, len, flags, false)?;
            self.take_whole(offset, end);
            Ok(())
        }
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = check_range(self.size(), offset, len)?;
        let first = out.len();
        let mut piece = Vec::new();
        for (start, stop, own) in self.runs(offset, end) {
            piece.clear();
            if own {
                self.private.extents(start, stop - start, &mut piece)?;
            } else {
                self.base.data.extents(start, stop - start, &mut piece)?;
            }
            for extent in &piece {
                push_extent(out, first, extent.len, extent.kind);
            }
        }
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
