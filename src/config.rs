//! `scratchd serve --config FILE`: the command line's settings in TOML.
//!
//! The file holds the same settings as [`ServeArgs`], named like the long
//! options without their dashes (`max-connections = 64`, `unix =
//! "/run/scratchd.sock"`), plus `backend = "tmpdisk"` and the backend's
//! `KEY=VALUE` parameters as a table named after it (`[tmpdisk]`). One
//! struct serves both, so a new option is a config key at once; serde's
//! `deny_unknown_fields` refuses a misspelt key by name, and the toml
//! crate's errors carry the line and column. The format, with a full
//! example, is in `docs/CONFIG.md`.
//!
//! Precedence: what the command line gives wins; a flag (`-r`) can only
//! switch a setting on. Backend parameters merge key by key when the
//! command line names the file's backend (or none); a command line naming
//! another backend ignores the file's parameters.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::serve::ServeArgs;
use crate::size::parse_size;
use scratchd_server::Cidr;

/// The backends whose parameters may form a table in the file.
const BACKEND_TABLES: [&str; 3] = ["memory", "file", "tmpdisk"];

/// A backend's parameters from the file: `KEY = VALUE` with a string,
/// number or boolean value (keys keep their place in the file, for errors).
pub type Params = BTreeMap<toml::Spanned<String>, ParamValue>;

/// A backend parameter's value, kept as the text `KEY=VALUE` would carry
/// (`size = "20G"`, `pool = 2`, `size = 1073741824` all work).
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
        d.deserialize_any(TextVisitor("a string, number or boolean"))
            .map(ParamValue)
    }
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

/// `memory-limit = "64G"` or a number of bytes, checked here so that the
/// error points at the line.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = d.deserialize_any(TextVisitor("a size such as \"64G\", or bytes"))?;
    parse_size("size", &text).map_err(de::Error::custom)?;
    Ok(Some(text))
}

/// `reply-timeout = "60s"`, `handshake-timeout = 10`: a duration or a
/// number of seconds, more than 0.
pub fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = d.deserialize_any(TextVisitor("a duration such as \"60s\", or seconds"))?;
    crate::cli::parse_reply_timeout(&text)
        .map(Some)
        .map_err(de::Error::custom)
}

/// `tcp-keepalive = "60s"` (or seconds; 0 is off).
pub fn keepalive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = d.deserialize_any(TextVisitor("a duration such as \"60s\", or seconds"))?;
    crate::cli::parse_keepalive(&text)
        .map(Some)
        .map_err(de::Error::custom)
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
    #[error("config file {}, line {line}: unknown key {key:?} in [{table}]; valid keys: {valid}{}",
        path.display(),
        if *table == "tmpdisk" { " (others only with command=)" } else { "" })]
    UnknownParam {
        path: PathBuf,
        line: usize,
        table: &'static str,
        key: String,
        valid: String,
    },
    #[error("config file {}, line {line}: unknown key {key:?} in [[class]]; valid keys: match, {}",
        path.display(), crate::tmpdisk::CLASS_KEYS.join(", "))]
    UnknownClassKey {
        path: PathBuf,
        line: usize,
        key: String,
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
        for (table, params) in BACKEND_TABLES.into_iter().zip(file.tables()) {
            if params.is_some() && table != backend {
                return Err(ConfigError::OtherBackendTable {
                    path: path.to_owned(),
                    table,
                    backend: backend.clone(),
                });
            }
        }
    }
    for (table, params) in BACKEND_TABLES.into_iter().zip(file.tables()) {
        let Some(params) = params else { continue };
        let keys = crate::backend::keys(table).unwrap_or_default();
        // tmpdisk passes other keys to its format command.
        let extra = table == "tmpdisk" && params.contains_key("command");
        for key in params.keys() {
            if !extra && !keys.iter().any(|k| k.0 == key.get_ref()) {
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
    for (i, class) in file.class.iter().enumerate() {
        for key in class.keys() {
            let name = key.get_ref().as_str();
            if name != "match" && !crate::tmpdisk::CLASS_KEYS.contains(&name) {
                return Err(ConfigError::UnknownClassKey {
                    path: path.to_owned(),
                    line: 1 + text[..key.span().start].matches('\n').count(),
                    key: name.to_owned(),
                });
            }
        }
        if !class.contains_key("match") {
            return Err(ConfigError::ClassWithoutMatch {
                path: path.to_owned(),
                number: i + 1,
            });
        }
    }
    Ok(file)
}

impl ServeArgs {
    /// The backend tables, in the order of [`BACKEND_TABLES`].
    fn tables(&self) -> [&Option<Params>; 3] {
        [&self.memory, &self.file, &self.tmpdisk]
    }

    /// These settings (the command line's), with what they leave out taken
    /// from `file`.
    pub fn or_file(self, file: ServeArgs) -> ServeArgs {
        let params = merge_params(&self, &file);
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
            backend,
            params: _,
            memory: _,
            file: _,
            tmpdisk: _,
            class: _,
        } = self;
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
            backend: backend.or(file.backend),
            params,
            memory: None,
            file: None,
            tmpdisk: None,
            // Classes come from the file only.
            class: file.class,
        }
    }
}

/// The command line's `KEY=VALUE`s, followed by the file's for keys the
/// command line does not set, when both speak of the same backend.
fn merge_params(cli: &ServeArgs, file: &ServeArgs) -> Vec<String> {
    let mut params = cli.params.clone();
    let Some(backend) = cli.backend.as_ref().or(file.backend.as_ref()) else {
        return params;
    };
    if file.backend.as_ref().is_some_and(|b| b != backend) {
        return params;
    }
    let Some(table) = BACKEND_TABLES
        .iter()
        .position(|t| t == backend)
        .and_then(|i| file.tables()[i].as_ref())
    else {
        return params;
    };
    let given: Vec<&str> = cli
        .params
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p.split_once('=') {
            Some((key, _)) => Some(key),
            // A bare first value stands for the backend's first key.
            None if i == 0 => crate::backend::first_key(backend),
            None => None,
        })
        .collect();
    for (key, value) in table {
        if !given.contains(&key.get_ref().as_str()) {
            params.push(format!("{}={}", key.get_ref(), value.0));
        }
    }
    params
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
        assert_eq!(merged.memory_limit.as_deref(), Some("64G"));
        assert_eq!(
            merged.control,
            Some(PathBuf::from("/run/scratchd/control.sock"))
        );
        assert_eq!(merged.metrics.as_deref(), Some("127.0.0.1:9810"));
        assert_eq!(merged.backend.as_deref(), Some("tmpdisk"));
        assert_eq!(merged.params, ["linger=30s", "pool=2", "size=20G"]);
    }

    /// The example shipped in contrib/ (and shown in docs/CONFIG.md) is valid.
    #[test]
    fn the_shipped_example_parses() {
        let example = file(include_str!("../contrib/scratchd.toml")).unwrap();
        let merged = cli(&[]).or_file(example);
        assert_eq!(merged.backend.as_deref(), Some("tmpdisk"));
        assert!(merged.params.contains(&"pool=2".to_owned()));
        assert_eq!(merged.allow.len(), 3);
        let docs = include_str!("../docs/CONFIG.md");
        let shown = docs
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/CONFIG.md shows the example in a toml block");
        assert_eq!(shown, include_str!("../contrib/scratchd.toml"));
    }

    #[test]
    fn backend_parameters_merge_key_by_key() {
        let merged = cli(&["tmpdisk", "10G", "pool=0"]).or_file(file(EXAMPLE).unwrap());
        assert_eq!(merged.params, ["10G", "pool=0", "linger=30s"]);
        let other = cli(&["memory", "size=1G"]).or_file(file(EXAMPLE).unwrap());
        assert_eq!(other.backend.as_deref(), Some("memory"));
        assert_eq!(
            other.params,
            ["size=1G"],
            "another backend's table is ignored"
        );
        let no_backend = cli(&[]).or_file(file("[memory]\nsize = 1048576\n").unwrap());
        assert_eq!(no_backend.backend, None);
        let named = cli(&["memory"]).or_file(file("[memory]\nsize = 1048576\n").unwrap());
        assert_eq!(named.params, ["size=1048576"]);
    }

    #[test]
    fn classes_come_from_the_file() {
        let text = "backend = \"tmpdisk\"\n[tmpdisk]\nsize = \"20G\"\n\n[[class]]\nmatch = \"big-*\"\nsize = \"200G\"\n\n[[class]]\nmatch = \"raw-*\"\ntype = \"none\"\n";
        let merged = cli(&["-p", "0"]).or_file(file(text).unwrap());
        assert_eq!(merged.class.len(), 2);
        assert_eq!(merged.class[0].get("match").unwrap().text(), "big-*");
        assert_eq!(merged.class[1].get("type").unwrap().text(), "none");
        assert!(file("[[class]]\nmatch = \"a*\"\npool = 2\n").is_ok());
        let e = file("[[class]]\nmatch = \"a*\"\ncommand = \"true\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3: unknown key \"command\" in [[class]]"),
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
