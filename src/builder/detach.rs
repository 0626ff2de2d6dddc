//! `scratchd detach`'s command line; the detach itself is
//! `scratchd_builder::detach`'s.

use std::path::PathBuf;

use clap::Args;
use scratchd_builder::detach::Detach;

use crate::cli;

/// Exit status when detaching failed.
const EXIT_FAILED: i32 = 1;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("what").required(true))]
pub struct DetachArgs {
    /// The attachment's mount point or block device.
    #[arg(value_name = "DIR|DEVICE", group = "what")]
    target: Option<PathBuf>,
    /// Remove what attachments whose holder died left behind (mount, loop
    /// device, FUSE mount, record).
    #[arg(long, group = "what")]
    stale: bool,
    /// Detach every attachment.
    #[arg(long, group = "what")]
    all: bool,
    /// More log output (-v info, -vv debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
}

/// `scratchd detach`.
pub fn main(args: DetachArgs) -> i32 {
    cli::init_logging(args.verbose, None);
    let what = if args.stale {
        Detach::Stale
    } else if args.all {
        Detach::All
    } else {
        Detach::Path(args.target.expect("clap requires one"))
    };
    match scratchd_builder::detach::detach(&what) {
        Ok(()) => 0,
        Err(e) => cli::fail("detach", &e, false, EXIT_FAILED),
    }
}
