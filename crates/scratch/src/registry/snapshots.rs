//! Snapshots by owner and name, and new disks that start as one.
//!
//! An owner takes a snapshot of one of its own disks (live or lingering)
//! under a name of its own namespace; the operator publishes snapshots to
//! every owner (the config's `[[snapshot]]`, an image file, or a copy of
//! an owner's). A new disk may start as a snapshot ([`Registry::open_from`],
//! or a class's `from=`): the owner's own of that name first, else a
//! published one. Nobody can reach another owner's snapshot: a name is
//! looked up in the asker's namespace and the published one only, and a
//! name that is in neither is simply unknown.
//!
//! A snapshot's bytes are charged once: to the server's budgets and,
//! for an owner's snapshot, to that owner's shares, which therefore live
//! as long as the owner has a disk or a snapshot. Deleting a snapshot
//! takes its name away at once; its bytes go when the last clone of it
//! does (the clones hold it). An owner holds at most
//! [`MAX_SNAPSHOTS_PER_OWNER`] snapshots.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_store::cow::Snapshot;
use scratchd_store::BlockDevice;
use tracing::info;

use super::{Entry, Registry, Shared, State, LOG};
use crate::device::{Budgets, ScratchDevice};
use crate::disk::CreateError;
use crate::names::{NameError, NamePolicy};
use crate::owner::Owner;

/// Snapshots one owner may hold at once (each costs descriptors and a
/// bitmap besides its bytes, which its share caps).
pub const MAX_SNAPSHOTS_PER_OWNER: usize = 64;

/// Where a snapshot is found: its owner's namespace, or the published one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotKey {
    /// None: published by the operator, for every owner.
    pub owner: Option<Owner>,
    pub name: String,
}

/// A snapshot the registry holds under a name.
pub(super) struct Held {
    /// Shared with the clones made of it.
    snapshot: Arc<Snapshot>,
    taken: Instant,
    /// What it was made from (a disk's name, an image's path, ...).
    source: String,
    /// Bytes of data it holds (fixed: it never changes).
    bytes: u64,
}

/// One snapshot as `ctl` and the metrics see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotView {
    pub key: SnapshotKey,
    pub size: u64,
    /// Bytes of data held (once, whatever the number of clones).
    pub bytes: u64,
    /// Disks alive that started as it.
    pub clones: usize,
    pub age: Duration,
    pub source: String,
}

/// Why a snapshot could not be taken, found, or made a disk of.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The snapshot's or the disk's name breaks the name policy.
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("no disk {0:?} of yours is open or lingering")]
    NoDisk(String),
    #[error("disk {0:?} is being created; try again in a moment")]
    Creating(String),
    #[error("no snapshot {0:?}")]
    NoSnapshot(String),
    #[error("a snapshot {0:?} exists already")]
    Exists(String),
    #[error("too many snapshots: each client may hold at most {max}")]
    TooMany { max: usize },
    #[error("cannot take the snapshot: {0}")]
    Create(#[source] Arc<CreateError>),
    #[error("cannot read the image {path}: {source}")]
    Image {
        path: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl Registry {
    /// Takes a snapshot of `owner`'s disk `disk` (live or lingering) and
    /// keeps it as `owner`'s `name`. Writes to the disk wait while it is
    /// copied, so it holds each write whole or not at all.
    ///
    /// # Errors
    ///
    /// A bad name, no such disk, a name in use, too many snapshots, or no
    /// room in the budgets (the owner's share included).
    pub fn take_snapshot(
        &self,
        owner: Owner,
        disk: &str,
        name: &str,
    ) -> Result<SnapshotView, SnapshotError> {
        let disk_key = self.shared.key_for(disk, owner)?;
        let key = self.shared.snapshot_key(Some(owner), name)?;
        let (device, class, shares) = {
            let mut state = self.shared.lock();
            let (device, class) = match state.entries.get(&disk_key) {
                Some(Entry::Live { disk, .. } | Entry::Lingering { disk, .. }) => {
                    (disk.device.clone(), disk.class)
                }
                Some(Entry::Creating(_)) => return Err(SnapshotError::Creating(disk.into())),
                None => return Err(SnapshotError::NoDisk(disk.into())),
            };
            let shares = state.reserve_snapshot(&key, &self.shared)?;
            (device, class, shares)
        };
        let made = self
            .shared
            .factory_of(class)
            .snapshot_of(&device, &shares)
            .map_err(|e| SnapshotError::Create(Arc::new(e)));
        self.shared.settle(&key, made, disk_key.name.clone())
    }

    /// Publishes a copy of `image`, an operator's file or block device
    /// read once, as the snapshot `name` of every owner. Its bytes live
    /// where the default class's disks do.
    ///
    /// # Errors
    ///
    /// A bad name, a name in use, an unreadable image, a size other than
    /// the default class's disks, or no room in the budgets.
    pub fn import_snapshot(&self, name: &str, image: &Path) -> Result<SnapshotView, SnapshotError> {
        let key = self.shared.snapshot_key(None, name)?;
        let image_error = |source| SnapshotError::Image {
            path: image.display().to_string(),
            source: Arc::new(source),
        };
        let source = ScratchDevice::image(image).map_err(image_error)?;
        if source.size() != self.shared.factory.size() {
            let size = std::io::Error::other(format!(
                "it has {} bytes, the disks {}",
                source.size(),
                self.shared.factory.size()
            ));
            return Err(image_error(size));
        }
        self.shared.lock().reserve_snapshot(&key, &self.shared)?;
        let made = self
            .shared
            .factory
            .snapshot_of(&source, &Budgets::default())
            .map_err(|e| SnapshotError::Create(Arc::new(e)));
        self.shared.settle(&key, made, image.display().to_string())
    }

    /// Publishes `owner`'s snapshot `name` to every owner under
    /// `published` (the same bytes, charged once: to `owner` while it
    /// keeps its own).
    ///
    /// # Errors
    ///
    /// A bad name, no such snapshot, or a published one of that name.
    pub fn publish_snapshot(
        &self,
        owner: Owner,
        name: &str,
        published: &str,
    ) -> Result<SnapshotView, SnapshotError> {
        let from = self.shared.snapshot_key(Some(owner), name)?;
        let key = self.shared.snapshot_key(None, published)?;
        let mut state = self.shared.lock();
        let held = state
            .snapshots
            .get(&from)
            .ok_or_else(|| SnapshotError::NoSnapshot(name.into()))?;
        let copy = Held {
            snapshot: held.snapshot.clone(),
            taken: Instant::now(),
            source: format!("{} of {}", from.name, owner),
            bytes: held.bytes,
        };
        if state.snapshots.contains_key(&key) {
            return Err(SnapshotError::Exists(published.into()));
        }
        state.snapshots.insert(key.clone(), copy);
        let view = state.snapshots[&key].view(&key, &state);
        info!(target: LOG, snapshot = %published, from = %name, owner = %owner, "snapshot published");
        Ok(view)
    }

    /// `owner`'s snapshots and the published ones, by owner and name. An
    /// owner without an identity sees the published ones only: its
    /// snapshots, like its disks, are everyone's who knows their names
    /// (see [`Registry::list`]).
    pub fn snapshots_of(&self, owner: Owner) -> Vec<SnapshotView> {
        let mine = |key: &SnapshotKey| owner.is_identified() && key.owner == Some(owner);
        self.snapshot_views(|key| key.owner.is_none() || mine(key))
    }

    /// Every snapshot: the operator's view.
    pub fn snapshots(&self) -> Vec<SnapshotView> {
        self.snapshot_views(|_| true)
    }

    fn snapshot_views(&self, filter: impl Fn(&SnapshotKey) -> bool) -> Vec<SnapshotView> {
        let state = self.shared.lock();
        let mut out: Vec<_> = state
            .snapshots
            .iter()
            .filter(|(key, _)| filter(key))
            .map(|(key, held)| held.view(key, &state))
            .collect();
        drop(state);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Deletes `owner`'s snapshot `name` (`None`: the published one). Its
    /// name is free at once; its bytes go with its last clone.
    ///
    /// # Errors
    ///
    /// A bad name or no such snapshot.
    pub fn delete_snapshot(&self, owner: Option<Owner>, name: &str) -> Result<(), SnapshotError> {
        let key = self.shared.snapshot_key(owner, name)?;
        let mut state = self.shared.lock();
        let held = state
            .snapshots
            .remove(&key)
            .ok_or_else(|| SnapshotError::NoSnapshot(name.into()))?;
        if let Some(owner) = owner {
            state.release_snapshot(&owner);
        }
        drop(state);
        info!(target: LOG, snapshot = %name, owner = ?owner, clones = Arc::strong_count(&held.snapshot) - 1, "snapshot deleted");
        drop(held);
        Ok(())
    }
}

impl Held {
    /// Its view, as `key`, in a registry whose `state` holds it.
    fn view(&self, key: &SnapshotKey, state: &State) -> SnapshotView {
        // Every clone holds a reference, and so does every name the
        // registry keeps it under (an owner's and a published one).
        let names = state
            .snapshots
            .values()
            .filter(|h| Arc::ptr_eq(&h.snapshot, &self.snapshot))
            .count()
            .max(1);
        SnapshotView {
            key: key.clone(),
            size: self.snapshot.size(),
            bytes: self.bytes,
            clones: Arc::strong_count(&self.snapshot).saturating_sub(names),
            age: self.taken.elapsed(),
            source: self.source.clone(),
        }
    }
}

impl Shared {
    /// `name` in `owner`'s namespace (None: the published one), if the name
    /// policy's character set allows it.
    fn snapshot_key(&self, owner: Option<Owner>, name: &str) -> Result<SnapshotKey, NameError> {
        // The characters and length of export names; no prefix.
        NamePolicy::default().check(name)?;
        Ok(SnapshotKey {
            owner,
            name: name.to_owned(),
        })
    }

    /// The snapshot a new disk of `owner` named `from` starts as: the
    /// owner's own, else a published one.
    pub(super) fn find_snapshot(
        &self,
        owner: Owner,
        from: &str,
    ) -> Result<Arc<Snapshot>, SnapshotError> {
        let state = self.lock();
        let mine = SnapshotKey {
            owner: Some(owner),
            name: from.to_owned(),
        };
        let published = SnapshotKey {
            owner: None,
            name: from.to_owned(),
        };
        state
            .snapshots
            .get(&mine)
            .or_else(|| state.snapshots.get(&published))
            .map(|held| held.snapshot.clone())
            .ok_or_else(|| SnapshotError::NoSnapshot(from.into()))
    }

    /// Files a snapshot made for `key` (reserved by
    /// [`State::reserve_snapshot`]), or gives the reservation back.
    fn settle(
        &self,
        key: &SnapshotKey,
        made: Result<Snapshot, SnapshotError>,
        source: String,
    ) -> Result<SnapshotView, SnapshotError> {
        let mut state = self.lock();
        state.reserved.remove(key);
        let snapshot = match made {
            Ok(snapshot) => snapshot,
            Err(e) => {
                if let Some(owner) = key.owner {
                    state.release_snapshot(&owner);
                }
                return Err(e);
            }
        };
        let held = Held {
            bytes: snapshot.data_bytes(),
            snapshot: Arc::new(snapshot),
            taken: Instant::now(),
            source,
        };
        state.snapshots.insert(key.clone(), held);
        let view = state.snapshots[key].view(key, &state);
        drop(state);
        info!(target: LOG, snapshot = %key.name, owner = ?key.owner, bytes = view.bytes, source = %view.source, "snapshot taken");
        Ok(view)
    }
}

impl State {
    /// Holds `key` for a snapshot about to be made (none of that name, and
    /// room under the owner's count), counting it for its owner, whose
    /// shares it returns.
    fn reserve_snapshot(
        &mut self,
        key: &SnapshotKey,
        shared: &Shared,
    ) -> Result<Budgets, SnapshotError> {
        if self.snapshots.contains_key(key) || self.reserved.contains(key) {
            return Err(SnapshotError::Exists(key.name.clone()));
        }
        let shares = match key.owner {
            Some(owner) => {
                let held = self.owner_state(&owner, shared);
                if held.snapshots >= MAX_SNAPSHOTS_PER_OWNER {
                    self.forget_if_idle(&owner);
                    return Err(SnapshotError::TooMany {
                        max: MAX_SNAPSHOTS_PER_OWNER,
                    });
                }
                held.snapshots += 1;
                held.shares.clone()
            }
            None => Budgets::default(),
        };
        self.reserved.insert(key.clone());
        Ok(shares)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use scratchd_store::memory::Budget;

    use super::super::testing::*;
    use super::super::{Class, OpenError, Settings};
    use super::*;
    use crate::config::{FormatKind, FormatSpec};
    use crate::disk::{Maker, Placement};
    use crate::owner::{OwnerLimits, Peer};

    fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        dev.read(offset, &mut buf).unwrap();
        buf
    }

    /// A registry of blank memory disks of `size` bytes charged to `budget`.
    fn budgeted(budget: &Arc<Budget>, size: u64, settings: Settings) -> Registry {
        let maker = Maker {
            size,
            quota: None,
            placement: Placement::Memory(budget.clone()),
            format: Box::new(FormatSpec {
                kind: FormatKind::None,
                fs_type: "none".into(),
                label: None,
                env: vec![],
                timeout: std::time::Duration::from_secs(5),
            }),
        };
        Registry::new(settings, Arc::new(maker)).unwrap()
    }

    #[test]
    fn a_snapshot_starts_clones_that_write_privately_and_outlive_its_name() {
        let (r, _) = registry(settings());
        let disk = r.open("root", alice()).unwrap();
        disk.device.write(0, b"prepared", false).unwrap();
        let view = r.take_snapshot(alice(), "root", "base").unwrap();
        assert_eq!((view.size, view.bytes, view.clones), (1 << 20, 4096, 0));
        // The disk goes on; the snapshot does not see later writes.
        disk.device.write(0, b"PREPARED", false).unwrap();
        let a = r.open_from("build-a", alice(), Some("base")).unwrap();
        let b = r.open_from("build-b", alice(), Some("base")).unwrap();
        assert_eq!(read(&*a.device, 0, 8), b"prepared");
        a.device.write(0, b"a", false).unwrap();
        assert_eq!(read(&*b.device, 0, 8), b"prepared");
        assert_eq!(a.device.allocated_bytes(), 4096);
        assert_eq!(b.device.allocated_bytes(), 0);
        assert_eq!(r.snapshots_of(alice())[0].clones, 2);
        // An existing disk opens as it is, whatever `from` says.
        let again = r.open_from("build-a", alice(), Some("base")).unwrap();
        assert_eq!(read(&*again.device, 0, 8), b"arepared");
        // Deleted, its name is free at once and its clones read on.
        r.delete_snapshot(Some(alice()), "base").unwrap();
        assert!(r.snapshots_of(alice()).is_empty());
        assert_eq!(read(&*b.device, 0, 8), b"prepared");
        assert!(matches!(
            r.open_from("build-c", alice(), Some("base")).err(),
            Some(OpenError::NoSnapshot(_))
        ));
        r.take_snapshot(alice(), "root", "base").unwrap();
        assert!(matches!(
            r.take_snapshot(alice(), "root", "base"),
            Err(SnapshotError::Exists(_))
        ));
    }

    #[test]
    fn nobody_reaches_another_owners_disk_or_snapshot() {
        let (r, _) = registry(settings());
        let bob = r.owner_of(peer(2000));
        let disk = r.open("root", alice()).unwrap();
        disk.device.write(0, b"secret", false).unwrap();
        r.take_snapshot(alice(), "root", "base").unwrap();
        // Bob's "root" is no disk of his; alice's snapshot is unknown to him.
        assert!(matches!(
            r.take_snapshot(bob, "root", "mine"),
            Err(SnapshotError::NoDisk(_))
        ));
        assert!(matches!(
            r.open_from("x", bob, Some("base")).err(),
            Some(OpenError::NoSnapshot(_))
        ));
        assert!(r.snapshots_of(bob).is_empty());
        assert!(matches!(
            r.delete_snapshot(Some(bob), "base"),
            Err(SnapshotError::NoSnapshot(_))
        ));
        assert!(matches!(
            r.publish_snapshot(bob, "base", "everyone"),
            Err(SnapshotError::NoSnapshot(_))
        ));
        // Published, it is everyone's; an owner's own name comes first.
        r.publish_snapshot(alice(), "base", "farm-root").unwrap();
        let clone = r.open_from("x", bob, Some("farm-root")).unwrap();
        assert_eq!(read(&*clone.device, 0, 6), b"secret");
        let names: Vec<_> = r.snapshots_of(bob).into_iter().map(|v| v.key).collect();
        assert_eq!(
            names,
            [SnapshotKey {
                owner: None,
                name: "farm-root".into()
            }]
        );
        // Bad names are refused like export names.
        assert!(matches!(
            r.take_snapshot(alice(), "root", "../x"),
            Err(SnapshotError::Name(_))
        ));
    }

    #[test]
    fn a_class_names_the_snapshot_its_disks_start_as() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(1 << 20).unwrap();
        image.as_file().write_all(b"base root").unwrap();
        let class = Class {
            pattern: "ci-*".into(),
            factory: Arc::new(Sized(1 << 20)),
            linger: std::time::Duration::ZERO,
            pool: 0,
            from: Some("farm-root".into()),
        };
        let r = Registry::with_classes(settings(), Arc::new(Sized(1 << 20)), vec![class]).unwrap();
        // Not yet published: the class's disks cannot be made.
        assert!(matches!(
            r.open("ci-1", alice()).err(),
            Some(OpenError::NoSnapshot(_))
        ));
        r.import_snapshot("farm-root", image.path()).unwrap();
        let ci = r.open("ci-1", alice()).unwrap();
        assert_eq!(read(&*ci.device, 0, 9), b"base root");
        let other = r.open("other", alice()).unwrap();
        assert_eq!(read(&*other.device, 0, 9), [0; 9]);
        // An image of another size is refused, saying so.
        let small = tempfile::NamedTempFile::new().unwrap();
        let err = r.import_snapshot("small", small.path()).unwrap_err();
        assert!(err.to_string().contains("0 bytes"), "{err}");
    }

    #[test]
    fn a_snapshot_is_charged_once_to_its_owner_and_clones_only_for_their_writes() {
        let budget = Arc::new(Budget::new(64 << 20));
        let r = budgeted(
            &budget,
            1 << 20,
            Settings {
                per_owner: OwnerLimits {
                    memory: Some(512 << 10),
                    ..OwnerLimits::default()
                },
                ..settings()
            },
        );
        let disk = r.open("root", alice()).unwrap();
        disk.device.write(0, &[7; 256 << 10], false).unwrap();
        r.take_snapshot(alice(), "root", "base").unwrap();
        assert_eq!(budget.used(), 512 << 10, "the disk and its snapshot");
        drop(disk); // no linger: the disk goes, the snapshot stays
        assert_eq!(budget.used(), 256 << 10);
        let clones: Vec<_> = (0..8)
            .map(|i| {
                r.open_from(&format!("b{i}"), alice(), Some("base"))
                    .unwrap()
            })
            .collect();
        assert_eq!(
            budget.used(),
            256 << 10,
            "clones cost nothing until written"
        );
        clones[0].device.write(0, &[1; 8192], false).unwrap();
        assert_eq!(budget.used(), (256 << 10) + 8192);
        // The owner's share holds the snapshot and the private blocks.
        let err = clones[1]
            .device
            .write(0, &vec![1; 256 << 10], false)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        // Its bytes go with the last clone, not with its name.
        r.delete_snapshot(Some(alice()), "base").unwrap();
        assert_eq!(budget.used(), (256 << 10) + 8192);
        drop(clones);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn snapshots_without_an_identity_are_used_by_name_and_never_listed() {
        let (r, _) = registry(settings());
        let anyone = r.owner_of(Peer::Anonymous);
        let disk = r.open("root", anyone).unwrap();
        disk.device.write(0, b"x", false).unwrap();
        r.take_snapshot(anyone, "root", "base").unwrap();
        assert!(r.snapshots_of(anyone).is_empty(), "names are keys here");
        let clone = r.open_from("build", anyone, Some("base")).unwrap();
        assert_eq!(read(&*clone.device, 0, 1), b"x");
        assert_eq!(r.snapshots().len(), 1, "the operator sees it");
    }

    /// The farm, scaled down 100 times: 50 builds cloned from one
    /// 4 MiB root, each writing 200 KiB (whole blocks and a partial one),
    /// hold the root once plus what they wrote, to the block; 50 builds on
    /// fresh disks would hold 50 roots.
    #[test]
    fn fifty_clones_of_one_root_hold_it_once() {
        const ROOT: u64 = 4 << 20;
        const WRITTEN: u64 = 200 << 10;
        let budget = Arc::new(Budget::new(u64::MAX));
        let r = budgeted(&budget, ROOT, settings());
        let root = r.open("root", alice()).unwrap();
        root.device
            .write(0, &vec![7; ROOT as usize], false)
            .unwrap();
        r.take_snapshot(alice(), "root", "base").unwrap();
        drop(root);
        assert_eq!(budget.used(), ROOT);
        let builds: Vec<_> = (0..50)
            .map(|i| {
                let build = r
                    .open_from(&format!("b{i}"), alice(), Some("base"))
                    .unwrap();
                // 49 whole blocks, then 4 KiB straddling two more.
                build.device.write(0, &vec![1; 49 * 4096], false).unwrap();
                build
                    .device
                    .write(49 * 4096 + 2048, &[2; 4096], false)
                    .unwrap();
                build
            })
            .collect();
        let per_build = WRITTEN + 4096; // the straddling write copies up two blocks
        assert_eq!(budget.used(), ROOT + 50 * per_build);
        let mut buf = vec![0; 4];
        builds[49].device.read(ROOT - 4, &mut buf).unwrap();
        assert_eq!(buf, [7; 4], "the root reads through");
        drop(builds);
        assert_eq!(budget.used(), ROOT);
    }

    #[test]
    fn an_owner_may_hold_only_so_many_snapshots() {
        let (r, _) = registry(settings());
        let _disk = r.open("root", alice()).unwrap();
        for i in 0..MAX_SNAPSHOTS_PER_OWNER {
            r.take_snapshot(alice(), "root", &format!("s{i}")).unwrap();
        }
        assert!(matches!(
            r.take_snapshot(alice(), "root", "one-more"),
            Err(SnapshotError::TooMany { .. })
        ));
        r.delete_snapshot(Some(alice()), "s0").unwrap();
        r.take_snapshot(alice(), "root", "one-more").unwrap();
    }
}
