//! What a `tmpdisk` server makes: the disk template and the server-wide
//! limits, plus the small checks they need (the names of extra environment
//! variables, the default memory budget). The settings as written, and
//! their parser, are [`crate::spec`]'s.

use std::path::PathBuf;
use std::time::Duration;

use crate::names::NamePolicy;
use crate::owner::{OwnerLimits, OwnerPolicy};

/// Environment variables every format command gets; extra `KEY=VALUE`s may
/// not reuse them.
pub const RESERVED_ENV: &[&str] = &["disk", "size", "type", "label"];

/// Where disks keep their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// In RAM, charged to the memory budget (`--memory-limit`).
    Memory,
    /// In an unnamed sparse file under this directory (`O_TMPFILE`), charged
    /// to the disk budget (`--disk-limit`) when there is one.
    Dir(PathBuf),
    /// In RAM until the memory budget is reached, then in an unnamed sparse
    /// file under this directory (`backing=memory,spill=dir:PATH`); the file
    /// part is charged to the disk budget when there is one.
    MemorySpill(PathBuf),
}

/// How a new disk is formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatKind {
    /// Left blank (all zeros).
    None,
    /// `mkfs -t TYPE` with options suited to a throw-away disk.
    Filesystem(String),
    /// A shell command (`sh -c`), with `$disk`, `$size`, `$type`, `$label`
    /// and the extra variables in its environment.
    Command(String),
}

/// The format step of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatSpec {
    pub kind: FormatKind,
    /// `type=`, passed to commands as `$type` (`none` when blank).
    pub fs_type: String,
    pub label: Option<String>,
    /// Extra variables for a format command (validated identifiers).
    pub env: Vec<(String, String)>,
    /// A format command still running after this is killed.
    pub timeout: Duration,
}

/// What one kind of disk is: the default class's, or an export class's.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Size of every disk, in bytes.
    pub size: u64,
    /// Most bytes one disk may allocate (`quota=`).
    pub quota: Option<u64>,
    pub format: FormatSpec,
    pub backing: Backing,
    /// How long a disk outlives its last connection.
    pub linger: Duration,
    /// Formatted disks kept ready.
    pub pool: usize,
    /// The snapshot new disks start as (`from=`), instead of a format.
    pub from: Option<String>,
}

/// An export class: new disks whose names match `pattern` are made as
/// `disk` says instead of as the default class (`[[class]]` in the config
/// file), from a pool of their own if its `pool` > 0. The budgets and the
/// name policy stay server-wide.
#[derive(Debug, Clone)]
pub struct Class {
    /// A glob with `*` only (`big-*`); the first class matching wins.
    pub pattern: String,
    pub disk: DiskSpec,
}

/// The class name of disks that match no class (metrics, `ctl`).
pub const DEFAULT_CLASS: &str = "default";

/// Whether `name` matches `pattern`, a glob in which `*` stands for any
/// run of characters (possibly empty) and every other character for
/// itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Everything a [`crate::Registry`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The default class: disks whose names match no class.
    pub disk: DiskSpec,
    /// At most this many names at once (live, being created or lingering).
    pub max_exports: Option<usize>,
    /// Bytes of RAM that all memory-backed disks together may hold.
    pub memory_limit: u64,
    /// Bytes that all dir-backed disks together may allocate (None: until
    /// the file system is full).
    pub disk_limit: Option<u64>,
    pub names: NamePolicy,
    /// The name that the default export name `""` stands for (`-e NAME`);
    /// without one, `""` is refused.
    pub default_name: Option<String>,
    pub description: Option<String>,
    pub read_only: bool,
    /// Who owns the disks a connection makes (`owner=`).
    pub owners: OwnerPolicy,
    /// What one owner may hold (`--max-exports-per-owner`,
    /// `--owner-memory-limit`, `--owner-disk-limit`).
    pub per_owner: OwnerLimits,
    /// Export classes, in order (the first matching wins); a name matching
    /// none gets the settings above.
    pub classes: Vec<Class>,
}

impl Config {
    /// Every kind of disk the server makes: the default class's, then each
    /// export class's.
    pub fn disks(&self) -> impl Iterator<Item = &DiskSpec> {
        std::iter::once(&self.disk).chain(self.classes.iter().map(|c| &c.disk))
    }
}

/// Why [`check_env_key`] refused a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvKeyError {
    #[error("extra key {0:?} is not a valid shell variable name ([A-Za-z_][A-Za-z0-9_]*), so the format command could not see it")]
    NotAVariable(String),
    #[error("extra key {0:?} is reserved: format commands get ${0} from scratchd")]
    Reserved(String),
}

/// Checks that `key` can be a shell variable (`[A-Za-z_][A-Za-z0-9_]*`) and
/// is not one of [`RESERVED_ENV`].
pub fn check_env_key(key: &str) -> Result<(), EnvKeyError> {
    let mut chars = key.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(EnvKeyError::NotAVariable(key.to_owned()));
    }
    if RESERVED_ENV.contains(&key) {
        return Err(EnvKeyError::Reserved(key.to_owned()));
    }
    Ok(())
}

/// The default memory budget: half of the machine's RAM (`MemTotal` in
/// `/proc/meminfo`), so that scratch disks can never push the host into the
/// OOM killer; unlimited if that cannot be read.
pub fn default_memory_limit() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_memtotal(&text))
        .map_or(u64::MAX, |total| total / 2)
}

/// `MemTotal` in bytes from the text of `/proc/meminfo`.
fn parse_memtotal(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys() {
        for good in ["counter", "_x", "A1_b"] {
            assert_eq!(check_env_key(good), Ok(()));
        }
        for bad in ["1x", "a-b", "", "a b", "é"] {
            let not_a_variable = EnvKeyError::NotAVariable(bad.into());
            assert_eq!(check_env_key(bad), Err(not_a_variable));
        }
        for reserved in RESERVED_ENV {
            let err = EnvKeyError::Reserved(reserved.to_string());
            assert_eq!(check_env_key(reserved), Err(err));
        }
    }

    #[test]
    fn globs() {
        for (pattern, name) in [
            ("big-*", "big-1"),
            ("big-*", "big-"),
            ("*", ""),
            ("*", "anything"),
            ("a*b*c", "abc"),
            ("a*b*c", "a-b-b-c"),
            ("*-big", "koji-big"),
            ("exact", "exact"),
            ("a**b", "ab"),
        ] {
            assert!(glob_match(pattern, name), "{pattern:?} {name:?}");
        }
        for (pattern, name) in [
            ("big-*", "bi"),
            ("big-*", "small-big-1"),
            ("exact", "exact2"),
            ("a*b*c", "acb"),
            ("*-big", "big"),
            ("ab*ba", "aba"),
            ("", "x"),
        ] {
            assert!(!glob_match(pattern, name), "{pattern:?} {name:?}");
        }
    }

    #[test]
    fn memtotal() {
        let text = "MemTotal:       24683656 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_memtotal(text), Some(24683656 * 1024));
        assert_eq!(parse_memtotal("MemFree: 1 kB"), None);
        assert!(default_memory_limit() > 0);
    }
}
