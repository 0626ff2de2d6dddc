//! `backing=memory,spill=dir:PATH`: a disk in RAM until the memory budget is
//! reached, then in an unnamed sparse file.
//!
//! A [`SpillDevice`] is a budgeted [`MemoryDevice`] and a [`BudgetedFile`]
//! (`O_TMPFILE` under PATH) of the same size, plus one "spilled" bit per
//! memory block (4 KiB, or the page size where larger) saying which of the
//! two holds the block. Two invariants make the bit the whole truth:
//!
//! - a block that is not spilled reads as zeros in the file;
//! - a spilled block holds no memory (it is unallocated in the memory
//!   device).
//!
//! A write (or a `NO_HOLE` zeroing) goes to the file for spilled blocks and
//! to memory for the others. When memory refuses with `ENOSPC` (which it does
//! before changing anything), the blocks of that run that already hold
//! memory are written there (that needs no more budget); of the rest —
//! unallocated, so zeros on both sides — as many whole blocks as the budget
//! still has room for go to memory, and the others are marked spilled and
//! written to the file. A trim or a zeroing that may trim punches both sides and clears
//! the bits of whole spilled blocks, so later writes try RAM first again.
//!
//! Bits only change with `fetch_or` / `fetch_and`, and whole blocks take no
//! lock. As in the memory device, concurrent requests on the same bytes
//! have an unspecified outcome. Requests on *different* bytes of one block
//! must both land, though, and that block may be spilling just then: one
//! write could put its bytes in RAM while the other marks the block spilled
//! and writes the file, losing the first. So the parts of a request that
//! cover a block only in part (at most its first and last block) hold one of
//! [`PARTIAL_LOCKS`] striped locks, chosen by block, while they are placed.
//! File systems and the page cache write whole 4 KiB blocks and never wait.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use scratchd_store::memory::Budget;
use scratchd_store::sync;

use scratchd_store::{
    block_runs, check_range, push_extent, BlockDevice, Capabilities, Extent, ExtentKind,
    MemoryDevice, ZeroFlags,
};

use crate::device::BudgetedFile;

/// How many locks serialise requests that cover part of a block; a power of
/// two, enough that unrelated blocks rarely share one.
const PARTIAL_LOCKS: usize = 64;

/// RAM first, then an unnamed file (see the [module documentation](self)).
#[derive(Debug)]
pub struct SpillDevice {
    mem: MemoryDevice,
    file: BudgetedFile,
    /// One bit per block: set when the block lives in the file.
    spilled: Box<[AtomicU64]>,
    block_shift: u32,
    /// The memory device's budget, to fill what is left of it first.
    budget: Arc<Budget>,
    /// Held while part of a block is placed or punched, by block number.
    partial: Box<[Mutex<()>]>,
}

fn enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// Calls `f(word index, mask)` for the bits of blocks `[first, end)`.
fn for_words(first: u64, end: u64, mut f: impl FnMut(usize, u64)) {
    let mut b = first;
    while b < end {
        let w = b / 64;
        let lo = b % 64;
        let hi = (end - w * 64).min(64);
        let n = hi - lo;
        let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
        f(w as usize, mask);
        b = w * 64 + hi;
    }
}

impl SpillDevice {
    /// What a spill disk offers, whatever its state: RAM and file share one
    /// view (multi-conn), flush is a no-op for scratch data, and the file
    /// part may block, so requests run on the worker pool.
    pub const CAPABILITIES: Capabilities = Capabilities {
        read_only: false,
        durable_flush: false,
        trim: true,
        fast_zero: true,
        multi_conn: true,
        may_block: true,
    };

    /// Joins `mem`, charged to `budget`, and `file`, which must have the
    /// same size; nothing is spilled yet, so the file must read as zeros.
    pub(crate) fn new(
        mem: MemoryDevice,
        budget: Arc<Budget>,
        file: BudgetedFile,
    ) -> io::Result<Self> {
        if mem.size() != file.size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory and spill file differ in size",
            ));
        }
        let block_shift = mem.block_size().trailing_zeros();
        let blocks = mem.size().div_ceil(mem.block_size());
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(Self {
            mem,
            file,
            spilled: (0..words).map(|_| AtomicU64::new(0)).collect(),
            block_shift,
            budget,
            partial: (0..PARTIAL_LOCKS).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Bytes of RAM held.
    pub fn memory_bytes(&self) -> u64 {
        self.mem.allocated_bytes()
    }

    /// Bytes the file system allocated to the spill file.
    pub fn file_bytes(&self) -> u64 {
        self.file.allocated()
    }

    /// RAM plus file space held.
    pub fn allocated_bytes(&self) -> u64 {
        self.memory_bytes() + self.file_bytes()
    }

    fn block_of(&self, offset: u64) -> u64 {
        offset >> self.block_shift
    }

    fn block_after(&self, offset: u64) -> u64 {
        offset.div_ceil(1 << self.block_shift)
    }

    fn block_start(&self, block: u64) -> u64 {
        block << self.block_shift
    }

    fn mark(&self, first: u64, end: u64) {
        for_words(first, end, |w, mask| {
            self.spilled[w].fetch_or(mask, Ordering::AcqRel);
        });
    }

    fn unmark(&self, first: u64, end: u64) {
        for_words(first, end, |w, mask| {
            if self.spilled[w].load(Ordering::Relaxed) & mask != 0 {
                self.spilled[w].fetch_and(!mask, Ordering::AcqRel);
            }
        });
    }

    /// Whether `block` is spilled, and the first block in `(block, end]`
    /// whose state differs (or `end`).
    fn run(&self, block: u64, end: u64) -> (bool, u64) {
        let word = |b: u64| self.spilled[(b / 64) as usize].load(Ordering::Acquire);
        let state = word(block) >> (block % 64) & 1 == 1;
        let mut b = block;
        while b < end {
            let raw = word(b);
            let differs = if state { !raw } else { raw } >> (b % 64);
            if differs != 0 {
                return (state, (b + u64::from(differs.trailing_zeros())).min(end));
            }
            b = (b / 64 + 1) * 64;
        }
        (state, end)
    }

    /// Maximal runs of `[start, end)` with one spilled state:
    /// `(run start, run end, spilled)`.
    fn runs(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        block_runs(start, end, self.block_shift, |block, end_block| {
            self.run(block, end_block)
        })
    }

    /// Calls `f` for `[offset, end)` in up to three pieces: a first and a
    /// last one that cover a block only in part, each under that block's
    /// partial lock, and the whole blocks between them.
    fn by_pieces(
        &self,
        offset: u64,
        end: u64,
        f: impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let head = self.block_start(self.block_after(offset)).min(end);
        let tail = self.block_start(self.block_of(end)).max(head);
        let partial = |start: u64, stop: u64| {
            let lock = &self.partial[self.block_of(start) as usize % PARTIAL_LOCKS];
            let _held = sync::lock(lock);
            f(start, stop)
        };
        if offset < head {
            partial(offset, head)?;
        }
        if head < tail {
            f(head, tail)?;
        }
        if tail < end {
            partial(tail, end)?;
        }
        Ok(())
    }

    /// Stores `[offset, end)`: `mem(start, stop)` for blocks kept in RAM,
    /// `file(start, stop)` for spilled ones, spilling what memory refuses.
    fn place(
        &self,
        offset: u64,
        end: u64,
        mem: impl Fn(u64, u64) -> io::Result<()>,
        file: impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        self.by_pieces(offset, end, |start, stop| {
            self.place_runs(start, stop, &mem, &file)
        })
    }

    /// [`place`](Self::place) for one piece.
    fn place_runs(
        &self,
        offset: u64,
        end: u64,
        mem: &impl Fn(u64, u64) -> io::Result<()>,
        file: &impl Fn(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        for (start, stop, spilled) in self.runs(offset, end) {
            if spilled {
                file(start, stop)?;
                continue;
            }
            match mem(start, stop) {
                Err(e) if enospc(&e) => {}
                other => {
                    other?;
                    continue;
                }
            }
            // Memory is full: blocks that hold memory stay there, the
            // others (zeros in memory and in the file) move to the file.
            let mut held = Vec::new();
            self.mem.extents(start, stop - start, &mut held)?;
            let mut pos = start;
            for e in held {
                let next = pos + e.len;
                match e.kind {
                    ExtentKind::Data => mem(pos, next)?,
                    ExtentKind::Hole => {
                        // What is left of the budget is filled first.
                        let room = self.budget.available();
                        let split = self
                            .block_start(self.block_of(pos) + (room >> self.block_shift))
                            .clamp(pos, next);
                        let mut rest = pos;
                        if split > pos {
                            match mem(pos, split) {
                                Ok(()) => rest = split,
                                Err(e) if enospc(&e) => {}
                                Err(e) => return Err(e),
                            }
                        }
                        if rest < next {
                            self.mark(self.block_of(rest), self.block_after(next));
                            file(rest, next)?;
                        }
                    }
                }
                pos = next;
            }
        }
        Ok(())
    }

    /// Makes `[offset, end)` read as zeros, freeing what can be freed, and
    /// brings whole spilled blocks back to RAM (for later writes).
    fn punch(&self, offset: u64, end: u64, fast: bool) -> io::Result<()> {
        self.by_pieces(offset, end, |start, stop| {
            self.punch_runs(start, stop, fast)
        })
    }

    /// [`punch`](Self::punch) for one piece.
    fn punch_runs(&self, offset: u64, end: u64, fast: bool) -> io::Result<()> {
        let flags = ZeroFlags {
            may_trim: true,
            fast,
        };
        for (start, stop, spilled) in self.runs(offset, end) {
            if !spilled {
                self.mem.zero(start, stop - start, flags, false)?;
                continue;
            }
            self.file.zero(start, stop - start, flags, false)?;
            // The file now reads zeros here and memory holds nothing.
            let last = if stop == self.size() {
                self.block_after(stop)
            } else {
                self.block_of(stop)
            };
            let first = self.block_after(start);
            if first < last {
                self.unmark(first, last);
            }
        }
        Ok(())
    }
}

impl BlockDevice for SpillDevice {
    fn size(&self) -> u64 {
        self.mem.size()
    }

    fn capabilities(&self) -> Capabilities {
        SpillDevice::CAPABILITIES
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = check_range(self.size(), offset, buf.len() as u64)?;
        for (start, stop, spilled) in self.runs(offset, end) {
            let chunk = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            if spilled {
                self.file.read(start, chunk)?;
            } else {
                self.mem.read(start, chunk)?;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let end = check_range(self.size(), offset, data.len() as u64)?;
        let part =
            |start: u64, stop: u64| &data[(start - offset) as usize..(stop - offset) as usize];
        self.place(
            offset,
            end,
            |start, stop| self.mem.write(start, part(start, stop), false),
            |start, stop| self.file.write(start, part(start, stop), false),
        )
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        let end = check_range(self.size(), offset, len)?;
        self.punch(offset, end, false)
    }

    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags, _fua: bool) -> io::Result<()> {
        let end = check_range(self.size(), offset, len)?;
        if flags.may_trim {
            return self.punch(offset, end, flags.fast);
        }
        self.place(
            offset,
            end,
            |start, stop| self.mem.zero(start, stop - start, flags, false),
            |start, stop| self.file.zero(start, stop - start, flags, false),
        )
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> io::Result<()> {
        let end = check_range(self.size(), offset, len)?;
        let first = out.len();
        let mut part = Vec::new();
        for (start, stop, spilled) in self.runs(offset, end) {
            part.clear();
            if spilled {
                self.file.extents(start, stop - start, &mut part)?;
            } else {
                self.mem.extents(start, stop - start, &mut part)?;
            }
            for e in &part {
                push_extent(out, first, e.len, e.kind);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use scratchd_store::testing::{self, Expect};
    use scratchd_store::FileDevice;

    use super::*;
    use crate::disk::proc_path;

    /// A spill device of `size` bytes with a memory budget of `limit`, its
    /// file in `dir`.
    fn device(dir: &std::path::Path, size: u64, limit: u64) -> (SpillDevice, Arc<Budget>) {
        let budget = Arc::new(Budget::new(limit));
        let inode = tempfile::tempfile_in(dir).unwrap();
        inode.set_len(size).unwrap();
        let file = FileDevice::open(&proc_path(&inode), false).unwrap();
        let file = BudgetedFile::new(file, inode, None).unwrap();
        let mem = MemoryDevice::with_budget(size, budget.clone()).unwrap();
        (SpillDevice::new(mem, budget.clone(), file).unwrap(), budget)
    }

    #[test]
    fn writes_past_the_budget_land_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (dev, budget) = device(dir.path(), 1 << 20, 64 << 10);
        let data: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
        dev.write(4096, &data, false).unwrap();
        assert_eq!(budget.used(), budget.limit());
        assert_eq!(dev.memory_bytes(), 64 << 10);
        assert!(dev.file_bytes() > 0, "nothing allocated in the file");
        let mut back = vec![0; data.len()];
        dev.read(4096, &mut back).unwrap();
        assert_eq!(back, data);
        // A trim of everything gives the memory back and brings the blocks
        // home: the next write goes to RAM.
        dev.trim(0, 1 << 20, false).unwrap();
        assert_eq!(budget.used(), 0);
        dev.write(0, &[7; 4096], false).unwrap();
        assert_eq!(budget.used(), 4096);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Two writes to different halves of one fresh block, racing for the
    /// last block of budget: whichever way it goes (RAM or file), both
    /// halves land, and trimming the block gives back all it took.
    #[test]
    fn racing_partial_writes_at_the_spill_point_both_land() {
        let dir = tempfile::tempdir().unwrap();
        let kept = 8;
        let (dev, budget) = device(dir.path(), 1 << 20, (kept + 1) * 4096);
        dev.write(0, &vec![1; kept as usize * 4096], false).unwrap();
        let block = kept * 4096;
        let start = std::sync::Barrier::new(2);
        for round in 0..10_000u32 {
            let (a, b) = ([round as u8 | 1; 2048], [round as u8 | 2; 2048]);
            std::thread::scope(|s| {
                s.spawn(|| {
                    start.wait();
                    dev.write(block, &a, false).unwrap();
                });
                start.wait();
                dev.write(block + 2048, &b, false).unwrap();
            });
            let mut back = [0; 4096];
            dev.read(block, &mut back).unwrap();
            assert!(
                back[..2048] == a && back[2048..] == b,
                "round {round}: a write was lost"
            );
            dev.trim(block, 4096, false).unwrap();
            assert_eq!(budget.used(), kept * 4096, "round {round}: memory leaked");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The store's model suite, with a memory budget of 0 to 64 blocks
        /// so that runs spill early, late or never; the budget is never
        /// overdrawn, and a trim of everything gives back all memory and
        /// brings every block home.
        #[test]
        fn behaves_like_the_model(
            (size, ops) in testing::sized_ops(64 << 10, 256 << 10),
            blocks in 0u64..=64,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (dev, budget) = device(dir.path(), size, blocks * 4096);
            let expect = Expect { trim_zeroes: true, may_fill: false, trim_may_fill: false };
            testing::check_with(&dev, &ops, expect, || testing::within_budget(&budget))?;
            dev.trim(0, size, false).unwrap();
            prop_assert_eq!(budget.used(), 0);
            prop_assert!(dev.spilled.iter().all(|w| w.load(Ordering::Relaxed) == 0));
        }
    }
}
