//! `scratchd`: fast throw-away NBD disks for package builds.
//!
//! This binary is only the edge: command-line parsing, logging, listeners
//! and process lifetime (`--run`, pidfile, signals). The protocol lives in
//! `scratchd-proto`, storage in `scratchd-store`, connections in
//! `scratchd-server`.

#![forbid(unsafe_code)]

mod backend;
mod serve;
mod size;
mod tmpdisk;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "scratchd",
    version,
    about = "Fast throw-away NBD scratch disks for package builds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a backend over NBD.
    #[command(after_help = concat!(
        "Backends:\n",
        "  memory   sparse RAM disk shared by all connections\n",
        "           size=SIZE  disk size, e.g. 1G (required)\n",
        "  file     an existing regular file or block device\n",
        "           path=PATH  file or device (required)\n",
        "  tmpdisk  one throw-away disk per export name (build), shared by its\n",
        "           connections, created on first connect, destroyed after the last\n",
        "           size=SIZE  disk size, e.g. 20G (required)\n",
        "           type=TYPE  mkfs -t TYPE (default ext4 without journal); none: blank\n",
        "           label=L  command='...'  backing=memory|dir:PATH  linger=30s\n",
        "           pool=N  format-timeout=60s  KEY=VALUE (environment of command=)\n",
        "           limits: --max-exports N --memory-limit SIZE --disk-limit SIZE\n",
        "                   --name-prefix P\n\n",
        "Examples:\n",
        "  scratchd serve -U - memory size=1G --run 'nbdinfo \"$uri\"'\n",
        "  scratchd serve -U /run/scratchd.sock file path=disk.img\n",
        "  scratchd serve -U /run/scratchd.sock tmpdisk size=20G linger=30s pool=2"
    ))]
    Serve(serve::ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve::main(args),
    };
    std::process::exit(code);
}
