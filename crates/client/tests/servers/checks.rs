//! Checks that every server gets: data round trips from many threads,
//! holes, trim, zeroing and extents. Each takes a fresh (all-zero) region
//! of the export of its own.

use std::io;

use scratchd_client::{BlockDevice, Client, ExtentKind, ZeroFlags};

use crate::util::{is_zero, Rng};

const MIB: u64 = 1 << 20;

/// `threads` threads, each owning `region` bytes from `base` on, write
/// random data of random sizes at random offsets and read random ranges
/// back, against a model of their region; then the whole of it is read
/// back in one call.
pub fn round_trip(client: &Client, base: u64, threads: usize, region: u64, ops: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let start = base + t as u64 * region;
            s.spawn(move || one_thread(client, start, region, ops, t as u64));
        }
    });
}

fn one_thread(client: &Client, start: u64, region: u64, ops: usize, seed: u64) {
    let mut rng = Rng::new(seed * 7919 + 1);
    let mut model = vec![0u8; region as usize];
    for step in 0..ops {
        let len = match rng.below(8) {
            0 => rng.below(region / 2) + 1,
            1..=3 => rng.below(4096) + 1,
            _ => rng.below(128 << 10) + 1,
        };
        let offset = rng.below(region - len + 1);
        let range = offset as usize..(offset + len) as usize;
        if rng.below(2) == 0 {
            rng.fill(&mut model[range.clone()]);
            let fua = rng.below(8) == 0;
            client
                .write(start + offset, &model[range], fua)
                .unwrap_or_else(|e| panic!("step {step}: write {offset}+{len}: {e}"));
        } else {
            let mut buf = vec![0xa5; len as usize];
            client
                .read(start + offset, &mut buf)
                .unwrap_or_else(|e| panic!("step {step}: read {offset}+{len}: {e}"));
            assert!(
                buf == model[range],
                "step {step}: read {offset}+{len} differs"
            );
        }
    }
    let all = client.read_vec(start, region as usize).expect("read back");
    assert!(all == model, "region at {start} differs after {ops} steps");
}

/// Never-written space reads as zeros, also around a little data in one
/// request (holes and data chunks mixed in a structured reply).
pub fn holes(client: &Client, base: u64) {
    let mut buf = vec![0xa5; 4 * MIB as usize];
    client.read(base, &mut buf).expect("read unwritten space");
    assert!(is_zero(&buf), "unwritten space does not read as zeros");
    client.write(base + MIB + 100, b"island", false).unwrap();
    client.read(base, &mut buf).unwrap();
    let at = (MIB + 100) as usize;
    assert_eq!(&buf[at..at + 6], b"island");
    assert!(is_zero(&buf[..at]) && is_zero(&buf[at + 6..]));
}

/// Zeroing (deallocating or not), trimming, fast zero, cache, flush and
/// extents over a 4 MiB region at `base`; `trim_zeroes`: trimmed space
/// must read as zeros afterwards (memory servers), else either way.
pub fn trim_zero_extents(client: &Client, base: u64, trim_zeroes: bool) {
    let mut rng = Rng::new(base);
    let mut data = vec![0u8; 4 * MIB as usize];
    rng.fill(&mut data);
    client.write(base, &data, false).unwrap();
    let len = data.len();
    let whole = |client: &Client| client.read_vec(base, len).unwrap();

    let trim_zero = ZeroFlags {
        may_trim: true,
        fast: false,
    };
    client.zero(base + MIB, MIB, trim_zero, false).unwrap();
    data[MIB as usize..2 * MIB as usize].fill(0);
    client
        .zero(base + 2 * MIB + 5, 70_000, ZeroFlags::default(), true)
        .unwrap();
    data[(2 * MIB + 5) as usize..(2 * MIB + 70_005) as usize].fill(0);
    assert!(whole(client) == data, "zeroed ranges");

    let fast = ZeroFlags {
        may_trim: true,
        fast: true,
    };
    match client.zero(base + 3 * MIB, 4096, fast, false) {
        Ok(()) => data[3 * MIB as usize..3 * MIB as usize + 4096].fill(0),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "fast zero: {e}"),
    }
    assert!(whole(client) == data, "after fast zero");

    let old = data[3 * MIB as usize..].to_vec();
    client.trim(base + 3 * MIB, MIB, false).unwrap();
    let got = whole(client);
    let tail = &got[3 * MIB as usize..];
    if trim_zeroes || is_zero(tail) {
        assert!(is_zero(tail), "trimmed range does not read as zeros");
        data[3 * MIB as usize..].fill(0);
    } else {
        assert!(tail == old, "trim changed data to something else");
    }
    assert!(got == data, "after trim");

    client.cache(base, 4 * MIB).unwrap();
    client.flush().unwrap();
    check_extents(client, base, &data);
}

/// Extents cover the range exactly, merged, holes only over zeros; with
/// block status, the deallocated MiB shows up as (at least partly) a hole.
fn check_extents(client: &Client, base: u64, data: &[u8]) {
    let mut out = Vec::new();
    client.extents(base, data.len() as u64, &mut out).unwrap();
    let mut pos = 0usize;
    let mut saw_hole_in_zeroed = false;
    for (i, e) in out.iter().enumerate() {
        assert!(e.len > 0, "empty extent in {out:?}");
        if i > 0 {
            assert_ne!(out[i - 1].kind, e.kind, "unmerged {out:?}");
        }
        let end = pos + e.len as usize;
        if e.kind == ExtentKind::Hole {
            assert!(is_zero(&data[pos..end]), "hole over data at {pos}..{end}");
            if pos < 2 * MIB as usize && end > MIB as usize {
                saw_hole_in_zeroed = true;
            }
        }
        pos = end;
    }
    assert_eq!(pos, data.len(), "extents {out:?} do not cover the range");
    let negotiated = client.info().base_allocation.is_some();
    assert_eq!(saw_hole_in_zeroed, negotiated, "extents {out:?}");
    if !negotiated {
        assert_eq!(out.len(), 1);
    }
}

/// The raw OS error of a request's failure.
pub fn errno_of(r: io::Result<()>) -> i32 {
    let e = r.expect_err("the request should fail");
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e:?}"))
}
