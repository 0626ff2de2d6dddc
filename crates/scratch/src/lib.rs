//! Build scratch disks: one throw-away disk per export name.
//!
//! The export name is the build's identity. The first connection that opens
//! a new name creates its disk (sparse, in memory or in an unnamed file,
//! formatted by mkfs or the operator's command); every later connection with
//! that name shares it, so `CAN_MULTI_CONN` holds; after the last one closes
//! (and an optional linger) the disk is destroyed and its memory or space
//! returned. Flush and FUA are no-ops: nothing here must survive a crash, and
//! nothing does, since no disk ever has a name in the file system.
//!
//! Layout:
//! - [`config`]: the template and limits the registry is built from.
//! - [`spec`]: the disk settings as written (`KEY=VALUE`, `[tmpdisk]`,
//!   `[[class]]`), their one parser, and their merge into a [`DiskSpec`].
//! - [`units`]: sizes and durations, one parser each.
//! - [`names`]: which export names are allowed, and unguessable names.
//! - [`owner`]: who a disk belongs to, and what one owner may hold.
//! - [`registry`]: [`Registry`], the (owner, name) → disk map: lifecycle,
//!   owners, classes and pools, the operator's views.
//! - [`disk`]: making a disk (memfd or `O_TMPFILE`, format, load).
//! - [`format`](mod@format): running mkfs or the format command under a timeout.
//! - [`spill`]: [`spill::SpillDevice`], RAM first, then an unnamed file.
//! - [`device`]: [`ScratchDevice`], stats and the disk budget of files.
//! - `pool`: formatted disks kept ready (one pool per class that asks).
//! - [`stats`]: per-disk counters.
//!
//! This crate knows disks, owners and budgets, not NBD: the exports layer
//! (`scratchd_exports`) serves a [`Registry`] to the protocol server, and
//! `scratchd run` opens its one disk from a registry of its own.
//!
//! The design and its trade-offs are written up in `docs/SCRATCH.md`.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use scratchd_store::memory::Budget;

pub mod config;
pub mod device;
pub mod disk;
pub mod format;
pub mod names;
pub mod owner;
mod pool;
pub mod registry;
pub mod spec;
pub mod spill;
pub mod stats;
pub mod units;

pub use config::{Backing, Class, Config, DiskSpec, FormatKind, FormatSpec};
pub use device::ScratchDevice;
pub use owner::{Owner, OwnerLimits, OwnerPolicy, Peer};
pub use registry::{DiskInfo, OpenDisk, OpenError, Registry, Settings};
pub use spec::{ClassSettings, DiskSettings, SpecError};
pub use stats::{IoCounters, StatsSnapshot};

/// Why [`from_config`] could not build the registry.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `backing=memory`: not even one disk of this size can be made.
    #[error("cannot make a {size}-byte memory disk: {source}")]
    Memory { size: u64, source: io::Error },
    #[error("backing=dir:{}: cannot create files there: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("backing=memory,spill=dir:{}: cannot create files there: {source}", dir.display())]
    SpillDir { dir: PathBuf, source: io::Error },
    #[error("cannot start threads: {0}")]
    Threads(#[source] io::Error),
}

/// Builds the registry a [`Config`] describes.
///
/// # Errors
///
/// When disks cannot be made at all (a `backing=dir:` that does not exist
/// or takes no files) or a thread cannot start.
pub fn from_config(config: Config) -> Result<Registry, BuildError> {
    // Owners' disk shares need a server-wide disk budget to be part of,
    // even when the server sets no limit of its own.
    let disk_limit = match (config.disk_limit, config.per_owner.disk) {
        (None, Some(_)) => Some(u64::MAX),
        (limit, _) => limit,
    };
    // One memory and one disk budget for every class: the limits are
    // server-wide.
    let memory = Arc::new(Budget::new(config.memory_limit));
    let disk = disk_limit.map(|limit| Arc::new(Budget::new(limit)));
    let maker = make(&memory, &disk, &config.disk)?;
    let mut classes = Vec::new();
    for class in &config.classes {
        classes.push(registry::Class {
            pattern: class.pattern.clone(),
            factory: Arc::new(make(&memory, &disk, &class.disk)?),
            linger: class.disk.linger,
            pool: class.disk.pool,
            from: class.disk.from.clone(),
        });
    }
    let settings = Settings {
        names: config.names,
        default_name: config.default_name,
        description: config.description,
        linger: config.disk.linger,
        max_exports: config.max_exports,
        read_only: config.read_only,
        pool: config.disk.pool,
        from: config.disk.from.clone(),
        owners: config.owners,
        per_owner: config.per_owner,
        ..Settings::new(config.disk.format.timeout)
    };
    Registry::with_classes(settings, Arc::new(maker), classes).map_err(BuildError::Threads)
}

/// The disk maker for one class (or the default), checked.
fn make(
    memory: &Arc<Budget>,
    disk: &Option<Arc<Budget>>,
    spec: &DiskSpec,
) -> Result<disk::Maker, BuildError> {
    let DiskSpec {
        size,
        quota,
        format,
        backing,
        ..
    } = spec;
    let size = *size;
    let placement = match backing {
        Backing::Memory => disk::Placement::Memory(memory.clone()),
        Backing::Dir(path) => disk::Placement::Dir {
            path: path.clone(),
            budget: disk.clone(),
        },
        Backing::MemorySpill(path) => disk::Placement::Spill {
            path: path.clone(),
            memory: memory.clone(),
            disk: disk.clone(),
        },
    };
    let maker = disk::Maker {
        quota: *quota,
        size,
        placement,
        format: Box::new(format.clone()),
    };
    maker.check().map_err(|source| match backing {
        Backing::Memory => BuildError::Memory { size, source },
        Backing::Dir(dir) => BuildError::Dir {
            dir: dir.clone(),
            source,
        },
        Backing::MemorySpill(dir) => BuildError::SpillDir {
            dir: dir.clone(),
            source,
        },
    })?;
    Ok(maker)
}
