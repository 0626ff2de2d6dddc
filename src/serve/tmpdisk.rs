//! `tmpdisk`: the build scratch-disk backend's settings and the server
//! flags it takes, turned into a [`scratchd_scratch::Config`].
//!
//! The disk keys themselves (`size=`, `backing=`, classes, ...) are parsed,
//! merged and checked by [`scratchd_scratch::spec`], from the command line
//! and the config file alike; what is left here are the server-wide
//! settings that only tmpdisk uses (budgets, names, owners' limits) and the
//! checks between them and the disks.

use scratchd_scratch::config::default_memory_limit;
use scratchd_scratch::names::NamePolicy;
use scratchd_scratch::{Backing, ClassSettings, Config, DiskSettings, OwnerLimits};

use crate::serve::backend::UsageError;

/// Server flags that only tmpdisk uses.
#[derive(Default)]
pub struct Limits {
    pub max_exports: Option<usize>,
    pub memory_limit: Option<u64>,
    pub disk_limit: Option<u64>,
    pub name_prefix: Option<String>,
    /// What one owner may hold.
    pub per_owner: OwnerLimits,
}

/// Export-level settings shared with the other backends.
#[derive(Default)]
pub struct ExportOptions {
    pub default_name: Option<String>,
    pub description: Option<String>,
    pub read_only: bool,
}

/// Builds the configuration from the default class's settings and the
/// export classes' (each taking what it leaves out from `disk`).
pub fn config(
    disk: &DiskSettings,
    classes: &[ClassSettings],
    limits: Limits,
    export: ExportOptions,
) -> Result<Config, UsageError> {
    let classes = classes
        .iter()
        .map(|class| class.class(disk))
        .collect::<Result<Vec<_>, _>>()?;
    let default = disk.disk_spec()?;
    // Some class keeps disks in files: disk limits make sense whatever the
    // default backing.
    let memory_only = std::iter::once(&default.backing)
        .chain(classes.iter().map(|c| &c.disk.backing))
        .all(|b| *b == Backing::Memory);
    if memory_only && limits.disk_limit.is_some() {
        return Err(UsageError::DiskLimitWithoutDir);
    }
    if memory_only && limits.per_owner.disk.is_some() {
        return Err(UsageError::OwnerDiskLimitWithoutDir);
    }
    Ok(Config {
        disk: default,
        max_exports: limits.max_exports,
        memory_limit: limits.memory_limit.unwrap_or_else(default_memory_limit),
        disk_limit: limits.disk_limit,
        names: NamePolicy {
            prefix: limits.name_prefix.unwrap_or_default(),
        },
        default_name: export.default_name,
        description: export.description,
        read_only: export.read_only,
        owners: disk.owner.unwrap_or_default(),
        per_owner: limits.per_owner,
        classes,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use scratchd_scratch::config::EnvKeyError;
    use scratchd_scratch::units::DurationError;
    use scratchd_scratch::{FormatKind, OwnerPolicy, SpecError};

    use super::*;

    fn settings(params: &[&str]) -> Result<DiskSettings, UsageError> {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        Ok(DiskSettings::from_params(&params)?)
    }

    fn parse(params: &[&str]) -> Result<Config, UsageError> {
        let limits = Limits {
            memory_limit: Some(1 << 30),
            ..Limits::default()
        };
        config(&settings(params)?, &[], limits, ExportOptions::default())
    }

    #[test]
    fn defaults_and_keys() {
        let c = parse(&["20G"]).unwrap();
        assert_eq!(c.disk.size, 20 << 30);
        assert_eq!(c.disk.format.kind, FormatKind::Filesystem("ext4".into()));
        assert_eq!(
            (c.disk.linger, c.disk.pool, c.disk.backing),
            (Duration::ZERO, 0, Backing::Memory)
        );
        let c = parse(&[
            "size=1M",
            "type=none",
            "backing=dir:/var/tmp",
            "linger=500ms",
            "pool=2",
            "format-timeout=2m",
            "label=L",
        ])
        .unwrap();
        assert_eq!(c.disk.format.kind, FormatKind::None);
        assert_eq!(c.disk.backing, Backing::Dir("/var/tmp".into()));
        assert_eq!(
            (c.disk.linger, c.disk.pool),
            (Duration::from_millis(500), 2)
        );
        assert_eq!(c.disk.format.timeout, Duration::from_secs(120));
        assert_eq!(c.disk.format.label.as_deref(), Some("L"));
        let c = parse(&["1M", "backing=memory,spill=dir:/var/tmp"]).unwrap();
        assert_eq!(c.disk.backing, Backing::MemorySpill("/var/tmp".into()));
        assert_eq!(c.owners, OwnerPolicy::Peer);
        assert_eq!(
            parse(&["1M", "owner=name"]).unwrap().owners,
            OwnerPolicy::Name
        );
        assert_eq!(
            parse(&["1M", "owner=peer+gid"]).unwrap().owners,
            OwnerPolicy::PeerGid
        );
        assert!(matches!(
            parse(&["1M", "owner=root"]),
            Err(UsageError::Disk(SpecError::Owner(_)))
        ));
    }

    fn with_classes(params: &[&str], classes: &[(&str, &[&str])]) -> Result<Config, UsageError> {
        let mut parsed = Vec::new();
        for (pattern, params) in classes {
            let mut class = ClassSettings::default();
            class.set("match", pattern).map_err(UsageError::from)?;
            for param in *params {
                let (key, value) = param.split_once('=').unwrap();
                class.set(key, value).map_err(UsageError::from)?;
            }
            parsed.push(class);
        }
        let limits = Limits {
            memory_limit: Some(1 << 30),
            disk_limit: Some(1 << 40),
            ..Limits::default()
        };
        let export = ExportOptions::default();
        config(&settings(params)?, &parsed, limits, export)
    }

    #[test]
    fn classes_take_what_they_leave_out_from_tmpdisk() {
        let c = with_classes(
            &["20G", "linger=30s", "label=L", "pool=2"],
            &[
                (
                    "big-*",
                    &["size=200G", "backing=dir:/var/tmp", "quota=100G"],
                ),
                ("raw-*", &["type=none", "linger=0", "pool=3"]),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.disk.size, c.disk.pool, c.disk.backing),
            (20 << 30, 2, Backing::Memory)
        );
        let [big, raw] = &c.classes[..] else {
            panic!("{:?}", c.classes)
        };
        assert_eq!(big.pattern, "big-*");
        assert_eq!(big.disk.size, 200 << 30);
        assert_eq!(big.disk.quota, Some(100 << 30));
        assert_eq!(big.disk.backing, Backing::Dir("/var/tmp".into()));
        assert_eq!(big.disk.linger, Duration::from_secs(30), "from [tmpdisk]");
        assert_eq!(big.disk.format.label.as_deref(), Some("L"));
        assert_eq!(big.disk.format.kind, FormatKind::Filesystem("ext4".into()));
        assert_eq!((raw.disk.size, raw.disk.linger), (20 << 30, Duration::ZERO));
        assert_eq!(raw.disk.format.kind, FormatKind::None);
        assert_eq!(
            (big.disk.pool, raw.disk.pool),
            (0, 3),
            "a pool is never inherited"
        );
    }

    #[test]
    fn disks_are_the_default_class_then_each_class() {
        let c = with_classes(
            &["20G"],
            &[("big-*", &["size=200G", "backing=dir:/var/tmp"])],
        )
        .unwrap();
        let backings: Vec<&Backing> = c.disks().map(|d| &d.backing).collect();
        assert_eq!(
            backings,
            [&Backing::Memory, &Backing::Dir("/var/tmp".into())],
            "a memory default with a file-backed class still needs the worker pool"
        );
    }

    #[test]
    fn class_errors_name_the_class_and_key() {
        let err =
            |classes: &[(&str, &[&str])]| with_classes(&["1G"], classes).unwrap_err().to_string();
        let e = err(&[("big-*", &["size=12Q"])]);
        assert!(e.contains("match = \"big-*\"") && e.contains("size"), "{e}");
        let e = err(&[("big-*", &["linger=forever"])]);
        assert!(e.contains("big-*") && e.contains("linger"), "{e}");
        let e = err(&[("big-*", &["backing=disk"])]);
        assert!(e.contains("big-*") && e.contains("backing=\"disk\""), "{e}");
        let e = err(&[("big-*", &["pool=many"])]);
        assert!(e.contains("big-*") && e.contains("pool=\"many\""), "{e}");
        let e = err(&[("big/*", &["size=1G"])]);
        assert!(e.contains("big/*") && e.contains("pattern"), "{e}");
        // --disk-limit needs some disk in files: a class's will do.
        assert!(matches!(
            with_classes(&["1G"], &[]),
            Err(UsageError::DiskLimitWithoutDir)
        ));
    }

    #[test]
    fn extra_keys_need_a_command_and_valid_names() {
        let c = parse(&["size=1M", "command=true", "counter=/tmp/x"]).unwrap();
        assert_eq!(
            c.disk.format.env,
            [("counter".to_string(), "/tmp/x".to_string())]
        );
        match parse(&["size=1M", "counter=/tmp/x"]) {
            Err(UsageError::Disk(SpecError::UnknownKey(key))) => assert_eq!(key, "counter"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["size=1M", "command=true", "bad-key=1"]),
            Err(UsageError::Disk(SpecError::EnvKey(
                EnvKeyError::NotAVariable(_)
            )))
        ));
        assert!(matches!(
            parse(&["size=1M", "command=true", "disk=1"]),
            Err(UsageError::Disk(SpecError::EnvKey(EnvKeyError::Reserved(
                _
            ))))
        ));
        assert!(matches!(
            parse(&["size=1M", "size=2M"]),
            Err(UsageError::Disk(SpecError::Duplicate(_)))
        ));
        assert!(matches!(
            parse(&["type=ext4"]),
            Err(UsageError::Disk(SpecError::MissingSize))
        ));
        for backing in ["disk", "memory,spill=dir:", "memory,spill=/tmp"] {
            match parse(&["1M", &format!("backing={backing}")]) {
                Err(UsageError::Disk(SpecError::Backing(b))) => assert_eq!(b, backing),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            parse(&["1M", "type=../x"]),
            Err(UsageError::Disk(SpecError::FsType(_)))
        ));
        assert!(matches!(
            parse(&["1M", "linger=forever"]),
            Err(UsageError::Disk(SpecError::Duration {
                key: "linger",
                source: DurationError::UnknownUnit { .. }
            }))
        ));
        assert!(matches!(
            parse(&["1M", "pool=x"]),
            Err(UsageError::Disk(SpecError::Pool(_)))
        ));
        assert!(matches!(
            parse(&["1M", "-1"]),
            Err(UsageError::Disk(SpecError::NotKeyValue(_)))
        ));
    }
}
