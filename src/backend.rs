//! Backend selection from the command line: `BACKEND [KEY=VALUE]...`.
//!
//! Each backend declares its keys, so an unknown backend or key is refused
//! with the list of valid ones, and a missing or malformed value names the
//! key at fault. As in nbdkit, the first key may be given without `KEY=`
//! (`scratchd serve memory 1G`).

use std::path::PathBuf;
use std::sync::Arc;

use scratchd_store::memory::Budget;
use scratchd_store::{BlockDevice, FileDevice, MemoryDevice};

use crate::size::parse_size;

/// Server options that backends take into account.
pub struct Options {
    /// `-r`: open read-only.
    pub read_only: bool,
    /// Bytes of RAM a memory disk may hold (`--memory-limit`).
    pub memory_limit: u64,
}

/// Builds a backend's device from its key values and the server options.
type OpenFn = fn(&Values, &Options) -> Result<Arc<dyn BlockDevice>, BackendError>;

/// A backend name and the keys it takes (the first one is the bare value's).
struct BackendSpec {
    name: &'static str,
    keys: &'static [(&'static str, &'static str)],
    summary: &'static str,
    /// Builds the device from the values of `keys`, in the same order.
    open: OpenFn,
}

/// Parameter values in the order of their backend's keys.
struct Values<'a> {
    spec: &'a BackendSpec,
    values: Vec<Option<String>>,
}

impl Values<'_> {
    fn required(&self, slot: usize) -> Result<&str, BackendError> {
        let (key, doc) = self.spec.keys[slot];
        self.values[slot].as_deref().ok_or_else(|| {
            BackendError::Usage(format!(
                "backend {} needs {key}=... ({doc})",
                self.spec.name
            ))
        })
    }
}

fn open_memory(v: &Values, o: &Options) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let size = parse_size("size", v.required(0)?).map_err(BackendError::Usage)?;
    // Writes past the budget fail with ENOSPC instead of the machine running
    // out of memory.
    let dev = MemoryDevice::with_budget(size, Arc::new(Budget::new(o.memory_limit)))
        .map_err(|e| BackendError::Open(format!("cannot create a {size}-byte memory disk: {e}")))?;
    Ok(Arc::new(dev))
}

fn open_file(v: &Values, o: &Options) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let path = PathBuf::from(v.required(0)?);
    let dev = FileDevice::open(&path, o.read_only)
        .map_err(|e| BackendError::Open(format!("cannot open {}: {e}", path.display())))?;
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
    for (k, doc) in crate::tmpdisk::KEYS {
        s.push_str(&format!("           {k}=...  {doc}\n"));
    }
    s
}

/// Why a backend could not be built: bad usage (exit 2) or a runtime failure.
#[derive(Debug)]
pub enum BackendError {
    Usage(String),
    Open(String),
}

/// Builds the device for `name` with `params` (`KEY=VALUE` or a bare value).
pub fn open_backend(
    name: &str,
    params: &[String],
    options: &Options,
) -> Result<Arc<dyn BlockDevice>, BackendError> {
    let spec = BACKENDS.iter().find(|b| b.name == name).ok_or_else(|| {
        BackendError::Usage(format!(
            "unknown backend {name:?}; valid backends are:\n{}",
            backends_help()
        ))
    })?;
    let valid_keys = || spec.keys.iter().map(|k| k.0).collect::<Vec<_>>().join(", ");
    let mut values: Vec<Option<String>> = vec![None; spec.keys.len()];
    for (i, p) in params.iter().enumerate() {
        let (key, value) = match p.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => (spec.keys[0].0, p.as_str()),
            None => {
                return Err(BackendError::Usage(format!(
                    "parameter {p:?} is not KEY=VALUE; {name} takes: {}",
                    valid_keys()
                )))
            }
        };
        let slot = spec.keys.iter().position(|k| k.0 == key).ok_or_else(|| {
            BackendError::Usage(format!(
                "unknown key {key:?} for backend {name}; valid keys: {}",
                valid_keys()
            ))
        })?;
        if values[slot].replace(value.to_owned()).is_some() {
            return Err(BackendError::Usage(format!("key {key:?} given twice")));
        }
    }
    (spec.open)(&Values { spec, values }, options)
}
