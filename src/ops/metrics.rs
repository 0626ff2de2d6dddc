//! `serve --metrics ADDR`: Prometheus text at `http://ADDR/metrics`.
//!
//! Each scrape takes one [`Snapshot`](crate::ops::admin::Snapshot) (the numbers
//! `ctl` shows) and encodes it with `prometheus-client`, through a
//! [`Collector`] rather than live metric objects: the registry's own
//! counters are the truth, and nothing is added to the data path. The HTTP
//! side is the least that Prometheus, curl and a browser need: one GET per
//! connection, answered and closed, on one thread.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use scratchd_server::busy_poll::BusyPolling;
use scratchd_server::counters::ServerCounters;
use MetricType::{Counter, Gauge};

use crate::ops::admin::{Admin, Budget, ExportRow, Pool, SnapshotRow, Status};

/// How long one scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves scrapes on a thread of its own; the bound
/// address (for port 0).
pub fn serve(addr: &str, admin: Arc<Admin>) -> io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        io::Error::new(e.kind(), format!("--metrics: cannot listen on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let hosts = Hosts::of(addr);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshots(admin)));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &registry, &hosts) {
                            debug!(error = %e, "metrics client");
                        }
                    }
                    Err(e) => warn!(error = %e, "metrics accept failed"),
                }
            }
        })?;
    Ok(bound)
}

/// The names a scraper may call this endpoint by (the `Host` header). The
/// metrics name every disk and its owner, so a web page must not read
/// them through DNS rebinding (a name of its own that it points at this
/// address): only IP literals, `localhost`, the host named in `--metrics`
/// and this machine's host name are answered.
struct Hosts {
    configured: String,
    nodename: String,
}

impl Hosts {
    fn of(addr: &str) -> Self {
        Hosts {
            configured: host_part(addr).to_ascii_lowercase(),
            nodename: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase(),
        }
    }

    /// Whether a request with this `Host` header (none: an HTTP/1.0
    /// client, which no browser is) may be answered.
    fn allow(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let name = host_part(host).to_ascii_lowercase();
        name.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
            || name == "localhost"
            || name == self.configured
            || name == self.nodename
    }
}

/// `host` of `host:port`, `[v6]:port`, `host` or `v6`.
fn host_part(text: &str) -> &str {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => text,
    }
}

/// Answers one HTTP request: `GET /metrics` (or `/`), else 404; 403 when
/// its `Host` is not one of this endpoint's names.
fn answer(stream: TcpStream, registry: &Registry, hosts: &Hosts) -> io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let timed = crate::ops::timed_read::Timed::new(&stream, REQUEST_TIMEOUT);
    let mut reader = BufReader::new(io::Read::take(timed, 64 * 1024));
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Headers up to the blank line: only Host matters.
    let mut header = String::new();
    let mut host = None;
    while reader.read_line(&mut header)? > 2 {
        if let Some((name, value)) = header.split_once(':') {
            if name.trim().eq_ignore_ascii_case("host") {
                host = Some(value.trim().to_owned());
            }
        }
        header.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, kind, body) = match (method, path) {
        _ if !hosts.allow(host.as_deref()) => {
            warn!(
                host = host.as_deref().unwrap_or(""),
                "metrics request for another host name refused"
            );
            ("403 Forbidden", "text/plain", "unknown Host\n".to_owned())
        }
        ("GET" | "HEAD", "/metrics" | "/") => {
            let mut body = String::new();
            match prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".to_owned(),
                ),
            }
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    (&stream).write_all(&out)
}

/// Encodes a fresh snapshot at each scrape.
struct Snapshots(Arc<Admin>);

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshots")
    }
}

type Labels = Vec<(&'static str, String)>;

fn export_labels(e: &ExportRow) -> Labels {
    vec![
        ("export", e.name.clone()),
        ("owner", e.owner.clone()),
        ("backend", e.backend.clone()),
        ("class", e.class.clone()),
    ]
}

/// The per-export error series: one per export and errno that occurred
/// (all eight for every disk would be mostly zeros, and exports are many).
fn by_errno(exports: &[ExportRow]) -> Vec<(Labels, u64)> {
    let mut out = Vec::new();
    for e in exports {
        for (errno, n) in &e.errors {
            let mut labels = export_labels(e);
            labels.push(("errno", errno.clone()));
            out.push((labels, *n));
        }
    }
    out
}

/// Writes one metric family: `values` by label set.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in values {
        let m = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v).encode(m)?,
            _ => ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(m)?,
        }
    }
    Ok(())
}

/// The metric families, in the order they are exposed: per export, the
/// registry's totals, connections, the server's events, creation times.
impl Collector for Snapshots {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.0.snapshot();
        let (e, s) = (&mut encoder, &snap.status);
        export_sizes(e, &snap.exports)?;
        export_io(e, &snap.exports)?;
        budgets(e, s)?;
        export_totals(e, s)?;
        pools(e, s)?;
        snapshots(e, &self.0.snapshots())?;
        connections(e, s)?;
        server_events(e, &self.0.server.counters)?;
        busy_polling(e, &self.0.server.busy_polling)?;
        creation_histogram(e, s)
    }
}

/// One value per export.
fn per_export(exports: &[ExportRow], f: impl Fn(&ExportRow) -> u64) -> Vec<(Labels, u64)> {
    exports.iter().map(|e| (export_labels(e), f(e))).collect()
}

/// Four values per export, one per data command.
fn by_command(exports: &[ExportRow], f: impl Fn(&ExportRow) -> [u64; 4]) -> Vec<(Labels, u64)> {
    let mut out = Vec::new();
    for e in exports {
        let values = f(e);
        for (command, v) in ["read", "write", "trim", "write_zeroes"].iter().zip(values) {
            let mut labels = export_labels(e);
            labels.push(("command", (*command).to_owned()));
            out.push((labels, v));
        }
    }
    out
}

/// One unlabelled value.
fn single(v: u64) -> [(Labels, u64); 1] {
    [(Labels::new(), v)]
}

/// Values labelled by one name (`errno`, `reason`, ...).
fn labelled(label: &'static str, values: Vec<(&'static str, u64)>) -> Vec<(Labels, u64)> {
    values
        .into_iter()
        .map(|(v, n)| (vec![(label, v.to_owned())], n))
        .collect()
}

/// Each export's connections and space.
fn export_sizes(e: &mut DescriptorEncoder, exports: &[ExportRow]) -> Result<(), std::fmt::Error> {
    family(
        e,
        "scratchd_export_connections",
        "Connections open on the export",
        Gauge,
        &per_export(exports, |e| e.connections),
    )?;
    family(
        e,
        "scratchd_export_connections_opened",
        "Connections the export has had",
        Counter,
        &per_export(exports, |e| e.connections_total),
    )?;
    family(
        e,
        "scratchd_export_allocated_bytes",
        "Memory or disk space the export holds",
        Gauge,
        &per_export(exports, |e| e.allocated_bytes),
    )?;
    family(
        e,
        "scratchd_export_shared_bytes",
        "Bytes of the snapshot a clone reads through to (held once for all its clones)",
        Gauge,
        &per_export(exports, |e| e.shared_bytes),
    )?;
    family(
        e,
        "scratchd_export_size_bytes",
        "Size of the export",
        Gauge,
        &per_export(exports, |e| e.size),
    )
}

/// Each export's requests: bytes and operations by command, flushes and
/// FUA dropped, error replies.
fn export_io(e: &mut DescriptorEncoder, exports: &[ExportRow]) -> Result<(), std::fmt::Error> {
    family(
        e,
        "scratchd_export_bytes",
        "Bytes by command",
        Counter,
        &by_command(exports, |e| {
            [
                e.io.read_bytes,
                e.io.written_bytes,
                e.io.trimmed_bytes,
                e.io.zeroed_bytes,
            ]
        }),
    )?;
    family(
        e,
        "scratchd_export_ops",
        "Requests by command",
        Counter,
        &by_command(exports, |e| {
            [e.io.reads, e.io.writes, e.io.trims, e.io.zeroes]
        }),
    )?;
    family(
        e,
        "scratchd_export_flushes_dropped",
        "FLUSH requests answered without doing anything",
        Counter,
        &per_export(exports, |e| e.io.flushes_dropped),
    )?;
    family(
        e,
        "scratchd_export_fua_dropped",
        "Requests whose FUA flag was ignored",
        Counter,
        &per_export(exports, |e| e.io.fua_dropped),
    )?;
    family(
        e,
        "scratchd_export_errors",
        "Error replies sent for the export's requests, by errno (those that occurred)",
        Counter,
        &by_errno(exports),
    )
}

/// The memory and disk budgets, those that are set.
fn budgets(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    let by_kind = |f: &dyn Fn(&Budget) -> u64| -> Vec<(Labels, u64)> {
        [("memory", s.memory), ("disk", s.disk)]
            .into_iter()
            .filter_map(|(kind, b)| b.map(|b| (vec![("kind", kind.to_owned())], f(&b))))
            .collect()
    };
    family(
        e,
        "scratchd_budget_used_bytes",
        "Bytes of the budget in use",
        Gauge,
        &by_kind(&|b| b.used),
    )?;
    family(
        e,
        "scratchd_budget_limit_bytes",
        "The budget's limit",
        Gauge,
        &by_kind(&|b| b.limit),
    )
}

/// Exports now, created and destroyed.
fn export_totals(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    family(
        e,
        "scratchd_exports",
        "Exports now (being created, live or lingering)",
        Gauge,
        &single(s.exports_live),
    )?;
    family(
        e,
        "scratchd_exports_created",
        "Exports created",
        Counter,
        &single(s.exports_created),
    )?;
    family(
        e,
        "scratchd_exports_destroyed",
        "Exports destroyed",
        Counter,
        &single(s.exports_destroyed),
    )
}

/// Each class's pool of formatted disks.
fn pools(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    let by_class = |f: &dyn Fn(&Pool) -> u64| -> Vec<(Labels, u64)> {
        s.pools
            .iter()
            .map(|p| (vec![("class", p.class.clone())], f(p)))
            .collect()
    };
    family(
        e,
        "scratchd_pool_ready",
        "Formatted disks ready in the class's pool",
        Gauge,
        &by_class(&|p| p.ready),
    )?;
    family(
        e,
        "scratchd_pool_target",
        "Formatted disks the class's pool keeps ready (pool=)",
        Gauge,
        &by_class(&|p| p.target),
    )
}

/// Each snapshot's bytes and clones, and their number.
fn snapshots(e: &mut DescriptorEncoder, rows: &[SnapshotRow]) -> Result<(), std::fmt::Error> {
    let each = |f: &dyn Fn(&SnapshotRow) -> u64| -> Vec<(Labels, u64)> {
        rows.iter()
            .map(|r| {
                let labels = vec![("snapshot", r.name.clone()), ("owner", r.owner.clone())];
                (labels, f(r))
            })
            .collect()
    };
    family(
        e,
        "scratchd_snapshots",
        "Snapshots held under a name (owners' and published)",
        Gauge,
        &single(rows.len() as u64),
    )?;
    family(
        e,
        "scratchd_snapshot_bytes",
        "Bytes of data a snapshot holds, once whatever its clones",
        Gauge,
        &each(&|r| r.bytes),
    )?;
    family(
        e,
        "scratchd_snapshot_clones",
        "Disks alive that started as the snapshot",
        Gauge,
        &each(&|r| r.clones),
    )
}

/// Connections open, accepted and refused at accept.
fn connections(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    family(
        e,
        "scratchd_connections",
        "Connections open",
        Gauge,
        &single(s.connections),
    )?;
    family(
        e,
        "scratchd_connections_accepted",
        "Connections accepted",
        Counter,
        &single(s.connections_accepted),
    )?;
    family(
        e,
        "scratchd_connections_refused",
        "Connections closed at accept (--allow, limits)",
        Counter,
        &single(s.connections_refused),
    )
}

/// The server's own event counters: error replies, failed handshakes,
/// TLS handshakes.
fn server_events(e: &mut DescriptorEncoder, c: &ServerCounters) -> Result<(), std::fmt::Error> {
    family(
        e,
        "scratchd_errors",
        "NBD error replies sent, by errno",
        Counter,
        &labelled("errno", c.errors()),
    )?;
    family(
        e,
        "scratchd_handshake_failures",
        "Handshakes that ended without transmission, by reason",
        Counter,
        &labelled("reason", c.handshake_failures()),
    )?;
    let (completed, failed) = c.tls_handshakes();
    family(
        e,
        "scratchd_tls_handshakes",
        "TLS handshakes, by result",
        Counter,
        &labelled("result", vec![("completed", completed), ("failed", failed)]),
    )
}

/// What the connections' spins for their next request caught
/// (`--busy-poll`).
fn busy_polling(e: &mut DescriptorEncoder, b: &BusyPolling) -> Result<(), std::fmt::Error> {
    let (caught, missed) = b.outcomes();
    family(
        e,
        "scratchd_busy_poll_waits",
        "Waits for a client's next request that spun first, by whether it came during the spin",
        Counter,
        &labelled("outcome", vec![("caught", caught), ("missed", missed)]),
    )
}

/// How long creating a scratch disk took, as a histogram.
fn creation_histogram(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = s
        .creation_buckets_ms
        .iter()
        .map(|ms| ms / 1e3)
        .chain([f64::INFINITY])
        .zip(s.creation_counts.iter().copied())
        .collect();
    let count = s.creation_counts.iter().sum();
    let mut m = e.encode_descriptor(
        "scratchd_export_creation_seconds",
        "Time to create (and format) a scratch disk",
        None,
        MetricType::Histogram,
    )?;
    m.encode_histogram::<NoLabelSet>(
        s.creation_seconds_sum,
        count,
        &buckets,
        None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_endpoints_names_are_answered() {
        let hosts = Hosts {
            configured: "metrics.farm".into(),
            nodename: "builder7".into(),
        };
        for ok in [
            None,
            Some("127.0.0.1:9810"),
            Some("[::1]:9810"),
            Some("::1"),
            Some("localhost:9810"),
            Some("Metrics.Farm:9810"),
            Some("builder7"),
        ] {
            assert!(hosts.allow(ok), "{ok:?}");
        }
        for refused in [
            "rebind.attacker.example:9810",
            "builder7.attacker.example",
            "",
        ] {
            assert!(!hosts.allow(Some(refused)), "{refused:?}");
        }
    }

    #[test]
    fn the_host_part_of_an_address() {
        assert_eq!(host_part("127.0.0.1:9810"), "127.0.0.1");
        assert_eq!(host_part("[::1]:9810"), "::1");
        assert_eq!(host_part("::1"), "::1");
        assert_eq!(host_part("name"), "name");
    }
}
