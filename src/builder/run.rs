//! `scratchd run`'s command line, and the run's local disk: a scratch disk
//! of this process's own, made with the tmpdisk machinery (no `--server`).
//! The run itself is `scratchd_builder::run`'s.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use scratchd_builder::run::{LocalDisk, RunError, RunRequest};
use scratchd_scratch::units::parse_size;
use scratchd_scratch::{DiskSettings, OpenDisk, Owner, SpecError};
use scratchd_store::BlockDevice;

use crate::builder::attach::FrontEndArgs;
use crate::serve::backend::{BackendError, OpenError};
use crate::serve::tmpdisk;
use crate::{cli, name};

/// Exit status when the run itself failed (no disk, no mount).
const EXIT_FAILED: i32 = 125;

#[derive(Args)]
pub struct RunArgs {
    /// Use a disk on this NBD server (`nbd://HOST[:PORT]` or
    /// `nbd+unix:///?socket=PATH`; the export is --name or a fresh name)
    /// instead of a private one; --size, --type and -o are then the
    /// server's business.
    #[arg(long, value_name = "URI")]
    server: Option<String>,
    /// Size of the scratch disk (sparse: unused space costs nothing).
    #[arg(long, value_name = "SIZE", default_value = "20G")]
    size: String,
    /// Name of the disk (the build's identity); default: `run-` and 128
    /// random bits. `-` reads it from a line of standard input (the rest
    /// is the command's). Give it there or in $SCRATCHD_NAME (root's
    /// environment, readable by root alone; the command does not inherit
    /// it), not on the command line, which every local user can read: the
    /// name is the disk's key.
    #[arg(long, value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
    name: Option<String>,
    /// Mount the disk here (default: a fresh directory, removed afterwards).
    /// The mount is private to the command and its children.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,
    #[command(flatten)]
    front_end: FrontEndArgs,
    /// RAM the disk may hold (default: half of the machine's RAM); writes
    /// past it fail with ENOSPC.
    #[arg(long, value_name = "SIZE")]
    memory_limit: Option<String>,
    /// More tmpdisk keys for the disk (backing=dir:PATH, spill=..., label=L).
    #[arg(short = 'o', long = "disk-option", value_name = "KEY=VALUE")]
    disk_options: Vec<String>,
    /// More log output (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

/// `scratchd run`.
pub fn main(args: RunArgs) -> i32 {
    cli::init_logging(args.verbose, None);
    let name = match name::resolve(args.name.clone()) {
        Ok(name) => name,
        Err(e) => return cli::fail("run", &e, true, EXIT_FAILED),
    };
    if args.front_end.from.is_some() && args.server.is_none() {
        let e = LocalDiskError::Usage("--from needs --server: snapshots live on a server".into());
        return cli::fail("run", &e, true, EXIT_FAILED);
    }
    let request = RunRequest {
        server: args.server.clone(),
        name,
        mount: args.mount.clone(),
        front_end: args.front_end.options(),
        command: args.command.clone(),
    };
    let result = scratchd_builder::run::run(&request, |name| open_run_disk(&args, name));
    match result {
        Ok(status) => cli::exit_code(status),
        Err(e) => {
            let usage = match &e {
                RunError::LocalDisk(local) => local.is_usage(),
                other => other.is_usage(),
            };
            cli::fail("run", &e, usage, EXIT_FAILED)
        }
    }
}

/// Why the run's own disk could not be made.
#[derive(Debug, thiserror::Error)]
enum LocalDiskError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("cannot create scratch disk {name:?}: {reason}")]
    Disk { name: String, reason: String },
}

impl LocalDiskError {
    /// Whether the command line asked for a disk that cannot be (exit
    /// status 2).
    fn is_usage(&self) -> bool {
        matches!(
            self,
            LocalDiskError::Usage(_) | LocalDiskError::Backend(BackendError::Usage(_))
        )
    }
}

/// The run's own disk, held open in its registry; dropping it destroys it.
struct RunDisk {
    export: OpenDisk,
    has_file_system: bool,
}

impl LocalDisk for RunDisk {
    fn device(&self) -> Arc<dyn BlockDevice> {
        self.export.device.clone()
    }

    fn has_file_system(&self) -> bool {
        self.has_file_system
    }
}

/// The run's own disk, and whether it has a file system to mount.
fn open_run_disk(args: &RunArgs, name: &str) -> Result<RunDisk, LocalDiskError> {
    Ok(RunDisk {
        export: open_local_disk(args, name)?,
        has_file_system: args.front_end.fs_type != "none",
    })
}

/// Creates the run's own scratch disk with the tmpdisk machinery.
fn open_local_disk(args: &RunArgs, name: &str) -> Result<OpenDisk, LocalDiskError> {
    // --size and --type, then -o KEY=VALUEs (which may not repeat them).
    let mut disk = DiskSettings::default();
    let usage = |e: SpecError| BackendError::from(crate::serve::backend::UsageError::from(e));
    disk.size = Some(parse_size("--size", &args.size).map_err(|e| usage(e.into()))?);
    disk.set("type", &args.front_end.fs_type).map_err(usage)?;
    disk.add_params(&args.disk_options).map_err(usage)?;
    let memory_limit = args
        .memory_limit
        .as_deref()
        .map(|t| parse_size("--memory-limit", t))
        .transpose()
        .map_err(|e| LocalDiskError::Usage(e.to_string()))?;
    let limits = tmpdisk::Limits {
        max_exports: Some(1),
        memory_limit,
        ..tmpdisk::Limits::default()
    };
    let config = tmpdisk::config(&disk, &[], limits, tmpdisk::ExportOptions::default())
        .map_err(BackendError::from)?;
    let registry = scratchd_scratch::from_config(config)
        .map_err(|e| LocalDiskError::Backend(OpenError::from(e).into()))?;
    // The run's own registry has one owner: this process.
    registry
        .open(name, Owner::Anyone)
        .map_err(|e| LocalDiskError::Disk {
            name: name.to_owned(),
            reason: e.to_string(),
        })
}
