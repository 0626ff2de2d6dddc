//! What an operator sees and does: the one place that computes the numbers
//! `scratchd ctl` prints and `--metrics` exports, and the actions `ctl`
//! takes (drop, keep).
//!
//! A [`Snapshot`] is taken on demand (a `ctl` request, a scrape) from the
//! registry's own counters; nothing here is on the data path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scratchd_scratch::owner::Owner;
use scratchd_scratch::registry::{DiskKey, DiskState, DiskView, Keep, CREATION_BUCKETS_MS};
use scratchd_scratch::{IoCounters, Registry};
use scratchd_server::counters::ErrorCounts;
use scratchd_server::ServerContext;
use scratchd_store::BlockDevice;
use serde::{Deserialize, Serialize};

/// The exports behind a server, as the operator acts on them.
pub enum Backend {
    /// tmpdisk: many disks, by owner and name.
    Tmpdisk(Arc<Registry>),
    /// memory or file: one export.
    Single {
        name: String,
        kind: String,
        device: Arc<dyn BlockDevice>,
        /// Its error replies.
        errors: Arc<ErrorCounts>,
    },
}

/// Everything `ctl` and the metrics read from.
pub struct Admin {
    pub backend: Backend,
    /// For the connection counts.
    pub server: Arc<ServerContext>,
    pub started: Instant,
}

/// One export, for `ctl list`/`show` and the per-export metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRow {
    pub name: String,
    /// The owner selector: `uid:N`, `uid:N+gid:M`, `cert:HEX`, `anonymous`.
    pub owner: String,
    pub backend: String,
    /// The export class (`[[class]]`'s pattern), or `default`.
    #[serde(default)]
    pub class: String,
    pub size: u64,
    /// Bytes it holds itself (a clone: what it wrote privately).
    pub allocated_bytes: u64,
    /// A clone: bytes of its snapshot, which it shares with the
    /// snapshot's other clones (held once); 0 for other disks.
    #[serde(default)]
    pub shared_bytes: u64,
    pub connections: u64,
    pub connections_total: u64,
    pub age_s: f64,
    /// `live`, `lingering` or `kept`.
    pub state: String,
    /// Seconds until a lingering or kept disk is destroyed (none: until
    /// dropped, or not lingering).
    pub expires_in_s: Option<f64>,
    /// The `ctl keep` in force: `forever`, `after:SECONDS` (counted from
    /// the last connection) or none.
    pub keep: Option<String>,
    /// Read, write, trim and zero counts and bytes, flushes and FUA
    /// dropped: fields of the row itself in JSON.
    #[serde(flatten)]
    pub io: IoCounters,
    /// Error replies sent for its requests, by errno name (`ENOSPC`); those
    /// that occurred only.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

/// A budget's use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Budget {
    pub used: u64,
    pub limit: u64,
}

/// The server as a whole, for `ctl status` and the global metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub backend: String,
    pub uptime_s: f64,
    /// Exports now (tmpdisk: being created, live or lingering).
    pub exports_live: u64,
    pub exports_created: u64,
    pub exports_destroyed: u64,
    pub connections: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub memory: Option<Budget>,
    pub disk: Option<Budget>,
    /// Upper bounds of the creation time buckets, in milliseconds.
    pub creation_buckets_ms: Vec<f64>,
    /// Creations per bucket (not cumulative), then those slower than the
    /// last bound.
    pub creation_counts: Vec<u64>,
    pub creation_seconds_sum: f64,
    /// Formatted disks ready, in all pools.
    pub pool_ready: u64,
    /// tmpdisk: each pool, the default class's first (even without one).
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// One class's pool of formatted disks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    /// The class (`[[class]]`'s pattern), or `default`.
    pub class: String,
    pub ready: u64,
    /// How many it keeps ready (`pool=`).
    pub target: u64,
}

/// Both at one moment.
pub struct Snapshot {
    pub status: Status,
    pub exports: Vec<ExportRow>,
}

/// The `ctl` selector of an owner.
pub fn owner_selector(owner: &Owner) -> String {
    match owner {
        Owner::Uid(uid) => format!("uid:{uid}"),
        Owner::UidGid(uid, gid) => format!("uid:{uid}+gid:{gid}"),
        Owner::Certificate(fp) => {
            let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
            format!("cert:{hex}")
        }
        Owner::Anyone => "anonymous".to_owned(),
    }
}

/// Whether `selector` (from `--owner`) picks `owner`: its exact selector,
/// `uid:N` for any group of N, a prefix of a certificate's hex, or `all`.
pub fn owner_matches(selector: &str, owner: &Owner) -> bool {
    selector_matches(selector, &owner_selector(owner))
}

/// [`owner_matches`] on an owner's selector text (`own`).
pub fn selector_matches(selector: &str, own: &str) -> bool {
    selector == "all"
        || own == selector
        || own.starts_with(&format!("{selector}+gid:"))
        || own.starts_with("cert:")
            && selector.len() > "cert:".len()
            && own.starts_with(&selector.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_selectors() {
        let cert = Owner::Certificate([0xab; 32]);
        assert!(owner_matches("cert:abab", &cert) && owner_matches("cert:ABAB", &cert));
        assert!(!owner_matches("cert:", &cert) && !owner_matches("uid:1", &cert));
        assert!(owner_matches("uid:1", &Owner::Uid(1)) && !owner_matches("uid:1", &Owner::Uid(10)));
        assert!(owner_matches("uid:1", &Owner::UidGid(1, 5)));
        assert!(owner_matches("uid:1+gid:5", &Owner::UidGid(1, 5)));
        assert!(!owner_matches("uid:1", &Owner::UidGid(10, 5)));
        assert!(owner_matches("anonymous", &Owner::Anyone) && owner_matches("all", &Owner::Uid(3)));
    }
}

fn row(view: &DiskView, kind: &str) -> ExportRow {
    let s = &view.stats;
    let (state, expires) = match (view.state, view.keep) {
        (DiskState::Live, _) => ("live", None),
        (DiskState::Lingering { left }, None) => ("lingering", left),
        (DiskState::Lingering { left }, Some(_)) => ("kept", left),
    };
    let keep = view.keep.map(|k| match k {
        Keep::Forever => "forever".to_owned(),
        Keep::After(d) => format!("after:{}", d.as_secs_f64()),
        Keep::Until(t) => format!(
            "until:{}",
            t.saturating_duration_since(Instant::now()).as_secs_f64()
        ),
    });
    ExportRow {
        name: view.key.name.clone(),
        owner: owner_selector(&view.key.owner),
        backend: kind.to_owned(),
        class: view.class.clone(),
        size: view.size,
        allocated_bytes: s.allocated_bytes,
        shared_bytes: s.shared_bytes,
        connections: s.connections,
        connections_total: s.connections_total,
        age_s: s.age.as_secs_f64(),
        state: state.to_owned(),
        expires_in_s: expires.map(|d| d.as_secs_f64()),
        keep,
        io: s.io,
        errors: errors_by_name(s.errors.iter().copied()),
    }
}

/// Error counts as the operator sees them: by errno name, those that
/// occurred only.
fn errors_by_name(counts: impl IntoIterator<Item = (&'static str, u64)>) -> BTreeMap<String, u64> {
    counts
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(name, n)| (name.to_owned(), n))
        .collect()
}

impl Admin {
    /// The numbers, now.
    pub fn snapshot(&self) -> Snapshot {
        let limit = &self.server.connections;
        let mut status = Status {
            backend: String::new(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            exports_live: 0,
            exports_created: 0,
            exports_destroyed: 0,
            connections: limit.live() as u64,
            connections_accepted: limit.accepted(),
            connections_refused: limit.refused(),
            memory: None,
            disk: None,
            creation_buckets_ms: CREATION_BUCKETS_MS.to_vec(),
            creation_counts: vec![0; CREATION_BUCKETS_MS.len() + 1],
            creation_seconds_sum: 0.0,
            pool_ready: 0,
            pools: Vec::new(),
        };
        let exports = match &self.backend {
            Backend::Tmpdisk(registry) => {
                let r = registry.status();
                let budget = |b: Option<scratchd_scratch::registry::BudgetUse>| {
                    b.map(|b| Budget {
                        used: b.used,
                        limit: b.limit,
                    })
                };
                status.backend = "tmpdisk".to_owned();
                status.exports_live = r.exports;
                status.exports_created = r.created;
                status.exports_destroyed = r.destroyed;
                status.memory = budget(r.memory);
                status.disk = budget(r.disk);
                status.creation_counts = r.creation_buckets;
                status.creation_seconds_sum = r.creation_seconds;
                status.pool_ready = r.pool_ready;
                status.pools = r
                    .pools
                    .into_iter()
                    .map(|p| Pool {
                        class: p.class,
                        ready: p.ready,
                        target: p.target,
                    })
                    .collect();
                registry.disks().iter().map(|d| row(d, "tmpdisk")).collect()
            }
            Backend::Single {
                name,
                kind,
                device,
                errors,
            } => {
                status.backend = kind.clone();
                status.exports_live = 1;
                status.exports_created = 1;
                vec![ExportRow {
                    name: name.clone(),
                    owner: "anonymous".to_owned(),
                    backend: kind.clone(),
                    class: scratchd_scratch::config::DEFAULT_CLASS.to_owned(),
                    size: device.size(),
                    allocated_bytes: 0,
                    shared_bytes: 0,
                    connections: status.connections,
                    connections_total: status.connections_accepted,
                    age_s: status.uptime_s,
                    state: "live".to_owned(),
                    expires_in_s: None,
                    keep: None,
                    io: IoCounters::default(),
                    errors: errors_by_name(errors.by_errno()),
                }]
            }
        };
        Snapshot { status, exports }
    }

    /// The registry, and the tmpdisk disks `name` (and `owner`, if given)
    /// designate.
    fn select(&self, name: &str, owner: Option<&str>) -> Result<(&Registry, Vec<DiskKey>), String> {
        let Backend::Tmpdisk(registry) = &self.backend else {
            return Err("only tmpdisk exports can be dropped or kept".to_owned());
        };
        let keys: Vec<DiskKey> = registry
            .disks()
            .into_iter()
            .map(|d| d.key)
            .filter(|k| k.name == name && owner.map_or(true, |o| owner_matches(o, &k.owner)))
            .collect();
        if keys.is_empty() {
            return Err(match owner {
                Some(o) => format!("no scratch disk {name:?} of owner {o}"),
                None => format!("no scratch disk {name:?}"),
            });
        }
        Ok((registry, keys))
    }

    /// `ctl drop`: each disk dropped, with its connections then.
    pub fn drop_disks(&self, name: &str, owner: Option<&str>) -> Result<Vec<Acted>, String> {
        let (registry, keys) = self.select(name, owner)?;
        if keys.len() > 1 && owner.is_none() {
            let owners: Vec<String> = keys.iter().map(|k| owner_selector(&k.owner)).collect();
            return Err(format!(
                "{name:?} names disks of {} owners ({}): pick one with --owner, or --owner all",
                keys.len(),
                owners.join(", ")
            ));
        }
        keys.iter()
            .map(|k| {
                let connections = registry.drop_disk(k).map_err(|e| e.to_string())?;
                Ok(Acted {
                    name: k.name.clone(),
                    owner: owner_selector(&k.owner),
                    connections: connections as u64,
                })
            })
            .collect()
    }

    /// `ctl keep`: the disks kept.
    pub fn keep_disks(
        &self,
        name: &str,
        owner: Option<&str>,
        time: Option<Duration>,
    ) -> Result<Vec<Acted>, String> {
        let (registry, keys) = self.select(name, owner)?;
        keys.iter()
            .map(|k| {
                registry.keep(k, time).map_err(|e| e.to_string())?;
                Ok(Acted {
                    name: k.name.clone(),
                    owner: owner_selector(&k.owner),
                    connections: 0,
                })
            })
            .collect()
    }
}

/// One snapshot, for `ctl snapshots` and the snapshot metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRow {
    pub name: String,
    /// The owner selector (`uid:N`, ...), or `published`.
    pub owner: String,
    pub size: u64,
    /// Bytes of data it holds, once whatever its clones.
    pub bytes: u64,
    /// Disks alive that started as it.
    pub clones: u64,
    pub age_s: f64,
    /// What it was made from: a disk's name, an image's path.
    pub source: String,
}

/// The owner column of a snapshot.
fn snapshot_owner(owner: Option<&Owner>) -> String {
    owner.map_or_else(|| PUBLISHED.to_owned(), owner_selector)
}

/// The owner selector of published snapshots.
pub const PUBLISHED: &str = "published";

impl Admin {
    /// The registry, for the snapshot actions.
    fn registry(&self) -> Result<&Registry, String> {
        match &self.backend {
            Backend::Tmpdisk(registry) => Ok(registry),
            Backend::Single { .. } => Err("only tmpdisk servers keep snapshots".to_owned()),
        }
    }

    /// Every snapshot, by owner and name (none without tmpdisk).
    pub fn snapshots(&self) -> Vec<SnapshotRow> {
        let Ok(registry) = self.registry() else {
            return Vec::new();
        };
        registry
            .snapshots()
            .into_iter()
            .map(|v| SnapshotRow {
                name: v.key.name.clone(),
                owner: snapshot_owner(v.key.owner.as_ref()),
                size: v.size,
                bytes: v.bytes,
                clones: v.clones as u64,
                age_s: v.age.as_secs_f64(),
                source: v.source,
            })
            .collect()
    }

    /// The owner of `owner`'s (a selector, or `published`) snapshot
    /// `name`: None for a published one.
    fn snapshot_owner_of(&self, name: &str, owner: &str) -> Result<Option<Owner>, String> {
        if owner == PUBLISHED {
            return Ok(None);
        }
        let registry = self.registry()?;
        let owners: Vec<Owner> = registry
            .snapshots()
            .into_iter()
            .filter(|v| v.key.name == name)
            .filter_map(|v| v.key.owner)
            .filter(|o| owner_matches(owner, o))
            .collect();
        match owners.as_slice() {
            [one] => Ok(Some(*one)),
            [] => Err(format!("no snapshot {name:?} of owner {owner}")),
            _ => Err(format!(
                "{owner} matches several owners of {name:?}: be exact"
            )),
        }
    }

    /// `ctl publish`: `owner`'s snapshot `name` published as `published`.
    pub fn publish(&self, name: &str, owner: &str, published: &str) -> Result<SnapshotRow, String> {
        let Some(owner) = self.snapshot_owner_of(name, owner)? else {
            return Err("publish takes an owner's snapshot: it is published already".to_owned());
        };
        self.registry()?
            .publish_snapshot(owner, name, published)
            .map_err(|e| e.to_string())?;
        self.snapshot_row(published, None)
    }

    /// `ctl import`: the image file at `image` published as `name`.
    pub fn import(&self, name: &str, image: &str) -> Result<SnapshotRow, String> {
        self.registry()?
            .import_snapshot(name, std::path::Path::new(image))
            .map_err(|e| e.to_string())?;
        self.snapshot_row(name, None)
    }

    /// `ctl delete-snapshot`: `owner`'s (or the published) snapshot `name`.
    pub fn delete_snapshot(&self, name: &str, owner: &str) -> Result<(), String> {
        let owner = self.snapshot_owner_of(name, owner)?;
        self.registry()?
            .delete_snapshot(owner, name)
            .map_err(|e| e.to_string())
    }

    fn snapshot_row(&self, name: &str, owner: Option<&Owner>) -> Result<SnapshotRow, String> {
        let selector = snapshot_owner(owner);
        self.snapshots()
            .into_iter()
            .find(|r| r.name == name && r.owner == selector)
            .ok_or_else(|| format!("snapshot {name:?} went meanwhile"))
    }
}

/// A disk an action was taken on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Acted {
    pub name: String,
    pub owner: String,
    /// `drop`: connections it had, now being closed.
    pub connections: u64,
}
