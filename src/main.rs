//! `scratchd`: fast throw-away NBD disks for package builds.
//!
//! The binary holds the commands, in folders by application: `serve/`
//! (the server: listeners, its settings, its backends, process lifetime),
//! `builder/` (`run`, `attach`, `detach`: thin layers over
//! `scratchd-builder`), `ops/` (the operator's snapshot, the control
//! socket and `ctl`, the metrics endpoint); `generate.rs` makes man pages
//! and completions. What every command shares (exit statuses, logging,
//! error reports, duration parsers) is in [`cli`]. The protocol lives in
//! `scratchd-proto`, storage in `scratchd-store`, connections in
//! `scratchd-server`, disks in `scratchd-scratch`, their join in
//! `scratchd-exports` (docs/ARCHITECTURE.md).

#![forbid(unsafe_code)]

mod builder;
mod cli;
mod generate;
mod name;
mod ops;
mod serve;

use builder::{attach, detach, run, snapshot};
use ops::ctl;
use serve::backend;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "scratchd",
    // The crate version, commit, build date and profile (build.rs).
    version = env!("SCRATCHD_VERSION"),
    about = "Fast throw-away NBD scratch disks for package builds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve a backend over NBD.
    #[command(after_help = backend::serve_help())]
    Serve(serve::ServeArgs),
    /// Run a command on a fresh scratch disk of its own, mounted, and
    /// clean up whatever happens.
    Run(run::RunArgs),
    /// Mount a disk on a server at a directory, for every process to see,
    /// until `scratchd detach`.
    Attach(attach::AttachArgs),
    /// Undo an attach (DIR or DEVICE), or remove what dead ones left
    /// (--stale).
    Detach(detach::DetachArgs),
    /// Take, list and delete snapshots of your disks on a server; new
    /// disks start as one with `run --from` or `attach --from`.
    Snapshot(snapshot::SnapshotArgs),
    /// Look at and act on a running server through its control socket
    /// (`serve --control PATH`): list, show, drop and keep disks, status.
    Ctl(ctl::CtlArgs),
    /// Write manual pages or shell completions made from these commands.
    Generate(generate::GenerateArgs),
    /// (internal) The watchdog of a `scratchd run`.
    #[command(hide = true, name = scratchd_builder::run::WATCHDOG_SUBCOMMAND)]
    RunWatchdog,
    /// (internal) The process that serves an attached disk's FUSE file.
    #[command(hide = true, name = scratchd_builder::holder::SUBCOMMAND)]
    AttachHolder,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve::main(args),
        Command::Run(args) => run::main(args),
        Command::Ctl(args) => ctl::main(args),
        Command::Generate(args) => generate::main(args, Cli::command()),
        Command::RunWatchdog => scratchd_builder::run::watchdog_main(),
        Command::Attach(args) => attach::main(args),
        Command::Detach(args) => detach::main(args),
        Command::Snapshot(args) => snapshot::main(args),
        Command::AttachHolder => attach::holder_main(),
    };
    std::process::exit(code);
}
