//! Test helpers shared by the registry's modules: disk factories that can
//! be held at a gate or told to fail, a registry over one, and the peers
//! the tests speak for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_store::{BlockDevice, Capabilities, MemoryDevice};

use super::{OpenDisk, Registry, Settings};
use crate::device::{scratch_capabilities, ScratchDevice};
use crate::disk::{CreateError, DiskFactory};
use crate::owner::{Owner, Peer};

/// Makes blank 1 MiB memory disks, counting them; can be held at a gate
/// or told to fail.
#[derive(Default)]
pub(super) struct Fake {
    made: AtomicU64,
    pub(super) fail: AtomicBool,
    gate: Mutex<bool>,
    opened: Condvar,
}

impl Fake {
    /// Makes the next creations wait until [`Fake::open_gate`].
    pub(super) fn hold(&self) {
        *self.gate.lock().unwrap() = true;
    }

    pub(super) fn open_gate(&self) {
        *self.gate.lock().unwrap() = false;
        self.opened.notify_all();
    }

    /// Creations started so far.
    pub(super) fn made(&self) -> u64 {
        self.made.load(Ordering::SeqCst)
    }
}

impl DiskFactory for Fake {
    fn create(&self) -> Result<ScratchDevice, CreateError> {
        self.made.fetch_add(1, Ordering::SeqCst);
        drop(
            self.opened
                .wait_while(self.gate.lock().unwrap(), |held| *held)
                .unwrap(),
        );
        if self.fail.load(Ordering::SeqCst) {
            return Err(CreateError::Load(std::io::Error::other("boom")));
        }
        Ok(ScratchDevice::memory(MemoryDevice::new(1 << 20).unwrap()))
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn capabilities(&self) -> Capabilities {
        memory_capabilities()
    }
}

/// Makes blank memory disks of its size.
pub(super) struct Sized(pub(super) u64);

impl DiskFactory for Sized {
    fn create(&self) -> Result<ScratchDevice, CreateError> {
        Ok(ScratchDevice::memory(MemoryDevice::new(self.0).unwrap()))
    }
    fn size(&self) -> u64 {
        self.0
    }
    fn capabilities(&self) -> Capabilities {
        memory_capabilities()
    }
}

fn memory_capabilities() -> Capabilities {
    scratch_capabilities(MemoryDevice::new(0).unwrap().capabilities())
}

/// A registry over a [`Fake`].
pub(super) fn registry(settings: Settings) -> (Registry, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    (Registry::new(settings, fake.clone()).unwrap(), fake)
}

/// Settings with a 5 s format timeout and no other policy.
pub(super) fn settings() -> Settings {
    Settings::new(Duration::from_secs(5))
}

/// A local user.
pub(super) fn peer(uid: u32) -> Peer {
    Peer::Unix { uid, gid: uid }
}

/// The owner most tests speak for: uid 1000 under the default policy.
pub(super) fn alice() -> Owner {
    Owner::Uid(1000)
}

/// The names alice lists.
pub(super) fn names(r: &Registry) -> Vec<String> {
    r.list(alice())
}

/// The size of an open disk.
pub(super) fn size_of(open: &OpenDisk) -> u64 {
    open.device.size()
}

/// Polls `f` for up to 5 s.
pub(super) fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::yield_now();
    }
}
