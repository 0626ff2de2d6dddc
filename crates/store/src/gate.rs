//! A gate that lets a snapshot see every write entirely or not at all.
//!
//! Every call that changes a disk (write, trim, zeroing) holds a
//! [`Pass`] while it runs; [`WriteGate::freeze`] closes the gate to new
//! calls, waits for the running ones, and keeps it closed while its
//! [`Frozen`] lives. A snapshot copied under `Frozen` therefore holds each
//! write whole or not at all.
//!
//! An open gate costs a write two atomic operations on one counter, and no
//! lock; the mutex and condition variable are used only while a freeze is
//! on or being lifted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::sync;

/// The top bit of the state: the gate is closed.
const CLOSED: u64 = 1 << 63;

/// Counts the calls that change a disk, and stops them during a freeze.
#[derive(Debug, Default)]
pub struct WriteGate {
    /// [`CLOSED`], plus the number of passes held.
    state: AtomicU64,
    /// Guards the waits on `changed`.
    lock: Mutex<()>,
    /// Signalled when the gate opens, or the last pass of a closed gate
    /// goes.
    changed: Condvar,
    /// Held by the one freeze at a time.
    freezer: Mutex<()>,
}

/// Held by a call that changes the disk; see [`WriteGate::enter`].
#[must_use]
pub struct Pass<'a>(&'a WriteGate);

/// Keeps the gate closed; see [`WriteGate::freeze`].
#[must_use]
pub struct Frozen<'a> {
    gate: &'a WriteGate,
    _one_at_a_time: MutexGuard<'a, ()>,
}

impl WriteGate {
    /// Enters the gate, waiting while it is closed.
    pub fn enter(&self) -> Pass<'_> {
        loop {
            let before = self.state.fetch_add(1, Ordering::AcqRel);
            if before & CLOSED == 0 {
                return Pass(self);
            }
            self.leave();
            let mut guard = sync::lock(&self.lock);
            while self.state.load(Ordering::Acquire) & CLOSED != 0 {
                guard = self
                    .changed
                    .wait(guard)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
    }

    fn leave(&self) {
        let before = self.state.fetch_sub(1, Ordering::AcqRel);
        if before == CLOSED | 1 {
            let _guard = sync::lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// Closes the gate and waits until no call holds a pass. Writes that
    /// arrive meanwhile wait until the returned [`Frozen`] is dropped.
    pub fn freeze(&self) -> Frozen<'_> {
        let one = sync::lock(&self.freezer);
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut guard = sync::lock(&self.lock);
        while self.state.load(Ordering::Acquire) != CLOSED {
            guard = self
                .changed
                .wait(guard)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        Frozen {
            gate: self,
            _one_at_a_time: one,
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.gate.state.fetch_and(!CLOSED, Ordering::AcqRel);
        let _guard = sync::lock(&self.gate.lock);
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn a_freeze_waits_for_running_writes_and_holds_new_ones() {
        let gate = WriteGate::default();
        let running = AtomicBool::new(false);
        thread::scope(|s| {
            let pass = gate.enter();
            let freezer = s.spawn(|| {
                let frozen = gate.freeze();
                // The pass below was dropped before the freeze returned.
                assert!(!running.load(Ordering::SeqCst));
                thread::sleep(Duration::from_millis(50));
                // The writer is still waiting.
                assert!(!running.load(Ordering::SeqCst));
                drop(frozen);
            });
            thread::sleep(Duration::from_millis(50));
            assert!(!freezer.is_finished(), "the freeze did not wait");
            drop(pass);
            thread::sleep(Duration::from_millis(10));
            let writer = s.spawn(|| {
                let _pass = gate.enter();
                running.store(true, Ordering::SeqCst);
            });
            freezer.join().unwrap();
            writer.join().unwrap();
            assert!(running.load(Ordering::SeqCst));
        });
        assert_eq!(gate.state.load(Ordering::SeqCst), 0);
    }
}
