//! `scratchd attach`'s command line, the options it shares with `scratchd
//! run` ([`FrontEndArgs`]), and the hidden `attach-holder` command. The
//! attach itself is `scratchd_builder::attach`'s.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use scratchd_builder::attach::AttachRequest;
use scratchd_builder::frontend::kernel::check_request_timeout;
use scratchd_builder::frontend::{AttachMode, FrontEndOptions, WriteBehindMode};
use scratchd_builder::holder::Holder;
use scratchd_scratch::units::parse_duration;

use crate::{cli, name};

/// Exit status when attaching failed.
const EXIT_FAILED: i32 = 1;

/// How a disk becomes a mounted block device: the options `scratchd run`
/// and `scratchd attach` share.
#[derive(Args)]
pub struct FrontEndArgs {
    /// Mount options. Every mount is nosuid,nodev (a disk's contents come
    /// from elsewhere: a setuid program or a device node on it must not
    /// work here); `suid` and `dev` are refused.
    #[arg(long, value_name = "OPTS", default_value = "noatime")]
    mount_options: String,
    /// The disk's file system: what is mounted (only that driver reads the
    /// disk; the kernel never probes it with others) and, for `run`'s own
    /// disk, what mkfs makes (ext4 with a journal of at most 64 MiB; `none`
    /// for no file system and no mount).
    #[arg(long = "type", value_name = "TYPE", default_value = "ext4")]
    pub fs_type: String,
    /// Connections to the server (when it allows several), and threads
    /// serving the disk's FUSE file.
    #[arg(long, value_name = "N", default_value_t = 4)]
    connections: usize,
    /// Acknowledge a write of a disk on a server once it is sent, not when
    /// the server answers, within a bounded window (FUSE front end): auto
    /// (on for a scratch disk, whose server advertises no flush; off for
    /// an export that may be durable), on or off. A write the server then
    /// refuses fails the next write, fsync and close.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    write_behind: WriteBehindMode,
    /// How the disk becomes a block device: fuse (a FUSE file and a loop
    /// device), kernel (the kernel's nbd driver, over netlink; needs a disk
    /// on a server and the nbd module), or auto (kernel where it can be
    /// used, else fuse).
    #[arg(long, value_name = "HOW", default_value = "auto")]
    attach: AttachMode,
    /// Start the disk as this snapshot on the server (yours, or one the
    /// operator published): no mkfs, nothing copied, mounted at once. It
    /// applies when the disk is made now; a disk that exists is used as it
    /// is. XFS clones are mounted with `nouuid` (they share the
    /// snapshot's UUID). Give it in $SCRATCHD_FROM rather than on the
    /// command line where a snapshot's name is a key (`owner=name`).
    #[arg(long, value_name = "SNAPSHOT", env = scratchd_builder::id::FROM_VAR, hide_env_values = true)]
    pub from: Option<String>,
    /// The kernel front end's per-request timeout (whole seconds, 1s to
    /// 1h; default 120s): a request the server has not answered within it
    /// fails, and with several connections costs its connection. Not for
    /// --attach fuse, which has none; with auto, used if the kernel's
    /// driver is chosen.
    #[arg(long, value_name = "DURATION", value_parser = parse_request_timeout)]
    timeout: Option<Duration>,
}

/// `--timeout`: a duration the kernel takes as its request timeout.
fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text).map_err(|e| e.to_string())?;
    check_request_timeout(timeout).map_err(|e| e.to_string())
}

impl FrontEndArgs {
    pub fn options(&self) -> FrontEndOptions {
        FrontEndOptions {
            attach: self.attach,
            connections: self.connections,
            write_behind: self.write_behind,
            mount_options: self.mount_options(),
            fs_type: self.fs_type.clone(),
            request_timeout: self.timeout,
            from: self.from.clone(),
        }
    }

    /// `--mount-options`, with `nouuid` for a clone's XFS: every clone of
    /// a snapshot carries its UUID, which XFS refuses to mount twice.
    fn mount_options(&self) -> String {
        let has_nouuid = self.mount_options.split(',').any(|o| o == "nouuid");
        match (&self.from, self.fs_type.as_str()) {
            (Some(_), "xfs") if !has_nouuid => format!("{},nouuid", self.mount_options),
            _ => self.mount_options.clone(),
        }
    }
}

#[derive(Args)]
pub struct AttachArgs {
    /// Mount the disk's file system here (an existing, empty directory; not
    /// a mount point already).
    #[arg(long, value_name = "DIR")]
    mount: PathBuf,
    /// The export: overrides the URI's. `-` reads it from a line of
    /// standard input. Give it there or in $SCRATCHD_NAME (root's
    /// environment, readable by root alone), not on the command line or in
    /// the URI, which every local user can read: the name is the disk's
    /// key.
    #[arg(long, value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
    name: Option<String>,
    #[command(flatten)]
    front_end: FrontEndArgs,
    /// More log output (-v info, -vv debug); the holder logs to its log
    /// file in the state directory.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    /// The server and export: `nbd+unix:///EXPORT?socket=PATH`,
    /// `nbd://HOST[:PORT]/EXPORT`, `nbds://...?tls-certificates=DIR`; leave
    /// EXPORT out (`nbd://HOST/`) and give it with --name or $SCRATCHD_NAME
    /// to keep it off the command line.
    #[arg(value_name = "URI")]
    uri: String,
}

/// `scratchd attach`: prints the block device.
pub fn main(args: AttachArgs) -> i32 {
    cli::init_logging(args.verbose, None);
    let name = match name::resolve(args.name) {
        Ok(name) => name,
        Err(e) => return cli::fail("attach", &e, true, EXIT_FAILED),
    };
    let request = AttachRequest {
        mount: args.mount,
        uri: args.uri,
        name,
        front_end: args.front_end.options(),
        verbose: args.verbose,
    };
    match scratchd_builder::attach::attach(&request) {
        Ok(device) => {
            println!("{}", device.display());
            0
        }
        Err(e) => cli::fail("attach", &e, e.is_usage(), EXIT_FAILED),
    }
}

/// `scratchd attach-holder` (hidden): the process that keeps a FUSE
/// attachment (see `scratchd_builder::holder`).
pub fn holder_main() -> i32 {
    let holder = Holder::begin();
    cli::init_logging(holder.verbose(), None);
    holder.run(cli::with_causes)
}
