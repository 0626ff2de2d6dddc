//! [`Registry`]: export names → scratch disks, created on first open,
//! shared by every connection with that name, destroyed after the last.
//!
//! The registry knows disks, owners and budgets, not NBD: it answers in its
//! own terms ([`DiskInfo`], [`OpenDisk`], [`OpenError`]), and the exports
//! layer above (`scratchd_exports`) turns those into the server's export
//! registry (flags, block sizes, protocol errors). `scratchd run` asks it
//! directly for its one local disk.
//!
//! # Owners
//!
//! A disk is found by its owner and its name together ([`DiskKey`]): a
//! connection's [`Owner`] (its [`Peer`] under `owner=`, see
//! [`crate::owner`]) is part of every lookup, so connections of one owner
//! share a disk by name while another owner asking for the same name gets a
//! fresh disk of its own, exactly as for a name nobody uses. LIST shows an
//! identified owner its own disks and nothing else; peers without an
//! identity (plain TCP) see an empty list, since "their" disks are everyone's
//! who lacks an identity. Each owner is capped by [`OwnerLimits`]: the number
//! of its disks (its lingering disks are evicted first), and shares of the
//! memory and disk budgets that its disks' own budgets are moved under when
//! the disk is made or taken from the pool. See [`owners`].
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
//!   on the entry's pending slot, bounded by a timeout, and never start
//!   a second mkfs. A failure removes the entry and is passed to every
//!   waiter.
//! - `Live`: a disk and its connection count. Each open returns a lease whose
//!   drop (when the connection and all its requests are done) decrements it.
//! - `Lingering`: no connections, kept until a deadline (`linger=`). An open
//!   revives it; otherwise a reaper thread removes it at the deadline.
//!
//! A disk is destroyed by dropping it outside the lock: memory goes back to
//! the budget and files are closed (they never had names). Its statistics are
//! logged then. The transitions are [`lifecycle`]'s.
//!
//! # Operator actions
//!
//! `scratchd ctl` acts through [`Registry::drop_disk`], which takes a disk
//! out of the map (a later open of its name makes a fresh disk) and ends its
//! connections through the stop each one left with its lease
//! ([`Lease::on_drop`]); the disk goes when the last of them is done.
//! [`Registry::keep`] marks a disk to stay after its last connection, for a
//! deadline or until dropped, instead of its linger; kept disks are never
//! evicted. [`Registry::disks`] and [`Registry::status`] are the numbers
//! `ctl` and the metrics show. See [`operator`].
//!
//! `--max-exports` counts every entry. When it is reached, the lingering
//! disk closest to its deadline is destroyed to make room; only when none
//! lingers is a new name refused. `--max-exports-per-owner` works the same
//! way within one owner's disks, and is checked first.
//!
//! # Layout
//!
//! - this module: the registry, its settings and its lookups (list, info,
//!   open) and their error;
//! - [`lifecycle`]: open, create, attach, release, linger, reap;
//! - [`owners`]: owners' accounting, the per-owner and server-wide caps;
//! - [`classes`]: which class a name falls in, and the classes' pools;
//! - [`operator`]: what `ctl` and the metrics see (disks, stats, status)
//!   and do (drop, keep);
//! - [`histogram`]: registry-wide counters and the creation-time histogram;
//! - `users`: who holds a disk, and how to end them on `ctl drop`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use scratchd_store::{sync, BlockDevice, Capabilities};

use crate::device::{Budgets, ClaimError, ScratchDevice};
use crate::disk::{CreateError, DiskFactory};
use crate::names::{NameError, NamePolicy};
use crate::owner::{Owner, OwnerLimits, OwnerPolicy, Peer};
use crate::pool::Pool;

mod classes;
mod histogram;
mod lifecycle;
mod operator;
mod owners;
mod snapshots;
#[cfg(test)]
mod testing;
mod users;

pub use classes::{Class, PoolStatus};
pub use histogram::CREATION_BUCKETS_MS;
pub use lifecycle::Lease;
pub use operator::{AdminError, BudgetUse, DiskState, DiskView, Keep, RegistryStatus};
pub use snapshots::{SnapshotError, SnapshotKey, SnapshotView, MAX_SNAPSHOTS_PER_OWNER};

use classes::ClassEntry;
use histogram::Counters;
use lifecycle::{Disk, Pending};
use owners::OwnerState;

/// The one log target of the registry's events, whichever module logs
/// them: operators filter on it (`docs/SCRATCH.md`).
const LOG: &str = "scratchd_scratch::registry";

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
    /// The snapshot new disks of the default class start as (`from=`).
    pub from: Option<String>,
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
            from: None,
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

/// What a name stands for, with or without a disk yet: what a client is
/// told before it opens one. The exports layer turns it into NBD's export
/// info (flags from `caps` and `read_only`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The name asked for, or the default name that `""` stands for.
    pub name: String,
    pub size: u64,
    /// What the disk (or, before it exists, its class's disks) can do.
    pub caps: Capabilities,
    /// The server serves every disk read-only (`--readonly`).
    pub read_only: bool,
    pub description: Option<String>,
}

/// A disk held open by one user (a connection, or `scratchd run`).
pub struct OpenDisk {
    pub info: DiskInfo,
    pub device: Arc<ScratchDevice>,
    /// Keeps the disk while its user needs it; dropped when the user (and
    /// every request in flight) is done.
    pub lease: Lease,
}

/// Why a name could not be opened (or described). The messages go to the
/// client as they are; the exports layer sorts the variants into NBD's
/// error kinds.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// The name breaks the name policy.
    #[error(transparent)]
    Name(#[from] NameError),
    /// `--max-exports` is reached and none of the asking owner's disks
    /// lingers (other owners' lingering disks are theirs, never evicted
    /// for someone else).
    #[error(
        "too many exports: this server holds at most {max} scratch disks at once, and none \
         of yours lingers to make room"
    )]
    TooMany { max: usize },
    /// `--max-exports-per-owner` is reached and none of the owner's disks
    /// lingers.
    #[error(
        "too many disks: each client may hold at most {max} scratch disks at once on this \
         server, and all of yours are in use"
    )]
    TooManyOfOwner { max: usize },
    /// The owner's share of a budget is too small for the new disk.
    #[error(transparent)]
    Share(Arc<ClaimError>),
    /// The snapshot a new disk was to start as is neither the owner's nor
    /// published.
    #[error("no snapshot {0:?}")]
    NoSnapshot(String),
    /// Making the disk failed (budget, file system, format command).
    #[error("cannot create the scratch disk: {0}")]
    Create(#[source] Arc<CreateError>),
    /// Another connection's creation of the disk took too long.
    #[error("timed out waiting for disk creation")]
    CreateTimeout,
    /// The registry is stopping.
    #[error("the server is shutting down")]
    Stopping,
}

/// Scratch disks by owner and name; see the [module documentation](self).
pub struct Registry {
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
    /// Snapshots by owner (or published) and name.
    snapshots: HashMap<SnapshotKey, snapshots::Held>,
    /// Names of snapshots being taken.
    reserved: HashSet<SnapshotKey>,
    stop: bool,
}

enum Entry {
    Creating(Arc<Pending>),
    Live { disk: Arc<Disk>, connections: u64 },
    Lingering { disk: Arc<Disk>, until: Instant },
}

impl Registry {
    /// A registry making disks with `factory` (and a pool of
    /// `settings.pool` of them), with a reaper thread for lingering disks.
    ///
    /// # Errors
    ///
    /// When a thread cannot be started.
    pub fn new(settings: Settings, factory: Arc<dyn DiskFactory>) -> std::io::Result<Registry> {
        Registry::with_classes(settings, factory, Vec::new())
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
    ) -> std::io::Result<Registry> {
        let pool = classes::start_pool(settings.pool, &factory)?;
        // The classes share the server's budgets; each knows those it uses.
        let mut budgets = factory.budgets();
        for class in &classes {
            let theirs = class.factory.budgets();
            budgets.memory = budgets.memory.or(theirs.memory);
            budgets.disk = budgets.disk.or(theirs.disk);
        }
        let shared = Arc::new(Shared {
            template_caps: factory.capabilities(),
            budgets,
            classes: ClassEntry::start_all(classes)?,
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
        Ok(Registry { shared })
    }

    /// The owner of the disks that `peer` creates and may open, under the
    /// registry's `owner=` policy.
    pub fn owner_of(&self, peer: Peer) -> Owner {
        self.shared.settings.owners.owner_of(peer)
    }

    /// The registry's description of its disks (`--description`).
    pub fn description(&self) -> Option<&str> {
        self.shared.settings.description.as_deref()
    }

    /// The names of `owner`'s disks (live or lingering), sorted; nothing for
    /// an owner without an identity, whose disks are shared by name only.
    pub fn list(&self, owner: Owner) -> Vec<String> {
        if !owner.is_identified() {
            return Vec::new();
        }
        let state = self.shared.lock();
        let mut names: Vec<String> = state
            .entries
            .iter()
            .filter(|(key, e)| key.owner == owner && !matches!(e, Entry::Creating(_)))
            .map(|(key, _)| key.name.clone())
            .collect();
        drop(state);
        names.sort();
        names
    }

    /// Describes what `name` is for `owner`, without creating anything.
    ///
    /// # Errors
    ///
    /// When the name breaks the name policy.
    pub fn info(&self, name: &str, owner: Owner) -> Result<DiskInfo, OpenError> {
        let key = self.shared.key_for(name, owner)?;
        let device = match self.shared.lock().entries.get(&key) {
            Some(Entry::Live { disk, .. } | Entry::Lingering { disk, .. }) => {
                Some(disk.device.clone())
            }
            _ => None,
        };
        Ok(self.shared.info(&key.name, device.as_deref()))
    }

    /// Opens `owner`'s disk `name`, creating it (or waiting for another
    /// user's creation of it) if it has none yet.
    ///
    /// # Errors
    ///
    /// When the name breaks the name policy, a cap or share leaves no room
    /// for a new disk, the disk cannot be made in time, or the registry is
    /// stopping.
    pub fn open(&self, name: &str, owner: Owner) -> Result<OpenDisk, OpenError> {
        self.open_from(name, owner, None)
    }

    /// [`Registry::open`], and if the disk is made now, it starts as the
    /// snapshot `from` (the owner's, else a published one) rather than as
    /// its class's disks do. An existing disk is opened as it is.
    ///
    /// # Errors
    ///
    /// As for [`Registry::open`], and when there is no such snapshot.
    pub fn open_from(
        &self,
        name: &str,
        owner: Owner,
        from: Option<&str>,
    ) -> Result<OpenDisk, OpenError> {
        let key = self.shared.key_for(name, owner)?;
        self.shared.open(&key, from)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.reaper.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    /// The disk that `owner` means by `name`, if policy allows the name.
    fn key_for(&self, name: &str, owner: Owner) -> Result<DiskKey, NameError> {
        let name = match (&self.settings.default_name, name) {
            (Some(default), "") => default.as_str(),
            _ => name,
        };
        self.settings.names.check(name)?;
        Ok(DiskKey {
            owner,
            name: name.to_owned(),
        })
    }

    /// What `name` is: its disk's size and capabilities when it has one,
    /// its class's otherwise.
    fn info(&self, name: &str, device: Option<&ScratchDevice>) -> DiskInfo {
        let (size, caps) = match (device, self.class_of(name)) {
            (Some(dev), _) => (dev.size(), dev.capabilities()),
            (None, Some(i)) => (self.classes[i].class.factory.size(), self.classes[i].caps),
            (None, None) => (self.factory.size(), self.template_caps),
        };
        DiskInfo {
            name: name.to_owned(),
            size,
            caps,
            read_only: self.settings.read_only,
            description: self.settings.description.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn names_are_checked_and_info_never_creates() {
        let (r, fake) = registry(settings());
        for bad in ["", "../x", ".hidden", &"x".repeat(200)] {
            assert!(
                matches!(r.info(bad, alice()), Err(OpenError::Name(_))),
                "{bad:?}"
            );
            assert!(
                matches!(r.open(bad, alice()), Err(OpenError::Name(_))),
                "{bad:?}"
            );
        }
        let info = r.info("new", alice()).unwrap();
        assert_eq!((info.name.as_str(), info.size), ("new", 1 << 20));
        assert!(info.caps.multi_conn && !info.read_only);
        assert!(names(&r).is_empty());
        assert_eq!(fake.made(), 0);

        let (r, _) = registry(Settings {
            default_name: Some("build".into()),
            read_only: true,
            description: Some("scratch".into()),
            ..settings()
        });
        let open = r.open("", alice()).unwrap();
        assert_eq!(open.info.name, "build");
        assert!(open.info.read_only);
        assert_eq!(open.info.description.as_deref(), Some("scratch"));
        assert_eq!(r.description(), Some("scratch"));
        assert_eq!(names(&r), ["build"]);
    }
}
