//! The storage target: each backend against a `Vec<u8>` model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use scratchd_store::memory::Budget;
use scratchd_store::testing::{self, Expect, Op};
use scratchd_store::{BlockDevice, FileDevice, MemoryDevice, ZeroFlags};

use crate::Input;

const BLOCK: u64 = 4096;

/// Most operations a case runs; each is followed by a full read-back.
const MAX_OPS: usize = 48;

/// An offset in `[0, size]`, often on or next to a block boundary.
fn position(input: &mut Input, size: u64) -> u64 {
    match input.below(4) {
        0 => input.below(size + 1),
        1 | 2 => {
            let block = input.below(size / BLOCK + 1);
            let delta = match input.below(4) {
                0 => 0,
                1 => 1 + input.below(7),
                2 => BLOCK - 1 - input.below(8),
                _ => input.below(BLOCK),
            };
            (block * BLOCK + delta).min(size)
        }
        _ => size,
    }
}

/// A range inside `[0, size]`, as `(offset, len)`.
fn range(input: &mut Input, size: u64) -> (u64, u64) {
    let offset = position(input, size);
    if input.bool() {
        let len = input.below(3 * BLOCK + 17);
        (offset, len.min(size - offset))
    } else {
        let other = position(input, size);
        (offset.min(other), offset.abs_diff(other))
    }
}

fn op(input: &mut Input, size: u64) -> Op {
    let kind = input.below(16);
    let (offset, len) = range(input, size);
    match kind {
        0..=5 => Op::Write {
            offset,
            len,
            seed: input.u64(),
        },
        6 | 7 => Op::Read { offset, len },
        8 | 9 => Op::Trim { offset, len },
        10 | 11 => {
            let flags = input.u8();
            Op::Zero {
                offset,
                len,
                flags: ZeroFlags {
                    may_trim: flags & 1 != 0,
                    fast: flags & 2 != 0,
                },
            }
        }
        12 | 13 => Op::Extents { offset, len },
        14 => Op::Cache { offset, len },
        _ => Op::Flush,
    }
}

/// A fresh zero-filled file of `size` bytes in `dir`, opened as a device;
/// its name is removed at once, so nothing is left behind even if the case
/// panics.
fn file_device(dir: &Path, size: u64) -> FileDevice {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        "scratchd-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&path).expect("create a scratch file");
    let opened = file
        .set_len(size)
        .and_then(|()| FileDevice::open(&path, false));
    let _ = std::fs::remove_file(&path);
    opened.expect("open a scratch file")
}

/// tmpfs when there is one (no ZERO_RANGE there), else the temp dir.
fn tmpfs_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// Operations on a backend, checked step by step against a `Vec<u8>` model
/// by the store's model suite (`scratchd_store::testing`): contents, extents
/// and, for a memory disk within a budget, the budget's accounting.
///
/// Input: a byte choosing the backend (memory, memory within a budget of a
/// few blocks, a file on tmpfs, a file in the temp dir) and the disk size,
/// then operations.
pub fn storage(data: &[u8]) {
    let mut input = Input::new(data);
    let backend = input.below(4);
    let size = match input.below(4) {
        0 => BLOCK * (1 + input.below(64)),
        1 => 1 + input.below(64),
        2 => 1 + input.below(96 << 10),
        _ => BLOCK * (1 + input.below(16)) + input.below(BLOCK),
    };
    let mut ops = Vec::new();
    while !input.is_empty() && ops.len() < MAX_OPS {
        ops.push(op(&mut input, size));
    }
    let exact = Expect {
        trim_zeroes: true,
        may_fill: false,
        trim_may_fill: false,
    };
    let result = match backend {
        0 => {
            let dev = MemoryDevice::new(size).expect("memory device");
            testing::check(&dev, &ops, exact).map(|()| check_memory_accounting(&dev, None))
        }
        1 => {
            let budget = Arc::new(Budget::new(BLOCK * input.below(24)));
            let dev = MemoryDevice::with_budget(size, budget.clone()).expect("memory device");
            let expect = Expect {
                may_fill: true,
                ..exact
            };
            testing::check_with(&dev, &ops, expect, || testing::within_budget(&budget))
                .map(|()| check_memory_accounting(&dev, Some(&budget)))
        }
        2 => testing::check(&file_device(&tmpfs_dir(), size), &ops, exact),
        _ => testing::check(&file_device(&std::env::temp_dir(), size), &ops, exact),
    };
    if let Err(e) = result {
        panic!("backend {backend}, size {size}: {e}");
    }
}

/// The memory disk's counters agree with what it holds, and trimming
/// everything gives every byte back (to the budget too).
fn check_memory_accounting(dev: &MemoryDevice, budget: Option<&Budget>) {
    let mut extents = Vec::new();
    dev.extents(0, dev.size(), &mut extents)
        .expect("extents of the whole disk");
    let data: u64 = extents
        .iter()
        .filter(|e| e.kind == scratchd_store::ExtentKind::Data)
        .map(|e| e.len)
        .sum();
    let allocated = dev.allocated_bytes();
    assert!(data <= allocated && allocated < data + dev.block_size());
    if let Some(budget) = budget {
        assert_eq!(budget.used(), allocated);
    }
    dev.trim(0, dev.size(), false).expect("trim everything");
    assert_eq!(dev.allocated_bytes(), 0);
    if let Some(budget) = budget {
        assert_eq!(budget.used(), 0);
    }
}
