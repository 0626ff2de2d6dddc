//! `scratchd snapshot`: take, list and delete snapshots on a server, over
//! the same kind of connection a build's disk uses (its TLS, its peer
//! credentials or client certificate): the server answers within the
//! caller's owner, as for its disks.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use scratchd_builder::id::SNAPSHOT_VAR;
use scratchd_client::{snapshot_request, Options, SnapshotAnswer, SnapshotRequest, Target};

use crate::{cli, name};

/// Exit status when the server refused or could not be reached.
const EXIT_FAILED: i32 = 1;

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    action: Action,
    /// More log output (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Action {
    /// Snapshot one of your disks (live or lingering) as SNAPSHOT: new
    /// disks can then start as it (`run --from`, `attach --from`).
    Take {
        /// The disk: overrides the URI's export. `-` reads it from a line
        /// of standard input; give it there or in $SCRATCHD_NAME, not on
        /// the command line, which every local user can read.
        #[arg(long, value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
        name: Option<String>,
        /// Freeze the file system mounted at DIR (the disk's) while the
        /// snapshot is taken, so that it holds a clean file system:
        /// everything written out, nothing half-written. Needs root.
        #[arg(long, value_name = "DIR")]
        freeze: Option<PathBuf>,
        /// The server (and maybe the disk): `nbd+unix:///NAME?socket=PATH`,
        /// `nbd://HOST[:PORT]/NAME`, `nbds://...?tls-certificates=DIR`.
        #[arg(value_name = "URI")]
        uri: String,
        /// The new snapshot's name; or $SCRATCHD_SNAPSHOT, off the command
        /// line, where a snapshot's name is a key (`owner=name`).
        #[arg(value_name = "SNAPSHOT", env = SNAPSHOT_VAR, hide_env_values = true)]
        snapshot: String,
    },
    /// List your snapshots and the published ones: name, size, bytes
    /// held, clones alive, age.
    List {
        #[arg(value_name = "URI")]
        uri: String,
    },
    /// Delete one of your snapshots; disks started as it keep working, and
    /// its bytes go with the last of them.
    Delete {
        #[arg(value_name = "URI")]
        uri: String,
        /// Its name; or $SCRATCHD_SNAPSHOT.
        #[arg(value_name = "SNAPSHOT", env = SNAPSHOT_VAR, hide_env_values = true)]
        snapshot: String,
    },
}

/// Why a snapshot command failed.
#[derive(Debug, thiserror::Error)]
enum SnapshotCommandError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Name(#[from] name::NameError),
    #[error(transparent)]
    Uri(#[from] scratchd_client::UriError),
    #[error(transparent)]
    Server(#[from] scratchd_client::Error),
    #[error(transparent)]
    Freeze(#[from] scratchd_builder::freeze::FreezeRefusal),
    #[error("cannot thaw the file system at {}", dir.display())]
    Thaw {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `scratchd snapshot`.
pub fn main(args: SnapshotArgs) -> i32 {
    cli::init_logging(args.verbose, None);
    match act(args.action) {
        Ok(()) => 0,
        Err(e) => {
            let usage = matches!(
                e,
                SnapshotCommandError::Usage(_) | SnapshotCommandError::Uri(_)
            );
            cli::fail("snapshot", &e, usage, EXIT_FAILED)
        }
    }
}

fn act(action: Action) -> Result<(), SnapshotCommandError> {
    match action {
        Action::Take {
            name,
            freeze,
            uri,
            snapshot,
        } => {
            let mut target = Target::parse(&uri)?;
            if let Some(name) = name::resolve(name)? {
                target.export = name;
            }
            if target.export.is_empty() {
                return Err(SnapshotCommandError::Usage(format!(
                    "{uri:?} names no disk: give it in the URI or with --name"
                )));
            }
            let request = SnapshotRequest::Take {
                disk: target.export.clone(),
                name: snapshot.clone(),
            };
            take_frozen(freeze.as_deref(), &target.export, || ask(&target, &request))?;
            println!("{snapshot}");
            Ok(())
        }
        Action::List { uri } => {
            let SnapshotAnswer::Listing(entries) =
                ask(&Target::parse(&uri)?, &SnapshotRequest::List)?
            else {
                return Ok(());
            };
            println!(
                "{:<24} {:>14} {:>14} {:>6} {:>10}  OWNER",
                "NAME", "SIZE", "BYTES", "CLONES", "AGE_S"
            );
            for e in entries {
                let whose = if e.published { "published" } else { "yours" };
                println!(
                    "{:<24} {:>14} {:>14} {:>6} {:>10.1}  {whose}",
                    e.name,
                    e.size,
                    e.bytes,
                    e.clones,
                    e.age_ms as f64 / 1e3
                );
            }
            Ok(())
        }
        Action::Delete { uri, snapshot } => {
            let request = SnapshotRequest::Delete { name: snapshot };
            ask(&Target::parse(&uri)?, &request).map(drop)
        }
    }
}

/// Sends `request` to `target`'s server.
fn ask(target: &Target, request: &SnapshotRequest) -> Result<SnapshotAnswer, SnapshotCommandError> {
    Ok(snapshot_request(target, &Options::default(), request)?)
}

/// Runs `take` with the file system at `dir` frozen, if there is one: it
/// must be the mount point of `disk` (`scratchd_builder::freeze`).
fn take_frozen(
    dir: Option<&std::path::Path>,
    disk: &str,
    take: impl FnOnce() -> Result<SnapshotAnswer, SnapshotCommandError>,
) -> Result<(), SnapshotCommandError> {
    let Some(dir) = dir else {
        return take().map(drop);
    };
    let frozen = scratchd_builder::freeze::freeze_disk(dir, disk)?;
    tracing::info!(dir = %dir.display(), "froze the file system");
    let taken = take();
    frozen.thaw().map_err(|source| SnapshotCommandError::Thaw {
        dir: dir.to_owned(),
        source,
    })?;
    taken.map(drop)
}
