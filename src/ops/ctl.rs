//! `scratchd ctl` and the control socket it talks to (`serve --control`).
//!
//! # Protocol
//!
//! A Unix stream socket, mode 0600 (so only the server's user, and root,
//! may act on disks). One request per connection: the client writes one
//! line of JSON and the server answers with one line of JSON, then closes.
//!
//! ```text
//! {"cmd":"list"}
//! {"cmd":"show","name":"build-42","owner":null}
//! {"cmd":"drop","name":"build-42","owner":"uid:1000"}
//! {"cmd":"keep","name":"build-42","owner":null,"for_s":3600.0}
//! {"cmd":"status"}
//! {"cmd":"snapshots"}
//! {"cmd":"publish","name":"root","owner":"uid:1000","as":"farm-root"}
//! {"cmd":"import","name":"farm-root","image":"/srv/roots/f40.img"}
//! {"cmd":"delete-snapshot","name":"farm-root","owner":"published"}
//! ```
//!
//! Answers are `{"ok":true,"result":…}` or `{"ok":false,"error":"…"}`;
//! `result` is `{"exports":[…]}` for list and show, `{"acted":[…]}` for drop
//! and keep, `{"snapshots":[…]}` for the snapshot commands (the one
//! published or imported, none for delete-snapshot), and the status
//! object for status (fields in
//! `docs/OPERATIONS.md`). `ctl --json` prints `result` as it came.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use scratchd_scratch::config::DEFAULT_CLASS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::name;
use crate::ops::admin::{Acted, Admin, ExportRow, SnapshotRow, Status};

/// A request or answer larger than this is refused.
const MAX_LINE: u64 = 64 * 1024;
/// How long one control client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    List,
    Show {
        name: String,
        owner: Option<String>,
    },
    Drop {
        name: String,
        owner: Option<String>,
    },
    Keep {
        name: String,
        owner: Option<String>,
        /// Seconds after the last connection; none: until dropped.
        for_s: Option<f64>,
    },
    Status,
    Snapshots,
    Publish {
        name: String,
        owner: String,
        #[serde(rename = "as")]
        published: String,
    },
    Import {
        name: String,
        image: String,
    },
    #[serde(rename = "delete-snapshot")]
    DeleteSnapshot {
        name: String,
        owner: String,
    },
}

/// Binds the control socket at `path` with mode 0600 and serves it on a
/// thread of its own.
pub fn serve(path: &Path, admin: Arc<Admin>) -> io::Result<()> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on control socket {}: {e}", path.display()),
        )
    };
    if path.exists() {
        return Err(named(io::ErrorKind::AddrInUse.into()));
    }
    // Bound in a private directory, made 0600 there, then moved into
    // place: nobody can connect while it has the umask's mode.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".scratchd-control-")
        .tempdir_in(parent)
        .map_err(named)?;
    let staged = private.path().join("control.sock");
    let listener = UnixListener::bind(&staged).map_err(named)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(named)?;
    std::fs::rename(&staged, path).map_err(named)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &admin) {
                            debug!(error = %e, "control client");
                        }
                    }
                    Err(e) => warn!(error = %e, "control socket accept failed"),
                }
            }
        })?;
    Ok(())
}

use crate::ops::timed_read::Timed;

/// Seconds in a (365-day) year.
const YEAR: u64 = 365 * 24 * 3600;
/// The longest `keep --for`: a disk kept longer is kept for good, and a
/// time past what the clock can add would only be an overflow.
const MAX_KEEP: Duration = Duration::from_secs(10 * YEAR);

/// Reads one request from `stream` and writes its answer.
fn answer(stream: UnixStream, admin: &Admin) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(Timed::new(&stream, REQUEST_TIMEOUT).take(MAX_LINE)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match execute(req, admin) {
            Ok(result) => json!({"ok": true, "result": result}),
            Err(error) => json!({"ok": false, "error": error}),
        },
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn to_json<T: Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

fn execute(req: Request, admin: &Admin) -> Result<Value, String> {
    match req {
        Request::List => to_json(&ExportsResult {
            exports: admin.snapshot().exports,
        }),
        Request::Show { name, owner } => {
            let exports: Vec<ExportRow> = admin
                .snapshot()
                .exports
                .into_iter()
                .filter(|e| {
                    e.name == name
                        && owner
                            .as_deref()
                            .map_or(true, |o| crate::ops::admin::selector_matches(o, &e.owner))
                })
                .collect();
            if exports.is_empty() {
                return Err(format!("no export {name:?}"));
            }
            to_json(&ExportsResult { exports })
        }
        Request::Drop { name, owner } => to_json(&ActedResult {
            acted: admin.drop_disks(&name, owner.as_deref())?,
        }),
        Request::Keep { name, owner, for_s } => {
            let time = match for_s {
                Some(s) if s > MAX_KEEP.as_secs_f64() => {
                    return Err(format!(
                        "keep: {s} s is more than {} years; keep without --for keeps \
                         it until it is dropped",
                        MAX_KEEP.as_secs() / YEAR
                    ))
                }
                Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
                Some(_) => return Err("keep: for_s must be more than 0".to_owned()),
                None => None,
            };
            to_json(&ActedResult {
                acted: admin.keep_disks(&name, owner.as_deref(), time)?,
            })
        }
        Request::Status => to_json(&admin.snapshot().status),
        Request::Snapshots => to_json(&SnapshotsResult {
            snapshots: admin.snapshots(),
        }),
        Request::Publish {
            name,
            owner,
            published,
        } => to_json(&SnapshotsResult {
            snapshots: vec![admin.publish(&name, &owner, &published)?],
        }),
        Request::Import { name, image } => to_json(&SnapshotsResult {
            snapshots: vec![admin.import(&name, &image)?],
        }),
        Request::DeleteSnapshot { name, owner } => {
            admin.delete_snapshot(&name, &owner)?;
            to_json(&SnapshotsResult { snapshots: vec![] })
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotsResult {
    snapshots: Vec<SnapshotRow>,
}

#[derive(Serialize, Deserialize)]
struct ExportsResult {
    exports: Vec<ExportRow>,
}

#[derive(Serialize, Deserialize)]
struct ActedResult {
    acted: Vec<Acted>,
}

/// `scratchd ctl`: look at and act on a running server.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The server's control socket (`serve --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the server's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Every export: name, owner, size, allocation, connections, age,
    /// linger/keep state, I/O counters.
    List,
    /// One export in detail.
    Show {
        /// The export; `-` reads it from a line of standard input. Give it
        /// there or in $SCRATCHD_NAME (readable by its user and root
        /// alone), not here, where every local user can read it.
        #[arg(value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
        name: String,
        /// Which owner's disk: uid:N, uid:N+gid:M, cert:HEX (a prefix
        /// will do), anonymous, or all.
        #[arg(long, value_name = "OWNER")]
        owner: Option<String>,
    },
    /// Disconnect a disk's clients and destroy it (a later connection
    /// with its name gets a fresh disk).
    Drop {
        /// The export; `-`, or $SCRATCHD_NAME, as for `show`.
        #[arg(value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
        name: String,
        /// Needed when several owners have a disk of that name.
        #[arg(long, value_name = "OWNER")]
        owner: Option<String>,
    },
    /// Keep a disk after its last connection (replacing its linger), for
    /// debugging a finished build.
    Keep {
        /// The export; `-`, or $SCRATCHD_NAME, as for `show`.
        #[arg(value_name = "NAME", env = name::NAME_VAR, hide_env_values = true)]
        name: String,
        /// Which owner's disk (all of them if several owners have one of
        /// that name and this is left out).
        #[arg(long, value_name = "OWNER")]
        owner: Option<String>,
        /// How long to keep it after its last connection (default: until
        /// `ctl drop` or the server stops).
        #[arg(long = "for", value_name = "DURATION", value_parser = crate::cli::parse_reply_timeout)]
        time: Option<Duration>,
    },
    /// Budgets, export and connection totals.
    Status,
    /// Every snapshot: name, owner (or published), size, bytes held once,
    /// clones alive, age, what it was made from.
    Snapshots,
    /// Publish an owner's snapshot to every owner (a farm-wide base root):
    /// the same bytes, held once.
    Publish {
        /// The snapshot, as its owner named it.
        #[arg(value_name = "SNAPSHOT")]
        name: String,
        /// Its owner: uid:N, uid:N+gid:M, cert:HEX (a prefix will do).
        #[arg(long, value_name = "OWNER")]
        owner: String,
        /// The published name (default: the same).
        #[arg(long = "as", value_name = "NAME")]
        published: Option<String>,
    },
    /// Publish a disk image (a file or block device of the disks' size,
    /// copied now) as a snapshot for every owner.
    Import {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "IMAGE")]
        image: PathBuf,
    },
    /// Delete a snapshot (its clones keep working; its bytes go with the
    /// last of them).
    DeleteSnapshot {
        #[arg(value_name = "SNAPSHOT")]
        name: String,
        /// Whose: an owner selector, or `published` (the default).
        #[arg(long, value_name = "OWNER", default_value = "published")]
        owner: String,
    },
}

/// The request a command asks, its name read from standard input if it
/// is `-`.
fn request(command: &CtlCommand) -> Result<Request, name::NameError> {
    let named = |name: &String| name::resolve(Some(name.clone())).map(Option::unwrap_or_default);
    Ok(match command {
        CtlCommand::List => Request::List,
        CtlCommand::Show { name, owner } => Request::Show {
            name: named(name)?,
            owner: owner.clone(),
        },
        CtlCommand::Drop { name, owner } => Request::Drop {
            name: named(name)?,
            owner: owner.clone(),
        },
        CtlCommand::Keep { name, owner, time } => Request::Keep {
            name: named(name)?,
            owner: owner.clone(),
            for_s: time.map(|t| t.as_secs_f64()),
        },
        CtlCommand::Status => Request::Status,
        CtlCommand::Snapshots => Request::Snapshots,
        CtlCommand::Publish {
            name,
            owner,
            published,
        } => Request::Publish {
            name: name.clone(),
            owner: owner.clone(),
            published: published.clone().unwrap_or_else(|| name.clone()),
        },
        CtlCommand::Import { name, image } => Request::Import {
            name: name.clone(),
            image: image.to_string_lossy().into_owned(),
        },
        CtlCommand::DeleteSnapshot { name, owner } => Request::DeleteSnapshot {
            name: name.clone(),
            owner: owner.clone(),
        },
    })
}

/// Runs `scratchd ctl`; its exit status.
pub fn main(args: CtlArgs) -> i32 {
    let req = match request(&args.command) {
        Ok(req) => req,
        Err(e) => return crate::cli::fail("ctl", &e, true, 1),
    };
    let reply = match ask(&args.control, &req) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("scratchd ctl: {}: {e}", args.control.display());
            return 1;
        }
    };
    if reply.get("ok") != Some(&Value::Bool(true)) {
        let error = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("malformed answer");
        eprintln!("scratchd ctl: {error}");
        return 1;
    }
    let result = reply.get("result").cloned().unwrap_or(Value::Null);
    if args.json {
        println!("{result:#}");
        return 0;
    }
    let printed = match &args.command {
        CtlCommand::List => serde_json::from_value(result).map(|r: ExportsResult| {
            print!("{}", table(&r.exports));
        }),
        CtlCommand::Show { .. } => serde_json::from_value(result).map(|r: ExportsResult| {
            for e in &r.exports {
                print!("{}", detail(e));
            }
        }),
        CtlCommand::Drop { .. } => serde_json::from_value(result).map(|r: ActedResult| {
            for a in r.acted {
                println!(
                    "dropped {} of {} ({} connection{} closed)",
                    a.name,
                    a.owner,
                    a.connections,
                    if a.connections == 1 { "" } else { "s" }
                );
            }
        }),
        CtlCommand::Keep { time, .. } => serde_json::from_value(result).map(|r: ActedResult| {
            let how = match time {
                Some(t) => format!(
                    "for {} after its last connection (from now if it has none)",
                    human_secs(t.as_secs_f64())
                ),
                None => "until dropped".to_owned(),
            };
            for a in r.acted {
                println!("keeping {} of {} {how}", a.name, a.owner);
            }
        }),
        CtlCommand::Status => {
            serde_json::from_value(result).map(|s: Status| print!("{}", status_text(&s)))
        }
        CtlCommand::Snapshots
        | CtlCommand::Publish { .. }
        | CtlCommand::Import { .. }
        | CtlCommand::DeleteSnapshot { .. } => serde_json::from_value(result)
            .map(|r: SnapshotsResult| print!("{}", snapshot_table(&r.snapshots))),
    };
    match printed {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("scratchd ctl: unexpected answer: {e}");
            1
        }
    }
}

/// Sends `req` and reads the answer.
fn ask(path: &Path, req: &Request) -> io::Result<Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream.take(16 << 20)).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Bytes as 1.5G, 20M, 512K, 17.
fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if v < 10.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.0}{unit}")
            };
        }
    }
    n.to_string()
}

/// Seconds as 42s, 3m20s, 2h5m.
fn human_secs(s: f64) -> String {
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// The state column: live, lingering 30s, kept, kept 1h0m.
fn state_text(e: &ExportRow) -> String {
    match (e.state.as_str(), e.expires_in_s) {
        ("live", _) if e.keep.is_some() => "live (keep)".to_owned(),
        (state, Some(s)) => format!("{state} {}", human_secs(s)),
        (state, None) => state.to_owned(),
    }
}

/// `ctl list`'s table.
fn table(exports: &[ExportRow]) -> String {
    let header = [
        "NAME", "OWNER", "CLASS", "SIZE", "ALLOC", "CONN", "AGE", "STATE", "READ", "WRITTEN", "OPS",
    ];
    let rows: Vec<[String; 11]> = exports
        .iter()
        .map(|e| {
            [
                e.name.clone(),
                e.owner.clone(),
                e.class.clone(),
                human_bytes(e.size),
                human_bytes(e.allocated_bytes),
                e.connections.to_string(),
                human_secs(e.age_s),
                state_text(e),
                human_bytes(e.io.read_bytes),
                human_bytes(e.io.written_bytes),
                (e.io.reads + e.io.writes + e.io.trims + e.io.zeroes).to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `ctl snapshots`' table.
fn snapshot_table(snapshots: &[SnapshotRow]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{:<24}  {:<16}  {:>8}  {:>8}  {:>6}  {:>8}  SOURCE\n",
        "NAME", "OWNER", "SIZE", "BYTES", "CLONES", "AGE"
    );
    for s in snapshots {
        out.push_str(&format!(
            "{:<24}  {:<16}  {:>8}  {:>8}  {:>6}  {:>8}  {}\n",
            s.name,
            s.owner,
            human_bytes(s.size),
            human_bytes(s.bytes),
            s.clones,
            human_secs(s.age_s),
            s.source
        ));
    }
    out
}

/// `ctl show`'s text for one export.
fn detail(e: &ExportRow) -> String {
    let keep = match e.keep.as_deref() {
        None => "no".to_owned(),
        Some("forever") => "until dropped".to_owned(),
        Some(k) => match k.split_once(':') {
            Some(("after", s)) => format!(
                "for {} after its last connection",
                human_secs(s.parse().unwrap_or(0.0))
            ),
            Some(("until", s)) => format!("{} more", human_secs(s.parse().unwrap_or(0.0))),
            _ => k.to_owned(),
        },
    };
    format!(
        "export:          {}\nowner:           {}\nbackend:         {}\nclass:           {}\nsize:            {} ({} bytes)\n\
         allocated:       {} ({} bytes)\nstate:           {}\nkeep:            {keep}\n\
         connections:     {} now, {} in all\nage:             {}\n\
         reads:           {} ({} bytes)\nwrites:          {} ({} bytes)\n\
         trims:           {} ({} bytes)\nzeroes:          {} ({} bytes)\n\
         flushes dropped: {}\nFUA dropped:     {}\nerrors:          {}\n\n",
        e.name,
        e.owner,
        e.backend,
        e.class,
        human_bytes(e.size),
        e.size,
        human_bytes(e.allocated_bytes),
        e.allocated_bytes,
        state_text(e),
        e.connections,
        e.connections_total,
        human_secs(e.age_s),
        e.io.reads,
        e.io.read_bytes,
        e.io.writes,
        e.io.written_bytes,
        e.io.trims,
        e.io.trimmed_bytes,
        e.io.zeroes,
        e.io.zeroed_bytes,
        e.io.flushes_dropped,
        e.io.fua_dropped,
        errors_text(e),
    )
}

/// Error replies as `ENOSPC 3, EINVAL 1`, or `none`.
fn errors_text(e: &ExportRow) -> String {
    if e.errors.is_empty() {
        return "none".to_owned();
    }
    let counts: Vec<String> = e
        .errors
        .iter()
        .map(|(errno, n)| format!("{errno} {n}"))
        .collect();
    counts.join(", ")
}

/// The pools by class, when a class has one of its own: ` (default 2 of
/// 2, big-* 1 of 1)`.
fn pools_text(pools: &[crate::ops::admin::Pool]) -> String {
    let each: Vec<String> = pools
        .iter()
        .filter(|p| p.target > 0)
        .map(|p| format!("{} {} of {}", p.class, p.ready, p.target))
        .collect();
    let only_default = pools
        .iter()
        .all(|p| p.target == 0 || p.class == DEFAULT_CLASS);
    if only_default {
        return String::new();
    }
    format!(" ({})", each.join(", "))
}

/// `ctl status`'s text.
fn status_text(s: &Status) -> String {
    let budget = |b: Option<crate::ops::admin::Budget>| match b {
        Some(b) => format!(
            "{} of {} ({:.1}%)",
            human_bytes(b.used),
            human_bytes(b.limit),
            b.used as f64 * 100.0 / b.limit.max(1) as f64
        ),
        None => "-".to_owned(),
    };
    format!(
        "backend:      {}\nuptime:       {}\nmemory:       {}\ndisk:         {}\n\
         exports:      {} live, {} created, {} destroyed\n\
         connections:  {} open, {} accepted, {} refused\npool ready:   {}{}\n",
        s.backend,
        human_secs(s.uptime_s),
        budget(s.memory),
        budget(s.disk),
        s.exports_live,
        s.exports_created,
        s.exports_destroyed,
        s.connections,
        s.connections_accepted,
        s.connections_refused,
        s.pool_ready,
        pools_text(&s.pools),
    )
}
