//! [`ScratchExports`]: export names → scratch disks, created on first open,
//! shared by every connection with that name, destroyed after the last.
//!
//! # Owners
//!
//! A disk is found by its owner and its name together ([`DiskKey`]): a
//! connection's [`Owner`] (its identity under `owner=`, see
//! [`crate::owner`]) is part of every lookup, so connections of one owner
//! share a disk by name while another owner asking for the same name gets a
//! fresh disk of its own, exactly as for a name nobody uses. LIST shows an
//! identified owner its own disks and nothing else; peers without an
//! identity (plain TCP) see an empty list, since "their" disks are everyone's
//! who lacks an identity. Each owner is capped by [`OwnerLimits`]: the number
//! of its disks (its lingering disks are evicted first), and shares of the
//! memory and disk budgets that its disks' own budgets are moved under when
//! the disk is made or taken from the pool.
//!
//! # States
//!
//! One `HashMap` behind one mutex holds an [`Entry`] per key. The mutex is
//! held only to look at or change an entry, never while a disk is made,
//! formatted or destroyed, and never on the data path (connections hold the
//! device itself).
//!
//! - `Creating`: the first opener inserts it, lets go of the lock and makes
//!   the disk in its own thread (from the pool when one is ready), so
//!   different names are created in parallel. Openers of the same name wait
//!   on the entry's [`Pending`] slot, bounded by a timeout, and never start
//!   a second mkfs. A failure removes the entry and is passed to every
//!   waiter.
//! - `Live`: a disk and its connection count. Each open returns a lease whose
//!   drop (when the connection and all its requests are done) decrements it.
//! - `Lingering`: no connections, kept until a deadline (`linger=`). An open
//!   revives it; otherwise a reaper thread removes it at the deadline.
//!
//! A disk is destroyed by dropping it outside the lock: memory goes back to
//! the budget and files are closed (they never had names). Its statistics are
//! logged then.
//!
//! # Operator actions
//!
//! `scratchd ctl` acts through [`ScratchExports::drop_disk`], which takes a
//! disk out of the map (a later open of its name makes a fresh disk) and
//! ends its connections through their [`Members`]; the disk goes when the
//! last of them is done. [`ScratchExports::keep`] marks a disk to stay after
//! its last connection, for a deadline or until dropped, instead of its
//! linger; kept disks are never evicted. [`ScratchExports::disks`] and
//! [`ScratchExports::status`] are the numbers `ctl` and the metrics show.
//!
//! `--max-exports` counts every entry. When it is reached, the lingering
//! disk closest to its deadline is destroyed to make room; only when none
//! lingers is a new name refused. `--max-exports-per-owner` works the same
//! way within one owner's disks, and is checked first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_proto::negotiation::{ExportInfo, ExportListing, LookupError};
use scratchd_server::export::{flags_for, BLOCK_SIZE};
use scratchd_server::shutdown::Members;
use scratchd_server::{Exports, Identity, OpenExport};
use scratchd_store::sync;
use scratchd_store::{BlockDevice, Capabilities};
use tracing::{info, warn};

use crate::device::{Budgets, ScratchDevice};
use crate::disk::DiskFactory;
use crate::names::NamePolicy;
use crate::owner::{Owner, OwnerLimits, OwnerPolicy};
use crate::pool::Pool;
use crate::stats::StatsSnapshot;

/// Waiting for another connection's disk creation gives up after the format
/// timeout plus this.
const CREATE_WAIT_SLACK: Duration = Duration::from_secs(30);

/// The registry's policy: everything but the disks themselves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub names: NamePolicy,
    /// What the default name `""` stands for; None: `""` is refused.
    pub default_name: Option<String>,
    pub description: Option<String>,
    pub linger: Duration,
    pub max_exports: Option<usize>,
    /// How long to wait for another connection's disk creation.
    pub create_timeout: Duration,
    pub read_only: bool,
    /// Formatted disks of the default class kept ready (each class sets
    /// its own: [`Class::pool`]).
    pub pool: usize,
    /// Who owns the disks a connection makes.
    pub owners: OwnerPolicy,
    /// What one owner may hold.
    pub per_owner: OwnerLimits,
}

impl Settings {
    /// Settings with the given format timeout and no other policy.
    pub fn new(format_timeout: Duration) -> Settings {
        Settings {
            names: NamePolicy::default(),
            default_name: None,
            description: None,
            linger: Duration::ZERO,
            max_exports: None,
            create_timeout: format_timeout + CREATE_WAIT_SLACK,
            read_only: false,
            pool: 0,
            owners: OwnerPolicy::default(),
            per_owner: OwnerLimits::default(),
        }
    }
}

/// What a disk is found by: its owner and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskKey {
    pub owner: Owner,
    pub name: String,
}

/// Upper bounds (milliseconds) of the disk creation time histogram.
pub const CREATION_BUCKETS_MS: [f64; 10] = [
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];

/// A lingering deadline far enough away to mean "until dropped".
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Registry-wide counters, kept by the disks too (a disk counts itself
/// destroyed when it goes, wherever that happens).
#[derive(Default)]
struct Counters {
    created: AtomicU64,
    destroyed: AtomicU64,
    /// Creations per bucket of [`CREATION_BUCKETS_MS`] (not cumulative),
    /// and one more for slower ones.
    creation: [AtomicU64; CREATION_BUCKETS_MS.len() + 1],
    /// Sum of creation times, in microseconds.
    creation_us: AtomicU64,
}

impl Counters {
    fn created(&self, took: Duration) {
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
}

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
    /// Creations per bucket of [`CREATION_BUCKETS_MS`] (each counts those
    /// above the bound before it), then those slower than the last.
    pub creation_buckets: Vec<u64>,
    /// Sum of creation times, in seconds.
    pub creation_seconds: f64,
    /// Formatted disks ready, in all pools.
    pub pool_ready: u64,
    /// Each pool: the default class's first (always, even without a pool),
    /// then those of the classes that have one.
    pub pools: Vec<PoolStatus>,
}

/// One class's pool at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The class's pattern, or [`DEFAULT_CLASS`](crate::config::DEFAULT_CLASS).
    pub class: String,
    /// Formatted disks waiting.
    pub ready: u64,
    /// How many it keeps (`pool=`).
    pub target: u64,
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

/// An export class: disks whose names match `pattern` (a glob with `*`)
/// are made by `factory` and linger for `linger`; `pool` of them are kept
/// ready, formatted.
pub struct Class {
    pub pattern: String,
    pub factory: Arc<dyn DiskFactory>,
    pub linger: Duration,
    pub pool: usize,
}

/// A class with what its disks can do, probed once, and its pool.
struct ClassEntry {
    class: Class,
    caps: Capabilities,
    pool: Option<Pool>,
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

/// Scratch disks by export name; see the [module documentation](self).
pub struct ScratchExports {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    factory: Arc<dyn DiskFactory>,
    /// The server's budgets, for owners' shares of them.
    budgets: Budgets,
    /// What every disk can do, for INFO on names without one.
    template_caps: Capabilities,
    /// Export classes, first match wins; names matching none get
    /// `factory`, `template_caps`, `settings.linger` and `pool`.
    classes: Vec<ClassEntry>,
    /// The default class's ready disks.
    pool: Option<Pool>,
    state: Mutex<State>,
    /// Wakes the reaper when a deadline is added or the registry stops.
    reaper: Condvar,
    next_id: AtomicU64,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct State {
    entries: HashMap<DiskKey, Entry>,
    /// Owners with at least one entry.
    owners: HashMap<Owner, OwnerState>,
    /// Lingering deadlines: (when, disk id, key). Stale ones (the disk was
    /// revived or is gone) are skipped when they come up.
    deadlines: BinaryHeap<Reverse<(Instant, u64, DiskKey)>>,
    stop: bool,
}

/// One owner's holdings.
struct OwnerState {
    /// Its entries (being created, live or lingering).
    disks: usize,
    /// Its shares of the server's budgets, which its disks charge.
    shares: Budgets,
}

impl State {
    /// Adds the entry of a new disk for `key`, counting it for its owner
    /// (whose shares are made on its first disk); the owner's shares.
    fn add(&mut self, key: DiskKey, entry: Entry, shared: &Shared) -> Budgets {
        let owner = self.owners.entry(key.owner).or_insert_with(|| OwnerState {
            disks: 0,
            shares: shared.budgets.shares(
                shared.settings.per_owner.memory,
                shared.settings.per_owner.disk,
            ),
        });
        owner.disks += 1;
        let shares = owner.shares.clone();
        self.entries.insert(key, entry);
        shares
    }

    /// Removes `key`'s entry, forgetting its owner with its last disk. The
    /// caller drops what is returned after unlocking.
    fn remove(&mut self, key: &DiskKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        if let Some(owner) = self.owners.get_mut(&key.owner) {
            owner.disks -= 1;
            if owner.disks == 0 {
                self.owners.remove(&key.owner);
            }
        }
        Some(entry)
    }

    /// How many entries `owner` has.
    fn disks_of(&self, owner: &Owner) -> usize {
        self.owners.get(owner).map_or(0, |o| o.disks)
    }
}

enum Entry {
    Creating(Arc<Pending>),
    Live { disk: Arc<Disk>, connections: u64 },
    Lingering { disk: Arc<Disk>, until: Instant },
}

/// The outcome of a creation, for connections waiting on it.
#[derive(Default)]
struct Pending {
    outcome: Mutex<Option<Result<(), LookupError>>>,
    done: Condvar,
}

/// A named disk.
struct Disk {
    id: u64,
    key: DiskKey,
    /// Its class (an index into `classes`), None for the default.
    class: Option<usize>,
    device: Arc<ScratchDevice>,
    attached: Instant,
    connections_total: AtomicU64,
    /// Its connections, for `ctl drop`.
    members: Arc<Members>,
    /// Set by `ctl keep`.
    keep: Mutex<Option<Keep>>,
    counters: Arc<Counters>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.counters.destroyed.fetch_add(1, Ordering::Relaxed);
        let s = self.stats(0);
        info!(
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
    fn stats(&self, connections: u64) -> StatsSnapshot {
        StatsSnapshot {
            connections,
            connections_total: self.connections_total.load(Ordering::Relaxed),
            age: self.attached.elapsed(),
            ..self.device.stats()
        }
    }

    /// Its `ctl keep` request, if one is in force.
    fn kept(&self) -> Option<Keep> {
        match *sync::lock(&self.keep) {
            Some(Keep::Until(t)) if t <= Instant::now() => None,
            k => k,
        }
    }
}

/// Held by one connection; releases its disk when dropped.
struct Lease {
    shared: Arc<Shared>,
    disk: Arc<Disk>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(&self.disk);
    }
}

impl ScratchExports {
    /// A registry making disks with `factory` (and a pool of
    /// `settings.pool` of them), with a reaper thread for lingering disks.
    ///
    /// # Errors
    ///
    /// When a thread cannot be started.
    pub fn new(
        settings: Settings,
        factory: Arc<dyn DiskFactory>,
    ) -> std::io::Result<ScratchExports> {
        ScratchExports::with_classes(settings, factory, Vec::new())
    }

    /// A registry making disks whose names match one of `classes` with the
    /// first that does, and the others with `factory`; each class with a
    /// `pool` keeps its own pool, `settings.pool` is the default class's.
    ///
    /// # Errors
    ///
    /// When a thread cannot be started.
    pub fn with_classes(
        settings: Settings,
        factory: Arc<dyn DiskFactory>,
        classes: Vec<Class>,
    ) -> std::io::Result<ScratchExports> {
        let pool = start_pool(settings.pool, &factory)?;
        // The classes share the server's budgets; each knows those it uses.
        let mut budgets = factory.budgets();
        for class in &classes {
            let theirs = class.factory.budgets();
            budgets.memory = budgets.memory.or(theirs.memory);
            budgets.disk = budgets.disk.or(theirs.disk);
        }
        let classes = classes
            .into_iter()
            .map(|class| {
                Ok(ClassEntry {
                    caps: class.factory.capabilities(),
                    pool: start_pool(class.pool, &class.factory)?,
                    class,
                })
            })
            .collect::<std::io::Result<_>>()?;
        let shared = Arc::new(Shared {
            template_caps: factory.capabilities(),
            budgets,
            classes,
            settings,
            factory,
            pool,
            state: Mutex::new(State::default()),
            reaper: Condvar::new(),
            next_id: AtomicU64::new(1),
            counters: Arc::default(),
        });
        // Even without linger=: `ctl keep` makes disks linger.
        let reaper = shared.clone();
        thread::Builder::new()
            .name("scratch-reaper".into())
            .spawn(move || reaper.reap())?;
        Ok(ScratchExports { shared })
    }

    /// Every disk with a name (live or lingering), by owner and name.
    pub fn disks(&self) -> Vec<DiskView> {
        let now = Instant::now();
        let disks: Vec<(Arc<Disk>, u64, DiskState)> = {
            let state = self.shared.lock();
            state
                .entries
                .values()
                .filter_map(|e| match e {
                    Entry::Live { disk, connections } => {
                        Some((disk.clone(), *connections, DiskState::Live))
                    }
                    Entry::Lingering { disk, until } => {
                        let left = until.saturating_duration_since(now);
                        let left = (left < FOREVER / 2).then_some(left);
                        Some((disk.clone(), 0, DiskState::Lingering { left }))
                    }
                    Entry::Creating(_) => None,
                })
                .collect()
        };
        let mut out: Vec<_> = disks
            .into_iter()
            .map(|(disk, n, state)| DiskView {
                key: disk.key.clone(),
                class: self.shared.class_name(disk.class).to_owned(),
                size: disk.device.size(),
                state,
                keep: disk.kept(),
                stats: disk.stats(n),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// The registry's totals and budgets.
    pub fn status(&self) -> RegistryStatus {
        let exports = self.shared.lock().entries.len() as u64;
        let c = &self.shared.counters;
        let creation_buckets = c
            .creation
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let budget = |b: &Option<Arc<scratchd_store::memory::Budget>>| {
            b.as_ref().map(|b| BudgetUse {
                used: b.used(),
                limit: b.limit(),
            })
        };
        RegistryStatus {
            exports,
            created: c.created.load(Ordering::Relaxed),
            destroyed: c.destroyed.load(Ordering::Relaxed),
            memory: budget(&self.shared.budgets.memory),
            disk: budget(&self.shared.budgets.disk),
            creation_buckets,
            creation_seconds: c.creation_us.load(Ordering::Relaxed) as f64 / 1e6,
            pool_ready: self.pool_ready() as u64,
            pools: self.pools(),
        }
    }

    /// The pools: the default class's, then each class's that has one.
    fn pools(&self) -> Vec<PoolStatus> {
        let status = |class: &str, pool: Option<&Pool>| PoolStatus {
            class: class.to_owned(),
            ready: pool.map_or(0, Pool::ready) as u64,
            target: pool.map_or(0, Pool::target) as u64,
        };
        let shared = &self.shared;
        std::iter::once(status(crate::config::DEFAULT_CLASS, shared.pool.as_ref()))
            .chain(shared.classes.iter().filter_map(|c| {
                let pool = c.pool.as_ref()?;
                Some(status(&c.class.pattern, Some(pool)))
            }))
            .collect()
    }

    /// Takes `key`'s disk out of the registry (a later open of the name
    /// makes a new one) and disconnects its clients; the disk is destroyed
    /// when the last of them is done. Returns how many were connected.
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
            Entry::Live { disk, .. } => disk.members.disconnect(),
            _ => 0,
        };
        info!(export = %key.name, owner = %key.owner, connections, "scratch disk dropped by the operator");
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
        let mut state = self.shared.lock();
        let disk = match state.entries.get_mut(key) {
            None => return Err(AdminError::NotFound(key.name.clone())),
            Some(Entry::Creating(_)) => return Err(AdminError::Creating(key.name.clone())),
            Some(Entry::Live { disk, .. }) => {
                *sync::lock(&disk.keep) = Some(time.map_or(Keep::Forever, Keep::After));
                info!(export = %key.name, owner = %key.owner, for_s = time.map(|t| t.as_secs_f64()), "scratch disk to be kept after its last connection");
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
        info!(export = %key.name, owner = %key.owner, for_s = time.map(|t| t.as_secs_f64()), "scratch disk kept by the operator");
        self.shared.reaper.notify_all();
        Ok(())
    }

    /// Statistics of every disk with a name (live or lingering), by owner
    /// and name: the operator's view, across owners.
    pub fn stats(&self) -> Vec<(DiskKey, StatsSnapshot)> {
        let disks: Vec<(Arc<Disk>, u64)> = {
            let state = self.shared.lock();
            state
                .entries
                .values()
                .filter_map(|e| match e {
                    Entry::Live { disk, connections } => Some((disk.clone(), *connections)),
                    Entry::Lingering { disk, .. } => Some((disk.clone(), 0)),
                    Entry::Creating(_) => None,
                })
                .collect()
        };
        let mut out: Vec<_> = disks
            .into_iter()
            .map(|(disk, n)| (disk.key.clone(), disk.stats(n)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Formatted disks ready, in all pools.
    pub fn pool_ready(&self) -> usize {
        let classes = self.shared.classes.iter().filter_map(|c| c.pool.as_ref());
        self.shared
            .pool
            .iter()
            .chain(classes)
            .map(Pool::ready)
            .sum()
    }
}

/// A pool of `target` disks made by `factory`, unless `target` is 0.
fn start_pool(target: usize, factory: &Arc<dyn DiskFactory>) -> std::io::Result<Option<Pool>> {
    match target {
        0 => Ok(None),
        n => Pool::start(n, factory.clone()).map(Some),
    }
}

/// The [`Keep`] for `ctl keep --for`, starting now.
fn keep_for(time: Option<Duration>) -> Keep {
    match time {
        Some(t) => Keep::Until(Instant::now() + t),
        None => Keep::Forever,
    }
}

impl Drop for ScratchExports {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.reaper.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    /// The disk that `peer` means by `name`, if policy allows the name.
    fn resolve(&self, name: &str, peer: &Identity) -> Result<DiskKey, LookupError> {
        let name = match (&self.settings.default_name, name) {
            (Some(default), "") => default.as_str(),
            _ => name,
        };
        self.settings.names.check(name)?;
        Ok(DiskKey {
            owner: self.settings.owners.owner_of(peer),
            name: name.to_owned(),
        })
    }

    /// The class of new disks named `name`: the first matching.
    fn class_of(&self, name: &str) -> Option<usize> {
        self.classes
            .iter()
            .position(|c| crate::config::glob_match(&c.class.pattern, name))
    }

    /// The pool of a class (None: the default class), if it has one.
    fn pool_of(&self, class: Option<usize>) -> Option<&Pool> {
        match class {
            Some(i) => self.classes[i].pool.as_ref(),
            None => self.pool.as_ref(),
        }
    }

    /// The name of a class, for the operator.
    fn class_name(&self, class: Option<usize>) -> &str {
        match class {
            Some(i) => &self.classes[i].class.pattern,
            None => crate::config::DEFAULT_CLASS,
        }
    }

    fn info(&self, name: &str, device: Option<&dyn BlockDevice>) -> ExportInfo {
        let (size, caps) = match (device, self.class_of(name)) {
            (Some(dev), _) => (dev.size(), dev.capabilities()),
            (None, Some(i)) => (self.classes[i].class.factory.size(), self.classes[i].caps),
            (None, None) => (self.factory.size(), self.template_caps),
        };
        ExportInfo {
            name: name.to_owned(),
            size,
            flags: flags_for(caps, self.settings.read_only),
            block_size: BLOCK_SIZE,
            description: self.settings.description.clone(),
        }
    }

    fn open(self: &Arc<Self>, key: &DiskKey) -> Result<OpenExport, LookupError> {
        let deadline = Instant::now() + self.settings.create_timeout;
        loop {
            let mut state = self.lock();
            if state.stop {
                return Err(LookupError::Shutdown("the server is shutting down".into()));
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
                    return self.create(key, &pending, &shares);
                }
            };
            drop(state);
            pending.wait(deadline)?;
            // Created: go round and attach to it like any later connection.
        }
    }

    /// Frees a slot for a new disk of `owner` under `--max-exports-per-owner`
    /// and `--max-exports`, evicting the lingering disk nearest its deadline
    /// (the owner's own, for its cap) if need be; the caller drops the
    /// evicted disks after unlocking.
    fn make_room(&self, state: &mut State, owner: &Owner) -> Result<Vec<Entry>, LookupError> {
        let mut evicted = Vec::new();
        if let Some(max) = self.settings.per_owner.max_exports {
            if state.disks_of(owner) >= max {
                let victim = Self::evict(state, |key| key.owner == *owner).ok_or_else(|| {
                    LookupError::Policy(format!(
                        "too many disks: each client may hold at most {max} scratch disks at \
                         once on this server, and all of yours are in use"
                    ))
                })?;
                info!(export = %victim.0.name, owner = %owner, "evicting a lingering disk to stay within --max-exports-per-owner");
                evicted.push(victim.1);
            }
        }
        if let Some(max) = self.settings.max_exports {
            if state.entries.len() >= max {
                let victim = Self::evict(state, |_| true).ok_or_else(|| {
                    LookupError::Policy(format!(
                        "too many exports: this server holds at most {max} scratch disks at once"
                    ))
                })?;
                info!(export = %victim.0.name, owner = %victim.0.owner, "evicting a lingering disk to stay within --max-exports");
                evicted.push(victim.1);
            }
        }
        Ok(evicted)
    }

    /// Removes the lingering disk nearest its deadline among those whose
    /// key passes `filter`, if any.
    fn evict(state: &mut State, filter: impl Fn(&DiskKey) -> bool) -> Option<(DiskKey, Entry)> {
        let (_, key) = state
            .entries
            .iter()
            .filter(|(key, _)| filter(key))
            .filter_map(|(key, e)| match e {
                Entry::Lingering { until, disk } if disk.kept().is_none() => {
                    Some((*until, key.clone()))
                }
                _ => None,
            })
            .min()?;
        let entry = state.remove(&key)?;
        Some((key, entry))
    }

    /// Makes the disk for `key`, whose entry is `Creating(pending)`, and
    /// moves it under its owner's `shares`.
    fn create(
        self: &Arc<Self>,
        key: &DiskKey,
        pending: &Pending,
        shares: &Budgets,
    ) -> Result<OpenExport, LookupError> {
        let start = Instant::now();
        let class = self.class_of(&key.name);
        // Each class's pool holds disks made by that class's factory.
        let pooled = self.pool_of(class).and_then(Pool::take);
        let from_pool = pooled.is_some();
        let made = match (pooled, class) {
            (Some(device), _) => Ok(device),
            (None, Some(i)) => self.classes[i].class.factory.create(),
            (None, None) => self.factory.create(),
        };
        let claimed = made
            .map_err(|why| {
                warn!(export = %key.name, owner = %key.owner, "cannot create scratch disk: {why}");
                LookupError::Platform(format!("cannot create the scratch disk: {why}"))
            })
            .and_then(|device| match device.claim(shares) {
                Ok(()) => Ok(device),
                Err(why) => {
                    info!(export = %key.name, owner = %key.owner, "new disk refused: {why}");
                    Err(LookupError::Policy(why.to_string()))
                }
            });
        let result = match claimed {
            Ok(device) => {
                let took = start.elapsed();
                self.counters.created(took);
                info!(export = %key.name, owner = %key.owner, class = self.class_name(class), from_pool, ms = took.as_secs_f64() * 1e3, "scratch disk created");
                let disk = Arc::new(Disk {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    key: key.clone(),
                    class,
                    device: Arc::new(device),
                    attached: Instant::now(),
                    connections_total: AtomicU64::new(0),
                    members: Arc::default(),
                    keep: Mutex::new(None),
                    counters: self.counters.clone(),
                });
                self.lock().entries.insert(
                    key.clone(),
                    Entry::Live {
                        disk: disk.clone(),
                        connections: 1,
                    },
                );
                Ok(self.attach(disk))
            }
            Err(e) => {
                let removed = self.lock().remove(key);
                drop(removed);
                Err(e)
            }
        };
        pending.finish(result.as_ref().map(drop).map_err(Clone::clone));
        result
    }

    /// A connection's handle on `disk`, already counted in its entry.
    fn attach(self: &Arc<Self>, disk: Arc<Disk>) -> OpenExport {
        disk.connections_total.fetch_add(1, Ordering::Relaxed);
        OpenExport {
            info: self.info(&disk.key.name, Some(disk.device.as_ref())),
            device: disk.device.clone(),
            lease: Some(Box::new(Lease {
                shared: self.clone(),
                disk: disk.clone(),
            })),
            members: Some(disk.members.clone()),
            errors: disk.device.errors(),
        }
    }

    /// A connection of `disk` is done.
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
        let (until, deadline) = match disk.kept() {
            Some(Keep::Forever) => (now + FOREVER, false),
            Some(Keep::Until(t)) => (t, true),
            Some(Keep::After(t)) => {
                *sync::lock(&disk.keep) = Some(Keep::Until(now + t));
                (now + t, true)
            }
            None => {
                let linger = match disk.class {
                    Some(i) => self.classes[i].class.linger,
                    None => self.settings.linger,
                };
                (now + linger, !linger.is_zero())
            }
        };
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

    /// The reaper thread: destroys lingering disks at their deadlines.
    fn reap(&self) {
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
    fn finish(&self, outcome: Result<(), LookupError>) {
        *sync::lock(&self.outcome) = Some(outcome);
        self.done.notify_all();
    }

    /// Waits until the creation is over (or `deadline`); its outcome.
    fn wait(&self, deadline: Instant) -> Result<(), LookupError> {
        let mut outcome = sync::lock(&self.outcome);
        loop {
            if let Some(outcome) = outcome.as_ref() {
                return outcome.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LookupError::Platform(
                    "timed out waiting for disk creation".into(),
                ));
            }
            outcome = sync::wait_timeout(&self.done, outcome, left).0;
        }
    }
}

/// Every question is answered within the asking peer's owner: see the
/// [module documentation](self#owners).
impl Exports for ScratchExports {
    /// An identified owner's own disks (live or lingering); nothing for
    /// peers without an identity, whose disks are shared by name only.
    fn list(&self, peer: &Identity) -> Vec<ExportListing> {
        let owner = self.shared.settings.owners.owner_of(peer);
        if !owner.is_identified() {
            return Vec::new();
        }
        let state = self.shared.lock();
        let mut names: Vec<ExportListing> = state
            .entries
            .iter()
            .filter(|(key, e)| key.owner == owner && !matches!(e, Entry::Creating(_)))
            .map(|(key, _)| ExportListing {
                name: key.name.clone(),
                description: self.shared.settings.description.clone(),
            })
            .collect();
        drop(state);
        names.sort_by(|a, b| a.name.cmp(&b.name));
        names
    }

    fn info(&self, name: &str, peer: &Identity) -> Result<ExportInfo, LookupError> {
        let key = self.shared.resolve(name, peer)?;
        let device = match self.shared.lock().entries.get(&key) {
            Some(Entry::Live { disk, .. } | Entry::Lingering { disk, .. }) => {
                Some(disk.device.clone())
            }
            _ => None,
        };
        Ok(self
            .shared
            .info(&key.name, device.as_deref().map(|d| d as &dyn BlockDevice)))
    }

    fn open(&self, name: &str, peer: &Identity) -> Result<OpenExport, LookupError> {
        let key = self.shared.resolve(name, peer)?;
        self.shared.open(&key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use crate::disk::CreateError;
    use crate::owner::{OwnerLimits, OwnerPolicy};
    use scratchd_store::MemoryDevice;

    use super::*;

    /// Makes blank memory disks, counting them; can be held at a gate or
    /// told to fail.
    #[derive(Default)]
    struct Fake {
        made: AtomicU64,
        fail: AtomicBool,
        gate: Mutex<bool>,
        opened: Condvar,
    }

    impl Fake {
        fn hold(&self) {
            *self.gate.lock().unwrap() = true;
        }
        fn open_gate(&self) {
            *self.gate.lock().unwrap() = false;
            self.opened.notify_all();
        }
        fn made(&self) -> u64 {
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
            crate::device::scratch_capabilities(MemoryDevice::new(0).unwrap().capabilities())
        }
    }

    fn registry(settings: Settings) -> (ScratchExports, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        (ScratchExports::new(settings, fake.clone()).unwrap(), fake)
    }

    /// A local user's connection.
    fn peer(uid: u32) -> Identity {
        Identity::Unix(scratchd_server::identity::Credentials {
            uid,
            gid: uid,
            pid: 1,
        })
    }

    fn alice() -> Identity {
        peer(1000)
    }

    fn settings() -> Settings {
        Settings::new(Duration::from_secs(5))
    }

    fn names(r: &ScratchExports) -> Vec<String> {
        r.list(&alice()).into_iter().map(|l| l.name).collect()
    }

    /// Polls `f` for up to 5 s.
    fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::yield_now();
        }
    }

    #[test]
    fn connections_share_a_disk_that_goes_with_the_last() {
        let (r, fake) = registry(settings());
        let a1 = r.open("a", &alice()).unwrap();
        let a2 = r.open("a", &alice()).unwrap();
        let b = r.open("b", &alice()).unwrap();
        assert!(Arc::ptr_eq(&a1.device, &a2.device));
        assert!(!Arc::ptr_eq(&a1.device, &b.device));
        assert!(a1.info.flags.0 & scratchd_proto::TransmissionFlags::CAN_MULTI_CONN != 0);
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
        let a3 = r.open("a", &alice()).unwrap();
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
                .map(|_| s.spawn(|| r.open("a", &alice()).unwrap()))
                .collect();
            eventually("the creation to start", || fake.made() == 1);
            // INFO and LIST meanwhile neither wait nor create.
            assert_eq!(r.info("a", &alice()).unwrap().size, 1 << 20);
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
                .map(|_| s.spawn(|| r.open("a", &alice()).err()))
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
                Some(LookupError::Platform(m)) => assert!(m.contains("boom"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(names(&r).is_empty() && r.stats().is_empty());
        // (An opener that arrived after the failure tried again, and failed.)
        let made = fake.made();
        fake.fail.store(false, Ordering::SeqCst);
        r.open("a", &alice()).unwrap();
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
            let creator = s.spawn(|| r.open("a", &alice()).map(drop));
            eventually("the creation to start", || fake.made() == 1);
            match r.open("a", &alice()).err() {
                Some(LookupError::Platform(m)) => assert!(m.contains("timed out"), "{m}"),
                other => panic!("{other:?}"),
            }
            fake.open_gate();
            creator.join().unwrap().unwrap();
        });
    }

    #[test]
    fn drop_disk_ends_connections_and_keep_outlasts_them() {
        let (r, fake) = registry(settings());
        let key = |name: &str| DiskKey {
            owner: Owner::Uid(1000),
            name: name.into(),
        };
        // keep: no linger, yet the disk stays after its last connection.
        let a = r.open("a", &alice()).unwrap();
        a.device.write(0, b"kept", false).unwrap();
        let device = a.device.clone();
        r.keep(&key("a"), None).unwrap();
        assert_eq!(r.disks()[0].keep, Some(Keep::Forever));
        drop(a);
        let view = &r.disks()[0];
        assert_eq!(view.state, DiskState::Lingering { left: None });
        let again = r.open("a", &alice()).unwrap();
        assert!(Arc::ptr_eq(&again.device, &device), "the kept disk");
        drop(again);
        // keep --for on a lingering disk: reaped at the new deadline.
        r.keep(&key("a"), Some(Duration::from_millis(100))).unwrap();
        eventually("the kept disk to expire", || r.disks().is_empty());
        assert_eq!(r.status().destroyed, 1);
        // drop: out of the registry at once, connections told to stop, the
        // disk destroyed after the last lease; the name makes a new disk.
        let b = r.open("b", &alice()).unwrap();
        // (The server makes each connection a member; here, one without a socket.)
        let member = b
            .members
            .as_ref()
            .unwrap()
            .join(scratchd_server::transport::Control::None);
        assert_eq!(r.drop_disk(&key("b")), Ok(1));
        assert!(r.disks().is_empty());
        assert_eq!(r.status().exports, 0);
        assert_eq!(r.status().destroyed, 1, "still held by its connection");
        let fresh = r.open("b", &alice()).unwrap();
        assert!(!Arc::ptr_eq(&fresh.device, &b.device));
        drop((b, member));
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

    #[test]
    fn a_lingering_disk_is_revived_then_reaped() {
        let (r, fake) = registry(Settings {
            linger: Duration::from_millis(200),
            ..settings()
        });
        let a = r.open("a", &alice()).unwrap();
        a.device.write(0, b"kept", false).unwrap();
        let device = a.device.clone();
        drop(a);
        assert_eq!(names(&r), ["a"], "lingering disks are listed");
        let again = r.open("a", &alice()).unwrap();
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
        r.open("a", &alice()).unwrap();
        assert_eq!(fake.made(), 2);
    }

    /// Makes blank memory disks of its size.
    struct Sized(u64);

    impl DiskFactory for Sized {
        fn create(&self) -> Result<ScratchDevice, CreateError> {
            Ok(ScratchDevice::memory(MemoryDevice::new(self.0).unwrap()))
        }
        fn size(&self) -> u64 {
            self.0
        }
        fn capabilities(&self) -> Capabilities {
            crate::device::scratch_capabilities(MemoryDevice::new(0).unwrap().capabilities())
        }
    }

    #[test]
    fn classes_pick_size_and_linger_by_name_first_match_wins() {
        let class = |pattern: &str, size: u64, linger: u64| Class {
            pattern: pattern.into(),
            factory: Arc::new(Sized(size)),
            linger: Duration::from_secs(linger),
            pool: 0,
        };
        let classes = vec![
            class("big-*", 4 << 20, 60),
            class("big-*-x", 8 << 20, 0),
            class("*-mid", 2 << 20, 0),
        ];
        let fake = Arc::new(Fake::default());
        let r = ScratchExports::with_classes(settings(), fake.clone(), classes).unwrap();
        let size = |name: &str| r.info(name, &alice()).unwrap().size;
        assert_eq!(size("big-1"), 4 << 20, "INFO knows the class's size");
        assert_eq!(size("big-1-x"), 4 << 20, "the first match wins");
        assert_eq!(size("a-mid"), 2 << 20);
        assert_eq!(size("small"), 1 << 20, "no class: the default");
        let big = r.open("big-1", &alice()).unwrap();
        assert_eq!(big.device.size(), 4 << 20);
        let small = r.open("small", &alice()).unwrap();
        assert_eq!(small.device.size(), 1 << 20);
        assert_eq!(
            fake.made(),
            1,
            "only the default class uses the default maker"
        );
        let classes: Vec<_> = r
            .disks()
            .into_iter()
            .map(|d| (d.key.name, d.class))
            .collect();
        assert_eq!(
            classes,
            [
                ("big-1".to_owned(), "big-*".to_owned()),
                ("small".to_owned(), "default".to_owned())
            ]
        );
        drop((big, small));
        assert_eq!(names(&r), ["big-1"], "big-* lingers, the default does not");
    }

    /// A class with `pool` keeps its own ready disks: a new name of that
    /// class takes one of them (without waiting for its factory), and the
    /// default class's pool is left alone.
    #[test]
    fn each_class_takes_disks_from_its_own_pool() {
        let (default, big) = (Arc::new(Fake::default()), Arc::new(Fake::default()));
        let class = Class {
            pattern: "big-*".into(),
            factory: big.clone(),
            linger: Duration::ZERO,
            pool: 2,
        };
        let settings = Settings {
            pool: 1,
            ..settings()
        };
        let r = ScratchExports::with_classes(settings, default.clone(), vec![class]).unwrap();
        let pools = |r: &ScratchExports| -> Vec<(String, u64, u64)> {
            let pools = r.status().pools.into_iter();
            pools.map(|p| (p.class, p.ready, p.target)).collect()
        };
        eventually("both pools to fill", || r.pool_ready() == 3);
        assert_eq!(
            pools(&r),
            [("default".into(), 1, 1), ("big-*".into(), 2, 2)]
        );
        // From now on a factory making a disk waits: an open that needs
        // one would hang.
        default.hold();
        big.hold();
        let opened = thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let r = &r;
            s.spawn(move || tx.send(r.open("big-1", &alice()).map(|e| e.device.size()).ok()));
            let opened = rx.recv_timeout(Duration::from_secs(5));
            default.open_gate();
            big.open_gate();
            opened
        });
        assert_eq!(opened, Ok(Some(1 << 20)), "big-1 waited for a new disk");
        let by_class = pools(&r);
        assert_eq!(by_class[0].1, 1, "the default pool is untouched");
        eventually("big-*'s pool to refill", || r.pool_ready() == 3);
        assert_eq!(big.made(), 3, "big-*'s pool is refilled by its factory");
        assert_eq!(default.made(), 1);
    }

    #[test]
    fn max_exports_evicts_lingering_disks_then_refuses() {
        let (r, _fake) = registry(Settings {
            max_exports: Some(2),
            linger: Duration::from_secs(60),
            ..settings()
        });
        let a = r.open("a", &alice()).unwrap();
        drop(r.open("b", &alice()).unwrap()); // lingers
        let c = r.open("c", &alice()).unwrap(); // evicts b
        assert_eq!(names(&r), ["a", "c"]);
        match r.open("d", &alice()).err() {
            Some(LookupError::Policy(m)) => assert!(m.contains("too many"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Existing names still open.
        r.open("a", &alice()).unwrap();
        drop((a, c));
    }

    #[test]
    fn names_are_checked_and_info_never_creates() {
        let (r, fake) = registry(settings());
        for bad in ["", "../x", ".hidden", &"x".repeat(200)] {
            assert!(
                matches!(r.info(bad, &alice()), Err(LookupError::Policy(_))),
                "{bad:?}"
            );
            assert!(
                matches!(r.open(bad, &alice()), Err(LookupError::Policy(_))),
                "{bad:?}"
            );
        }
        let info = r.info("new", &alice()).unwrap();
        assert_eq!((info.name.as_str(), info.size), ("new", 1 << 20));
        assert!(names(&r).is_empty());
        assert_eq!(fake.made(), 0);

        let (r, _) = registry(Settings {
            default_name: Some("build".into()),
            ..settings()
        });
        let open = r.open("", &alice()).unwrap();
        assert_eq!(open.info.name, "build");
        assert_eq!(names(&r), ["build"]);
    }

    #[test]
    fn each_owner_has_a_namespace_and_lists_only_its_own_disks() {
        let (r, fake) = registry(settings());
        let (bob, anonymous) = (peer(2000), Identity::Anonymous);
        let a1 = r.open("build", &alice()).unwrap();
        let a2 = r.open("build", &alice()).unwrap();
        assert!(
            Arc::ptr_eq(&a1.device, &a2.device),
            "one owner shares by name"
        );
        a1.device.write(0, b"secret", false).unwrap();
        // Bob asking for alice's name gets what any fresh name gets.
        assert_eq!(r.list(&bob), []);
        assert_eq!(
            r.info("build", &bob),
            r.info("fresh", &bob).map(|i| ExportInfo {
                name: "build".into(),
                ..i
            })
        );
        let b = r.open("build", &bob).unwrap();
        assert!(!Arc::ptr_eq(&a1.device, &b.device));
        let mut buf = [1u8; 6];
        b.device.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 6], "another owner's disk is fresh");
        // Peers without an identity share one namespace and list nothing.
        let n = r.open("build", &anonymous).unwrap();
        assert!(!Arc::ptr_eq(&n.device, &a1.device) && !Arc::ptr_eq(&n.device, &b.device));
        assert_eq!(r.list(&anonymous), []);
        assert_eq!(names(&r), ["build"]);
        assert_eq!(r.list(&bob).len(), 1);
        assert_eq!(fake.made(), 3);
        // uid+gid: the same uid in another group is another owner.
        let (r, _) = registry(Settings {
            owners: OwnerPolicy::PeerGid,
            ..settings()
        });
        let staff = Identity::Unix(scratchd_server::identity::Credentials {
            uid: 1000,
            gid: 50,
            pid: 2,
        });
        let x = r.open("x", &alice()).unwrap();
        assert!(!Arc::ptr_eq(
            &x.device,
            &r.open("x", &staff).unwrap().device
        ));
        // owner=name: everybody reaches a disk by its name.
        let (r, _) = registry(Settings {
            owners: OwnerPolicy::Name,
            ..settings()
        });
        let x = r.open("x", &alice()).unwrap();
        assert!(Arc::ptr_eq(&x.device, &r.open("x", &bob).unwrap().device));
        assert_eq!(r.list(&alice()), [], "nobody lists under owner=name");
    }

    #[test]
    fn the_per_owner_cap_evicts_the_owners_lingering_disk_then_refuses() {
        let (r, _) = registry(Settings {
            per_owner: OwnerLimits {
                max_exports: Some(2),
                ..OwnerLimits::default()
            },
            linger: Duration::from_secs(60),
            ..settings()
        });
        let bob = peer(2000);
        let bobs = r.open("b", &bob).unwrap();
        drop(r.open("lingers", &bob).unwrap());
        let a = r.open("a", &alice()).unwrap();
        drop(r.open("a-lingers", &alice()).unwrap());
        let c = r.open("c", &alice()).unwrap(); // evicts a-lingers, not bob's
        assert_eq!(r.list(&alice()).len(), 2);
        assert_eq!(r.list(&bob).len(), 2);
        match r.open("d", &alice()).err() {
            Some(LookupError::Policy(m)) => assert!(m.contains("at most 2"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Its open disks still open, and others carry on.
        drop(r.open("a", &alice()).unwrap());
        let another = r.open("new", &peer(3000)).unwrap();
        // A disk gone gives its slot back.
        drop(c);
        r.open("d", &alice()).unwrap();
        drop((a, bobs, another));
    }

    #[test]
    fn owner_shares_give_enospc_and_pooled_disks_join_their_owners_share() {
        use crate::disk::{Maker, Placement};
        use scratchd_store::memory::Budget;
        let server = Arc::new(Budget::new(64 << 10));
        let maker = Maker {
            quota: None,
            size: 1 << 20,
            placement: Placement::Memory(server.clone()),
            format: Box::new(crate::FormatSpec {
                kind: crate::FormatKind::None,
                fs_type: "none".into(),
                label: None,
                env: Vec::new(),
                timeout: Duration::from_secs(5),
            }),
        };
        let settings = Settings {
            pool: 1,
            per_owner: OwnerLimits {
                memory: Some(24 << 10),
                ..OwnerLimits::default()
            },
            ..settings()
        };
        let r = ScratchExports::new(settings, Arc::new(maker)).unwrap();
        eventually("the pool to fill", || r.pool_ready() == 1);
        let a = r.open("a", &alice()).unwrap(); // from the pool
        let a2 = r.open("a2", &alice()).unwrap(); // made at once
        let bob = r.open("b", &peer(2000)).unwrap();
        a.device.write(0, &[1; 16 << 10], false).unwrap();
        a2.device.write(0, &[1; 8 << 10], false).unwrap();
        let err = a2.device.write(8 << 10, &[1; 4096], false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "past alice's share");
        bob.device.write(0, &[2; 24 << 10], false).unwrap();
        assert_eq!(server.used(), 48 << 10, "others carry on");
        // Trimming gives the share back.
        a.device.trim(0, 16 << 10, false).unwrap();
        a2.device.write(8 << 10, &[1; 4096], false).unwrap();
        drop((a, a2, bob));
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn dropping_the_registry_stops_the_reaper() {
        let (r, _) = registry(Settings {
            linger: Duration::from_secs(60),
            ..settings()
        });
        let shared = Arc::downgrade(&r.shared);
        drop(r.open("a", &alice()).unwrap());
        drop(r);
        eventually("the reaper to exit", || shared.strong_count() == 0);
    }
}
