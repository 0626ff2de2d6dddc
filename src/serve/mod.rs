//! `scratchd serve`: set up listeners for one backend and serve until told
//! to stop (signal, parent death, or the end of the `--run` command).
//!
//! Beside it, what only serving needs: `config.rs` (the TOML file),
//! `backend.rs` (a backend from its name and settings), `tmpdisk.rs` (the
//! scratch-disk backend's registry from its settings), `notify.rs`
//! (systemd's readiness protocol).

pub mod backend;
pub mod config;
pub mod notify;
pub mod tmpdisk;

use std::fmt::Display;
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use scratchd_server::busy_poll::{self, BusyPolling};
use scratchd_server::tls::{TlsConfig, TlsMode};
use scratchd_server::{
    shutdown::Shutdown, workers::WorkerPool, Cidr, ConnectionLimit, Exports, Listener,
    ServerContext, SingleExport, Transport,
};
use scratchd_store::sync;
use serde::Deserialize;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{info, warn};

use crate::cli::{init_logging, parse_duration_or_off, parse_reply_timeout, EXIT_USAGE};
use crate::ops::admin::{Admin, Backend as AdminBackend};
use backend::{open_backend, BackendError, OpenError, Options, UsageError};
use notify::Notifier;
use scratchd_scratch::config::default_memory_limit;
use scratchd_scratch::units::parse_size;
use scratchd_scratch::{ClassSettings, DiskSettings};

const DEFAULT_PORT: u16 = 10809;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
const DEFAULT_THREADS: usize = 16;
const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// How long a stopping server waits for connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `scratchd serve`'s settings: its command line, and the same settings
/// read from a `--config` file (every field but `config` and `params` has
/// the same name there, in kebab-case; see `docs/CONFIG.md`). Defaults are
/// applied where a setting is used, so that a flag left out can be told
/// from one given: flags override the file ([`ServeArgs::or_file`]).
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// Read settings from this TOML file (docs/CONFIG.md); options given
    /// on the command line override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen on a Unix socket at PATH; `-` makes a private one in a fresh
    /// temporary directory (for --run).
    #[arg(short = 'U', long = "unix", value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Listen on TCP port N (default 10809 when no other listener is given;
    /// 0 picks a free port).
    #[arg(short = 'p', long, value_name = "N")]
    pub port: Option<u16>,
    /// Listen on this TCP address only (default: all addresses).
    #[arg(short = 'i', long, value_name = "ADDR")]
    pub ipaddr: Option<String>,
    /// Captive mode: serve, run CMD with `sh -c` ($uri, $unixsocket, $port and
    /// $exportname set), then exit with its status.
    #[arg(long, value_name = "CMD")]
    pub run: Option<String>,
    /// Refuse writes, trims and zeroing (EPERM).
    #[arg(short = 'r', long)]
    #[serde(default)]
    pub readonly: bool,
    /// Name of the export (default ""; clients may also ask for "").
    #[arg(short = 'e', long = "export-name", value_name = "NAME")]
    pub export_name: Option<String>,
    /// Description sent to clients that ask for it (nbdinfo shows it).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Write the server's PID here once it is ready for clients.
    #[arg(short = 'P', long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Exit when the parent process exits.
    #[arg(long)]
    #[serde(default)]
    pub exit_with_parent: bool,
    /// Serve exactly one connection on stdin (a socket, inetd-style: read
    /// and written), or on stdin/stdout, then exit.
    #[arg(short = 's', long)]
    #[serde(default)]
    pub single: bool,
    /// Accepted for nbdkit compatibility: scratchd always stays in the foreground.
    #[arg(short = 'f', long)]
    #[serde(default)]
    pub foreground: bool,
    /// At most N client connections at once (default 4096; 0: no limit); a
    /// client past it is closed at once. Each connection holds a thread and
    /// its buffers.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Serve TCP clients from these addresses only (repeatable; e.g.
    /// 10.0.0.0/8, 2001:db8::/32, 192.0.2.7); others are closed at accept.
    /// Unix-socket clients are not affected.
    #[arg(long = "allow", value_name = "CIDR")]
    #[serde(default, deserialize_with = "config::cidrs")]
    pub allow: Vec<Cidr>,
    /// At most N connections at once from one TCP client address (0: no
    /// limit; default a sixteenth of --max-connections, at least 1);
    /// Unix-socket clients are not counted per peer.
    #[arg(long, value_name = "N")]
    pub max_connections_per_peer: Option<usize>,
    /// Worker threads for backends that may block (file; tmpdisk with
    /// dir: or spill=; default 16). A connection with one small request
    /// and nothing else in flight runs it on its own thread instead; at
    /// most this many do so at once.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// TLS: off (STARTTLS refused; the default), on (offered), require
    /// (nothing but STARTTLS before TLS is up).
    #[arg(long, value_name = "MODE", value_enum)]
    pub tls: Option<TlsSetting>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (the
    /// layout of nbdkit and qemu).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by the directory's ca-cert.pem;
    /// each certificate then owns its scratch disks.
    #[arg(long)]
    #[serde(default)]
    pub tls_verify_peer: bool,
    /// Cut off a client that reads none of its replies for this long while
    /// some are waiting for it (its queued replies are dropped; default 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_reply_timeout)]
    #[serde(default, deserialize_with = "config::positive_duration")]
    pub reply_timeout: Option<Duration>,
    /// Drop a client whose whole handshake (from accept to GO or
    /// EXPORT_NAME, TLS included) takes longer than this (default 10s).
    #[arg(long, value_name = "DURATION", value_parser = parse_reply_timeout)]
    #[serde(default, deserialize_with = "config::positive_duration")]
    pub handshake_timeout: Option<Duration>,
    /// TCP keepalive: probe a TCP client after this long without traffic
    /// and end its connection when it vanished (about twice this); 0: off
    /// (default 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_off)]
    #[serde(default, deserialize_with = "config::duration_or_off")]
    pub tcp_keepalive: Option<Duration>,
    /// Spin for up to this long for a client's next request before
    /// sleeping, while its requests come that quickly (saves a thread
    /// wake-up per round trip, costs CPU; at most one fewer connection
    /// spins at once than there are CPUs); 0: off (default 200us, at
    /// most 100ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_or_off)]
    #[serde(default, deserialize_with = "config::duration_or_off")]
    pub busy_poll: Option<Duration>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    #[serde(default)]
    pub verbose: u8,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// tmpdisk: at most N scratch disks at once (the asking owner's
    /// lingering ones are evicted first, never another owner's).
    #[arg(long, value_name = "N")]
    pub max_exports: Option<usize>,
    /// memory and tmpdisk: RAM that all memory disks may hold together;
    /// writes past it fail with ENOSPC (default: half of the machine's RAM).
    #[arg(long, value_name = "SIZE", value_parser = |t: &str| parse_size("--memory-limit", t))]
    #[serde(default, deserialize_with = "config::size")]
    pub memory_limit: Option<u64>,
    /// tmpdisk with backing=dir: space all disk files may allocate together
    /// (default: until the file system is full).
    #[arg(long, value_name = "SIZE", value_parser = |t: &str| parse_size("--disk-limit", t))]
    #[serde(default, deserialize_with = "config::size")]
    pub disk_limit: Option<u64>,
    /// tmpdisk: export names must start with P.
    #[arg(long, value_name = "P")]
    pub name_prefix: Option<String>,
    /// tmpdisk: at most N scratch disks at once per owner (see owner=;
    /// default three quarters of --max-exports); the owner's lingering
    /// disks are evicted first.
    #[arg(long, value_name = "N")]
    pub max_exports_per_owner: Option<NonZeroUsize>,
    /// tmpdisk: RAM the disks of one owner may hold together; their writes
    /// past it fail with ENOSPC.
    #[arg(long, value_name = "SIZE", value_parser = |t: &str| parse_size("--owner-memory-limit", t))]
    #[serde(default, deserialize_with = "config::size")]
    pub owner_memory_limit: Option<u64>,
    /// tmpdisk with dir: or spill=: space the disk files of one owner may
    /// allocate together.
    #[arg(long, value_name = "SIZE", value_parser = |t: &str| parse_size("--owner-disk-limit", t))]
    #[serde(default, deserialize_with = "config::size")]
    pub owner_disk_limit: Option<u64>,
    /// Serve `scratchd ctl` on a Unix socket at PATH (mode 0600, removed
    /// at exit; docs/OPERATIONS.md).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9810; port 0 picks a free one, logged at startup).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// tmpdisk: publish the disk image IMAGE (a file or block device of the
    /// default class's disk size, read once at startup) as snapshot NAME
    /// for every owner: `run --from NAME`, or a class with `from=NAME`,
    /// starts disks as it. Repeatable.
    #[arg(long = "publish", value_name = "NAME=IMAGE")]
    #[serde(default)]
    pub publish: Vec<String>,
    /// Backend: memory, file or tmpdisk (may come from --config instead).
    pub backend: Option<String>,
    /// Backend parameters, KEY=VALUE (added to, and overriding, those of
    /// the same backend in --config).
    #[arg(value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub params: Vec<String>,
    /// The config file's `[memory]` table: the memory backend's parameters.
    #[arg(skip)]
    pub memory: Option<config::Params>,
    /// The config file's `[file]` table.
    #[arg(skip)]
    pub file: Option<config::Params>,
    /// The config file's `[tmpdisk]` table: the default class's disk
    /// settings, parsed as the command line's `KEY=VALUE`s are.
    #[arg(skip)]
    pub tmpdisk: Option<DiskSettings>,
    /// The config file's `[[class]]` tables: tmpdisk's export classes.
    #[arg(skip)]
    #[serde(default)]
    pub class: Vec<ClassSettings>,
}

/// `--tls` (`tls =` in the file): whether TCP clients may or must start
/// TLS. The server's own [`TlsMode`] has no "off": no TLS config at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    // No doc comments: clap would print them in `--help` as a list of
    // values, which the option's own help already explains.
    Off,
    On,
    Require,
}

impl ServeArgs {
    /// The export's name (default "").
    fn export_name(&self) -> &str {
        self.export_name.as_deref().unwrap_or("")
    }
}

/// Files and directories to remove however the server ends.
#[derive(Default)]
struct Cleanup {
    sockets: Vec<PathBuf>,
    pidfile: Option<PathBuf>,
    tempdir: Option<tempfile::TempDir>,
}

impl Cleanup {
    fn run(&mut self) {
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
        if let Some(p) = self.pidfile.take() {
            let _ = std::fs::remove_file(p);
        }
        self.tempdir.take();
    }
}

pub fn main(args: ServeArgs) -> i32 {
    let args = match &args.config {
        Some(path) => match config::load(path) {
            Ok(file) => args.or_file(file),
            Err(e) => {
                // The toml crate's messages end with a newline.
                eprintln!("scratchd: {}", e.to_string().trim_end());
                return EXIT_USAGE;
            }
        },
        None => args,
    };
    let Some(backend) = &args.backend else {
        eprintln!(
            "scratchd: no backend: name one (memory, file, tmpdisk) on the command line or as backend = in --config"
        );
        return EXIT_USAGE;
    };
    let backend = backend.clone();
    // First, before any thread starts: it takes the variable out of the
    // environment.
    let notifier = Notifier::from_env();
    if args.single && stderr_is_stdin() {
        // xinetd passes the connection as stdin, stdout and stderr: a log
        // line would land in the client's stream. Systemd units set
        // `StandardError=journal` instead.
        init_logging(0, Some("off"));
    } else {
        init_logging(args.verbose, args.log_level.as_deref());
    }
    let _ = args.foreground;
    let busy_poll = args.busy_poll.unwrap_or(busy_poll::DEFAULT_LIMIT);
    if busy_poll > busy_poll::MAX_LIMIT {
        eprintln!(
            "scratchd: --busy-poll {busy_poll:?} is longer than a spin can pay off: at most {:?} (0: off)",
            busy_poll::MAX_LIMIT
        );
        return EXIT_USAGE;
    }
    let (exports, may_block, admin_backend) = match build_exports(&args, &backend) {
        Ok(e) => e,
        Err(BackendError::Usage(e)) => {
            eprintln!("scratchd: {e}");
            return EXIT_USAGE;
        }
        Err(BackendError::Open(e)) => return fail(e),
    };
    let threads = args.threads.unwrap_or(DEFAULT_THREADS);
    let workers = match WorkerPool::new(if may_block { threads } else { 1 }) {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot start worker threads: {e}")),
    };
    raise_open_file_limit();
    let tls = match tls_config(&args) {
        Ok(t) => t,
        Err(TlsSetupError::Usage(m)) => {
            eprintln!("scratchd: {m}");
            return EXIT_USAGE;
        }
        Err(e) => return fail(e),
    };
    let ctx = Arc::new(ServerContext {
        exports,
        counters: Arc::default(),
        workers,
        shutdown: Shutdown::default(),
        connections: ConnectionLimit::new(
            Some(args.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)).filter(|&n| n > 0),
        )
        .with_allow(args.allow.clone())
        .with_max_per_peer(max_per_peer(&args)),
        reply_timeout: args.reply_timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT),
        handshake_timeout: args
            .handshake_timeout
            .unwrap_or(scratchd_server::connection::DEFAULT_HANDSHAKE_TIMEOUT),
        tcp_keepalive: Some(args.tcp_keepalive.unwrap_or(DEFAULT_TCP_KEEPALIVE))
            .filter(|d| !d.is_zero()),
        busy_polling: BusyPolling::new(busy_poll),
        tls,
    });
    if args.exit_with_parent {
        if let Err(e) = exit_with_parent() {
            return fail(format!("--exit-with-parent: {e}"));
        }
    }
    if args.single {
        return match Transport::stdio() {
            Ok(t) => {
                scratchd_server::serve(t, &ctx);
                0
            }
            Err(e) => fail(format!("cannot use stdin/stdout: {e}")),
        };
    }
    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    let admin = Arc::new(Admin {
        backend: admin_backend,
        server: ctx.clone(),
        started: std::time::Instant::now(),
    });
    if let Err(e) = start_admin(&args, &admin, &cleanup) {
        sync::lock(&cleanup).run();
        return fail(e);
    }
    let result = start_listeners(&args, &ctx, &cleanup);
    let code = match result {
        Err(e) => fail(e),
        Ok(env) => {
            if let Some(p) = &args.pidfile {
                if let Err(e) = write_pidfile(p) {
                    sync::lock(&cleanup).run();
                    return fail(format!("cannot write pidfile {}: {e}", p.display()));
                }
                sync::lock(&cleanup).pidfile = Some(p.clone());
            }
            match &args.run {
                Some(cmd) => run_captive(cmd, &env, &cleanup, &notifier),
                None => serve_until_signal(&ctx, &env, &cleanup, &notifier),
            }
        }
    };
    sync::lock(&cleanup).run();
    code
}

/// Raises the soft limit on open files to the hard one: every connection
/// takes a descriptor (and a file-backed disk more), and the usual soft
/// limit of 1024 would refuse clients long before `--max-connections`.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            warn!(error = %e, "cannot raise the open-file limit");
        }
    }
}

/// Whether standard error is the very file (socket) standard input is.
fn stderr_is_stdin() -> bool {
    use std::os::fd::AsFd;
    match (
        rustix::fs::fstat(io::stdin().as_fd()),
        rustix::fs::fstat(io::stderr().as_fd()),
    ) {
        (Ok(i), Ok(e)) => (i.st_dev, i.st_ino) == (e.st_dev, e.st_ino),
        _ => false,
    }
}

/// Starts `--control` and `--metrics`, if asked for.
fn start_admin(
    args: &ServeArgs,
    admin: &Arc<Admin>,
    cleanup: &Mutex<Cleanup>,
) -> Result<(), io::Error> {
    if let Some(path) = &args.control {
        crate::ops::ctl::serve(path, admin.clone())?;
        sync::lock(cleanup).sockets.push(path.clone());
        info!(path = %path.display(), "control socket ready");
    }
    if let Some(addr) = &args.metrics {
        let bound = crate::ops::metrics::serve(addr, admin.clone())?;
        // Printed too: with port 0 the caller needs to know.
        info!(%bound, "metrics at http://{bound}/metrics");
    }
    Ok(())
}

/// Connections one TCP address may hold at once: `--max-connections-per-peer`,
/// or by default a sixteenth of `--max-connections` (256 of 4,096), so that
/// one address, before it has authenticated anything, cannot take every
/// slot while farms of builders still have plenty each. No global limit,
/// no default per address.
fn max_per_peer(args: &ServeArgs) -> Option<usize> {
    match args.max_connections_per_peer {
        Some(n) => Some(n).filter(|&n| n > 0),
        None => {
            let max = args.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
            Some((max / 16).max(1)).filter(|_| max > 0)
        }
    }
}

/// The exports to serve, whether their backend may block, and the
/// operator's view of them.
fn build_exports(
    args: &ServeArgs,
    backend: &str,
) -> Result<(Arc<dyn Exports>, bool, AdminBackend), BackendError> {
    if backend == "tmpdisk" {
        return build_tmpdisk(args);
    }
    let tmpdisk_only = [
        ("--max-exports", args.max_exports.is_some()),
        ("--disk-limit", args.disk_limit.is_some()),
        ("--name-prefix", args.name_prefix.is_some()),
        (
            "--max-exports-per-owner",
            args.max_exports_per_owner.is_some(),
        ),
        ("--owner-memory-limit", args.owner_memory_limit.is_some()),
        ("--owner-disk-limit", args.owner_disk_limit.is_some()),
    ];
    if let Some((flag, _)) = tmpdisk_only.iter().find(|f| f.1) {
        return Err(UsageError::TmpdiskOnly(flag).into());
    }
    if !args.class.is_empty() {
        return Err(UsageError::TmpdiskOnly("[[class]]").into());
    }
    let options = Options {
        read_only: args.readonly,
        memory_limit: args.memory_limit.unwrap_or_else(default_memory_limit),
    };
    let file_table = match backend {
        "memory" => args.memory.as_ref(),
        "file" => args.file.as_ref(),
        _ => None,
    };
    let device = open_backend(backend, &args.params, file_table, &options)?;
    let may_block = device.capabilities().may_block;
    let export = SingleExport::new(
        args.export_name().to_owned(),
        args.description.clone(),
        device.clone(),
        args.readonly,
    );
    let admin = AdminBackend::Single {
        name: args.export_name().to_owned(),
        kind: backend.to_owned(),
        device,
        errors: export.errors(),
    };
    Ok((Arc::new(export), may_block, admin))
}

/// `--publish NAME=IMAGE`: each image, copied into a published snapshot.
fn publish_images(
    registry: &scratchd_scratch::Registry,
    publish: &[String],
) -> Result<(), BackendError> {
    for item in publish {
        let Some((name, image)) = item.split_once('=') else {
            return Err(UsageError::Publish(item.clone()).into());
        };
        let view = registry
            .import_snapshot(name, std::path::Path::new(image))
            .map_err(OpenError::Publish)?;
        tracing::info!(
            snapshot = name,
            image,
            bytes = view.bytes,
            "snapshot published"
        );
    }
    Ok(())
}

fn build_tmpdisk(args: &ServeArgs) -> Result<(Arc<dyn Exports>, bool, AdminBackend), BackendError> {
    let limits = tmpdisk::Limits {
        max_exports: args.max_exports,
        memory_limit: args.memory_limit,
        disk_limit: args.disk_limit,
        name_prefix: args.name_prefix.clone(),
        per_owner: scratchd_scratch::OwnerLimits {
            max_exports: args
                .max_exports_per_owner
                .map(NonZeroUsize::get)
                .or_else(|| default_max_exports_per_owner(args.max_exports)),
            memory: args.owner_memory_limit,
            disk: args.owner_disk_limit,
        },
    };
    let export = tmpdisk::ExportOptions {
        default_name: Some(args.export_name().to_owned()).filter(|n| !n.is_empty()),
        description: args.description.clone(),
        read_only: args.readonly,
    };
    let disk = args.disk_settings().map_err(UsageError::from)?;
    let config = tmpdisk::config(&disk, &args.class, limits, export)?;
    warn_about_ownership(config.owners);
    // Any class with disks in files sends requests to the worker pool,
    // which then needs its threads (memory disks answer inline).
    let may_block = config
        .disks()
        .any(|d| d.backing != scratchd_scratch::Backing::Memory);
    let registry = Arc::new(scratchd_scratch::from_config(config).map_err(OpenError::from)?);
    publish_images(&registry, &args.publish)?;
    let exports = Arc::new(scratchd_exports::ScratchExports::new(registry.clone()));
    Ok((exports, may_block, AdminBackend::Tmpdisk(registry)))
}

/// `--max-exports-per-owner` when not given: three quarters of
/// `--max-exports` (at least one slot short of it from 2 on), so that one
/// owner cannot take every slot and others can always create a disk.
fn default_max_exports_per_owner(max_exports: Option<usize>) -> Option<usize> {
    max_exports.map(|max| match max {
        0 | 1 => max,
        _ => max - (max / 4).max(1),
    })
}

/// Warns that under `owner=name` every client reaches scratch disks by
/// name alone.
fn warn_about_ownership(owners: scratchd_scratch::OwnerPolicy) {
    if owners == scratchd_scratch::OwnerPolicy::Name {
        warn!(
            "owner=name: any client that can connect and knows a disk's name can read and \
             write it; use unguessable names (docs/SECURITY.md)"
        );
    }
}

/// Warns that TCP clients, which prove no identity, reach scratch disks by
/// name alone.
fn warn_about_tcp(listeners: &[Listener]) {
    if listeners.iter().any(|l| l.tcp_port().is_some()) {
        warn!(
            "tmpdisk over TCP: plaintext TCP clients prove no identity, so any peer that can \
             connect and knows a disk's name can read and write it; use unguessable names, \
             --tls=require --tls-verify-peer (each client certificate then owns its disks), and \
             limit who can connect; see docs/SECURITY.md"
        );
    }
}

/// Reports a fatal error once, on stderr (where the logs go too), and
/// returns the exit status for it.
fn fail(message: impl Display) -> i32 {
    eprintln!("scratchd: {message}");
    1
}

/// The environment `--run` commands get: how to reach the server.
struct RunEnv {
    uri: String,
    unixsocket: Option<PathBuf>,
    port: Option<u16>,
    exportname: String,
}

/// Why the listeners could not be set up.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("socket activation: {0}")]
    SocketActivation(#[source] io::Error),
    #[error("cannot create a temporary directory: {0}")]
    TempDir(#[source] io::Error),
    /// Binding a Unix socket or a TCP port; the message names it.
    #[error(transparent)]
    Bind(io::Error),
    #[error("cannot start listener: {0}")]
    Start(#[source] io::Error),
}

fn start_listeners(
    args: &ServeArgs,
    ctx: &Arc<ServerContext>,
    cleanup: &Arc<Mutex<Cleanup>>,
) -> Result<RunEnv, ListenError> {
    let mut listeners = Listener::from_systemd().map_err(ListenError::SocketActivation)?;
    let mut unixsocket = None;
    if let Some(path) = &args.unix {
        let path = if path == Path::new("-") {
            let dir = tempfile::Builder::new()
                .prefix("scratchd-")
                .tempdir()
                .map_err(ListenError::TempDir)?;
            let p = dir.path().join("nbd.sock");
            sync::lock(cleanup).tempdir = Some(dir);
            p
        } else {
            path.clone()
        };
        listeners.push(Listener::unix(&path).map_err(ListenError::Bind)?);
        unixsocket = Some(path);
    }
    if args.port.is_some() || args.ipaddr.is_some() || listeners.is_empty() {
        let port = args.port.unwrap_or(DEFAULT_PORT);
        listeners.extend(Listener::tcp(args.ipaddr.as_deref(), port).map_err(ListenError::Bind)?);
    }
    let port = listeners.iter().find_map(Listener::tcp_port);
    // With required TLS and verified client certificates, every TCP
    // client is an owner (its certificate): nothing to warn about.
    let certified = args.tls == Some(TlsSetting::Require) && args.tls_verify_peer;
    if args.backend.as_deref() == Some("tmpdisk") && !certified {
        warn_about_tcp(&listeners);
    }
    let mut c = sync::lock(cleanup);
    for l in listeners {
        if let Listener::Unix(_, p) = &l {
            c.sockets.push(p.clone());
        }
        l.spawn(ctx.clone()).map_err(ListenError::Start)?;
    }
    let uri = match (&unixsocket, port) {
        (Some(sock), _) => format!(
            "nbd+unix:///{}?socket={}",
            percent_encode(args.export_name()),
            percent_encode(&sock.to_string_lossy())
        ),
        (None, Some(port)) => format!(
            "nbd://localhost:{port}/{}",
            percent_encode(args.export_name())
        ),
        (None, None) => String::new(),
    };
    Ok(RunEnv {
        uri,
        unixsocket,
        port,
        exportname: args.export_name().to_owned(),
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn write_pidfile(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{}", std::process::id())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn exit_with_parent() -> std::io::Result<()> {
    let parent = rustix::process::getppid();
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
    // The parent may have died before the request took effect.
    if rustix::process::getppid() != parent {
        std::process::exit(0);
    }
    Ok(())
}

/// Serves until SIGINT, SIGTERM or SIGHUP, then stops gracefully: the
/// socket files go first (no new clients), every connection stops reading,
/// requests already received are answered, and connections close; those
/// still open after [`SHUTDOWN_GRACE`] are cut off.
fn serve_until_signal(
    ctx: &ServerContext,
    env: &RunEnv,
    cleanup: &Mutex<Cleanup>,
    notifier: &Notifier,
) -> i32 {
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot install signal handlers: {e}")),
    };
    // Only now: a SIGTERM sent as soon as systemd sees READY=1 must find
    // the handler.
    notifier.notify(&ready_message(env));
    if let Some(sig) = signals.forever().next() {
        info!(signal = sig, "shutting down");
    }
    notifier.notify("STOPPING=1");
    sync::lock(cleanup).run();
    let left = ctx.shutdown.begin(SHUTDOWN_GRACE);
    if left > 0 {
        warn!(
            connections = left,
            "still open at the shutdown deadline; closing them"
        );
    }
    0
}

/// What systemd is told once the server is ready: listeners set up, pidfile
/// written, signal handlers installed.
fn ready_message(env: &RunEnv) -> String {
    let at = if env.uri.is_empty() {
        "the sockets systemd passed"
    } else {
        &env.uri
    };
    format!("READY=1\nSTATUS=serving {at}")
}

/// Runs the captive command; the server ends when it does, with its status.
fn run_captive(cmd: &str, env: &RunEnv, cleanup: &Arc<Mutex<Cleanup>>, notifier: &Notifier) -> i32 {
    let mut p = Process::new("sh");
    p.arg("-c")
        .arg(cmd)
        .env("uri", &env.uri)
        .env("exportname", &env.exportname);
    match &env.unixsocket {
        Some(s) => p.env("unixsocket", s),
        None => p.env_remove("unixsocket"),
    };
    match env.port {
        Some(port) => p.env("port", port.to_string()),
        None => p.env_remove("port"),
    };
    // A signal to the server stops the captive command too, then cleans up.
    let cleanup = cleanup.clone();
    let stopping = notifier.clone();
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                stopping.notify("STOPPING=1");
                sync::lock(&cleanup).run();
                std::process::exit(128 + sig);
            }
        });
    }
    notifier.notify(&ready_message(env));
    let status = p.status();
    notifier.notify("STOPPING=1");
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(e) => fail(format!("cannot run {cmd:?}: {e}")),
    }
}

/// Why `--tls` could not be set up.
#[derive(Debug, thiserror::Error)]
enum TlsSetupError {
    #[error("{0}")]
    Usage(&'static str),
    #[error("--tls-certificates: {0}")]
    Load(#[from] scratchd_server::tls::TlsConfigError),
}

fn tls_config(args: &ServeArgs) -> Result<Option<TlsConfig>, TlsSetupError> {
    let mode = match args.tls.unwrap_or(TlsSetting::Off) {
        TlsSetting::On => TlsMode::On,
        TlsSetting::Require => TlsMode::Require,
        TlsSetting::Off => {
            if args.tls_certificates.is_some() || args.tls_verify_peer {
                return Err(TlsSetupError::Usage(
                    "--tls-certificates and --tls-verify-peer need --tls=on or --tls=require",
                ));
            }
            return Ok(None);
        }
    };
    let dir = args
        .tls_certificates
        .as_deref()
        .ok_or(TlsSetupError::Usage(
            "--tls=on|require needs --tls-certificates DIR",
        ))?;
    Ok(Some(TlsConfig::load(dir, mode, args.tls_verify_peer)?))
}
