//! Prometheus metrics on `[metrics] listen`: `GET /metrics` answers the
//! text exposition of one status snapshot (the same the control socket
//! gives), encoded with prometheus-client. Names and units follow the
//! Prometheus conventions (`_total` counters, `_seconds`, `_bytes`).
//!
//! The port is for a scraper on a management network: one connection at a
//! time, a request head of at most 8 KiB read within 2 s, nothing else
//! parsed; a stranger can delay a scrape by 2 s at most per connection and
//! cannot reach the node's loop beyond one status request per scrape.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::control::{Request, Status};
use crate::failover::Role;

const HEAD_MAX: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Upper bounds (seconds) of the histogram buckets; +Inf follows.
pub const BUCKETS_S: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram as status carries it: per-bucket (not cumulative) counts
/// for [`BUCKETS_S`] and a last one for +Inf.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistSnapshot {
    pub sum_s: f64,
    pub count: u64,
    pub buckets: Vec<u64>,
}

impl HistSnapshot {
    /// From an hdrhistogram of microseconds.
    pub fn from_micros(h: &hdrhistogram::Histogram<u64>) -> HistSnapshot {
        // Each recorded value in exactly one bucket (count_between works on
        // the histogram's own buckets, which straddle these bounds).
        let mut buckets = vec![0u64; BUCKETS_S.len() + 1];
        for v in h.iter_recorded() {
            let us = h.highest_equivalent(v.value_iterated_to());
            let i = BUCKETS_S
                .iter()
                .position(|b| us as f64 <= b * 1e6)
                .unwrap_or(BUCKETS_S.len());
            buckets[i] += v.count_at_value();
        }
        HistSnapshot {
            sum_s: if h.is_empty() {
                0.0
            } else {
                h.mean() * h.len() as f64 / 1e6
            },
            count: h.len(),
            buckets,
        }
    }
}

#[derive(Debug)]
struct Hist(HistSnapshot);

impl EncodeMetric for Hist {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = BUCKETS_S
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(self.0.buckets.iter().copied().chain(std::iter::repeat(0)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum_s, self.0.count, &buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PortLabel {
    port: String,
}

/// The text exposition of `s`.
pub fn render(s: &Status) -> String {
    let mut r = Registry::with_prefix("hasync");
    let roles = Family::<RoleLabel, Gauge>::default();
    for role in [
        Role::Negotiating,
        Role::Promoting,
        Role::Primary,
        Role::Secondary,
        Role::HandingOver,
        Role::Failed,
        Role::Off,
    ] {
        roles
            .get_or_create(&RoleLabel {
                role: role.to_string(),
            })
            .set(i64::from(s.mode == role));
    }
    r.register("role", "1 for the node's current role", roles);
    gauge(&mut r, "epoch", "The node's epoch", s.epoch as i64);
    gauge(
        &mut r,
        "peer_alive",
        "1 while heartbeats from the peer arrive",
        i64::from(s.peer.alive),
    );
    if let Some(age) = s.peer.last_heartbeat_age_ms {
        r.register_with_unit(
            "peer_heartbeat_age",
            "Time since the peer's last heartbeat",
            Unit::Seconds,
            ConstGauge::new(age as f64 / 1000.0),
        );
    }
    if let Some(h) = &s.link.heartbeat_gap {
        r.register_with_unit(
            "heartbeat_gap",
            "Gaps between consecutive heartbeats received",
            Unit::Seconds,
            Hist(h.clone()),
        );
    }
    counter(
        &mut r,
        "heartbeats_sent",
        "Heartbeats sent",
        s.link.heartbeats_sent,
    );
    counter(
        &mut r,
        "heartbeats_received",
        "Heartbeats received",
        s.link.heartbeats_received,
    );
    let auth = Family::<PortLabel, prometheus_client::metrics::counter::Counter>::default();
    auth.get_or_create(&PortLabel {
        port: "heartbeat".into(),
    })
    .inc_by(s.link.heartbeat_port.auth_failures);
    auth.get_or_create(&PortLabel {
        port: "sync".into(),
    })
    .inc_by(s.replication.sync_port.auth_failures);
    r.register(
        "auth_failures",
        "Connections that failed authentication, per port",
        auth,
    );
    let rp = &s.replication;
    if let Some(h) = &rp.lag {
        r.register_with_unit(
            "replication_lag",
            "Time from a change on the primary to its durable ack from the secondary",
            Unit::Seconds,
            Hist(h.clone()),
        );
    }
    gauge(
        &mut r,
        "replication_backlog_ops",
        "Changes queued or in flight to the secondary",
        (rp.ops_pending + rp.ops_inflight) as i64,
    );
    gauge(
        &mut r,
        "replication_connected",
        "1 while a sync session is up",
        i64::from(rp.connected),
    );
    gauge(
        &mut r,
        "replica_caught_up",
        "1 once the secondary's replica is complete",
        i64::from(rp.caught_up),
    );
    gauge(
        &mut r,
        "replica_incomplete",
        "1 while this node's first sync has not finished (it does not take over on its own)",
        i64::from(rp.replica_incomplete),
    );
    gauge(
        &mut r,
        "disk_full",
        "1 while replication is paused for a full disk",
        i64::from(rp.disk_full || rp.peer_disk_full),
    );
    gauge(
        &mut r,
        "unwatched_folders",
        "Folders whose inotify watch failed and that are not watched yet (tried again after 30 s, the wait doubling up to 5 min; the stores compared with the replica at each retry)",
        rp.unwatched_folders as i64,
    );
    gauge(
        &mut r,
        "tracker_stalled",
        "1 while the change tracker has not read past a held delete's look for 10 s or more",
        i64::from(rp.tracker_stalled_s.is_some()),
    );
    gauge(
        &mut r,
        "conflict_refused",
        "1 while the primary refuses the versions this secondary hands over (the status says why)",
        i64::from(rp.conflict_refused.is_some()),
    );
    for (name, help, v) in [
        ("files_sent", "Files sent to the secondary", rp.files_sent),
        (
            "files_landed",
            "Files landed in the replica",
            rp.files_landed,
        ),
        ("renames_sent", "Renames sent as renames", rp.renames_sent),
        (
            "renames_applied",
            "Renames applied on the replica",
            rp.renames_applied,
        ),
        (
            "deletes_applied",
            "Deletions applied on the replica",
            rp.deletes_applied,
        ),
        (
            "deletes_held_for_room",
            "Deletions and replacements held back while their content waits for room under another name",
            rp.deletes_held_for_room,
        ),
        (
            "deletes_held_for_move",
            "Deletions of names found gone held back until their content lands under another name or the primary confirms them",
            rp.deletes_held_for_move,
        ),
        (
            "verify_runs",
            "Anti-entropy comparisons run",
            rp.verify_runs,
        ),
        (
            "drift_repaired",
            "Paths repaired as drift by anti-entropy",
            rp.repaired,
        ),
        (
            "refused_paths",
            "Paths the replica refused (unsafe names, metadata)",
            rp.refused_paths,
        ),
        (
            "conflicts_kept",
            "Versions kept aside as conflicts on this node",
            rp.conflicts_kept,
        ),
        (
            "foreign_writes",
            "Paths of the replica changed by another process",
            rp.foreign_writes,
        ),
        (
            "inotify_overflows",
            "Kernel event queue overflows (each followed by a rescan)",
            rp.inotify_overflows,
        ),
    ] {
        counter(&mut r, name, help, v);
    }
    r.register_with_unit(
        "sent",
        "File content sent to the secondary",
        Unit::Bytes,
        ConstCounter::new(rp.content_bytes_sent),
    );
    r.register_with_unit(
        "landed",
        "File content landed in the replica",
        Unit::Bytes,
        ConstCounter::new(rp.bytes_landed),
    );
    gauge(
        &mut r,
        "conflicts",
        "Versions kept aside now",
        s.conflicts.count as i64,
    );
    counter(
        &mut r,
        "log_records_dropped",
        "Log records dropped because the log writer fell behind (a stalled journal or stderr)",
        crate::logging::dropped(),
    );
    let q = &s.queue_push;
    counter(
        &mut r,
        "queue_pushes_requested",
        "Queue pushes raised",
        q.requested,
    );
    counter(
        &mut r,
        "queue_ingested",
        "Pushed queue messages ingested on this node",
        q.ingest.ingested,
    );
    counter(
        &mut r,
        "queue_duplicates_dropped",
        "Pushed queue messages dropped as duplicates by the ledger",
        q.ingest.duplicates_dropped,
    );
    gauge(
        &mut r,
        "ledger_entries",
        "Entries in the queue dedup ledger",
        q.ingest.ledger_entries as i64,
    );
    gauge(
        &mut r,
        "alarms_recent",
        "Alarms in the node's recent alarm list",
        s.alarms.len() as i64,
    );
    gauge(
        &mut r,
        "quorum_targets_reached",
        "Ping quorum targets reached",
        s.quorum.reached as i64,
    );
    gauge(
        &mut r,
        "service_address_held",
        "1 while this node holds its service addresses",
        i64::from(s.vip.held),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    prometheus_text(&out)
}

/// prometheus-client writes OpenMetrics; scrapers and `promtool` also take
/// the classic text format (0.0.4), in which a counter's HELP and TYPE
/// name the `_total` series and there is no UNIT line or `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Binds the metrics port (a startup error when it cannot).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

type ControlMsg = (Request, oneshot::Sender<super::control::Response>);

/// Serves scrapes until the node's loop is gone.
pub fn serve(
    listener: TcpListener,
    to_node: mpsc::Sender<ControlMsg>,
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    for stream in listener.incoming() {
        if stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let Ok(stream) = stream else { continue };
        scrape(stream, &to_node);
        if to_node.is_closed() {
            return;
        }
    }
}

fn scrape(mut stream: TcpStream, to_node: &mpsc::Sender<ControlMsg>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= HEAD_MAX || std::time::Instant::now() >= deadline {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large or too slow\n",
            );
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.trim_ascii().split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" {
        let _ = respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
        );
        return;
    }
    if path != b"/metrics" {
        let _ = respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n",
        );
        return;
    }
    let (tx, rx) = oneshot::channel();
    if to_node.blocking_send((Request::Status, tx)).is_err() {
        return;
    }
    let Ok(resp) = rx.blocking_recv() else { return };
    match resp.status {
        Some(s) => {
            let _ = respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &render(&s),
            );
        }
        None => {
            let _ = respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "no status\n",
            );
        }
    }
}

fn respond(stream: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Closing with unread input would reset the connection and could
    // destroy the answer on its way: end the answer, then discard what the
    // client still sends (bounded in time and size).
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let until = std::time::Instant::now() + Duration::from_millis(500);
    while left > 0 && std::time::Instant::now() < until {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_snapshot_puts_every_value_in_one_bucket() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in [500, 900, 1_000, 3_000, 70_000, 250_010, 20_000_000] {
            h.record(us).unwrap();
        }
        let s = HistSnapshot::from_micros(&h);
        assert_eq!(s.buckets.iter().sum::<u64>(), 7, "{:?}", s.buckets);
        assert_eq!(
            s.buckets[8], 1,
            "250.01 ms in (0.25, 0.5] only: {:?}",
            s.buckets
        );
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in [500, 900, 1_000, 3_000, 70_000, 20_000_000] {
            h.record(us).unwrap();
        }
        let s = HistSnapshot::from_micros(&h);
        assert_eq!(s.count, 6);
        assert_eq!(s.buckets.iter().sum::<u64>(), 6);
        assert_eq!(s.buckets[0], 3, "<= 1 ms: {:?}", s.buckets);
        assert_eq!(*s.buckets.last().unwrap(), 1, "over 10 s: +Inf");
        assert!((s.sum_s - 20.0754).abs() < 0.1, "{}", s.sum_s);
    }
}
