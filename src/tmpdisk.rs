//! `tmpdisk`: the build scratch-disk backend's keys, turned into a
//! [`scratchd_scratch::Config`].
//!
//! Unlike the other backends, tmpdisk accepts keys it does not know when a
//! `command=` is given: they become environment variables of the format
//! command, so each must be a valid shell variable name. Without `command=`
//! an unknown key is an error naming it, as for every backend.

use std::path::PathBuf;
use std::time::Duration;

use scratchd_scratch::config::{check_env_key, default_memory_limit, parse_duration};
use scratchd_scratch::names::NamePolicy;
use scratchd_scratch::{
    Backing, Class, Config, DiskSpec, FormatKind, FormatSpec, OwnerLimits, OwnerPolicy,
};

use crate::backend::{parse_params, Keys, UsageError};
use crate::size::parse_size;

/// The keys tmpdisk knows, with their help (the first is the bare value's).
pub const KEYS: Keys = &[
    ("size", "size of each disk, e.g. 20G (required)"),
    (
        "type",
        "filesystem for mkfs -t (default ext4, no journal); none: blank",
    ),
    ("label", "filesystem label"),
    (
        "command",
        "format with `sh -c COMMAND` ($disk $size $type $label, extra KEY=VALUEs)",
    ),
    (
        "backing",
        "memory (default), dir:PATH (unnamed sparse files in PATH), or memory,spill=dir:PATH (RAM, then files in PATH)",
    ),
    (
        "linger",
        "keep a disk this long after its last connection (default 0; 30s, 2m)",
    ),
    ("pool", "keep N formatted disks ready (default 0)"),
    (
        "quota",
        "most bytes one disk may allocate (RAM and file each); past it, ENOSPC for that disk",
    ),
    (
        "format-timeout",
        "kill a format command running longer (default 60s)",
    ),
    (
        "owner",
        "who owns a disk: peer (default: the Unix peer's uid), peer+gid, or name (whoever knows the name)",
    ),
];

/// The keys an export class (`[[class]]` in the config file) may set,
/// besides `match`; the others come from `[tmpdisk]`, except `pool`: a
/// class has a pool only when it asks for one.
pub const CLASS_KEYS: &[&str] = &[
    "size", "type", "backing", "quota", "linger", "label", "pool",
];

/// An export class as written: its pattern and its `KEY=VALUE`s.
#[derive(Debug, Clone, Default)]
pub struct ClassParams {
    pub pattern: String,
    pub params: Vec<String>,
}

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

/// Builds the configuration from `params` (`KEY=VALUE`, or the size alone
/// first).
pub fn config(
    params: &[String],
    limits: Limits,
    export: ExportOptions,
) -> Result<Config, UsageError> {
    config_with_classes(params, &[], limits, export)
}

/// Builds the configuration from `params` and the export classes: each
/// class's keys, and `params` for the keys it does not set, parsed and
/// checked exactly as `params` are (errors name the class).
pub fn config_with_classes(
    params: &[String],
    classes: &[ClassParams],
    limits: Limits,
    export: ExportOptions,
) -> Result<Config, UsageError> {
    let mut parsed = Vec::new();
    for class in classes {
        parsed.push(class_config(params, class).map_err(|source| match source {
            UsageError::ClassPattern(_) => source,
            source => UsageError::Class {
                pattern: class.pattern.clone(),
                source: Box::new(source),
            },
        })?);
    }
    let uses_files = parsed.iter().any(|c| c.disk.backing != Backing::Memory);
    let mut config = single_config(params, limits, export, uses_files)?;
    config.classes = parsed;
    Ok(config)
}

/// The class `class` describes, with what it leaves out from `base` (but
/// `pool`: `[tmpdisk]`'s pool is the default class's, and ready disks cost
/// memory, so a class keeps none unless it says so).
fn class_config(base: &[String], class: &ClassParams) -> Result<Class, UsageError> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*');
    if class.pattern.is_empty() || class.pattern.len() > 128 || !class.pattern.chars().all(valid) {
        return Err(UsageError::ClassPattern(class.pattern.clone()));
    }
    let key_of = |i: usize, p: &str| match p.split_once('=') {
        Some((key, _)) => key.to_owned(),
        None if i == 0 => "size".to_owned(),
        None => String::new(),
    };
    let own: Vec<String> = class
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| key_of(i, p))
        .collect();
    let mut params = class.params.clone();
    for (i, p) in base.iter().enumerate() {
        let key = key_of(i, p);
        if !own.contains(&key) && key != "pool" {
            params.push(if p.contains('=') {
                p.clone()
            } else {
                format!("size={p}")
            });
        }
    }
    let limits = Limits {
        memory_limit: Some(0),
        ..Limits::default()
    };
    let c = single_config(&params, limits, ExportOptions::default(), true)?;
    Ok(Class {
        pattern: class.pattern.clone(),
        disk: c.disk,
    })
}

/// The configuration `params` give; `uses_files`: some class keeps disks
/// in files, so disk limits make sense whatever the default backing.
fn single_config(
    params: &[String],
    limits: Limits,
    export: ExportOptions,
    uses_files: bool,
) -> Result<Config, UsageError> {
    let params = parse_params("tmpdisk", KEYS, params, true)?;
    let get = |key: &str| params.get(key);
    let size = parse_size("size", params.required("size", Some("e.g. size=20G"))?)?;
    let fs_type = get("type").unwrap_or("ext4").to_owned();
    if fs_type.is_empty()
        || !fs_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(UsageError::FsType(fs_type));
    }
    let kind = match (get("command"), fs_type.as_str()) {
        (Some(command), _) => FormatKind::Command(command.to_owned()),
        (None, "none") => FormatKind::None,
        (None, fs) => FormatKind::Filesystem(fs.to_owned()),
    };
    if let Some((key, _)) = params.extra.first() {
        if !matches!(kind, FormatKind::Command(_)) {
            return Err(UsageError::UnknownKey {
                backend: "tmpdisk",
                key: (*key).to_owned(),
                keys: KEYS,
                extra: true,
            });
        }
    }
    for (key, _) in &params.extra {
        check_env_key(key)?;
    }
    let duration = |key: &'static str, default: Duration| match get(key) {
        Some(text) => parse_duration(text).map_err(|source| UsageError::Duration { key, source }),
        None => Ok(default),
    };
    let backing = match get("backing").unwrap_or("memory") {
        "memory" => Backing::Memory,
        other => match (
            other.strip_prefix("dir:"),
            other.strip_prefix("memory,spill=dir:"),
        ) {
            (Some(dir), _) if !dir.is_empty() => Backing::Dir(PathBuf::from(dir)),
            (_, Some(dir)) if !dir.is_empty() => Backing::MemorySpill(PathBuf::from(dir)),
            _ => return Err(UsageError::Backing(other.to_owned())),
        },
    };
    let memory_only = backing == Backing::Memory && !uses_files;
    if memory_only && limits.disk_limit.is_some() {
        return Err(UsageError::DiskLimitWithoutDir);
    }
    if memory_only && limits.per_owner.disk.is_some() {
        return Err(UsageError::OwnerDiskLimitWithoutDir);
    }
    let owners = get("owner").map_or(Ok(OwnerPolicy::default()), OwnerPolicy::parse)?;
    let pool = match get("pool") {
        Some(n) => n.parse().map_err(|_| UsageError::Pool(n.to_owned()))?,
        None => 0,
    };
    let quota = get("quota").map(|q| parse_size("quota", q)).transpose()?;
    Ok(Config {
        disk: DiskSpec {
            size,
            quota,
            format: FormatSpec {
                kind,
                fs_type,
                label: get("label").map(str::to_owned),
                env: params
                    .extra
                    .iter()
                    .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                timeout: duration("format-timeout", Duration::from_secs(60))?,
            },
            backing,
            linger: duration("linger", Duration::ZERO)?,
            pool,
        },
        max_exports: limits.max_exports,
        memory_limit: limits.memory_limit.unwrap_or_else(default_memory_limit),
        disk_limit: limits.disk_limit,
        names: NamePolicy {
            prefix: limits.name_prefix.unwrap_or_default(),
        },
        default_name: export.default_name,
        description: export.description,
        read_only: export.read_only,
        owners,
        per_owner: limits.per_owner,
        classes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use scratchd_scratch::config::{DurationError, EnvKeyError};

    use super::*;

    fn parse(params: &[&str]) -> Result<Config, UsageError> {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        let limits = Limits {
            memory_limit: Some(1 << 30),
            ..Limits::default()
        };
        config(&params, limits, ExportOptions::default())
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
            Err(UsageError::Owner(_))
        ));
    }

    fn with_classes(params: &[&str], classes: &[(&str, &[&str])]) -> Result<Config, UsageError> {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        let classes: Vec<ClassParams> = classes
            .iter()
            .map(|(pattern, params)| ClassParams {
                pattern: pattern.to_string(),
                params: params.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let limits = Limits {
            memory_limit: Some(1 << 30),
            disk_limit: Some(1 << 40),
            ..Limits::default()
        };
        let export = ExportOptions::default();
        config_with_classes(&params, &classes, limits, export)
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
            Err(UsageError::UnknownKey {
                key, extra: true, ..
            }) => assert_eq!(key, "counter"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["size=1M", "command=true", "bad-key=1"]),
            Err(UsageError::EnvKey(EnvKeyError::NotAVariable(_)))
        ));
        assert!(matches!(
            parse(&["size=1M", "command=true", "disk=1"]),
            Err(UsageError::EnvKey(EnvKeyError::Reserved(_)))
        ));
        assert!(matches!(
            parse(&["size=1M", "size=2M"]),
            Err(UsageError::DuplicateKey(_))
        ));
        assert!(matches!(
            parse(&["type=ext4"]),
            Err(UsageError::MissingKey { key: "size", .. })
        ));
        for backing in ["disk", "memory,spill=dir:", "memory,spill=/tmp"] {
            match parse(&["1M", &format!("backing={backing}")]) {
                Err(UsageError::Backing(b)) => assert_eq!(b, backing),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            parse(&["1M", "type=../x"]),
            Err(UsageError::FsType(_))
        ));
        assert!(matches!(
            parse(&["1M", "linger=forever"]),
            Err(UsageError::Duration {
                key: "linger",
                source: DurationError::UnknownUnit { .. }
            })
        ));
        assert!(matches!(parse(&["1M", "pool=x"]), Err(UsageError::Pool(_))));
        assert!(matches!(
            parse(&["1M", "-1"]),
            Err(UsageError::NotKeyValue { extra: true, .. })
        ));
    }
}
