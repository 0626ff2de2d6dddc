//! A pool of formatted disks kept ready (`pool=N`), so that a new build gets
//! its disk without waiting for mkfs. The default class and each export
//! class with `pool = N` have one, each with its own factory and filler.
//!
//! One filler thread makes disks until `N` are ready and sleeps on a condvar
//! until one is taken. Ready disks hold memory or space like any other disk
//! (charged to the same budget). When making a disk fails (an exhausted
//! budget, a broken format command) the filler logs it and retries after a
//! back-off that doubles up to 30 s; a build that finds the pool empty
//! simply makes its own disk.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use scratchd_store::sync;

use tracing::warn;

use crate::device::ScratchDevice;
use crate::disk::DiskFactory;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Ready disks and the thread that refills them; stops the thread on drop.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    target: usize,
}

struct State {
    ready: Vec<ScratchDevice>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }
}

impl Pool {
    /// Starts filling a pool of `target` disks made by `factory`.
    pub(crate) fn start(target: usize, factory: Arc<dyn DiskFactory>) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ready: Vec::with_capacity(target),
                stop: false,
            }),
            changed: Condvar::new(),
            target,
        });
        let filler = shared.clone();
        thread::Builder::new()
            .name("scratch-pool".into())
            .spawn(move || fill(&filler, factory.as_ref()))?;
        Ok(Pool { shared })
    }

    /// A ready disk, if there is one; the filler starts on its replacement.
    pub(crate) fn take(&self) -> Option<ScratchDevice> {
        let disk = self.shared.lock().ready.pop();
        self.shared.changed.notify_all();
        disk
    }

    /// How many disks are ready now.
    pub(crate) fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// How many disks it keeps ready.
    pub(crate) fn target(&self) -> usize {
        self.shared.target
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let ready = {
            let mut state = self.shared.lock();
            state.stop = true;
            std::mem::take(&mut state.ready)
        };
        self.shared.changed.notify_all();
        drop(ready);
    }
}

fn fill(shared: &Shared, factory: &dyn DiskFactory) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        {
            let mut state = shared.lock();
            while !state.stop && state.ready.len() >= shared.target {
                state = sync::wait(&shared.changed, state);
            }
            if state.stop {
                return;
            }
        }
        match factory.create() {
            Ok(disk) => {
                backoff = FIRST_BACKOFF;
                let mut state = shared.lock();
                if state.stop {
                    return;
                }
                state.ready.push(disk);
            }
            Err(e) => {
                warn!("cannot prepare a pooled scratch disk (retrying in {backoff:?}): {e}");
                let state = shared.lock();
                if state.stop {
                    return;
                }
                let _ = shared
                    .changed
                    .wait_timeout_while(state, backoff, |s| !s.stop)
                    .unwrap_or_else(PoisonError::into_inner);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
