//! Disk settings as written: tmpdisk's keys (`size=20G`, `backing=dir:PATH`,
//! `linger=30s`, ...), whether they come from the command line's `KEY=VALUE`
//! parameters or from the config file's `[tmpdisk]` and `[[class]]` tables.
//!
//! Both sources go through one parser, [`DiskSettings::set`] (and
//! [`ClassSettings::set`]), so a key is parsed, checked and named in errors
//! the same way wherever it is written: the command line splits its
//! parameters into keys and values ([`DiskSettings::from_params`]); the
//! file's tables deserialize into the same structs through a serde visitor
//! that calls `set` for each key while the value is being read, so that
//! the toml crate points its error at that value's line.
//!
//! The structs hold what was written, every key an `Option`: merging is
//! field by field ([`DiskSettings::or`]: the command line over the file, a
//! class over `[tmpdisk]`), and only [`DiskSettings::disk_spec`] fills in
//! the defaults and checks what depends on several keys (a size is needed,
//! extra keys need `command=`), giving the [`DiskSpec`] the registry uses.
//!
//! A new disk key is a field here, its arm in [`DiskSettings::set`] and
//! its line in [`DiskSettings::or`], its line in [`KEYS`] (and
//! [`CLASS_KEYS`] if a class may set it), and where [`DiskSpec`] carries
//! it.

use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::config::{check_env_key, Backing, Class, DiskSpec, EnvKeyError, FormatKind, FormatSpec};
use crate::names::{NameError, NamePolicy};
use crate::owner::{OwnerPolicy, OwnerPolicyError};
use crate::units::{parse_duration, parse_size, DurationError, SizeError};

/// The keys tmpdisk knows, with their help (the first is the bare value's).
pub const KEYS: &[(&str, &str)] = &[
    ("size", "size of each disk, e.g. 20G (required)"),
    (
        "type",
        "filesystem for mkfs -t (default ext4, journal of at most 64 MiB); none: blank",
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
        "from",
        "new disks start as this snapshot (the owner's, else a published one): no format, copy-on-write",
    ),
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
    "size", "type", "backing", "quota", "linger", "label", "pool", "from",
];

/// How long a format command may run unless `format-timeout=` says.
const DEFAULT_FORMAT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a disk setting was refused; every message names the key (and the
/// class) at fault. The config file adds the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("parameter {0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("key {0:?} given twice")]
    Duplicate(String),
    #[error("backend tmpdisk needs size=... (e.g. size=20G)")]
    MissingSize,
    #[error("unknown key {0:?} for backend tmpdisk; valid keys: {keys} (other keys are passed to command= only)",
        keys = key_names())]
    UnknownKey(String),
    #[error("unknown key {0:?} in [[class]]; valid keys: match, {keys}", keys = CLASS_KEYS.join(", "))]
    UnknownClassKey(String),
    /// `size=` or `quota=` (the error names which).
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("{key}: {source}")]
    Duration {
        key: &'static str,
        source: DurationError,
    },
    #[error("type={0:?} is not a filesystem type")]
    FsType(String),
    #[error("backing={0:?}: expected memory, dir:PATH or memory,spill=dir:PATH")]
    Backing(String),
    #[error("pool={0:?} is not a number")]
    Pool(String),
    #[error("from: {0}")]
    From(#[from] NameError),
    #[error(transparent)]
    Owner(#[from] OwnerPolicyError),
    #[error(transparent)]
    EnvKey(#[from] EnvKeyError),
    #[error("[[class]] match = {0:?}: a pattern is 1-128 characters of [A-Za-z0-9._-] and *")]
    ClassPattern(String),
    /// A key of an export class (named by its pattern once `match` is
    /// read).
    #[error("[[class]]{}: {source}", in_class(.pattern))]
    Class {
        pattern: Option<String>,
        source: Box<SpecError>,
    },
}

/// ` match = "PATTERN"`, when the pattern is known.
fn in_class(pattern: &Option<String>) -> String {
    pattern
        .as_ref()
        .map_or_else(String::new, |p| format!(" match = {p:?}"))
}

/// The names of [`KEYS`], comma-separated.
fn key_names() -> String {
    KEYS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
}

/// One kind of disk as written: `[tmpdisk]`, the command line's
/// `tmpdisk KEY=VALUE...`, `scratchd run`'s disk, or a class's keys.
/// `None`: not given (a default or another source fills it in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSettings {
    /// `size=`, in bytes.
    pub size: Option<u64>,
    /// `type=`: a file system for mkfs, or `none` (checked to be a plain
    /// word, since it becomes part of a program name).
    pub fs_type: Option<String>,
    /// `label=`.
    pub label: Option<String>,
    /// `command=`: formats instead of mkfs.
    pub command: Option<String>,
    /// `backing=`.
    pub backing: Option<Backing>,
    /// `linger=`.
    pub linger: Option<Duration>,
    /// `pool=`.
    pub pool: Option<usize>,
    /// `from=`: a snapshot's name.
    pub from: Option<String>,
    /// `quota=`, in bytes.
    pub quota: Option<u64>,
    /// `format-timeout=`.
    pub format_timeout: Option<Duration>,
    /// `owner=`: server-wide, so it is only read from the default class.
    pub owner: Option<OwnerPolicy>,
    /// Keys tmpdisk does not know, in the order given: variables for
    /// `command=` (checked as names once the settings are complete).
    pub env: Vec<(String, String)>,
}

impl DiskSettings {
    /// Parses `params` (`KEY=VALUE`, or the size alone first, as in
    /// `tmpdisk 20G linger=30s`).
    pub fn from_params(params: &[String]) -> Result<DiskSettings, SpecError> {
        let mut settings = DiskSettings::default();
        let rest = match params.split_first() {
            Some((size, rest)) if !size.contains('=') => {
                settings.set("size", size)?;
                rest
            }
            _ => params,
        };
        settings.add_params(rest)?;
        Ok(settings)
    }

    /// Adds `params`, each `KEY=VALUE`, to these settings; a key already
    /// set is refused.
    pub fn add_params(&mut self, params: &[String]) -> Result<(), SpecError> {
        for param in params {
            let (key, value) = param
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(param.clone()))?;
            self.set(key, value)?;
        }
        Ok(())
    }

    /// Sets `key` from its text: the one parser of every disk key. A key
    /// given twice is refused; a key tmpdisk does not know is kept for
    /// `command=`.
    pub fn set(&mut self, key: &str, text: &str) -> Result<(), SpecError> {
        match key {
            "size" => fill(&mut self.size, key, || Ok(parse_size("size", text)?)),
            "type" => fill(&mut self.fs_type, key, || parse_fs_type(text)),
            "label" => fill(&mut self.label, key, || Ok(text.to_owned())),
            "command" => fill(&mut self.command, key, || Ok(text.to_owned())),
            "backing" => fill(&mut self.backing, key, || parse_backing(text)),
            "linger" => fill(&mut self.linger, key, || duration("linger", text)),
            "pool" => fill(&mut self.pool, key, || {
                text.parse().map_err(|_| SpecError::Pool(text.to_owned()))
            }),
            "from" => fill(&mut self.from, key, || {
                NamePolicy::default().check(text)?;
                Ok(text.to_owned())
            }),
            "quota" => fill(&mut self.quota, key, || Ok(parse_size("quota", text)?)),
            "format-timeout" => fill(&mut self.format_timeout, key, || {
                duration("format-timeout", text)
            }),
            "owner" => fill(&mut self.owner, key, || Ok(OwnerPolicy::parse(text)?)),
            _ if self.env.iter().any(|(k, _)| k == key) => {
                Err(SpecError::Duplicate(key.to_owned()))
            }
            _ => {
                self.env.push((key.to_owned(), text.to_owned()));
                Ok(())
            }
        }
    }

    /// These settings, with what they leave out taken from `base`, key by
    /// key (extra variables too).
    pub fn or(self, base: &DiskSettings) -> DiskSettings {
        // Destructured whole, so that a new key cannot be forgotten here.
        let DiskSettings {
            size,
            fs_type,
            label,
            command,
            backing,
            linger,
            pool,
            from,
            quota,
            format_timeout,
            owner,
            mut env,
        } = self;
        for (key, value) in &base.env {
            if !env.iter().any(|(k, _)| k == key) {
                env.push((key.clone(), value.clone()));
            }
        }
        DiskSettings {
            size: size.or(base.size),
            fs_type: fs_type.or_else(|| base.fs_type.clone()),
            label: label.or_else(|| base.label.clone()),
            command: command.or_else(|| base.command.clone()),
            backing: backing.or_else(|| base.backing.clone()),
            linger: linger.or(base.linger),
            pool: pool.or(base.pool),
            from: from.or_else(|| base.from.clone()),
            quota: quota.or(base.quota),
            format_timeout: format_timeout.or(base.format_timeout),
            owner: owner.or(base.owner),
            env,
        }
    }

    /// Refuses extra keys without `command=` (a misspelt key, most likely).
    /// [`DiskSettings::disk_spec`] checks this on the merged settings; the
    /// config file checks its own `[tmpdisk]` too, where it can name the
    /// key's line.
    pub fn check_extra_keys(&self) -> Result<(), SpecError> {
        match (&self.command, self.env.first()) {
            (None, Some((key, _))) => Err(SpecError::UnknownKey(key.clone())),
            _ => Ok(()),
        }
    }

    /// The disk these settings describe, with the defaults for what they
    /// leave out (`type=ext4`, `backing=memory`, no linger, no pool).
    pub fn disk_spec(&self) -> Result<DiskSpec, SpecError> {
        let size = self.size.ok_or(SpecError::MissingSize)?;
        self.check_extra_keys()?;
        for (key, _) in &self.env {
            check_env_key(key)?;
        }
        let fs_type = self.fs_type.clone().unwrap_or_else(|| "ext4".to_owned());
        let kind = match (&self.command, fs_type.as_str()) {
            (Some(command), _) => FormatKind::Command(command.clone()),
            (None, "none") => FormatKind::None,
            (None, fs) => FormatKind::Filesystem(fs.to_owned()),
        };
        Ok(DiskSpec {
            size,
            quota: self.quota,
            format: FormatSpec {
                kind,
                fs_type,
                label: self.label.clone(),
                env: self.env.clone(),
                timeout: self.format_timeout.unwrap_or(DEFAULT_FORMAT_TIMEOUT),
            },
            backing: self.backing.clone().unwrap_or(Backing::Memory),
            linger: self.linger.unwrap_or(Duration::ZERO),
            pool: self.pool.unwrap_or(0),
            from: self.from.clone(),
        })
    }
}

/// Sets an unset `slot` to what `parse` makes of the value; a key given
/// twice is refused before its value is looked at.
fn fill<T>(
    slot: &mut Option<T>,
    key: &str,
    parse: impl FnOnce() -> Result<T, SpecError>,
) -> Result<(), SpecError> {
    if slot.is_some() {
        return Err(SpecError::Duplicate(key.to_owned()));
    }
    *slot = Some(parse()?);
    Ok(())
}

/// `type=`: a word of `[A-Za-z0-9_.-]` (it names `mkfs.TYPE`).
fn parse_fs_type(text: &str) -> Result<String, SpecError> {
    let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if text.is_empty() || !text.chars().all(word) {
        return Err(SpecError::FsType(text.to_owned()));
    }
    Ok(text.to_owned())
}

/// `backing=memory`, `backing=dir:PATH` or `backing=memory,spill=dir:PATH`.
fn parse_backing(text: &str) -> Result<Backing, SpecError> {
    if text == "memory" {
        return Ok(Backing::Memory);
    }
    match (
        text.strip_prefix("dir:"),
        text.strip_prefix("memory,spill=dir:"),
    ) {
        (Some(dir), _) if !dir.is_empty() => Ok(Backing::Dir(PathBuf::from(dir))),
        (_, Some(dir)) if !dir.is_empty() => Ok(Backing::MemorySpill(PathBuf::from(dir))),
        _ => Err(SpecError::Backing(text.to_owned())),
    }
}

/// A duration for `key`, named in the error.
fn duration(key: &'static str, text: &str) -> Result<Duration, SpecError> {
    parse_duration(text).map_err(|source| SpecError::Duration { key, source })
}

/// An export class as written: `match = "PATTERN"` and its disk keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassSettings {
    /// `match`: required (the config file names a class without one).
    pub pattern: Option<String>,
    /// The keys of [`CLASS_KEYS`] the class sets.
    pub disk: DiskSettings,
}

impl ClassSettings {
    /// Sets `key` from its text: `match`, or one of [`CLASS_KEYS`].
    pub fn set(&mut self, key: &str, text: &str) -> Result<(), SpecError> {
        match key {
            "match" if self.pattern.is_some() => Err(SpecError::Duplicate(key.to_owned())),
            "match" => {
                self.pattern = Some(text.to_owned());
                Ok(())
            }
            key if CLASS_KEYS.contains(&key) => {
                self.disk.set(key, text).map_err(|source| SpecError::Class {
                    pattern: self.pattern.clone(),
                    source: Box::new(source),
                })
            }
            key => Err(SpecError::UnknownClassKey(key.to_owned())),
        }
    }

    /// The class these settings describe, with what they leave out from
    /// `base` (`[tmpdisk]`) but `pool`: ready disks cost memory, so a class
    /// keeps none unless it says so. Errors name the class.
    pub fn class(&self, base: &DiskSettings) -> Result<Class, SpecError> {
        let pattern = self.pattern.clone().unwrap_or_default();
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '*');
        if pattern.is_empty() || pattern.len() > 128 || !pattern.chars().all(valid) {
            return Err(SpecError::ClassPattern(pattern));
        }
        let base = DiskSettings {
            pool: None,
            ..base.clone()
        };
        let disk = self
            .disk
            .clone()
            .or(&base)
            .disk_spec()
            .map_err(|source| SpecError::Class {
                pattern: Some(pattern.clone()),
                source: Box::new(source),
            })?;
        Ok(Class { pattern, disk })
    }
}

/// Settings that a table of the config file deserializes into, key by key.
trait Table: Default {
    /// Sets one key (the same parser as the command line's).
    fn set(&mut self, key: &str, text: &str) -> Result<(), SpecError>;
}

impl Table for DiskSettings {
    fn set(&mut self, key: &str, text: &str) -> Result<(), SpecError> {
        DiskSettings::set(self, key, text)
    }
}

impl Table for ClassSettings {
    fn set(&mut self, key: &str, text: &str) -> Result<(), SpecError> {
        ClassSettings::set(self, key, text)
    }
}

impl<'de> Deserialize<'de> for DiskSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TableVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for ClassSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TableVisitor(PhantomData))
    }
}

/// Reads a table key by key into a [`Table`].
struct TableVisitor<T>(PhantomData<T>);

impl<'de, T: Table> Visitor<'de> for TableVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a table of KEY = VALUE settings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut table = T::default();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value_seed(Setting {
                table: &mut table,
                key: &key,
            })?;
        }
        Ok(table)
    }
}

/// One key's value, set while the deserializer is at it, so that its
/// error points at the value.
struct Setting<'a, T> {
    table: &'a mut T,
    key: &'a str,
}

impl<'de, T: Table> DeserializeSeed<'de> for Setting<'_, T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let text = deserialize_text(d, "a string, number or boolean")?;
        self.table.set(self.key, &text).map_err(de::Error::custom)
    }
}

/// A setting's value as `KEY=VALUE` would carry it: a string, number or
/// boolean (`size = "20G"`, `pool = 2`, `size = 1073741824`); `expecting`
/// says what else is wrong.
pub fn deserialize_text<'de, D: Deserializer<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<String, D::Error> {
    d.deserialize_any(TextVisitor(expecting))
}

/// Accepts a string, integer, float or boolean as its text.
struct TextVisitor(&'static str);

impl Visitor<'_> for TextVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::SizeProblem;

    fn params(params: &[&str]) -> Result<DiskSettings, SpecError> {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        DiskSettings::from_params(&params)
    }

    /// The settings a `[tmpdisk]` table gives, or its error's text.
    fn table(text: &str) -> Result<DiskSettings, String> {
        #[derive(Deserialize)]
        struct File {
            tmpdisk: DiskSettings,
        }
        toml::from_str::<File>(&format!("[tmpdisk]\n{text}"))
            .map(|f| f.tmpdisk)
            .map_err(|e| e.to_string())
    }

    fn spec(p: &[&str]) -> Result<DiskSpec, SpecError> {
        params(p)?.disk_spec()
    }

    #[test]
    fn the_file_and_the_command_line_give_the_same_settings() {
        let from_params = params(&[
            "20G",
            "type=xfs",
            "label=L",
            "backing=memory,spill=dir:/var/tmp",
            "linger=30s",
            "pool=2",
            "quota=1.5G",
            "format-timeout=2m",
            "owner=peer+gid",
            "command=true",
            "counter=/tmp/x",
        ])
        .unwrap();
        let from_file = table(
            r#"size = "20G"
type = "xfs"
label = "L"
backing = "memory,spill=dir:/var/tmp"
linger = "30s"
pool = 2
quota = "1.5G"
format-timeout = 120
owner = "peer+gid"
command = "true"
counter = "/tmp/x"
"#,
        )
        .unwrap();
        assert_eq!(from_params, from_file);
        assert_eq!(
            from_params,
            DiskSettings {
                size: Some(20 << 30),
                fs_type: Some("xfs".into()),
                label: Some("L".into()),
                command: Some("true".into()),
                backing: Some(Backing::MemorySpill("/var/tmp".into())),
                linger: Some(Duration::from_secs(30)),
                pool: Some(2),
                from: None,
                quota: Some(3 << 29),
                format_timeout: Some(Duration::from_secs(120)),
                owner: Some(OwnerPolicy::PeerGid),
                env: vec![("counter".into(), "/tmp/x".into())],
            }
        );
        // Numbers and booleans are their text.
        assert_eq!(
            table("size = 1048576\nlabel = true\n").unwrap(),
            params(&["size=1M", "label=true"]).unwrap()
        );
    }

    #[test]
    fn both_sources_name_the_key_at_fault() {
        for (key, value, says) in [
            ("size", "12Q", "invalid size size=\"12Q\": unknown unit"),
            ("quota", "lots", "invalid size quota=\"lots\""),
            ("linger", "forever", "linger: invalid duration \"forever\""),
            ("format-timeout", "1d", "format-timeout: invalid duration"),
            ("type", "../x", "type=\"../x\" is not a filesystem type"),
            ("backing", "disk", "backing=\"disk\": expected memory"),
            ("pool", "many", "pool=\"many\" is not a number"),
            ("owner", "root", "invalid owner=\"root\""),
        ] {
            let cli = params(&["label=L", &format!("{key}={value}")])
                .unwrap_err()
                .to_string();
            assert!(cli.contains(says), "{key}: {cli}");
            let file = table(&format!("label = \"L\"\n{key} = \"{value}\"\n")).unwrap_err();
            assert!(file.contains(says), "{key}: {file}");
            assert!(file.contains("line 3"), "the value's line: {file}");
        }
    }

    #[test]
    fn unknown_and_duplicate_keys_are_refused_by_name() {
        let unknown = "unknown key \"sise\" for backend tmpdisk; valid keys: size, type";
        let cli = spec(&["1M", "sise=2"]).unwrap_err().to_string();
        assert!(cli.starts_with(unknown), "{cli}");
        // The file's line is the config file's business (it names it).
        let file = table("size = 1\nsise = 2\n").unwrap();
        let file = file.check_extra_keys().unwrap_err().to_string();
        assert_eq!(file, cli);
        assert_eq!(
            params(&["size=1M", "size=2M"]),
            Err(SpecError::Duplicate("size".into()))
        );
        assert_eq!(
            params(&["size=1M", "size=12Q"]),
            Err(SpecError::Duplicate("size".into())),
            "the key, before its value"
        );
        assert_eq!(
            params(&["1M", "command=true", "x=1", "x=2"]),
            Err(SpecError::Duplicate("x".into()))
        );
        let file = table("size = 1\nsize = 2\n").unwrap_err();
        assert!(
            file.contains("duplicate key") && file.contains("size"),
            "{file}"
        );
        assert_eq!(
            params(&["1M", "-1"]),
            Err(SpecError::NotKeyValue("-1".into()))
        );
        let file = table("size = [1]\n").unwrap_err();
        assert!(file.contains("a string, number or boolean"), "{file}");
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let d = spec(&["20G"]).unwrap();
        assert_eq!(d.size, 20 << 30);
        assert_eq!(d.format.kind, FormatKind::Filesystem("ext4".into()));
        assert_eq!(d.format.timeout, DEFAULT_FORMAT_TIMEOUT);
        assert_eq!(
            (d.linger, d.pool, d.backing, d.quota),
            (Duration::ZERO, 0, Backing::Memory, None)
        );
        let d = spec(&["1M", "type=none", "backing=dir:/var/tmp"]).unwrap();
        assert_eq!(d.format.kind, FormatKind::None);
        assert_eq!(d.backing, Backing::Dir("/var/tmp".into()));
        assert_eq!(
            spec(&["type=ext4"]).unwrap_err(),
            SpecError::MissingSize,
            "a size is needed"
        );
        for backing in ["disk", "memory,spill=dir:", "memory,spill=/tmp", "dir:"] {
            assert_eq!(
                params(&["1M", &format!("backing={backing}")]),
                Err(SpecError::Backing(backing.into()))
            );
        }
        assert!(matches!(
            params(&["1M", "linger=forever"]),
            Err(SpecError::Duration {
                key: "linger",
                source: DurationError::UnknownUnit { .. }
            })
        ));
        assert!(matches!(
            params(&["12Q"]),
            Err(SpecError::Size(SizeError {
                what: "size",
                why: SizeProblem::UnknownUnit,
                ..
            }))
        ));
    }

    #[test]
    fn extra_keys_need_a_command_and_valid_names() {
        let d = spec(&["size=1M", "command=true", "counter=/tmp/x"]).unwrap();
        assert_eq!(
            d.format.env,
            [("counter".to_string(), "/tmp/x".to_string())]
        );
        assert_eq!(d.format.kind, FormatKind::Command("true".into()));
        assert_eq!(
            spec(&["size=1M", "counter=/tmp/x"]).unwrap_err(),
            SpecError::UnknownKey("counter".into())
        );
        assert!(matches!(
            spec(&["size=1M", "command=true", "bad-key=1"]),
            Err(SpecError::EnvKey(EnvKeyError::NotAVariable(_)))
        ));
        assert!(matches!(
            spec(&["size=1M", "command=true", "disk=1"]),
            Err(SpecError::EnvKey(EnvKeyError::Reserved(_)))
        ));
        // A command given later (the command line's) makes them valid.
        let file = params(&["1M", "counter=1"]).unwrap();
        let cli = params(&["command=true"]).unwrap();
        assert!(cli.or(&file).disk_spec().is_ok());
        let file = table("size = 1\nX = 2\ncommand = \"true\"\n").unwrap();
        assert_eq!(file.check_extra_keys(), Ok(()));
        let file = table("size = 1\nX = 2\n").unwrap();
        assert_eq!(
            file.check_extra_keys(),
            Err(SpecError::UnknownKey("X".into()))
        );
    }

    #[test]
    fn the_first_source_wins_key_by_key() {
        let cli = params(&["10G", "pool=0", "command=true", "a=cli"]).unwrap();
        let file = params(&["20G", "linger=30s", "pool=2", "a=file", "b=file"]).unwrap();
        let merged = cli.or(&file);
        assert_eq!(merged.size, Some(10 << 30));
        assert_eq!(merged.pool, Some(0));
        assert_eq!(merged.linger, Some(Duration::from_secs(30)));
        assert_eq!(merged.command.as_deref(), Some("true"));
        assert_eq!(
            merged.env,
            [("a".into(), "cli".into()), ("b".into(), "file".into())]
        );
    }

    fn class(text: &str) -> Result<ClassSettings, String> {
        #[derive(Deserialize)]
        struct File {
            class: Vec<ClassSettings>,
        }
        toml::from_str::<File>(&format!("[[class]]\n{text}"))
            .map(|mut f| f.class.remove(0))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn classes_take_what_they_leave_out_but_pool() {
        let base = params(&["20G", "linger=30s", "label=L", "pool=2"]).unwrap();
        let big = class(
            "match = \"big-*\"\nsize = \"200G\"\nbacking = \"dir:/var/tmp\"\nquota = \"100G\"\n",
        )
        .unwrap()
        .class(&base)
        .unwrap();
        assert_eq!(big.pattern, "big-*");
        assert_eq!(big.disk.size, 200 << 30);
        assert_eq!(big.disk.quota, Some(100 << 30));
        assert_eq!(big.disk.backing, Backing::Dir("/var/tmp".into()));
        assert_eq!(big.disk.linger, Duration::from_secs(30), "from [tmpdisk]");
        assert_eq!(big.disk.format.label.as_deref(), Some("L"));
        assert_eq!(big.disk.pool, 0, "a pool is never inherited");
        let raw = class("match = \"raw-*\"\ntype = \"none\"\nlinger = 0\npool = 3\n")
            .unwrap()
            .class(&base)
            .unwrap();
        assert_eq!((raw.disk.size, raw.disk.linger), (20 << 30, Duration::ZERO));
        assert_eq!((raw.disk.format.kind, raw.disk.pool), (FormatKind::None, 3));
    }

    #[test]
    fn class_errors_name_the_class_and_key() {
        let base = params(&["1G"]).unwrap();
        let mut big = ClassSettings::default();
        big.set("match", "big-*").unwrap();
        big.set("linger", "1s").unwrap();
        assert_eq!(
            big.set("command", "true"),
            Err(SpecError::UnknownClassKey("command".into()))
        );
        assert_eq!(
            big.set("match", "x"),
            Err(SpecError::Duplicate("match".into()))
        );
        let e = class("match = \"big-*\"\ncommand = \"true\"\n").unwrap_err();
        assert!(
            e.contains("line 3") && e.contains("unknown key \"command\" in [[class]]"),
            "{e}"
        );
        let e = class("match = \"big-*\"\nsize = \"12Q\"\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(
            e.contains("[[class]] match = \"big-*\": invalid size size="),
            "{e}"
        );
        let e = class("size = \"12Q\"\n").unwrap_err();
        assert!(e.contains("[[class]]: invalid size size="), "{e}");
        // Cross-key checks run on the merged settings, and name the class.
        let mut blank = ClassSettings::default();
        blank.set("match", "blank-*").unwrap();
        let e = blank
            .class(&DiskSettings::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "[[class]] match = \"blank-*\": backend tmpdisk needs size=... (e.g. size=20G)"
        );
        blank.pattern = Some("big/*".into());
        assert_eq!(
            blank.class(&base).unwrap_err(),
            SpecError::ClassPattern("big/*".into())
        );
    }
}
