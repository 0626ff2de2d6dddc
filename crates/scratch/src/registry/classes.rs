//! Export classes and their pools: which class a new name falls in (the
//! first whose pattern matches; the default class otherwise), which makes
//! its disk, how long it lingers, and the formatted disks each class keeps
//! ready.

use std::sync::Arc;
use std::time::Duration;

use scratchd_store::Capabilities;

use super::{Registry, Shared};
use crate::config::{glob_match, DEFAULT_CLASS};
use crate::disk::DiskFactory;
use crate::pool::Pool;

/// An export class: disks whose names match `pattern` (a glob with `*`)
/// are made by `factory` and linger for `linger`; `pool` of them are kept
/// ready, formatted.
pub struct Class {
    pub pattern: String,
    pub factory: Arc<dyn DiskFactory>,
    pub linger: Duration,
    pub pool: usize,
    /// The snapshot its new disks start as (`from=`): the owner's of that
    /// name, else a published one.
    pub from: Option<String>,
}

/// A class with what its disks can do, probed once, and its pool.
pub(super) struct ClassEntry {
    pub(super) class: Class,
    pub(super) caps: Capabilities,
    pub(super) pool: Option<Pool>,
}

/// One class's pool at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The class's pattern, or [`DEFAULT_CLASS`].
    pub class: String,
    /// Formatted disks waiting.
    pub ready: u64,
    /// How many it keeps (`pool=`).
    pub target: u64,
}

impl ClassEntry {
    /// Probes every class and starts the pools of those that ask for one.
    pub(super) fn start_all(classes: Vec<Class>) -> std::io::Result<Vec<ClassEntry>> {
        classes
            .into_iter()
            .map(|class| {
                Ok(ClassEntry {
                    caps: class.factory.capabilities(),
                    pool: start_pool(class.pool, &class.factory)?,
                    class,
                })
            })
            .collect()
    }
}

/// A pool of `target` disks made by `factory`, unless `target` is 0.
pub(super) fn start_pool(
    target: usize,
    factory: &Arc<dyn DiskFactory>,
) -> std::io::Result<Option<Pool>> {
    match target {
        0 => Ok(None),
        n => Pool::start(n, factory.clone()).map(Some),
    }
}

impl Shared {
    /// The class of new disks named `name`: the first matching (None: the
    /// default class).
    pub(super) fn class_of(&self, name: &str) -> Option<usize> {
        self.classes
            .iter()
            .position(|c| glob_match(&c.class.pattern, name))
    }

    /// The snapshot new disks of `class` start as, if it names one.
    pub(super) fn base_of(&self, class: Option<usize>) -> Option<&str> {
        match class {
            Some(i) => self.classes[i].class.from.as_deref(),
            None => self.settings.from.as_deref(),
        }
    }

    /// The pool of a class, if it has one.
    pub(super) fn pool_of(&self, class: Option<usize>) -> Option<&Pool> {
        match class {
            Some(i) => self.classes[i].pool.as_ref(),
            None => self.pool.as_ref(),
        }
    }

    /// The factory of a class.
    pub(super) fn factory_of(&self, class: Option<usize>) -> &dyn DiskFactory {
        match class {
            Some(i) => self.classes[i].class.factory.as_ref(),
            None => self.factory.as_ref(),
        }
    }

    /// How long a class's disks linger after their last connection.
    pub(super) fn linger_of(&self, class: Option<usize>) -> Duration {
        match class {
            Some(i) => self.classes[i].class.linger,
            None => self.settings.linger,
        }
    }

    /// The name of a class, for the operator.
    pub(super) fn class_name(&self, class: Option<usize>) -> &str {
        match class {
            Some(i) => &self.classes[i].class.pattern,
            None => DEFAULT_CLASS,
        }
    }
}

impl Registry {
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

    /// The pools: the default class's, then each class's that has one.
    pub(super) fn pools(&self) -> Vec<PoolStatus> {
        let status = |class: &str, pool: Option<&Pool>| PoolStatus {
            class: class.to_owned(),
            ready: pool.map_or(0, Pool::ready) as u64,
            target: pool.map_or(0, Pool::target) as u64,
        };
        let shared = &self.shared;
        std::iter::once(status(DEFAULT_CLASS, shared.pool.as_ref()))
            .chain(shared.classes.iter().filter_map(|c| {
                let pool = c.pool.as_ref()?;
                Some(status(&c.class.pattern, Some(pool)))
            }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Duration;

    use super::super::testing::*;
    use super::super::Settings;
    use super::*;

    #[test]
    fn classes_pick_size_and_linger_by_name_first_match_wins() {
        let class = |pattern: &str, size: u64, linger: u64| Class {
            pattern: pattern.into(),
            factory: Arc::new(Sized(size)),
            linger: Duration::from_secs(linger),
            pool: 0,
            from: None,
        };
        let classes = vec![
            class("big-*", 4 << 20, 60),
            class("big-*-x", 8 << 20, 0),
            class("*-mid", 2 << 20, 0),
        ];
        let fake = Arc::new(Fake::default());
        let r = Registry::with_classes(settings(), fake.clone(), classes).unwrap();
        let size = |name: &str| r.info(name, alice()).unwrap().size;
        assert_eq!(size("big-1"), 4 << 20, "INFO knows the class's size");
        assert_eq!(size("big-1-x"), 4 << 20, "the first match wins");
        assert_eq!(size("a-mid"), 2 << 20);
        assert_eq!(size("small"), 1 << 20, "no class: the default");
        let big = r.open("big-1", alice()).unwrap();
        assert_eq!(size_of(&big), 4 << 20);
        let small = r.open("small", alice()).unwrap();
        assert_eq!(size_of(&small), 1 << 20);
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
            from: None,
        };
        let settings = Settings {
            pool: 1,
            ..settings()
        };
        let r = Registry::with_classes(settings, default.clone(), vec![class]).unwrap();
        let pools = |r: &Registry| -> Vec<(String, u64, u64)> {
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
            s.spawn(move || tx.send(r.open("big-1", alice()).map(|e| size_of(&e)).ok()));
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
}
