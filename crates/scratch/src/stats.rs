//! Per-disk counters, kept with relaxed atomics on the data path and read as
//! a [`StatsSnapshot`] by the registry (for its log line when the disk goes,
//! `scratchd ctl` and the metrics).
//!
//! The I/O counters are the device's to keep; error replies are the
//! server's to count (a refused request never reaches the device), so the
//! device hands its [`ErrorCounts`] (a store type, which knows errno names,
//! not NBD) to the connections that open it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use scratchd_store::ErrorCounts;

/// One operation kind: how many calls and how many bytes.
#[derive(Debug, Default)]
pub(crate) struct Counter {
    ops: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    pub(crate) fn add(&self, bytes: u64) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.ops.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Live counters of one disk.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) read: Counter,
    pub(crate) written: Counter,
    pub(crate) trimmed: Counter,
    pub(crate) zeroed: Counter,
    pub(crate) flushes_dropped: AtomicU64,
    pub(crate) fua_dropped: AtomicU64,
    /// Error replies by errno, counted by the server's connections.
    pub(crate) errors: Arc<ErrorCounts>,
}

/// A disk's I/O counters: what `ctl` shows and the metrics export, in
/// one place (`scratchd ctl --json` flattens them into each export).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoCounters {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    pub trims: u64,
    pub trimmed_bytes: u64,
    pub zeroes: u64,
    pub zeroed_bytes: u64,
    /// FLUSH requests answered without doing anything.
    pub flushes_dropped: u64,
    /// Requests whose FUA flag was ignored.
    pub fua_dropped: u64,
}

/// A disk's statistics at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections attached now.
    pub connections: u64,
    /// Connections attached since the disk was created.
    pub connections_total: u64,
    pub io: IoCounters,
    /// Error replies by errno name (`ENOSPC`), those that were sent only.
    pub errors: Vec<(&'static str, u64)>,
    /// Memory or disk space the disk holds now (a clone: what it wrote
    /// privately).
    pub allocated_bytes: u64,
    /// A clone: the bytes of the snapshot it reads through to, held once
    /// for all its clones; 0 for other disks.
    pub shared_bytes: u64,
    /// Time since the disk was given its name.
    pub age: Duration,
}

impl Stats {
    /// The I/O counters, with the other fields left for the caller.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let (reads, read_bytes) = self.read.get();
        let (writes, written_bytes) = self.written.get();
        let (trims, trimmed_bytes) = self.trimmed.get();
        let (zeroes, zeroed_bytes) = self.zeroed.get();
        StatsSnapshot {
            io: IoCounters {
                reads,
                read_bytes,
                writes,
                written_bytes,
                trims,
                trimmed_bytes,
                zeroes,
                zeroed_bytes,
                flushes_dropped: self.flushes_dropped.load(Ordering::Relaxed),
                fua_dropped: self.fua_dropped.load(Ordering::Relaxed),
            },
            errors: self
                .errors
                .by_errno()
                .into_iter()
                .filter(|&(_, n)| n > 0)
                .collect(),
            ..StatsSnapshot::default()
        }
    }
}
