//! Lock helpers shared by every crate.
//!
//! A panic while a lock is held poisons it. scratchd never leaves shared
//! state half-updated across a panic point (each critical section is a few
//! plain assignments), so a poisoned lock is still consistent: taking it
//! anyway keeps one crashed thread from taking every other connection down
//! with it.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Locks `m`, recovering the guard of a poisoned lock.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv`, recovering the guard of a poisoned lock.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` for at most `timeout`, recovering the guard of a poisoned
/// lock; returns the guard and whether the wait timed out.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, bool) {
    let (g, r) = cv
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner);
    (g, r.timed_out())
}

/// Waits on `cv` until `deadline` (`None`: for ever), recovering the guard
/// of a poisoned lock. `Err` with the guard, without waiting, once the
/// deadline has passed: the caller gives up.
pub fn wait_until<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> Result<MutexGuard<'a, T>, MutexGuard<'a, T>> {
    let Some(deadline) = deadline else {
        return Ok(wait(cv, guard));
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(guard);
    }
    Ok(wait_timeout(cv, guard, left).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_a_passed_deadline_gives_the_guard_back_at_once() {
        let (m, cv) = (Mutex::new(7), Condvar::new());
        let guard = wait_until(&cv, lock(&m), Some(Instant::now())).unwrap_err();
        assert_eq!(*guard, 7);
        drop(guard);
        let short = Some(Instant::now() + Duration::from_millis(1));
        // Woken by nobody, the wait ends at the deadline with the guard.
        assert_eq!(*wait_until(&cv, lock(&m), short).unwrap(), 7);
    }
}
