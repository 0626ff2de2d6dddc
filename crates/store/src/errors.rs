//! Errors a device's users were answered with, by errno.
//!
//! A device cannot count these itself: a request refused before it reaches
//! the device (out of range, read-only, shutting down) is an error reply
//! too. So whoever answers requests (the server's connections) charges an
//! [`ErrorCounts`], and whoever keeps the device (a registry, beside the
//! disk's other counters) shows it. Every connection of one device shares
//! its atomics, never a lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// The errnos counted, by Linux number and name: those a block device's
/// errors come down to (the ones NBD can carry). Any other number counts as
/// `EIO`, as a protocol would send it.
pub const ERRNOS: [(u32, &str); 8] = [
    (1, "EPERM"),
    (5, "EIO"),
    (12, "ENOMEM"),
    (22, "EINVAL"),
    (28, "ENOSPC"),
    (75, "EOVERFLOW"),
    (95, "ENOTSUP"),
    (108, "ESHUTDOWN"),
];

/// Where unknown errnos are counted.
const EIO: usize = 1;

/// Error replies sent, by errno (indexed like [`ERRNOS`]).
#[derive(Debug)]
pub struct ErrorCounts([AtomicU64; ERRNOS.len()]);

impl ErrorCounts {
    pub const fn new() -> ErrorCounts {
        ErrorCounts([const { AtomicU64::new(0) }; ERRNOS.len()])
    }

    /// Counts one error answered with `errno` (a Linux errno number).
    pub fn add(&self, errno: u32) {
        let i = ERRNOS.iter().position(|&(n, _)| n == errno).unwrap_or(EIO);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, by errno name (`ENOSPC`), every errno included.
    pub fn by_errno(&self) -> Vec<(&'static str, u64)> {
        ERRNOS
            .iter()
            .zip(&self.0)
            .map(|(&(_, name), n)| (name, n.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Default for ErrorCounts {
    fn default() -> ErrorCounts {
        ErrorCounts::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_name_and_unknown_ones_as_eio() {
        let counts = ErrorCounts::new();
        counts.add(28);
        counts.add(28);
        counts.add(22);
        counts.add(4242);
        let by = counts.by_errno();
        assert_eq!(by.len(), ERRNOS.len());
        let count = |name| by.iter().find(|e| e.0 == name).unwrap().1;
        assert_eq!((count("ENOSPC"), count("EINVAL")), (2, 1));
        assert_eq!(count("EIO"), 1, "an errno outside the list");
        assert_eq!(ERRNOS[EIO].1, "EIO");
    }
}
