//! What the operator sees and does: every disk with its state and
//! statistics ([`Registry::disks`], [`Registry::stats`]), the registry's
//! totals, budgets and pools ([`Registry::status`]), and the two actions of
//! `scratchd ctl`: drop a disk ([`Registry::drop_disk`]) and keep one after
//! its last connection ([`Registry::keep`]).
//!
//! Views are taken on demand (a `ctl` request, a scrape): the lock is held
//! only to copy out the entries, and the disks' statistics are read after.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_store::memory::Budget;
use scratchd_store::{sync, BlockDevice};
use tracing::info;

use super::lifecycle::{Disk, FOREVER};
use super::{DiskKey, Entry, Registry, LOG};
use crate::stats::StatsSnapshot;

/// A budget's use at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUse {
    pub used: u64,
    pub limit: u64,
}

/// The registry as a whole at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryStatus {
    /// Entries: disks being created, live or lingering.
    pub exports: u64,
    pub created: u64,
    pub destroyed: u64,
    /// The RAM budget (`--memory-limit`), when disks use RAM.
    pub memory: Option<BudgetUse>,
    /// The disk budget (`--disk-limit`), when there is one.
    pub disk: Option<BudgetUse>,
    /// Creations per bucket of
    /// [`CREATION_BUCKETS_MS`](super::CREATION_BUCKETS_MS) (each counts
    /// those above the bound before it), then those slower than the last.
    pub creation_buckets: Vec<u64>,
    /// Sum of creation times, in seconds.
    pub creation_seconds: f64,
    /// Formatted disks ready, in all pools.
    pub pool_ready: u64,
    /// Each pool: the default class's first (always, even without a pool),
    /// then those of the classes that have one.
    pub pools: Vec<super::PoolStatus>,
}

/// Where a disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// At least one connection.
    Live,
    /// No connection; destroyed in `left` unless one comes (or it is kept
    /// until dropped: `left` is then `None`).
    Lingering { left: Option<Duration> },
}

/// What `ctl keep` asked for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Until the operator drops it (or the server stops).
    Forever,
    /// For this long after its last connection (asked while connected).
    After(Duration),
    /// Until then (asked, or the last connection left, with `After`).
    Until(Instant),
}

/// One disk, for the operator.
#[derive(Debug, Clone)]
pub struct DiskView {
    pub key: DiskKey,
    /// Its class's pattern, or [`DEFAULT_CLASS`](crate::config::DEFAULT_CLASS).
    pub class: String,
    pub size: u64,
    pub state: DiskState,
    pub keep: Option<Keep>,
    pub stats: StatsSnapshot,
}

/// Why an operator action found nothing to act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("no scratch disk {0:?}")]
    NotFound(String),
    #[error("scratch disk {0:?} is being created; try again in a moment")]
    Creating(String),
}

impl Registry {
    /// Every disk with a name (live or lingering), by owner and name.
    pub fn disks(&self) -> Vec<DiskView> {
        let now = Instant::now();
        let state = |until: Option<Instant>| match until {
            None => DiskState::Live,
            Some(until) => {
                let left = until.saturating_duration_since(now);
                DiskState::Lingering {
                    left: (left < FOREVER / 2).then_some(left),
                }
            }
        };
        let mut out: Vec<_> = self
            .named_disks()
            .into_iter()
            .map(|(disk, n, until)| DiskView {
                key: disk.key.clone(),
                class: self.shared.class_name(disk.class).to_owned(),
                size: disk.device.size(),
                state: state(until),
                keep: disk.kept(),
                stats: disk.stats(n),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Statistics of every disk with a name (live or lingering), by owner
    /// and name: the operator's view, across owners.
    pub fn stats(&self) -> Vec<(DiskKey, StatsSnapshot)> {
        let mut out: Vec<_> = self
            .named_disks()
            .into_iter()
            .map(|(disk, n, _)| (disk.key.clone(), disk.stats(n)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The disks with a name, each with its connections and, when it
    /// lingers, its deadline: copied out under the lock, to be read after.
    fn named_disks(&self) -> Vec<(Arc<Disk>, u64, Option<Instant>)> {
        let state = self.shared.lock();
        state
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Live { disk, connections } => Some((disk.clone(), *connections, None)),
                Entry::Lingering { disk, until } => Some((disk.clone(), 0, Some(*until))),
                Entry::Creating(_) => None,
            })
            .collect()
    }

    /// The registry's totals and budgets.
    pub fn status(&self) -> RegistryStatus {
        let exports = self.shared.lock().entries.len() as u64;
        let c = &self.shared.counters;
        let budget = |b: &Option<Arc<Budget>>| {
            b.as_ref().map(|b| BudgetUse {
                used: b.used(),
                limit: b.limit(),
            })
        };
        let (created, destroyed) = c.totals();
        RegistryStatus {
            exports,
            created,
            destroyed,
            memory: budget(&self.shared.budgets.memory),
            disk: budget(&self.shared.budgets.disk),
            creation_buckets: c.creation_buckets(),
            creation_seconds: c.creation_seconds(),
            pool_ready: self.pool_ready() as u64,
            pools: self.pools(),
        }
    }

    /// Takes `key`'s disk out of the registry (a later open of the name
    /// makes a new one) and ends its users (each by the stop it left, see
    /// [`Lease::on_drop`](super::Lease::on_drop)); the disk is destroyed
    /// when the last of them is done. Returns how many connections that
    /// closed.
    ///
    /// # Errors
    ///
    /// When there is no such disk, or it is still being created.
    pub fn drop_disk(&self, key: &DiskKey) -> Result<usize, AdminError> {
        let mut state = self.shared.lock();
        if let Some(Entry::Creating(_)) = state.entries.get(key) {
            return Err(AdminError::Creating(key.name.clone()));
        }
        let removed = state
            .remove(key)
            .ok_or_else(|| AdminError::NotFound(key.name.clone()))?;
        drop(state);
        let connections = match &removed {
            Entry::Live { disk, .. } => disk.users.disconnect(),
            _ => 0,
        };
        info!(target: LOG, export = %key.name, owner = %key.owner, connections, "scratch disk dropped by the operator");
        drop(removed);
        Ok(connections)
    }

    /// Keeps `key`'s disk after its last connection, for `time` (after
    /// that connection, or from now if it already has none) or, with
    /// `None`, until dropped; this replaces its linger.
    ///
    /// # Errors
    ///
    /// When there is no such disk, or it is still being created.
    pub fn keep(&self, key: &DiskKey, time: Option<Duration>) -> Result<(), AdminError> {
        // Past a century is forever; beyond, `Instant` additions overflow.
        let time = time.map(|t| t.min(FOREVER));
        let mut state = self.shared.lock();
        let disk = match state.entries.get_mut(key) {
            None => return Err(AdminError::NotFound(key.name.clone())),
            Some(Entry::Creating(_)) => return Err(AdminError::Creating(key.name.clone())),
            Some(Entry::Live { disk, .. }) => {
                *sync::lock(&disk.keep) = Some(time.map_or(Keep::Forever, Keep::After));
                info!(target: LOG, export = %key.name, owner = %key.owner, for_s = time.map(|t| t.as_secs_f64()), "scratch disk to be kept after its last connection");
                return Ok(());
            }
            Some(Entry::Lingering { disk, until }) => {
                *until = Instant::now() + time.unwrap_or(FOREVER);
                *sync::lock(&disk.keep) = Some(keep_for(time));
                (disk.clone(), *until)
            }
        };
        if time.is_some() {
            state
                .deadlines
                .push(Reverse((disk.1, disk.0.id, key.clone())));
        }
        drop(state);
        info!(target: LOG, export = %key.name, owner = %key.owner, for_s = time.map(|t| t.as_secs_f64()), "scratch disk kept by the operator");
        self.shared.reaper.notify_all();
        Ok(())
    }
}

/// The [`Keep`] for `ctl keep --for`, starting now.
fn keep_for(time: Option<Duration>) -> Keep {
    match time {
        Some(t) => Keep::Until(Instant::now() + t),
        None => Keep::Forever,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::super::testing::*;
    use super::*;
    use crate::owner::Owner;

    #[test]
    fn drop_disk_ends_connections_and_keep_outlasts_them() {
        let (r, fake) = registry(settings());
        let key = |name: &str| DiskKey {
            owner: Owner::Uid(1000),
            name: name.into(),
        };
        // keep: no linger, yet the disk stays after its last connection.
        let a = r.open("a", alice()).unwrap();
        a.device.write(0, b"kept", false).unwrap();
        let device = a.device.clone();
        r.keep(&key("a"), None).unwrap();
        assert_eq!(r.disks()[0].keep, Some(Keep::Forever));
        drop(a);
        let view = &r.disks()[0];
        assert_eq!(view.state, DiskState::Lingering { left: None });
        let again = r.open("a", alice()).unwrap();
        assert!(Arc::ptr_eq(&again.device, &device), "the kept disk");
        drop(again);
        // keep --for on a lingering disk: reaped at the new deadline.
        r.keep(&key("a"), Some(Duration::from_millis(100))).unwrap();
        eventually("the kept disk to expire", || r.disks().is_empty());
        assert_eq!(r.status().destroyed, 1);
        // drop: out of the registry at once, users told to stop, the disk
        // destroyed after the last lease; the name makes a new disk.
        let mut b = r.open("b", alice()).unwrap();
        // (The exports layer leaves a stop that ends the connection.)
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        b.lease.on_drop(move || {
            flag.store(true, Ordering::SeqCst);
            1
        });
        assert_eq!(r.drop_disk(&key("b")), Ok(1));
        assert!(stopped.load(Ordering::SeqCst), "its user was ended");
        assert!(r.disks().is_empty());
        assert_eq!(r.status().exports, 0);
        assert_eq!(r.status().destroyed, 1, "still held by its connection");
        let fresh = r.open("b", alice()).unwrap();
        assert!(!Arc::ptr_eq(&fresh.device, &b.device));
        drop(b);
        assert_eq!(r.status().destroyed, 2);
        assert_eq!(
            r.drop_disk(&key("none")),
            Err(AdminError::NotFound("none".into()))
        );
        assert!(r.keep(&key("none"), None).is_err());
        assert_eq!(fake.made(), 3);
        let status = r.status();
        assert_eq!((status.created, status.exports), (3, 1));
        assert_eq!(status.creation_buckets.iter().sum::<u64>(), 3);
    }
}
