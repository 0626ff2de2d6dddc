//! A disk's life: opened (made, from the pool or by its class's factory,
//! while other openers of the name wait), attached to each user, released
//! by each user's lease, lingering after the last, and reaped at its
//! deadline. The states are described in the [registry's
//! documentation](super#states).

use std::cmp::Reverse;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use scratchd_store::sync;
use tracing::{info, warn};

use super::histogram::Counters;
use super::operator::Keep;
use super::users::{User, Users};
use super::{DiskKey, Entry, OpenDisk, OpenError, Shared, LOG};
use crate::device::{Budgets, ScratchDevice};
use crate::pool::Pool;
use crate::stats::StatsSnapshot;

/// A lingering deadline far enough away to mean "until dropped".
pub(super) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The outcome of a creation, for users waiting on it.
#[derive(Default)]
pub(super) struct Pending {
    outcome: Mutex<Option<Result<(), OpenError>>>,
    done: Condvar,
}

/// A named disk.
pub(super) struct Disk {
    pub(super) id: u64,
    pub(super) key: DiskKey,
    /// Its class (an index into `classes`), None for the default.
    pub(super) class: Option<usize>,
    pub(super) device: Arc<ScratchDevice>,
    attached: Instant,
    connections_total: AtomicU64,
    /// Its users, for `ctl drop`.
    pub(super) users: Arc<Users>,
    /// Set by `ctl keep`.
    pub(super) keep: Mutex<Option<Keep>>,
    counters: Arc<Counters>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.counters.destroyed();
        let s = self.stats(0);
        info!(
            target: LOG,
            export = %self.key.name,
            owner = %self.key.owner,
            age_s = s.age.as_secs_f64(),
            connections = s.connections_total,
            io = ?s.io,
            errors = ?s.errors,
            allocated_bytes = s.allocated_bytes,
            "scratch disk destroyed"
        );
    }
}

impl Disk {
    /// Its statistics, with `connections` users now.
    pub(super) fn stats(&self, connections: u64) -> StatsSnapshot {
        StatsSnapshot {
            connections,
            connections_total: self.connections_total.load(Ordering::Relaxed),
            age: self.attached.elapsed(),
            ..self.device.stats()
        }
    }

    /// Its `ctl keep` request, if one is in force.
    pub(super) fn kept(&self) -> Option<Keep> {
        match *sync::lock(&self.keep) {
            Some(Keep::Until(t)) if t <= Instant::now() => None,
            k => k,
        }
    }
}

/// Held by one user of a disk; releases the disk when dropped (the disk
/// then lingers or goes, if it was the last).
pub struct Lease {
    shared: Arc<Shared>,
    disk: Arc<Disk>,
    /// How `ctl drop` ends this user, once it said ([`Lease::on_drop`]).
    user: Option<User>,
}

impl Lease {
    /// Tells the registry how to end this user when the operator drops
    /// the disk (`scratchd ctl drop`): `stop` is called then, or at once if
    /// the disk was dropped already, and returns how many connections it
    /// closed, which [`Registry::drop_disk`] adds up. A user that never
    /// says is not ended, only let go of by the registry.
    ///
    /// [`Registry::drop_disk`]: super::Registry::drop_disk
    pub fn on_drop(&mut self, stop: impl FnOnce() -> usize + Send + Sync + 'static) {
        self.user = Some(self.disk.users.join(Box::new(stop)));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(&self.disk);
    }
}

impl Shared {
    /// Opens `key`'s disk: attaches to it if it is live or lingering,
    /// waits for it if it is being created, creates it otherwise.
    pub(super) fn open(
        self: &Arc<Self>,
        key: &DiskKey,
        from: Option<&str>,
    ) -> Result<OpenDisk, OpenError> {
        let deadline = Instant::now() + self.settings.create_timeout;
        loop {
            let mut state = self.lock();
            if state.stop {
                return Err(OpenError::Stopping);
            }
            let pending = match state.entries.get_mut(key) {
                Some(Entry::Live { disk, connections }) => {
                    *connections += 1;
                    let disk = disk.clone();
                    drop(state);
                    return Ok(self.attach(disk));
                }
                Some(Entry::Lingering { disk, .. }) => {
                    let disk = disk.clone();
                    let live = Entry::Live {
                        disk: disk.clone(),
                        connections: 1,
                    };
                    state.entries.insert(key.clone(), live);
                    drop(state);
                    return Ok(self.attach(disk));
                }
                Some(Entry::Creating(pending)) => pending.clone(),
                None => {
                    let evicted = self.make_room(&mut state, &key.owner)?;
                    let pending = Arc::new(Pending::default());
                    let shares = state.add(key.clone(), Entry::Creating(pending.clone()), self);
                    drop(state);
                    drop(evicted);
                    return self.create(key, &pending, &shares, from);
                }
            };
            drop(state);
            pending.wait(deadline)?;
            // Created: go round and attach to it like any later user.
        }
    }

    /// Makes the disk for `key`, whose entry is `Creating(pending)`, and
    /// moves it under its owner's `shares`.
    fn create(
        self: &Arc<Self>,
        key: &DiskKey,
        pending: &Pending,
        shares: &Budgets,
        from: Option<&str>,
    ) -> Result<OpenDisk, OpenError> {
        let start = Instant::now();
        let class = self.class_of(&key.name);
        let result = self.make(key, class, shares, from).map(|(device, from_pool)| {
            let took = start.elapsed();
            self.counters.created(took);
            info!(target: LOG, export = %key.name, owner = %key.owner, class = self.class_name(class), from_pool, ms = took.as_secs_f64() * 1e3, "scratch disk created");
            let disk = self.name_disk(key, class, device);
            self.lock().entries.insert(
                key.clone(),
                Entry::Live {
                    disk: disk.clone(),
                    connections: 1,
                },
            );
            self.attach(disk)
        });
        if result.is_err() {
            let removed = self.lock().remove(key);
            drop(removed);
        }
        pending.finish(result.as_ref().map(drop).map_err(Clone::clone));
        result
    }

    /// A disk for `key` of `class`, from the class's pool when one is
    /// ready (and whether it was), under its owner's `shares`.
    fn make(
        &self,
        key: &DiskKey,
        class: Option<usize>,
        shares: &Budgets,
        from: Option<&str>,
    ) -> Result<(ScratchDevice, bool), OpenError> {
        let from = from.or_else(|| self.base_of(class));
        if let Some(from) = from {
            let device = self.make_clone(key, class, from)?;
            self.claim(key, &device, shares)?;
            return Ok((device, false));
        }
        // Each class's pool holds disks made by that class's factory.
        let pooled = self.pool_of(class).and_then(Pool::take);
        let from_pool = pooled.is_some();
        let device = match pooled {
            Some(device) => device,
            None => self.factory_of(class).create().map_err(|why| {
                warn!(target: LOG, export = %key.name, owner = %key.owner, "cannot create scratch disk: {why}");
                OpenError::Create(Arc::new(why))
            })?,
        };
        self.claim(key, &device, shares)?;
        Ok((device, from_pool))
    }

    /// A new disk for `key` of `class` that starts as the snapshot `from`.
    fn make_clone(
        &self,
        key: &DiskKey,
        class: Option<usize>,
        from: &str,
    ) -> Result<ScratchDevice, OpenError> {
        let base = self
            .find_snapshot(key.owner, from)
            .map_err(|_| OpenError::NoSnapshot(from.to_owned()))?;
        self.factory_of(class).clone_of(&base).map_err(|why| {
            warn!(target: LOG, export = %key.name, owner = %key.owner, snapshot = %from, "cannot clone a snapshot: {why}");
            OpenError::Create(Arc::new(why))
        })
    }

    /// Moves a new disk's charges under its owner's `shares`.
    fn claim(
        &self,
        key: &DiskKey,
        device: &ScratchDevice,
        shares: &Budgets,
    ) -> Result<(), OpenError> {
        device.claim(shares).map_err(|why| {
            info!(target: LOG, export = %key.name, owner = %key.owner, "new disk refused: {why}");
            OpenError::Share(Arc::new(why))
        })
    }

    /// Gives a new device its name.
    fn name_disk(&self, key: &DiskKey, class: Option<usize>, device: ScratchDevice) -> Arc<Disk> {
        Arc::new(Disk {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key: key.clone(),
            class,
            device: Arc::new(device),
            attached: Instant::now(),
            connections_total: AtomicU64::new(0),
            users: Arc::default(),
            keep: Mutex::new(None),
            counters: self.counters.clone(),
        })
    }

    /// A user's handle on `disk`, already counted in its entry.
    fn attach(self: &Arc<Self>, disk: Arc<Disk>) -> OpenDisk {
        disk.connections_total.fetch_add(1, Ordering::Relaxed);
        OpenDisk {
            info: self.info(&disk.key.name, Some(&disk.device)),
            device: disk.device.clone(),
            lease: Lease {
                shared: self.clone(),
                disk,
                user: None,
            },
        }
    }

    /// A user of `disk` is done: the last one leaves it lingering (for its
    /// keep or its class's linger) or destroys it.
    fn release(&self, disk: &Arc<Disk>) {
        let mut state = self.lock();
        let Some(Entry::Live {
            disk: live,
            connections,
        }) = state.entries.get_mut(&disk.key)
        else {
            return;
        };
        if !Arc::ptr_eq(live, disk) {
            return;
        }
        *connections -= 1;
        if *connections > 0 {
            return;
        }
        let now = Instant::now();
        let (until, deadline) = self.lingering_deadline(disk, now);
        if until <= now || state.stop {
            let removed = state.remove(&disk.key);
            drop(state);
            drop(removed);
            return;
        }
        let entry = Entry::Lingering {
            disk: disk.clone(),
            until,
        };
        state.entries.insert(disk.key.clone(), entry);
        if deadline {
            state
                .deadlines
                .push(Reverse((until, disk.id, disk.key.clone())));
        }
        drop(state);
        self.reaper.notify_all();
    }

    /// Until when `disk`, whose last user left `now`, lingers, and whether
    /// that is a deadline for the reaper (not one far off or now).
    fn lingering_deadline(&self, disk: &Disk, now: Instant) -> (Instant, bool) {
        match disk.kept() {
            Some(Keep::Forever) => (now + FOREVER, false),
            Some(Keep::Until(t)) => (t, true),
            Some(Keep::After(t)) => {
                *sync::lock(&disk.keep) = Some(Keep::Until(now + t));
                (now + t, true)
            }
            None => {
                let linger = self.linger_of(disk.class);
                (now + linger, !linger.is_zero())
            }
        }
    }

    /// The reaper thread: destroys lingering disks at their deadlines.
    pub(super) fn reap(&self) {
        let mut state = self.lock();
        while !state.stop {
            let now = Instant::now();
            let next = state.deadlines.peek().map(|Reverse((when, _, _))| *when);
            match next {
                None => state = sync::wait(&self.reaper, state),
                Some(when) if when > now => {
                    state = sync::wait_timeout(&self.reaper, state, when - now).0;
                }
                Some(_) => {
                    let Some(Reverse((when, id, key))) = state.deadlines.pop() else {
                        continue;
                    };
                    let expired = matches!(state.entries.get(&key),
                        Some(Entry::Lingering { disk, until }) if disk.id == id && *until == when);
                    if expired {
                        let removed = state.remove(&key);
                        drop(state);
                        drop(removed);
                        state = self.lock();
                    }
                }
            }
        }
    }
}

impl Pending {
    fn finish(&self, outcome: Result<(), OpenError>) {
        *sync::lock(&self.outcome) = Some(outcome);
        self.done.notify_all();
    }

    /// Waits until the creation is over (or `deadline`); its outcome.
    fn wait(&self, deadline: Instant) -> Result<(), OpenError> {
        let mut outcome = sync::lock(&self.outcome);
        loop {
            if let Some(outcome) = outcome.as_ref() {
                return outcome.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OpenError::CreateTimeout);
            }
            outcome = sync::wait_timeout(&self.done, outcome, left).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::thread;

    use scratchd_store::BlockDevice;

    use super::super::testing::*;
    use super::super::Settings;
    use super::*;

    #[test]
    fn connections_share_a_disk_that_goes_with_the_last() {
        let (r, fake) = registry(settings());
        let a1 = r.open("a", alice()).unwrap();
        let a2 = r.open("a", alice()).unwrap();
        let b = r.open("b", alice()).unwrap();
        assert!(Arc::ptr_eq(&a1.device, &a2.device));
        assert!(!Arc::ptr_eq(&a1.device, &b.device));
        assert!(a1.info.caps.multi_conn);
        assert_eq!(fake.made(), 2);
        a1.device.write(0, b"x", false).unwrap();
        let stats = r.stats();
        assert_eq!(stats[0].0.name, "a");
        assert_eq!(
            (stats[0].1.connections, stats[0].1.connections_total),
            (2, 2)
        );
        assert_eq!(stats[0].1.io.writes, 1);
        drop(a1);
        assert_eq!(names(&r), ["a", "b"]);
        drop(a2);
        assert_eq!(names(&r), ["b"]);
        let a3 = r.open("a", alice()).unwrap();
        let mut buf = [9u8];
        a3.device.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0], "a new disk after the last connection left");
        assert_eq!(fake.made(), 3);
    }

    #[test]
    fn concurrent_opens_of_a_new_name_wait_for_one_creation() {
        let (r, fake) = registry(settings());
        fake.hold();
        let devices = thread::scope(|s| {
            let openers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| r.open("a", alice()).unwrap()))
                .collect();
            eventually("the creation to start", || fake.made() == 1);
            // INFO and LIST meanwhile neither wait nor create.
            assert_eq!(r.info("a", alice()).unwrap().size, 1 << 20);
            assert!(names(&r).is_empty());
            fake.open_gate();
            openers
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(fake.made(), 1);
        assert!(devices
            .iter()
            .all(|d| Arc::ptr_eq(&d.device, &devices[0].device)));
        assert_eq!(r.stats()[0].1.connections, 4);
    }

    #[test]
    fn a_failed_creation_reaches_every_waiter_and_leaves_nothing() {
        let (r, fake) = registry(settings());
        fake.fail.store(true, Ordering::SeqCst);
        fake.hold();
        let errors = thread::scope(|s| {
            let openers: Vec<_> = (0..3)
                .map(|_| s.spawn(|| r.open("a", alice()).err()))
                .collect();
            eventually("the creation to start", || fake.made() == 1);
            fake.open_gate();
            openers
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Vec<_>>()
        });
        for e in errors {
            match e {
                Some(e @ OpenError::Create(_)) => {
                    assert!(e.to_string().ends_with(": boom"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(names(&r).is_empty() && r.stats().is_empty());
        // (An opener that arrived after the failure tried again, and failed.)
        let made = fake.made();
        fake.fail.store(false, Ordering::SeqCst);
        r.open("a", alice()).unwrap();
        assert_eq!(fake.made(), made + 1);
    }

    #[test]
    fn waiting_for_a_creation_is_bounded() {
        let (r, fake) = registry(Settings {
            create_timeout: Duration::from_millis(100),
            ..settings()
        });
        fake.hold();
        thread::scope(|s| {
            let creator = s.spawn(|| r.open("a", alice()).map(drop));
            eventually("the creation to start", || fake.made() == 1);
            match r.open("a", alice()).err() {
                Some(e @ OpenError::CreateTimeout) => {
                    assert!(e.to_string().contains("timed out"), "{e}")
                }
                other => panic!("{other:?}"),
            }
            fake.open_gate();
            creator.join().unwrap().unwrap();
        });
    }

    #[test]
    fn a_lingering_disk_is_revived_then_reaped() {
        let (r, fake) = registry(Settings {
            linger: Duration::from_millis(200),
            ..settings()
        });
        let a = r.open("a", alice()).unwrap();
        a.device.write(0, b"kept", false).unwrap();
        let device = a.device.clone();
        drop(a);
        assert_eq!(names(&r), ["a"], "lingering disks are listed");
        let again = r.open("a", alice()).unwrap();
        assert!(Arc::ptr_eq(&again.device, &device));
        assert_eq!(r.stats()[0].1.connections_total, 2);
        drop(again);
        let start = Instant::now();
        eventually("the reaper", || names(&r).is_empty());
        assert!(start.elapsed() >= Duration::from_millis(150));
        // The registry lets go of the disk (the reaper drops it just after
        // unlisting it, outside the lock); then only our clone holds it.
        eventually("the reaper to drop the disk", || {
            Arc::strong_count(&device) == 1
        });
        r.open("a", alice()).unwrap();
        assert_eq!(fake.made(), 2);
    }

    #[test]
    fn a_stopped_registry_opens_nothing_and_lets_go_of_its_disks() {
        let (r, _) = registry(Settings {
            linger: Duration::from_secs(60),
            ..settings()
        });
        let a = r.open("a", alice()).unwrap();
        r.shared.lock().stop = true;
        assert!(matches!(r.open("b", alice()), Err(OpenError::Stopping)));
        drop(a);
        assert!(names(&r).is_empty(), "no linger once stopping");
    }

    #[test]
    fn dropping_the_registry_stops_the_reaper() {
        let (r, _) = registry(Settings {
            linger: Duration::from_secs(60),
            ..settings()
        });
        let shared = Arc::downgrade(&r.shared);
        drop(r.open("a", alice()).unwrap());
        drop(r);
        eventually("the reaper to exit", || shared.strong_count() == 0);
    }
}
