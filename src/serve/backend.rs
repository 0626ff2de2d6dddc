//! Backend selection from the command line: `BACKEND [KEY=VALUE]...`.
//!
//! Each backend declares its keys, so an unknown backend or key is refused
//! with the list of valid ones, and a missing or malformed value names the
//! key at fault. As in nbdkit, the first key may be given without `KEY=`
//! (`scratchd serve memory 1G`). [`parse_params`] does this for every
//! backend, tmpdisk included; the errors are [`UsageError`]s (exit status
//! 2) or, once the parameters are valid, [`OpenError`]s (exit status 1).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use scratchd_scratch::units::{parse_size, SizeError};
use scratchd_scratch::{BuildError, SpecError};
use scratchd_store::memory::Budget;
use scratchd_store::{BlockDevice, FileDevice, MemoryDevice};

use crate::serve::config;

/// A backend's keys with their help; the first is the bare value's.
pub type Keys = &'static [(&'static str, &'static str)];

/// Server options that backends take into account.
pub struct Options {
    /// `-r`: open read-only.
    pub read_only: bool,
    /// Bytes of RAM a memory disk may hold (`--memory-limit`).
    pub memory_limit: u64,
}

/// Why a backend could not be built: the caller exits with status 2 for
/// [`Usage`](Self::Usage), 1 for [`Open`](Self::Open).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// A command line that names no valid backend configuration.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("unknown backend {0:?}; valid backends are:\n{help}", help = backends_help())]
    UnknownBackend(String),
    #[error("parameter {param:?} is not KEY=VALUE; {backend} takes: {}", names(.keys))]
    NotKeyValue {
        backend: &'static str,
        param: String,
        keys: Keys,
    },
    #[error("unknown key {key:?} for backend {backend}; valid keys: {}", names(.keys))]
    UnknownKey {
        backend: &'static str,
        key: String,
        keys: Keys,
    },
    #[error("key {0:?} given twice")]
    DuplicateKey(String),
    #[error("--publish {0:?} is not NAME=IMAGE")]
    Publish(String),
    #[error("backend {backend} needs {key}=... ({hint})")]
    MissingKey {
        backend: &'static str,
        key: &'static str,
        hint: &'static str,
    },
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A flag that only tmpdisk takes, given for another backend.
    #[error("{0} applies to the tmpdisk backend only")]
    TmpdiskOnly(&'static str),
    /// tmpdisk's disk settings (the default class's or a class's).
    #[error(transparent)]
    Disk(#[from] SpecError),
    #[error("--disk-limit applies to backing=dir:PATH only; use --memory-limit")]
    DiskLimitWithoutDir,
    #[error("--owner-disk-limit applies to backing=dir:PATH or spill=dir:PATH only; use --owner-memory-limit")]
    OwnerDiskLimitWithoutDir,
}

/// The names of `keys`, comma-separated.
fn names(keys: Keys) -> String {
    keys.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
}

/// Valid parameters that do not make a backend.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create a {size}-byte memory disk: {source}")]
    Memory { size: u64, source: io::Error },
    #[error("cannot open {}: {source}", path.display())]
    File { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Scratch(#[from] BuildError),
    /// `--publish`: an image could not become a snapshot.
    #[error("--publish: {0}")]
    Publish(#[source] scratchd_scratch::registry::SnapshotError),
}

/// A backend's parameters sorted by key.
#[derive(Debug)]
pub struct Params<'a> {
    backend: &'static str,
    keys: Keys,
    /// The values of `keys`, in the same order.
    values: Vec<Option<&'a str>>,
}

impl<'a> Params<'a> {
    /// Where `key`'s value goes, if the backend has such a key.
    fn slot(&self, key: &str) -> Result<usize, UsageError> {
        self.keys
            .iter()
            .position(|k| k.0 == key)
            .ok_or_else(|| UsageError::UnknownKey {
                backend: self.backend,
                key: key.to_owned(),
                keys: self.keys,
            })
    }

    /// The value of `key`, which must be one of the backend's keys.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let slot = self.keys.iter().position(|k| k.0 == key);
        slot.and_then(|slot| self.values[slot])
    }

    /// The value of `key`, or an error saying the backend needs it, with
    /// `hint` (the key's help unless given).
    pub fn required(
        &self,
        key: &'static str,
        hint: Option<&'static str>,
    ) -> Result<&'a str, UsageError> {
        let doc = self.keys.iter().find(|k| k.0 == key).map_or("", |k| k.1);
        self.get(key).ok_or(UsageError::MissingKey {
            backend: self.backend,
            key,
            hint: hint.unwrap_or(doc),
        })
    }
}

/// Sorts `params` (`KEY=VALUE`, or the first key's value alone first) by
/// the backend's `keys`, then takes the keys they leave out from the config
/// file's table for the backend, if any. A key not among `keys` is refused.
pub fn parse_params<'a>(
    backend: &'static str,
    keys: Keys,
    params: &'a [String],
    file: Option<&'a config::Params>,
) -> Result<Params<'a>, UsageError> {
    let mut parsed = Params {
        backend,
        keys,
        values: vec![None; keys.len()],
    };
    for (i, p) in params.iter().enumerate() {
        let (key, value) = match p.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => (keys[0].0, p.as_str()),
            None => {
                return Err(UsageError::NotKeyValue {
                    backend,
                    param: p.clone(),
                    keys,
                })
            }
        };
        let slot = parsed.slot(key)?;
        if parsed.values[slot].replace(value).is_some() {
            return Err(UsageError::DuplicateKey(key.to_owned()));
        }
    }
    for (key, value) in file.into_iter().flatten() {
        let slot = parsed.slot(key.get_ref())?;
        parsed.values[slot].get_or_insert(value.text());
    }
    Ok(parsed)
}

/// Builds a backend's device from its parameters and the server options.
type OpenFn = fn(&Params, &Options) -> Result<Arc<dyn BlockDevice>, BackendError>;

/// A backend name and the keys it takes (the first one is the bare value's).
struct BackendSpec {
    name: &'static str,
    keys: Keys,
    summary: &'static str,
    /// Builds the device from the values of `keys`.
    open: OpenFn,
}

fn open_memory(p: &Params, o: &Options) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let size = parse_size("size", p.required("size", None)?).map_err(UsageError::from)?;
    // Writes past the budget fail with ENOSPC instead of the machine running
    // out of memory.
    let dev = MemoryDevice::with_budget(size, Arc::new(Budget::new(o.memory_limit)))
        .map_err(|source| OpenError::Memory { size, source })?;
    Ok(Arc::new(dev))
}

fn open_file(p: &Params, o: &Options) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let path = PathBuf::from(p.required("path", None)?);
    let dev =
        FileDevice::open(&path, o.read_only).map_err(|source| OpenError::File { path, source })?;
    Ok(Arc::new(dev))
}

const BACKENDS: &[BackendSpec] = &[
    BackendSpec {
        name: "memory",
        keys: &[("size", "disk size, e.g. 1G (required)")],
        summary: "sparse RAM disk shared by all connections",
        open: open_memory,
    },
    BackendSpec {
        name: "file",
        keys: &[("path", "existing file or block device (required)")],
        summary: "an existing regular file or block device",
        open: open_file,
    },
];

/// One line per backend and key, for `--help` and error messages.
pub fn backends_help() -> String {
    let mut s = String::new();
    for b in BACKENDS {
        s.push_str(&format!("  {:<8} {}\n", b.name, b.summary));
        for (k, doc) in b.keys {
            s.push_str(&format!("           {k}=...  {doc}\n"));
        }
    }
    s.push_str("  tmpdisk  one throw-away disk per export name (build)\n");
    for (k, doc) in scratchd_scratch::spec::KEYS {
        s.push_str(&format!("           {k}=...  {doc}\n"));
    }
    s
}

/// What `scratchd serve --help` ends with: [`backends_help`], the flags
/// only tmpdisk takes, and examples.
pub fn serve_help() -> String {
    format!(
        "Backends:\n{}{}",
        backends_help(),
        concat!(
            "           limits: --max-exports N --memory-limit SIZE --disk-limit SIZE\n",
            "                   --name-prefix P\n\n",
            "Examples:\n",
            "  scratchd serve -U - memory size=1G --run 'nbdinfo \"$uri\"'\n",
            "  scratchd serve -U /run/scratchd.sock file path=disk.img\n",
            "  scratchd serve -U /run/scratchd.sock tmpdisk size=20G linger=30s pool=2"
        )
    )
}

/// The keys backend `name` takes, if it is a backend.
pub fn keys(name: &str) -> Option<Keys> {
    match name {
        "tmpdisk" => Some(scratchd_scratch::spec::KEYS),
        _ => BACKENDS.iter().find(|b| b.name == name).map(|b| b.keys),
    }
}

/// Builds the device for `name` with `params` (`KEY=VALUE` or a bare value)
/// over the config file's table for it (`file`).
pub fn open_backend(
    name: &str,
    params: &[String],
    file: Option<&config::Params>,
    options: &Options,
) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let spec = BACKENDS
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| UsageError::UnknownBackend(name.to_owned()))?;
    let params = parse_params(spec.name, spec.keys, params, file)?;
    (spec.open)(&params, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: Keys = &[("size", "the size"), ("label", "a label")];

    fn parse(params: &[&str]) -> Result<Params<'static>, UsageError> {
        let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
        parse_params("test", KEYS, Vec::leak(params), None)
    }

    #[test]
    fn the_first_value_may_be_bare() {
        let p = parse(&["1G", "label=L"]).unwrap();
        assert_eq!((p.get("size"), p.get("label")), (Some("1G"), Some("L")));
        let p = parse(&["label=L"]).unwrap();
        assert_eq!(p.get("size"), None);
        assert!(matches!(
            p.required("size", None),
            Err(UsageError::MissingKey {
                key: "size",
                hint: "the size",
                ..
            })
        ));
    }

    #[test]
    fn bad_parameters_name_what_is_wrong() {
        match parse(&["1G", "L"]) {
            Err(e @ UsageError::NotKeyValue { .. }) => assert_eq!(
                e.to_string(),
                "parameter \"L\" is not KEY=VALUE; test takes: size, label"
            ),
            other => panic!("{other:?}"),
        }
        match parse(&["1G", "size=2G"]) {
            Err(UsageError::DuplicateKey(key)) => assert_eq!(key, "size"),
            other => panic!("{other:?}"),
        }
        match parse(&["1G", "colour=blue"]) {
            Err(UsageError::UnknownKey { key, .. }) => assert_eq!(key, "colour"),
            other => panic!("{other:?}"),
        }
    }

    /// The config file's table fills in what the command line leaves out.
    #[test]
    fn the_file_table_fills_in_keys_left_out() {
        #[derive(serde::Deserialize)]
        struct File {
            test: config::Params,
        }
        let file: File = toml::from_str("[test]\nsize = 1048576\nlabel = \"F\"\n").unwrap();
        let file = Box::leak(Box::new(file.test));
        let params = vec!["label=L".to_owned()];
        let p = parse_params("test", KEYS, Vec::leak(params), Some(file)).unwrap();
        assert_eq!(
            (p.get("size"), p.get("label")),
            (Some("1048576"), Some("L"))
        );
        let bare = vec!["2G".to_owned()];
        let p = parse_params("test", KEYS, Vec::leak(bare), Some(file)).unwrap();
        assert_eq!((p.get("size"), p.get("label")), (Some("2G"), Some("F")));
    }

    #[test]
    fn unknown_backends_and_keys_list_the_valid_ones() {
        let options = Options {
            read_only: false,
            memory_limit: 1 << 20,
        };
        let open = |name: &str, params: &[&str]| {
            let params: Vec<String> = params.iter().map(|s| s.to_string()).collect();
            open_backend(name, &params, None, &options).err()
        };
        match open("nosuch", &[]) {
            Some(BackendError::Usage(e @ UsageError::UnknownBackend(_))) => {
                assert!(e.to_string().contains(&backends_help()));
            }
            other => panic!("{other:?}"),
        }
        match open("memory", &["size=1M", "colour=blue"]) {
            Some(BackendError::Usage(e @ UsageError::UnknownKey { .. })) => assert_eq!(
                e.to_string(),
                "unknown key \"colour\" for backend memory; valid keys: size"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            open("memory", &["size=lots"]),
            Some(BackendError::Usage(UsageError::Size(_)))
        ));
        assert!(matches!(
            open("file", &["/nonexistent/disk.img"]),
            Some(BackendError::Open(OpenError::File { .. }))
        ));
    }
}
