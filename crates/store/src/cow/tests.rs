use std::path::Path;
use std::sync::Weak;

use proptest::prelude::*;

use super::*;
use crate::memory::Budget;
use crate::testing::{self, CloneStep, Cow, Expect, Op};
use crate::{FileDevice, MemoryDevice};

const KIB: u64 = 1024;

fn block() -> u64 {
    allocation_block_size()
}

/// A snapshot of `src`, held in memory.
fn snapshot_in_memory(src: &MemoryDevice) -> Arc<Snapshot> {
    let into = MemoryDevice::new(src.size()).unwrap();
    Arc::new(Snapshot::copy(src, Box::new(into)).unwrap())
}

fn empty_snapshot(size: u64) -> Arc<Snapshot> {
    snapshot_in_memory(&MemoryDevice::new(size).unwrap())
}

fn kinds(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<(ExtentKind, u64)> {
    let mut out = Vec::new();
    dev.extents(offset, len, &mut out).unwrap();
    out.iter().map(|e| (e.kind, e.len)).collect()
}

/// Bytes in data extents, over the whole device.
fn data_bytes(dev: &dyn BlockDevice) -> u64 {
    kinds(dev, 0, dev.size())
        .iter()
        .filter(|(kind, _)| *kind == ExtentKind::Data)
        .map(|(_, len)| len)
        .sum()
}

/// A disk of `size` bytes with `fill` written over `[offset, offset + len)`.
fn disk_with(size: u64, offset: u64, len: u64, fill: u8) -> MemoryDevice {
    let dev = MemoryDevice::new(size).unwrap();
    dev.write(offset, &vec![fill; len as usize], false).unwrap();
    dev
}

fn read(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xa5; len as usize];
    dev.read(offset, &mut buf).unwrap();
    buf
}

#[test]
fn a_snapshot_holds_the_data_once_and_skips_zero_blocks() {
    let bs = block();
    let src = disk_with(64 * bs, bs, 3 * bs, 7);
    // A block of written zeros is data in the source, nothing in the copy.
    src.write(10 * bs, &vec![0; bs as usize], false).unwrap();
    let budget = Arc::new(Budget::new(u64::MAX));
    let dev = MemoryDevice::with_budget(64 * bs, budget.clone()).unwrap();
    let snap = Snapshot::copy(&src, Box::new(dev)).unwrap();
    assert_eq!(budget.used(), 3 * bs);
    assert_eq!(read(snap.device(), bs, 3 * bs), vec![7; 3 * bs as usize]);
    assert_eq!(data_bytes(snap.device()), 3 * bs);
    assert_eq!(snap.data_bytes(), 3 * bs);
    drop(snap);
    assert_eq!(budget.used(), 0);
}

#[test]
fn a_snapshot_of_another_size_or_past_its_budget_is_refused() {
    let bs = block();
    let src = disk_with(8 * bs, 0, 4 * bs, 1);
    let err = Snapshot::copy(&src, Box::new(MemoryDevice::new(4 * bs).unwrap())).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    let budget = Arc::new(Budget::new(2 * bs));
    let dev = MemoryDevice::with_budget(8 * bs, budget.clone()).unwrap();
    let err = Snapshot::copy(&src, Box::new(dev)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(budget.used(), 0, "a failed copy keeps nothing");
}

#[test]
fn clones_read_through_and_write_privately() {
    let bs = block();
    let size = 16 * bs;
    let snap = snapshot_in_memory(&disk_with(size, 0, 8 * bs, 3));
    let a = CloneDevice::new(snap.clone(), MemoryDevice::new(size).unwrap()).unwrap();
    let b = CloneDevice::new(snap.clone(), MemoryDevice::new(size).unwrap()).unwrap();
    // Reading costs a clone nothing.
    assert_eq!(read(&a, 0, 8 * bs), vec![3; 8 * bs as usize]);
    assert_eq!(a.private().allocated_bytes(), 0);
    // A partial write copies its block up: the rest keeps the snapshot's bytes.
    a.write(bs + 10, &[9; 10], false).unwrap();
    assert_eq!(a.private().allocated_bytes(), bs);
    let mut want = vec![3; 2 * bs as usize];
    want[bs as usize + 10..bs as usize + 20].fill(9);
    assert_eq!(read(&a, 0, 2 * bs), want);
    // The other clone and the snapshot are untouched.
    assert_eq!(read(&b, 0, 2 * bs), vec![3; 2 * bs as usize]);
    assert_eq!(read(snap.device(), 0, 2 * bs), vec![3; 2 * bs as usize]);
    // A whole-block write copies nothing up.
    b.write(4 * bs, &vec![5; 2 * bs as usize], false).unwrap();
    assert_eq!(b.private().allocated_bytes(), 2 * bs);
}

#[test]
fn trimmed_and_zeroed_blocks_of_a_clone_read_as_zeros_and_report_holes() {
    use ExtentKind::{Data, Hole};
    let bs = block();
    let size = 16 * bs;
    let snap = snapshot_in_memory(&disk_with(size, 0, 8 * bs, 3));
    let clone = CloneDevice::new(snap, MemoryDevice::new(size).unwrap()).unwrap();
    clone.trim(bs, 2 * bs, false).unwrap();
    let punch = ZeroFlags {
        may_trim: true,
        fast: false,
    };
    clone.zero(5 * bs, bs, punch, false).unwrap();
    assert_eq!(read(&clone, bs, 2 * bs), vec![0; 2 * bs as usize]);
    assert_eq!(read(&clone, 5 * bs, bs), vec![0; bs as usize]);
    // Trimming costs nothing; block status is exact.
    assert_eq!(clone.private().allocated_bytes(), 0);
    assert_eq!(
        kinds(&clone, 0, size),
        [
            (Data, bs),
            (Hole, 2 * bs),
            (Data, 2 * bs),
            (Hole, bs),
            (Data, 2 * bs),
            (Hole, 8 * bs)
        ]
    );
    // A write into a trimmed block does not bring the snapshot's bytes back.
    clone.write(bs + 1, &[8], false).unwrap();
    let mut want = vec![0; bs as usize];
    want[1] = 8;
    assert_eq!(read(&clone, bs, bs), want);
    // Zeroing without trimming allocates.
    let no_hole = ZeroFlags::default();
    clone.zero(6 * bs, bs, no_hole, false).unwrap();
    assert_eq!(read(&clone, 6 * bs, bs), vec![0; bs as usize]);
    assert_eq!(clone.private().allocated_bytes(), 2 * bs);
}

#[test]
fn a_full_budget_fails_a_clone_write_and_changes_nothing() {
    let bs = block();
    let size = 8 * bs;
    let snap = snapshot_in_memory(&disk_with(size, 0, size, 3));
    let budget = Arc::new(Budget::new(bs));
    let private = MemoryDevice::with_budget(size, budget.clone()).unwrap();
    let clone = CloneDevice::new(snap, private).unwrap();
    let err = clone
        .write(10, &vec![1; 2 * bs as usize], false)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(read(&clone, 0, size), vec![3; size as usize]);
    let err = clone.trim(5 * bs + 10, 10, false).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "the copy-up needs room"
    );
    assert!(budget.used() <= bs);
    assert_eq!(read(&clone, 0, size), vec![3; size as usize]);
}

#[test]
fn a_clone_costs_the_same_whatever_the_size() {
    const TIB: u64 = 1 << 40;
    let snap = empty_snapshot(TIB);
    for _ in 0..100 {
        let clone = CloneDevice::new(snap.clone(), MemoryDevice::new(TIB).unwrap()).unwrap();
        clone.write(TIB - 4, b"last", false).unwrap();
        assert_eq!(read(&clone, TIB - 4, 4), b"last");
    }
}

#[test]
fn disjoint_writes_to_one_shared_block_all_land() {
    let bs = block();
    let size = 64 * bs;
    let snap = snapshot_in_memory(&disk_with(size, 0, size, 0xee));
    let clone = CloneDevice::new(snap, MemoryDevice::new(size).unwrap()).unwrap();
    const SECTOR: u64 = 512;
    // Each thread writes every fourth sector: every block is copied up by
    // whichever thread comes first, and no copy-up may erase a sector.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let clone = &clone;
            s.spawn(move || {
                for sector in (t..size / SECTOR).step_by(4) {
                    let data = [(sector % 251) as u8; SECTOR as usize];
                    clone.write(sector * SECTOR, &data, false).unwrap();
                }
            });
        }
    });
    let all = read(&clone, 0, size);
    for (sector, chunk) in all.chunks(SECTOR as usize).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == (sector % 251) as u8),
            "sector {sector}"
        );
    }
    assert_eq!(clone.private().allocated_bytes(), size);
}

/// Clones in memory, every snapshot and clone charged within one budget.
struct MemoryCow {
    global: Arc<Budget>,
    /// Every snapshot made, with the budget its bytes are charged to.
    snapshots: Vec<(Weak<Snapshot>, Arc<Budget>)>,
}

impl MemoryCow {
    fn new(limit: u64) -> Self {
        Self {
            global: Arc::new(Budget::new(limit)),
            snapshots: Vec::new(),
        }
    }

    fn first_disk(&self, size: u64) -> CloneDevice<MemoryDevice> {
        let private = MemoryDevice::with_budget(size, self.global.clone()).unwrap();
        CloneDevice::new(empty_snapshot(size), private).unwrap()
    }
}

impl Cow for MemoryCow {
    type Disk = CloneDevice<MemoryDevice>;
    type Snap = Arc<Snapshot>;

    fn snapshot(&mut self, disk: &Self::Disk) -> io::Result<Self::Snap> {
        let budget = Arc::new(Budget::within(self.global.clone(), u64::MAX));
        let into = MemoryDevice::with_budget(disk.size(), budget.clone())?;
        let snap = Arc::new(Snapshot::copy(disk, Box::new(into))?);
        self.snapshots.push((Arc::downgrade(&snap), budget));
        Ok(snap)
    }

    fn clone_of(&mut self, snap: &Self::Snap) -> io::Result<Self::Disk> {
        let share = Arc::new(Budget::within(self.global.clone(), u64::MAX));
        CloneDevice::new(snap.clone(), MemoryDevice::with_budget(snap.size(), share)?)
    }

    fn check(&mut self, disks: &[Self::Disk], _: &[Self::Snap]) -> Result<(), String> {
        let bs = block();
        let mut expected = 0;
        for disk in disks {
            let held = disk.private().allocated_bytes();
            let data = data_bytes(disk.private());
            if !(data <= held && held < data + bs) {
                return Err(format!("a clone holds {held} bytes for {data} of data"));
            }
            expected += held;
        }
        for (snap, budget) in &self.snapshots {
            match snap.upgrade() {
                Some(snap) => {
                    let data = data_bytes(snap.device());
                    if !(data <= budget.used() && budget.used() < data + bs) {
                        return Err(format!(
                            "a snapshot is charged {} bytes for {data} of data",
                            budget.used()
                        ));
                    }
                    expected += budget.used();
                }
                None if budget.used() != 0 => {
                    return Err(format!("a dropped snapshot holds {}", budget.used()));
                }
                None => {}
            }
        }
        testing::within_budget(&self.global)?;
        if self.global.used() != expected {
            return Err(format!(
                "{} bytes charged, {expected} held",
                self.global.used()
            ));
        }
        Ok(())
    }
}

/// Clones with snapshots and private blocks in unnamed files in `dir`.
struct FileCow<'a> {
    dir: &'a Path,
}

fn file_device(dir: &Path, size: u64) -> io::Result<FileDevice> {
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file().set_len(size)?;
    // The device keeps the file open; its name goes with `tmp`.
    FileDevice::open(tmp.path(), false)
}

impl Cow for FileCow<'_> {
    type Disk = CloneDevice<FileDevice>;
    type Snap = Arc<Snapshot>;

    fn snapshot(&mut self, disk: &Self::Disk) -> io::Result<Self::Snap> {
        let into = file_device(self.dir, disk.size())?;
        Ok(Arc::new(Snapshot::copy(disk, Box::new(into))?))
    }

    fn clone_of(&mut self, snap: &Self::Snap) -> io::Result<Self::Disk> {
        CloneDevice::new(snap.clone(), file_device(self.dir, snap.size())?)
    }

    fn check(&mut self, _: &[Self::Disk], _: &[Self::Snap]) -> Result<(), String> {
        Ok(())
    }
}

const EXACT: Expect = Expect {
    trim_zeroes: true,
    may_fill: false,
    trim_may_fill: false,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn clones_in_memory_behave_like_the_model(
        (size, steps) in testing::sized_clone_steps(32 * KIB, 192 * KIB)
    ) {
        let mut cow = MemoryCow::new(u64::MAX);
        let first = cow.first_disk(size);
        testing::check_clones(&mut cow, first, &steps, EXACT)?;
        prop_assert_eq!(cow.global.used(), 0);
    }

    #[test]
    fn clones_in_memory_within_a_budget_behave_like_the_model(
        (size, steps) in testing::sized_clone_steps(32 * KIB, 128 * KIB),
        blocks in 0u64..48,
    ) {
        let mut cow = MemoryCow::new(blocks * block());
        let first = cow.first_disk(size);
        let expect = Expect { may_fill: true, trim_may_fill: true, ..EXACT };
        testing::check_clones(&mut cow, first, &steps, expect)?;
        prop_assert_eq!(cow.global.used(), 0);
    }

    #[test]
    fn clones_in_files_behave_like_the_model(
        (size, steps) in testing::sized_clone_steps(32 * KIB, 128 * KIB)
    ) {
        let dir = tempfile::tempdir_in(tmpfs()).unwrap();
        let mut cow = FileCow { dir: dir.path() };
        let first = cow.clone_of(&empty_snapshot(size)).unwrap();
        testing::check_clones(&mut cow, first, &steps, EXACT)?;
    }

    #[test]
    fn a_clone_alone_behaves_like_a_disk(
        (size, ops) in testing::sized_ops(32 * KIB, 256 * KIB)
    ) {
        let clone = CloneDevice::new(empty_snapshot(size), MemoryDevice::new(size).unwrap()).unwrap();
        testing::check(&clone, &ops, EXACT)?;
    }
}

/// A tmpfs directory, which punches holes (as the scratch disks' do).
fn tmpfs() -> &'static Path {
    Path::new("/dev/shm")
}

#[test]
fn the_clone_suite_fails_a_clone_that_reads_a_trimmed_block_through() {
    // The suite can fail: a trim that only trims the private device (and
    // so lets the snapshot's data show again) is caught.
    struct Leaky(CloneDevice<MemoryDevice>);
    impl BlockDevice for Leaky {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        fn read(&self, o: u64, b: &mut [u8]) -> io::Result<()> {
            self.0.read(o, b)
        }
        fn write(&self, o: u64, d: &[u8], f: bool) -> io::Result<()> {
            self.0.write(o, d, f)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, o: u64, l: u64, f: bool) -> io::Result<()> {
            self.0.private().trim(o, l, f)
        }
        fn zero(&self, o: u64, l: u64, fl: ZeroFlags, f: bool) -> io::Result<()> {
            self.0.zero(o, l, fl, f)
        }
        fn extents(&self, o: u64, l: u64, out: &mut Vec<Extent>) -> io::Result<()> {
            self.0.extents(o, l, out)
        }
    }
    struct LeakyCow;
    impl Cow for LeakyCow {
        type Disk = Leaky;
        type Snap = Arc<Snapshot>;
        fn snapshot(&mut self, disk: &Leaky) -> io::Result<Arc<Snapshot>> {
            let into = MemoryDevice::new(disk.size())?;
            Ok(Arc::new(Snapshot::copy(disk, Box::new(into))?))
        }
        fn clone_of(&mut self, snap: &Arc<Snapshot>) -> io::Result<Leaky> {
            Ok(Leaky(CloneDevice::new(
                snap.clone(),
                MemoryDevice::new(snap.size())?,
            )?))
        }
        fn check(&mut self, _: &[Leaky], _: &[Arc<Snapshot>]) -> Result<(), String> {
            Ok(())
        }
    }
    let bs = block();
    let first = LeakyCow.clone_of(&empty_snapshot(4 * bs)).unwrap();
    let steps = [
        CloneStep::On {
            disk: 0,
            op: Op::Write {
                offset: 0,
                len: bs,
                seed: 2,
            },
        },
        CloneStep::Snapshot { disk: 0 },
        CloneStep::Clone { snapshot: 0 },
        CloneStep::On {
            disk: 1,
            op: Op::Trim { offset: 0, len: bs },
        },
    ];
    assert!(testing::check_clones(&mut LeakyCow, first, &steps, EXACT).is_err());
}
