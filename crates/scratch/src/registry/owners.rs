//! Owners' holdings and the caps on them: each owner's count of disks and
//! its shares of the server's budgets (made with its first disk, forgotten
//! with its last), and room for a new disk under `--max-exports-per-owner`
//! and `--max-exports`, made by evicting a lingering disk.

use tracing::info;

use super::{DiskKey, Entry, OpenError, Shared, State, LOG};
use crate::device::Budgets;
use crate::owner::Owner;

/// One owner's holdings.
pub(super) struct OwnerState {
    /// Its entries (being created, live or lingering).
    disks: usize,
    /// Its snapshots (being taken or held under a name).
    pub(super) snapshots: usize,
    /// Its shares of the server's budgets, which its disks and snapshots
    /// charge.
    pub(super) shares: Budgets,
}

impl State {
    /// `owner`'s holdings, made (with its shares) if it has none yet.
    pub(super) fn owner_state(&mut self, owner: &Owner, shared: &Shared) -> &mut OwnerState {
        self.owners
            .entry(owner.holder())
            .or_insert_with(|| OwnerState {
                disks: 0,
                snapshots: 0,
                shares: shared.budgets.shares(
                    shared.settings.per_owner.memory,
                    shared.settings.per_owner.disk,
                ),
            })
    }

    /// Forgets `owner` if it holds neither disks nor snapshots.
    pub(super) fn forget_if_idle(&mut self, owner: &Owner) {
        let holder = owner.holder();
        if self
            .owners
            .get(&holder)
            .is_some_and(|o| o.disks == 0 && o.snapshots == 0)
        {
            self.owners.remove(&holder);
        }
    }

    /// One of `owner`'s snapshots is gone (or was never made).
    pub(super) fn release_snapshot(&mut self, owner: &Owner) {
        if let Some(held) = self.owners.get_mut(&owner.holder()) {
            held.snapshots = held.snapshots.saturating_sub(1);
        }
        self.forget_if_idle(owner);
    }

    /// Adds the entry of a new disk for `key`, counting it for its owner
    /// (whose shares are made on its first disk); the owner's shares.
    pub(super) fn add(&mut self, key: DiskKey, entry: Entry, shared: &Shared) -> Budgets {
        let owner = self.owner_state(&key.owner, shared);
        owner.disks += 1;
        let shares = owner.shares.clone();
        self.entries.insert(key, entry);
        shares
    }

    /// Removes `key`'s entry, forgetting its owner with its last disk. The
    /// caller drops what is returned after unlocking.
    pub(super) fn remove(&mut self, key: &DiskKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        let holder = key.owner.holder();
        if let Some(owner) = self.owners.get_mut(&holder) {
            owner.disks -= 1;
        }
        self.forget_if_idle(&key.owner);
        Some(entry)
    }

    /// How many entries `owner` has (with its other groups', see
    /// [`Owner::holder`]).
    fn disks_of(&self, owner: &Owner) -> usize {
        self.owners.get(&owner.holder()).map_or(0, |o| o.disks)
    }

    /// Removes the lingering disk nearest its deadline among those whose
    /// key passes `filter`, if any.
    fn evict(&mut self, filter: impl Fn(&DiskKey) -> bool) -> Option<(DiskKey, Entry)> {
        let (_, key) = self
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
        let entry = self.remove(&key)?;
        Some((key, entry))
    }
}

impl Shared {
    /// Frees a slot for a new disk of `owner` under `--max-exports-per-owner`
    /// and `--max-exports`, evicting the owner's own lingering disk nearest
    /// its deadline if need be; the caller drops the evicted disks after
    /// unlocking. Another owner's lingering disk is never taken: it is
    /// that owner's data (what a build keeps between runs), and a full
    /// server is that owner's business only through its own cap.
    pub(super) fn make_room(
        &self,
        state: &mut State,
        owner: &Owner,
    ) -> Result<Vec<Entry>, OpenError> {
        let mut evicted = Vec::new();
        let own = |key: &DiskKey| key.owner.holder() == owner.holder();
        if let Some(max) = self.settings.per_owner.max_exports {
            if state.disks_of(owner) >= max {
                let victim = state.evict(own).ok_or(OpenError::TooManyOfOwner { max })?;
                info!(target: LOG, export = %victim.0.name, owner = %owner, "evicting a lingering disk to stay within --max-exports-per-owner");
                evicted.push(victim.1);
            }
        }
        if let Some(max) = self.settings.max_exports {
            if state.entries.len() >= max {
                let victim = state.evict(own).ok_or(OpenError::TooMany { max })?;
                info!(target: LOG, export = %victim.0.name, owner = %victim.0.owner, "evicting a lingering disk to stay within --max-exports");
                evicted.push(victim.1);
            }
        }
        Ok(evicted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use scratchd_store::BlockDevice;

    use super::super::testing::*;
    use super::super::{DiskInfo, Registry, Settings};
    use super::*;
    use crate::owner::{OwnerLimits, OwnerPolicy, Peer};

    #[test]
    fn max_exports_evicts_lingering_disks_then_refuses() {
        let (r, _fake) = registry(Settings {
            max_exports: Some(2),
            linger: Duration::from_secs(60),
            ..settings()
        });
        let a = r.open("a", alice()).unwrap();
        drop(r.open("b", alice()).unwrap()); // lingers
        let c = r.open("c", alice()).unwrap(); // evicts b
        assert_eq!(names(&r), ["a", "c"]);
        match r.open("d", alice()).err() {
            Some(e @ OpenError::TooMany { max: 2 }) => {
                assert!(e.to_string().contains("too many"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // Existing names still open.
        r.open("a", alice()).unwrap();
        drop((a, c));
    }

    #[test]
    fn a_full_server_never_evicts_another_owners_lingering_disk() {
        let (r, _fake) = registry(Settings {
            max_exports: Some(2),
            linger: Duration::from_secs(60),
            ..settings()
        });
        let bob = r.owner_of(peer(2000));
        let kept = r.open("bobs-cache", bob).unwrap();
        kept.device.write(0, b"bob's", false).unwrap();
        drop(kept); // lingers: bob's data between two runs
        let a = r.open("a", alice()).unwrap();
        match r.open("b", alice()).err() {
            Some(e @ OpenError::TooMany { max: 2 }) => {
                assert!(e.to_string().contains("none of yours lingers"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let back = r.open("bobs-cache", bob).unwrap();
        let mut buf = [0u8; 5];
        back.device.read(0, &mut buf).unwrap();
        assert_eq!(&buf, b"bob's", "bob's lingering disk survived");
        drop(back);
        // Alice's own lingering disk does make room for her.
        drop(a);
        r.open("b", alice()).unwrap();
        assert_eq!(r.list(alice()), ["b"]);
        assert_eq!(r.list(bob), ["bobs-cache"]);
    }

    #[test]
    fn switching_groups_does_not_multiply_a_users_cap() {
        let (r, _) = registry(Settings {
            owners: OwnerPolicy::PeerGid,
            per_owner: OwnerLimits {
                max_exports: Some(2),
                ..OwnerLimits::default()
            },
            ..settings()
        });
        let group = |gid| r.owner_of(Peer::Unix { uid: 1000, gid });
        let one = r.open("x", group(100)).unwrap();
        let two = r.open("x", group(5)).unwrap();
        assert!(!Arc::ptr_eq(&one.device, &two.device), "a namespace each");
        assert!(matches!(
            r.open("y", group(6)).err(),
            Some(OpenError::TooManyOfOwner { max: 2 })
        ));
        // Another user is counted apart.
        r.open(
            "x",
            r.owner_of(Peer::Unix {
                uid: 1001,
                gid: 100,
            }),
        )
        .unwrap();
        drop((one, two));
    }

    #[test]
    fn each_owner_has_a_namespace_and_lists_only_its_own_disks() {
        let (r, fake) = registry(settings());
        let (bob, anonymous) = (r.owner_of(peer(2000)), r.owner_of(Peer::Anonymous));
        let a1 = r.open("build", alice()).unwrap();
        let a2 = r.open("build", alice()).unwrap();
        assert!(
            Arc::ptr_eq(&a1.device, &a2.device),
            "one owner shares by name"
        );
        a1.device.write(0, b"secret", false).unwrap();
        // Bob asking for alice's name gets what any fresh name gets.
        assert_eq!(r.list(bob), Vec::<String>::new());
        assert_eq!(
            r.info("build", bob).unwrap(),
            DiskInfo {
                name: "build".into(),
                ..r.info("fresh", bob).unwrap()
            }
        );
        let b = r.open("build", bob).unwrap();
        assert!(!Arc::ptr_eq(&a1.device, &b.device));
        let mut buf = [1u8; 6];
        b.device.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 6], "another owner's disk is fresh");
        // Peers without an identity share one namespace and list nothing.
        let n = r.open("build", anonymous).unwrap();
        assert!(!Arc::ptr_eq(&n.device, &a1.device) && !Arc::ptr_eq(&n.device, &b.device));
        assert_eq!(r.list(anonymous), Vec::<String>::new());
        assert_eq!(names(&r), ["build"]);
        assert_eq!(r.list(bob).len(), 1);
        assert_eq!(fake.made(), 3);
        // uid+gid: the same uid in another group is another owner.
        let (r, _) = registry(Settings {
            owners: OwnerPolicy::PeerGid,
            ..settings()
        });
        let staff = r.owner_of(Peer::Unix { uid: 1000, gid: 50 });
        let x = r.open("x", r.owner_of(peer(1000))).unwrap();
        assert!(!Arc::ptr_eq(&x.device, &r.open("x", staff).unwrap().device));
        // owner=name: everybody reaches a disk by its name.
        let (r, _) = registry(Settings {
            owners: OwnerPolicy::Name,
            ..settings()
        });
        let x = r.open("x", r.owner_of(peer(1000))).unwrap();
        let y = r.open("x", r.owner_of(peer(2000))).unwrap();
        assert!(Arc::ptr_eq(&x.device, &y.device));
        assert_eq!(
            r.list(r.owner_of(peer(1000))),
            Vec::<String>::new(),
            "nobody lists under owner=name"
        );
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
        let bob = r.owner_of(peer(2000));
        let bobs = r.open("b", bob).unwrap();
        drop(r.open("lingers", bob).unwrap());
        let a = r.open("a", alice()).unwrap();
        drop(r.open("a-lingers", alice()).unwrap());
        let c = r.open("c", alice()).unwrap(); // evicts a-lingers, not bob's
        assert_eq!(r.list(alice()).len(), 2);
        assert_eq!(r.list(bob).len(), 2);
        match r.open("d", alice()).err() {
            Some(e @ OpenError::TooManyOfOwner { .. }) => {
                assert!(e.to_string().contains("at most 2"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // Its open disks still open, and others carry on.
        drop(r.open("a", alice()).unwrap());
        let another = r.open("new", r.owner_of(peer(3000))).unwrap();
        // A disk gone gives its slot back.
        drop(c);
        r.open("d", alice()).unwrap();
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
        let r = Registry::new(settings, Arc::new(maker)).unwrap();
        eventually("the pool to fill", || r.pool_ready() == 1);
        let a = r.open("a", alice()).unwrap(); // from the pool
        let a2 = r.open("a2", alice()).unwrap(); // made at once
        let bob = r.open("b", r.owner_of(peer(2000))).unwrap();
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
}
