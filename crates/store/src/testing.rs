//! A model-based test that every backend's tests run: random sequences of
//! operations go to a device and to a `Vec<u8>` model of it, and after each
//! one the device must read back exactly as the model does and report extents
//! that cover the asked range, merged, with holes only where the model holds
//! zeros.
//!
//! Offsets and lengths favour block boundaries and their neighbours, so that
//! unaligned and block-straddling requests are common.
//!
//! This is the one suite for every [`BlockDevice`] in the workspace, like
//! cloud-hypervisor's block crate runs one test helper over every engine.
//! This crate's tests run it over [`MemoryDevice`](crate::MemoryDevice) and
//! [`FileDevice`](crate::FileDevice); other crates enable it for their tests
//! with the `testing` feature (a dev-dependency feature, so release builds
//! never see proptest):
//!
//! ```toml
//! [dev-dependencies]
//! scratchd-store = { workspace = true, features = ["testing"] }
//! ```
//!
//! and call it from a `proptest!` (a `#[test]` in a test module):
//!
//! ```
//! use proptest::prelude::*;
//! use scratchd_store::testing::{self, Expect};
//! use scratchd_store::MemoryDevice;
//!
//! proptest! {
//!     #![proptest_config(ProptestConfig::with_cases(8))]
//!     fn behaves_like_the_model((size, ops) in testing::sized_ops(64 << 10, 256 << 10)) {
//!         let dev = MemoryDevice::new(size).unwrap();
//!         testing::check(&dev, &ops, Expect { trim_zeroes: true, may_fill: false, trim_may_fill: false })?;
//!     }
//! }
//! behaves_like_the_model();
//! ```

use std::fmt::Debug;

use proptest::prelude::*;

use crate::memory::Budget;
use crate::{BlockDevice, Extent, ExtentKind, ZeroFlags};

/// The block size that offsets are drawn around.
const BLOCK: u64 = 4096;

/// One request to a device.
#[derive(Debug, Clone)]
pub enum Op {
    /// Writes `len` bytes made from `seed`.
    Write {
        offset: u64,
        len: u64,
        seed: u64,
    },
    Read {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Extents {
        offset: u64,
        len: u64,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// An offset in `[0, size]`, often on or near a block boundary.
fn position(size: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=size,
        (
            0..=size / BLOCK,
            prop_oneof![Just(0), 1..8u64, BLOCK - 8..BLOCK]
        )
            .prop_map(move |(block, delta)| (block * BLOCK + delta).min(size)),
        Just(size),
    ]
}

/// A range inside `[0, size]`, as `(offset, len)`.
fn range(size: u64) -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Up to three blocks and a bit.
        (position(size), 0..=3 * BLOCK + 16)
            .prop_map(move |(offset, len)| (offset, len.min(size - offset))),
        // Up to the whole disk.
        (position(size), position(size)).prop_map(|(a, b)| (a.min(b), a.abs_diff(b))),
    ]
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(size), any::<u64>())
            .prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => range(size).prop_map(|(offset, len)| Op::Read { offset, len }),
        2 => range(size).prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => (range(size), any::<bool>(), any::<bool>()).prop_map(
            |((offset, len), may_trim, fast)| Op::Zero {
                offset,
                len,
                flags: ZeroFlags { may_trim, fast },
            }
        ),
        2 => range(size).prop_map(|(offset, len)| Op::Extents { offset, len }),
        1 => range(size).prop_map(|(offset, len)| Op::Cache { offset, len }),
        1 => Just(Op::Flush),
    ]
}

/// A disk size in `[min, max]` (a multiple of the block size half the time)
/// and up to 32 operations on a disk of that size.
pub fn sized_ops(min: u64, max: u64) -> impl Strategy<Value = (u64, Vec<Op>)> {
    prop_oneof![
        (min / BLOCK..=max / BLOCK).prop_map(|blocks| blocks * BLOCK),
        min..=max,
    ]
    .prop_flat_map(|size| (Just(size), prop::collection::vec(op(size), 1..32)))
}

/// `len` pseudo-random bytes from `seed` (splitmix64).
fn bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

fn fail(step: usize, op: &Op, what: impl Debug) -> TestCaseError {
    TestCaseError::fail(format!("step {step}, {op:?}: {what:?}"))
}

/// Compares a read of `[offset, offset + expected.len())` with `expected`.
fn compare(
    dev: &dyn BlockDevice,
    offset: u64,
    expected: &[u8],
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let mut buf = vec![0xa5; expected.len()];
    dev.read(offset, &mut buf).map_err(|e| fail(step, op, e))?;
    // Slice equality is a memcmp, fast even in unoptimised test builds.
    if buf == expected {
        return Ok(());
    }
    match buf.iter().zip(expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(fail(
            step,
            op,
            format!(
                "byte {} reads {:#04x}, model has {:#04x}",
                offset + i as u64,
                buf[i],
                expected[i]
            ),
        )),
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    const ZEROS: [u8; 4096] = [0; 4096];
    bytes
        .chunks(ZEROS.len())
        .all(|chunk| chunk == &ZEROS[..chunk.len()])
}

/// Checks the device's extents of `[offset, offset + len)` against the model.
/// The output vector already holds an extent of the caller's, which the
/// device must leave alone (not merge its first extent into).
fn check_extents(
    dev: &dyn BlockDevice,
    model: &[u8],
    offset: u64,
    len: u64,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let callers = Extent {
        len: 1,
        kind: ExtentKind::Data,
    };
    let mut out = vec![callers];
    dev.extents(offset, len, &mut out)
        .map_err(|e| fail(step, op, e))?;
    if out[0] != callers {
        return Err(fail(step, op, ("the caller's extent was changed", &out)));
    }
    out.remove(0);
    let mut pos = offset;
    for (i, extent) in out.iter().enumerate() {
        let end = pos + extent.len;
        if extent.len == 0 || end > offset + len {
            return Err(fail(step, op, ("bad extent length", &out)));
        }
        if i > 0 && out[i - 1].kind == extent.kind {
            return Err(fail(step, op, ("unmerged extents", &out)));
        }
        if extent.kind == ExtentKind::Hole && !is_zero(&model[pos as usize..end as usize]) {
            return Err(fail(step, op, ("hole over data", pos, end, &out)));
        }
        pos = end;
    }
    if pos != offset + len {
        return Err(fail(step, op, ("extents do not cover the range", &out)));
    }
    Ok(())
}

/// What a device may do that a plain byte array would not.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Trims make their range read as zeros; when false, they must leave it
    /// unchanged (a file system that cannot punch holes).
    pub trim_zeroes: bool,
    /// Writes and zeroing without `may_trim` may fail with `ENOSPC` (a
    /// budget), leaving the device unchanged; when false, `ENOSPC` fails the
    /// test like any other error.
    pub may_fill: bool,
    /// Trims, and zeroing that may trim, may fail with `ENOSPC` too (when
    /// `may_fill`), leaving the device unchanged: a clone copies up a
    /// shared block that such a request covers in part.
    pub trim_may_fill: bool,
}

/// An invariant for [`check_with`]: `budget` holds no more than its limit.
pub fn within_budget(budget: &Budget) -> Result<(), String> {
    let (used, limit) = (budget.used(), budget.limit());
    if used > limit {
        return Err(format!("budget overdrawn: {used} of {limit} bytes"));
    }
    Ok(())
}

/// Runs `ops` on `dev`, a zero-filled device, and on a model of it, checking
/// after each step that the whole device reads as the model does.
///
/// Besides what `expect` allows, fast zeroing may fail with `EOPNOTSUPP`,
/// leaving the device unchanged.
pub fn check(dev: &dyn BlockDevice, ops: &[Op], expect: Expect) -> Result<(), TestCaseError> {
    check_with(dev, ops, expect, || Ok(()))
}

/// [`check`], and `invariant` after every step: the device's own
/// bookkeeping (a budget never overdrawn, say); an `Err` names what broke.
pub fn check_with(
    dev: &dyn BlockDevice,
    ops: &[Op],
    expect: Expect,
    mut invariant: impl FnMut() -> Result<(), String>,
) -> Result<(), TestCaseError> {
    let size = dev.size();
    let mut model = vec![0u8; size as usize];
    for (step, op) in ops.iter().enumerate() {
        apply(dev, &mut model, op, step, expect)?;
        compare(dev, 0, &model, step, op)?;
        invariant().map_err(|e| fail(step, op, e))?;
    }
    check_extents(dev, &model, 0, size, ops.len(), &Op::Flush)
}

/// Runs `op` on `dev` and on `model`, checking what it returns (reads, extents).
fn apply(
    dev: &dyn BlockDevice,
    model: &mut [u8],
    op: &Op,
    step: usize,
    expect: Expect,
) -> Result<(), TestCaseError> {
    let full = |e: &std::io::Error| expect.may_fill && e.raw_os_error() == Some(libc::ENOSPC);
    match *op {
        Op::Write { offset, len, seed } => {
            let data = bytes(seed, len);
            // Odd seeds go through `write_from` where the backend has it.
            let direct = (seed % 2 == 1)
                .then(|| dev.write_from(offset, data.len(), &mut &data[..], false))
                .flatten();
            match direct.unwrap_or_else(|| dev.write(offset, &data, false)) {
                Ok(()) => model[offset as usize..][..len as usize].copy_from_slice(&data),
                Err(e) if full(&e) => {}
                Err(e) => return Err(fail(step, op, e)),
            }
        }
        Op::Read { offset, len } => {
            let want = &model[offset as usize..][..len as usize];
            compare(dev, offset, want, step, op)?;
            let mut got = Vec::new();
            let mut append = |b: &[u8]| {
                got.extend_from_slice(b);
                Ok(())
            };
            if let Some(r) = dev.read_to(offset, len as usize, &mut append) {
                r.map_err(|e| fail(step, op, e))?;
                prop_assert!(got == want, "step {step}: read_to differs after {op:?}");
            }
        }
        Op::Trim { offset, len } => match dev.trim(offset, len, false) {
            Ok(()) if expect.trim_zeroes => model[offset as usize..][..len as usize].fill(0),
            Ok(()) => {}
            // A clone copies up a shared block that a trim covers in part.
            Err(e) if expect.trim_may_fill && full(&e) => {}
            Err(e) => return Err(fail(step, op, e)),
        },
        Op::Zero { offset, len, flags } => match dev.zero(offset, len, flags, false) {
            Ok(()) => model[offset as usize..][..len as usize].fill(0),
            Err(e) if full(&e) && (!flags.may_trim || expect.trim_may_fill) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && flags.fast => {}
            Err(e) => return Err(fail(step, op, e)),
        },
        Op::Extents { offset, len } => check_extents(dev, model, offset, len, step, op)?,
        Op::Cache { offset, len } => dev.cache(offset, len).map_err(|e| fail(step, op, e))?,
        Op::Flush => dev.flush().map_err(|e| fail(step, op, e))?,
    }
    Ok(())
}

/// One step of the clone suite ([`check_clones`]). Indices are taken
/// modulo the number of disks or snapshots alive; a step that names none
/// does nothing.
#[derive(Debug, Clone)]
pub enum CloneStep {
    /// `op` on a disk.
    On { disk: usize, op: Op },
    /// A snapshot of a disk.
    Snapshot { disk: usize },
    /// A new disk, a clone of a snapshot.
    Clone { snapshot: usize },
    /// The suite lets go of a snapshot; its clones keep it alive.
    DropSnapshot { snapshot: usize },
    /// A disk goes (not the last one).
    DropDisk { disk: usize },
}

fn clone_step(size: u64) -> impl Strategy<Value = CloneStep> {
    prop_oneof![
        12 => (any::<usize>(), op(size)).prop_map(|(disk, op)| CloneStep::On { disk, op }),
        2 => any::<usize>().prop_map(|disk| CloneStep::Snapshot { disk }),
        3 => any::<usize>().prop_map(|snapshot| CloneStep::Clone { snapshot }),
        1 => any::<usize>().prop_map(|snapshot| CloneStep::DropSnapshot { snapshot }),
        1 => any::<usize>().prop_map(|disk| CloneStep::DropDisk { disk }),
    ]
}

/// A disk size in `[min, max]` and up to 48 clone-suite steps.
pub fn sized_clone_steps(min: u64, max: u64) -> impl Strategy<Value = (u64, Vec<CloneStep>)> {
    prop_oneof![
        (min / BLOCK..=max / BLOCK).prop_map(|blocks| blocks * BLOCK),
        min..=max,
    ]
    .prop_flat_map(|size| (Just(size), prop::collection::vec(clone_step(size), 1..48)))
}

/// What [`check_clones`] needs of a backing: snapshots of its disks, and
/// clones of those, and a check of its accounting.
pub trait Cow {
    /// A disk: the first one, or a clone.
    type Disk: BlockDevice;
    /// A snapshot, as the suite holds it.
    type Snap;
    /// A snapshot of `disk`.
    fn snapshot(&mut self, disk: &Self::Disk) -> std::io::Result<Self::Snap>;
    /// A new disk that starts as `snap`.
    fn clone_of(&mut self, snap: &Self::Snap) -> std::io::Result<Self::Disk>;
    /// After every step, with what the suite holds: every budget exact
    /// (an `Err` names what is wrong).
    fn check(&mut self, disks: &[Self::Disk], snaps: &[Self::Snap]) -> Result<(), String>;
}

/// Runs `steps` on `first`, a zero-filled disk, and on the snapshots and
/// clones they make, each beside a model; after every step every disk must
/// read as its model and `cow.check` must pass. Taking a snapshot may fail
/// with `ENOSPC` when `expect.may_fill`.
pub fn check_clones<C: Cow>(
    cow: &mut C,
    first: C::Disk,
    steps: &[CloneStep],
    expect: Expect,
) -> Result<(), TestCaseError> {
    let size = first.size();
    let mut disks = vec![first];
    let mut models = vec![vec![0u8; size as usize]];
    let mut snaps: Vec<C::Snap> = Vec::new();
    let mut snap_models: Vec<Vec<u8>> = Vec::new();
    let flush = Op::Flush;
    for (step, how) in steps.iter().enumerate() {
        let stepfail = |e: &dyn Debug| TestCaseError::fail(format!("step {step}, {how:?}: {e:?}"));
        match *how {
            CloneStep::On { disk, ref op } => {
                let i = disk % disks.len();
                apply(&disks[i], &mut models[i], op, step, expect)?;
            }
            CloneStep::Snapshot { disk } => {
                let i = disk % disks.len();
                match cow.snapshot(&disks[i]) {
                    Ok(snap) => {
                        snaps.push(snap);
                        snap_models.push(models[i].clone());
                    }
                    Err(e) if expect.may_fill && e.raw_os_error() == Some(libc::ENOSPC) => {}
                    Err(e) => return Err(stepfail(&e)),
                }
            }
            CloneStep::Clone { snapshot } if !snaps.is_empty() => {
                let i = snapshot % snaps.len();
                disks.push(cow.clone_of(&snaps[i]).map_err(|e| stepfail(&e))?);
                models.push(snap_models[i].clone());
            }
            CloneStep::DropSnapshot { snapshot } if !snaps.is_empty() => {
                let i = snapshot % snaps.len();
                snaps.remove(i);
                snap_models.remove(i);
            }
            CloneStep::DropDisk { disk } if disks.len() > 1 => {
                let i = disk % disks.len();
                disks.remove(i);
                models.remove(i);
            }
            _ => {}
        }
        for (disk, model) in disks.iter().zip(&models) {
            compare(disk, 0, model, step, &flush)?;
        }
        cow.check(&disks, &snaps).map_err(|e| stepfail(&e))?;
    }
    for (disk, model) in disks.iter().zip(&models) {
        check_extents(disk, model, 0, size, steps.len(), &flush)?;
    }
    Ok(())
}
