//! `scratchd serve --config FILE`: the command line's settings in TOML.
//!
//! The file holds the same settings as [`ServeArgs`], named like the long
//! options without their dashes (`max-connections = 64`, `unix =
//! "/run/scratchd.sock"`), plus `backend = "tmpdisk"` and the backend's
//! `KEY=VALUE` parameters as a table named after it (`[tmpdisk]`). One
//! struct serves both, so a new option is a config key at once, parsed to
//! the same typed value (a size in bytes, a duration) by the same function
//! as its flag; serde's `deny_unknown_fields` refuses a misspelt key by
//! name, and the toml crate's errors carry the line and column. The
//! `[tmpdisk]` and `[[class]]` tables deserialize into
//! [`scratchd_scratch::spec`]'s typed disk settings, through the parser
//! of the command line's `KEY=VALUE`s. The format, with a full example, is
//! in `docs/CONFIG.md`.
//!
//! Precedence: what the command line gives wins; a flag (`-r`) can only
//! switch a setting on. Backend parameters merge key by key when the
//! command line names the file's backend (or none), as typed values for
//! tmpdisk; a command line naming another backend ignores the file's
//! parameters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::serve::ServeArgs;
use scratchd_scratch::spec::deserialize_text;
use scratchd_scratch::units::{parse_duration, parse_positive_duration, parse_size};
use scratchd_scratch::{DiskSettings, SpecError};
use scratchd_server::Cidr;

/// The backends whose parameters may form a table in the file.
const BACKEND_TABLES: [&str; 3] = ["memory", "file", "tmpdisk"];

/// The `[memory]` or `[file]` backend's parameters from the file: `KEY =
/// VALUE` with a string, number or boolean value (keys keep their place in
/// the file, for errors). `[tmpdisk]` and `[[class]]` are typed disk
/// settings ([`scratchd_scratch::spec`]).
pub type Params = BTreeMap<toml::Spanned<String>, ParamValue>;

/// A `[memory]` or `[file]` parameter's value, kept as the text
/// `KEY=VALUE` would carry (`size = "1G"`, `size = 1073741824` both work).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamValue(String);

impl ParamValue {
    /// The value as `KEY=VALUE` would carry it.
    pub fn text(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_text(d, "a string, number or boolean").map(ParamValue)
    }
}

/// `memory-limit = "64G"` or a number of bytes, checked here so that the
/// error points at the line.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let text = deserialize_text(d, "a size such as \"64G\", or bytes")?;
    parse_size("size", &text)
        .map(Some)
        .map_err(de::Error::custom)
}

/// `reply-timeout = "60s"`, `handshake-timeout = 10`: a duration or a
/// number of seconds, more than 0.
pub fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = deserialize_text(d, "a duration such as \"60s\", or seconds")?;
    parse_positive_duration(&text)
        .map(Some)
        .map_err(de::Error::custom)
}

/// `tcp-keepalive = "60s"`, `busy-poll = "50us"` (or seconds; 0 is off).
pub fn duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = deserialize_text(d, "a duration such as \"60s\", or seconds")?;
    parse_duration(&text).map(Some).map_err(de::Error::custom)
}

/// `allow = ["10.0.0.0/8", "::1"]`.
pub fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| text.parse().map_err(de::Error::custom))
        .collect()
}

/// Why a config file cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key (named), a value of the wrong type.
    #[error("config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {}, line {line}: unknown key {key:?} in [{table}]; valid keys: {valid}",
        path.display())]
    UnknownParam {
        path: PathBuf,
        line: usize,
        table: &'static str,
        key: String,
        valid: String,
    },
    /// A `[tmpdisk]` key the file's own `command=` does not take.
    #[error("config file {}{}: {source}", path.display(), at_line(*.line))]
    Disk {
        path: PathBuf,
        line: Option<usize>,
        source: SpecError,
    },
    #[error("config file {}: [[class]] number {number} has no match = \"PATTERN\"", path.display())]
    ClassWithoutMatch { path: PathBuf, number: usize },
    #[error("config file {}: table [{table}] does not match backend = {backend:?}", path.display())]
    OtherBackendTable {
        path: PathBuf,
        table: &'static str,
        backend: String,
    },
}

/// Reads `path` as [`ServeArgs`] (with the backend's table).
pub fn load(path: &Path) -> Result<ServeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<ServeArgs, ConfigError> {
    let file: ServeArgs = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if let Some(backend) = &file.backend {
        for (table, given) in BACKEND_TABLES.into_iter().zip(file.tables()) {
            if given && table != backend {
                return Err(ConfigError::OtherBackendTable {
                    path: path.to_owned(),
                    table,
                    backend: backend.clone(),
                });
            }
        }
    }
    // `[tmpdisk]` and `[[class]]` keys were checked as they were read, but
    // for extra keys, which depend on a `command=` that may come later.
    if let Some(disk) = &file.tmpdisk {
        disk.check_extra_keys()
            .map_err(|source| ConfigError::Disk {
                path: path.to_owned(),
                line: match &source {
                    SpecError::UnknownKey(key) => tmpdisk_key_line(text, key),
                    _ => None,
                },
                source,
            })?;
    }
    for (table, params) in [("memory", &file.memory), ("file", &file.file)] {
        let Some(params) = params else { continue };
        let keys = crate::serve::backend::keys(table).unwrap_or_default();
        for key in params.keys() {
            if !keys.iter().any(|k| k.0 == key.get_ref()) {
                return Err(ConfigError::UnknownParam {
                    path: path.to_owned(),
                    line: 1 + text[..key.span().start].matches('\n').count(),
                    table,
                    key: key.get_ref().clone(),
                    valid: keys.iter().map(|k| k.0).collect::<Vec<_>>().join(", "),
                });
            }
        }
    }
    if let Some(i) = file.class.iter().position(|c| c.pattern.is_none()) {
        return Err(ConfigError::ClassWithoutMatch {
            path: path.to_owned(),
            number: i + 1,
        });
    }
    Ok(file)
}

/// `, line N`, when the line is known.
fn at_line(line: Option<usize>) -> String {
    line.map_or_else(String::new, |n| format!(", line {n}"))
}

/// The line of `key` in the `[tmpdisk]` table of `text` (a file that
/// parsed), read again with the keys' places.
fn tmpdisk_key_line(text: &str, key: &str) -> Option<usize> {
    #[derive(Deserialize)]
    struct Places {
        tmpdisk: Option<Params>,
    }
    let places: Places = toml::from_str(text).ok()?;
    let (spanned, _) = places
        .tmpdisk?
        .into_iter()
        .find(|(k, _)| k.get_ref() == key)?;
    Some(1 + text[..spanned.span().start].matches('\n').count())
}

impl ServeArgs {
    /// Which backend tables the file has, in the order of [`BACKEND_TABLES`].
    fn tables(&self) -> [bool; 3] {
        [
            self.memory.is_some(),
            self.file.is_some(),
            self.tmpdisk.is_some(),
        ]
    }

    /// These settings (the command line's), with what they leave out taken
    /// from `file`. The backend's parameters stay in two parts, the command
    /// line's `params` and the file's table for that backend (the others are
    /// dropped), which the backend merges key by key as it parses them
    /// ([`ServeArgs::disk_settings`] for tmpdisk).
    pub fn or_file(self, file: ServeArgs) -> ServeArgs {
        // Destructured whole, so that a new field cannot be forgotten here.
        let ServeArgs {
            config,
            unix,
            port,
            ipaddr,
            run,
            readonly,
            export_name,
            description,
            pidfile,
            exit_with_parent,
            single,
            foreground,
            max_connections,
            allow,
            max_connections_per_peer,
            threads,
            tls,
            tls_certificates,
            tls_verify_peer,
            reply_timeout,
            handshake_timeout,
            tcp_keepalive,
            busy_poll,
            verbose,
            log_level,
            max_exports,
            memory_limit,
            disk_limit,
            name_prefix,
            max_exports_per_owner,
            owner_memory_limit,
            owner_disk_limit,
            control,
            metrics,
            publish,
            backend,
            params,
            memory: _,
            file: _,
            tmpdisk: _,
            class: _,
        } = self;
        // The file's table counts when it is for the backend in use.
        let backend = backend.or(file.backend.clone());
        let tables = backend.is_some() && (file.backend.is_none() || file.backend == backend);
        let table = |name: &str| tables && backend.as_deref() == Some(name);
        ServeArgs {
            config,
            unix: unix.or(file.unix),
            port: port.or(file.port),
            ipaddr: ipaddr.or(file.ipaddr),
            run: run.or(file.run),
            readonly: readonly || file.readonly,
            export_name: export_name.or(file.export_name),
            description: description.or(file.description),
            pidfile: pidfile.or(file.pidfile),
            exit_with_parent: exit_with_parent || file.exit_with_parent,
            single: single || file.single,
            foreground: foreground || file.foreground,
            max_connections: max_connections.or(file.max_connections),
            allow: if allow.is_empty() { file.allow } else { allow },
            max_connections_per_peer: max_connections_per_peer.or(file.max_connections_per_peer),
            threads: threads.or(file.threads),
            tls: tls.or(file.tls),
            tls_certificates: tls_certificates.or(file.tls_certificates),
            tls_verify_peer: tls_verify_peer || file.tls_verify_peer,
            reply_timeout: reply_timeout.or(file.reply_timeout),
            handshake_timeout: handshake_timeout.or(file.handshake_timeout),
            tcp_keepalive: tcp_keepalive.or(file.tcp_keepalive),
            busy_poll: busy_poll.or(file.busy_poll),
            verbose: if verbose > 0 { verbose } else { file.verbose },
            log_level: log_level.or(file.log_level),
            max_exports: max_exports.or(file.max_exports),
            memory_limit: memory_limit.or(file.memory_limit),
            disk_limit: disk_limit.or(file.disk_limit),
            name_prefix: name_prefix.or(file.name_prefix),
            max_exports_per_owner: max_exports_per_owner.or(file.max_exports_per_owner),
            owner_memory_limit: owner_memory_limit.or(file.owner_memory_limit),
            owner_disk_limit: owner_disk_limit.or(file.owner_disk_limit),
            control: control.or(file.control),
            metrics: metrics.or(file.metrics),
            publish: if publish.is_empty() {
                file.publish
            } else {
                publish
            },
            memory: file.memory.filter(|_| table("memory")),
            file: file.file.filter(|_| table("file")),
            tmpdisk: file.tmpdisk.filter(|_| table("tmpdisk")),
            backend,
            params,
            // Classes come from the file only.
            class: file.class,
        }
    }

    /// tmpdisk's default class: the command line's `KEY=VALUE`s over the
    /// file's `[tmpdisk]` (kept by [`ServeArgs::or_file`] only when it is
    /// for this backend), key by key.
    pub fn disk_settings(&self) -> Result<DiskSettings, SpecError> {
        let cli = DiskSettings::from_params(&self.params)?;
        Ok(match &self.tmpdisk {
            Some(file) => cli.or(file),
            None => cli,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn cli(args: &[&str]) -> ServeArgs {
        Cli::parse_from(std::iter::once("serve").chain(args.iter().copied())).serve
    }

    fn file(text: &str) -> Result<ServeArgs, ConfigError> {
        parse(Path::new("test.toml"), text)
    }

    const EXAMPLE: &str = r#"
unix = "/run/scratchd.sock"
max-connections = 64
readonly = true
allow = ["10.0.0.0/8"]
reply-timeout = 30
memory-limit = "64G"
control = "/run/scratchd/control.sock"
metrics = "127.0.0.1:9810"
backend = "tmpdisk"

[tmpdisk]
size = "20G"
linger = "30s"
pool = 2
"#;

    #[test]
    fn the_file_fills_in_what_the_command_line_leaves_out() {
        let merged = cli(&["-p", "0", "--max-connections", "8"]).or_file(file(EXAMPLE).unwrap());
        assert_eq!(merged.unix, Some(PathBuf::from("/run/scratchd.sock")));
        assert_eq!(merged.port, Some(0));
        assert_eq!(merged.max_connections, Some(8), "the flag wins");
        assert!(merged.readonly);
        assert_eq!(merged.allow, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(merged.reply_timeout, Some(Duration::from_secs(30)));
        assert_eq!(merged.memory_limit, Some(64 << 30));
        assert_eq!(
            merged.control,
            Some(PathBuf::from("/run/scratchd/control.sock"))
        );
        assert_eq!(merged.metrics.as_deref(), Some("127.0.0.1:9810"));
        assert_eq!(merged.backend.as_deref(), Some("tmpdisk"));
        let disk = merged.disk_settings().unwrap();
        assert_eq!(disk.size, Some(20 << 30));
        assert_eq!(disk.linger, Some(Duration::from_secs(30)));
        assert_eq!(disk.pool, Some(2));
    }

    /// The example shipped in contrib/ (and shown in docs/CONFIG.md) is valid.
    #[test]
    fn the_shipped_example_parses() {
        let example = file(include_str!("../../contrib/scratchd.toml")).unwrap();
        let merged = cli(&[]).or_file(example);
        assert_eq!(merged.backend.as_deref(), Some("tmpdisk"));
        assert_eq!(merged.disk_settings().unwrap().pool, Some(2));
        assert_eq!(merged.allow.len(), 3);
        let docs = include_str!("../../docs/CONFIG.md");
        let shown = docs
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/CONFIG.md shows the example in a toml block");
        assert_eq!(shown, include_str!("../../contrib/scratchd.toml"));
    }

    /// Flags and keys hold the same typed values, parsed once.
    #[test]
    fn sizes_and_modes_are_typed_from_both_sources() {
        let flags = cli(&[
            "--memory-limit",
            "64G",
            "--owner-disk-limit",
            "1M",
            "--tls",
            "require",
        ]);
        let text = "memory-limit = \"64G\"\nowner-disk-limit = 1048576\ntls = \"require\"\n";
        let from_file = file(text).unwrap();
        for args in [&flags, &from_file] {
            assert_eq!(args.memory_limit, Some(64 << 30));
            assert_eq!(args.owner_disk_limit, Some(1 << 20));
            assert_eq!(args.tls, Some(crate::serve::TlsSetting::Require));
        }
        let bad = Cli::try_parse_from(["serve", "--disk-limit", "12Q"])
            .err()
            .unwrap();
        let bad = bad.to_string();
        assert!(bad.contains("--disk-limit") && bad.contains("12Q"), "{bad}");
    }

    #[test]
    fn backend_parameters_merge_key_by_key() {
        let merged = cli(&["tmpdisk", "10G", "pool=0"]).or_file(file(EXAMPLE).unwrap());
        let disk = merged.disk_settings().unwrap();
        assert_eq!(disk.size, Some(10 << 30), "a bare size is size=");
        assert_eq!(disk.pool, Some(0), "the command line wins");
        assert_eq!(disk.linger, Some(Duration::from_secs(30)), "from the file");
        let other = cli(&["memory", "size=1G"]).or_file(file(EXAMPLE).unwrap());
        assert_eq!(other.backend.as_deref(), Some("memory"));
        assert_eq!(other.params, ["size=1G"]);
        assert!(
            other.tmpdisk.is_none() && other.memory.is_none(),
            "another backend's table is ignored"
        );
        let no_backend = cli(&[]).or_file(file("[memory]\nsize = 1048576\n").unwrap());
        assert_eq!(no_backend.backend, None);
        assert!(no_backend.memory.is_none());
        let named = cli(&["memory"]).or_file(file("[memory]\nsize = 1048576\n").unwrap());
        let table = named.memory.as_ref().unwrap();
        assert_eq!(table.get("size").map(ParamValue::text), Some("1048576"));
        // A file without a backend, whose [tmpdisk] the command line's
        // tmpdisk completes.
        let named =
            cli(&["tmpdisk", "linger=1s"]).or_file(file("[tmpdisk]\nsize = 1024\n").unwrap());
        let disk = named.disk_settings().unwrap();
        assert_eq!(
            (disk.size, disk.linger),
            (Some(1024), Some(Duration::from_secs(1)))
        );
        // The two sources give the same settings, and a bad value on the
        // command line is refused naming its key, as in the file.
        let same = cli(&["tmpdisk", "size=20G", "linger=30s", "pool=2"]).disk_settings();
        assert_eq!(same, file(EXAMPLE).unwrap().disk_settings());
        let e = cli(&["tmpdisk", "1G", "linger=x"])
            .disk_settings()
            .unwrap_err();
        assert!(e.to_string().starts_with("linger: invalid duration"), "{e}");
        let e = file("[tmpdisk]\nsize = 1\nlinger = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("linger: invalid duration"),
            "{e}"
        );
    }

    #[test]
    fn classes_come_from_the_file() {
        let text = "backend = \"tmpdisk\"\n[tmpdisk]\nsize = \"20G\"\n\n[[class]]\nmatch = \"big-*\"\nsize = \"200G\"\n\n[[class]]\nmatch = \"raw-*\"\ntype = \"none\"\n";
        let merged = cli(&["-p", "0"]).or_file(file(text).unwrap());
        assert_eq!(merged.class.len(), 2);
        assert_eq!(merged.class[0].pattern.as_deref(), Some("big-*"));
        assert_eq!(merged.class[0].disk.size, Some(200 << 30));
        assert_eq!(merged.class[1].disk.fs_type.as_deref(), Some("none"));
        assert!(file("[[class]]\nmatch = \"a*\"\npool = 2\n").is_ok());
        let e = file("[[class]]\nmatch = \"a*\"\ncommand = \"true\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown key \"command\" in [[class]]"),
            "{e}"
        );
        let e = file("[[class]]\nsize = 2\n").unwrap_err().to_string();
        assert!(e.contains("[[class]] number 1 has no match"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_key_and_line() {
        let e = file("port = 1\nmax-conections = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("max-conections"),
            "{e}"
        );
        assert!(e.contains("line 2"), "{e}");
        let e = file("port = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = file("memory-limit = \"12Q\"\n").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        let e = file("allow = [\"10.1.0.0/8\"]\n").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = file("reply-timeout = \"0\"\n").unwrap_err().to_string();
        assert!(e.contains("more than 0"), "{e}");
        let e = file("port = 1\ntls = \"requir\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("requir"), "{e}");
        let e = file("backend = \"tmpdisk\"\n[memory]\nsize = \"1G\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[memory] does not match"), "{e}");
        let e = file("[memory]\nsize = 1\n\nsise = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4: unknown key \"sise\" in [memory]"),
            "{e}"
        );
        assert!(file("[tmpdisk]\nsize = 1\ncommand = \"true\"\nX = 2\n").is_ok());
        assert!(file("[tmpdisk]\nX = 2\ncommand = \"true\"\n").is_ok());
        let e = file("[tmpdisk]\nsize = 1\n\nsise = 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4: unknown key \"sise\" for backend tmpdisk"),
            "{e}"
        );
        let e = file("[tmpdisk]\nsize = [1]\n").unwrap_err().to_string();
        assert!(e.contains("a string, number or boolean"), "{e}");
        for key in ["config = \"x\"", "params = []", "unknown = 1"] {
            assert!(file(key).is_err(), "{key}");
        }
        assert!(
            file("size = \"1G\"\nbackend = \"memory\"").is_err(),
            "not a top-level key"
        );
    }
}
