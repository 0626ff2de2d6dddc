//! Registry-wide counters: disks created and destroyed, and how long
//! creations took, as a histogram for the metrics.
//!
//! The disks keep these too (a disk counts itself destroyed when it goes,
//! wherever that happens), so they are shared atomics rather than state
//! under the registry's lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (milliseconds) of the disk creation time histogram.
pub const CREATION_BUCKETS_MS: [f64; 10] = [
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];

/// Disks created and destroyed, and creation times.
#[derive(Default)]
pub(super) struct Counters {
    created: AtomicU64,
    destroyed: AtomicU64,
    /// Creations per bucket of [`CREATION_BUCKETS_MS`] (not cumulative),
    /// and one more for slower ones.
    creation: [AtomicU64; CREATION_BUCKETS_MS.len() + 1],
    /// Sum of creation times, in microseconds.
    creation_us: AtomicU64,
}

impl Counters {
    /// A disk was made, in `took`.
    pub(super) fn created(&self, took: Duration) {
        let ms = took.as_secs_f64() * 1e3;
        let bucket = CREATION_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(CREATION_BUCKETS_MS.len());
        self.creation[bucket].fetch_add(1, Ordering::Relaxed);
        self.creation_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.created.fetch_add(1, Ordering::Relaxed);
    }

    /// A disk was destroyed.
    pub(super) fn destroyed(&self) {
        self.destroyed.fetch_add(1, Ordering::Relaxed);
    }

    /// (created, destroyed) so far.
    pub(super) fn totals(&self) -> (u64, u64) {
        (
            self.created.load(Ordering::Relaxed),
            self.destroyed.load(Ordering::Relaxed),
        )
    }

    /// Creations per bucket of [`CREATION_BUCKETS_MS`] (each counts those
    /// above the bound before it), then those slower than the last.
    pub(super) fn creation_buckets(&self) -> Vec<u64> {
        self.creation
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Sum of creation times, in seconds.
    pub(super) fn creation_seconds(&self) -> f64 {
        self.creation_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creations_fall_in_the_first_bucket_they_fit() {
        let c = Counters::default();
        c.created(Duration::from_micros(500));
        c.created(Duration::from_millis(1));
        c.created(Duration::from_millis(7));
        c.created(Duration::from_secs(60));
        c.destroyed();
        let buckets = c.creation_buckets();
        assert_eq!(buckets.len(), CREATION_BUCKETS_MS.len() + 1);
        assert_eq!((buckets[0], buckets[2], buckets[10]), (2, 1, 1));
        assert_eq!(buckets.iter().sum::<u64>(), 4);
        assert_eq!(c.totals(), (4, 1));
        assert!((c.creation_seconds() - 60.0085).abs() < 1e-9);
    }
}
