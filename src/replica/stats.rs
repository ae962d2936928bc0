//! Counters shared between the replication thread and the daemon's status.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::tracker::TrackerStats;

#[derive(Debug)]
pub struct ReplStats {
    pub mode: Mutex<&'static str>,
    pub connected: AtomicBool,
    // sender
    pub files_sent: AtomicU64,
    pub content_bytes_sent: AtomicU64,
    /// Large files whose content went out by splice (zero-copy), and bytes.
    pub files_spliced: AtomicU64,
    pub bytes_spliced: AtomicU64,
    pub renames_sent: AtomicU64,
    pub links_sent: AtomicU64,
    pub deletes_sent: AtomicU64,
    pub dirs_sent: AtomicU64,
    pub symlinks_sent: AtomicU64,
    pub ops_acked: AtomicU64,
    pub ops_inflight: AtomicU64,
    pub ops_pending: AtomicU64,
    pub verify_runs: AtomicU64,
    pub repaired: AtomicU64,
    pub needs_received: AtomicU64,
    pub refused_by_peer: AtomicU64,
    pub peer_disk_full: AtomicBool,
    /// Since when a held delete's look has waited for the change tracker,
    /// while that is past `sender::TRACKER_STALL_WARN`.
    pub tracker_stalled_since: Mutex<Option<Instant>>,
    pub lag_us: Mutex<Histogram<u64>>,
    /// Where the lag goes, stage by stage (µs): see [`Stages`].
    pub stages: Mutex<Stages>,
    pub progress: Mutex<Progress>,
    // receiver
    pub files_landed: AtomicU64,
    pub bytes_landed: AtomicU64,
    pub renames_applied: AtomicU64,
    pub deletes_applied: AtomicU64,
    /// Deletions (and replacements: a rename, link, symlink, folder or file
    /// put over it) held back: the content waits for room under another name.
    pub deletes_held_for_room: AtomicU64,
    /// Unsure deletions held back: the file's content may have moved to a
    /// name still on its way.
    pub deletes_held_for_move: AtomicU64,
    pub links_applied: AtomicU64,
    pub hash_mismatches: AtomicU64,
    pub refused_paths: AtomicU64,
    pub conflicts_kept: AtomicU64,
    /// Secondary: why the primary refused the last version handed over,
    /// until it acknowledges one or a session or a tenure as primary
    /// begins.
    pub conflict_refused: Mutex<Option<String>>,
    /// Paths in the replica changed by another process while secondary.
    pub foreign_writes: AtomicU64,
    /// Whether the secondary watches its replica for foreign writes.
    pub foreign_watch: Mutex<String>,
    /// Why the replica is latched unverified (a flush failed), if it is.
    pub unverified: Mutex<Option<String>>,
    /// When the secondary last acknowledged a batch as durable.
    pub last_ack: Mutex<Option<Instant>>,
    /// Secondary: since when the flush in flight runs, once it is overdue
    /// (`[replication] flush_alarm_ms`).
    pub flush_overdue_since: Mutex<Option<Instant>>,
    pub rename_sources_missing: AtomicU64,
    pub disk_full: AtomicBool,
    /// Receiver: the primary said the replica is complete.
    pub caught_up: AtomicBool,
    /// What this node's stores hold (`failover::ReplicaFill` as a number:
    /// 0 fresh, 1 filling, 2 complete; the durable marks, `replica::fill`).
    replica_fill: std::sync::atomic::AtomicU8,
    /// Zero-loss commit: true while commits are confirmed by the peer.
    pub synchronous: AtomicBool,
    pub commits_replicated: AtomicU64,
    pub commits_degraded: AtomicU64,
    pub tracker: Mutex<TrackerStats>,
    pub last_error: Mutex<Option<String>>,
    /// Admission on the sync port (strangers, authentication failures).
    pub gate: std::sync::Arc<crate::link::gate::GateStats>,
    /// Alarms raised on the replication thread, collected by the daemon
    /// into its alarm list (bounded: the oldest are dropped).
    pub alarms: Mutex<std::collections::VecDeque<String>>,
    /// Why the replica's disk counts as full, while it does.
    pub disk_full_why: Mutex<Option<String>>,
}

/// Alarms kept for the daemon to collect.
const ALARMS_QUEUED_MAX: usize = 64;

impl ReplStats {
    /// Queues an alarm for status (the caller logs it).
    /// What this node's stores hold.
    pub fn replica_fill(&self) -> crate::failover::ReplicaFill {
        use crate::failover::ReplicaFill;
        match self.replica_fill.load(Relaxed) {
            1 => ReplicaFill::Filling,
            2 => ReplicaFill::Complete,
            _ => ReplicaFill::Fresh,
        }
    }

    pub fn set_replica_fill(&self, fill: crate::failover::ReplicaFill) {
        use crate::failover::ReplicaFill;
        let n = match fill {
            ReplicaFill::Fresh => 0,
            ReplicaFill::Filling => 1,
            ReplicaFill::Complete => 2,
        };
        self.replica_fill.store(n, Relaxed);
    }

    pub fn raise_alarm(&self, message: String) {
        let mut q = self.alarms.lock().expect("alarms lock");
        if q.len() == ALARMS_QUEUED_MAX {
            q.pop_front();
        }
        q.push_back(message);
    }

    /// The alarms raised since the last call.
    pub fn take_alarms(&self) -> Vec<String> {
        self.alarms.lock().expect("alarms lock").drain(..).collect()
    }
}

/// Where the primary's sync session is (status shows it as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPhase {
    /// No session yet.
    #[default]
    Idle,
    /// The replica's manifest is asked for and compared (a session starts).
    Manifest,
    /// Filling the replica with what the first comparison found.
    InitialSync,
    /// A periodic comparison and what it found.
    Verifying,
    /// Live changes as they happen.
    Streaming,
}

impl SyncPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPhase::Idle => "",
            SyncPhase::Manifest => "manifest",
            SyncPhase::InitialSync => "initial-sync",
            SyncPhase::Verifying => "verifying",
            SyncPhase::Streaming => "streaming",
        }
    }

    /// A comparison's differences are being sent (progress is shown).
    pub fn is_catching_up(self) -> bool {
        matches!(self, SyncPhase::InitialSync | SyncPhase::Verifying)
    }
}

impl std::fmt::Display for SyncPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub phase: SyncPhase,
    pub total_files: u64,
    pub total_bytes: u64,
    pub done_files: u64,
    pub done_bytes: u64,
    pub started: Option<Instant>,
}

impl Default for ReplStats {
    fn default() -> Self {
        ReplStats {
            mode: Mutex::new("idle"),
            connected: AtomicBool::new(false),
            files_sent: AtomicU64::new(0),
            content_bytes_sent: AtomicU64::new(0),
            files_spliced: AtomicU64::new(0),
            bytes_spliced: AtomicU64::new(0),
            renames_sent: AtomicU64::new(0),
            links_sent: AtomicU64::new(0),
            deletes_sent: AtomicU64::new(0),
            dirs_sent: AtomicU64::new(0),
            symlinks_sent: AtomicU64::new(0),
            ops_acked: AtomicU64::new(0),
            ops_inflight: AtomicU64::new(0),
            ops_pending: AtomicU64::new(0),
            verify_runs: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            needs_received: AtomicU64::new(0),
            refused_by_peer: AtomicU64::new(0),
            peer_disk_full: AtomicBool::new(false),
            tracker_stalled_since: Mutex::new(None),
            lag_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds"),
            ),
            stages: Mutex::new(Stages::new()),
            progress: Mutex::new(Progress::default()),
            files_landed: AtomicU64::new(0),
            bytes_landed: AtomicU64::new(0),
            renames_applied: AtomicU64::new(0),
            deletes_applied: AtomicU64::new(0),
            deletes_held_for_room: AtomicU64::new(0),
            deletes_held_for_move: AtomicU64::new(0),
            links_applied: AtomicU64::new(0),
            hash_mismatches: AtomicU64::new(0),
            refused_paths: AtomicU64::new(0),
            conflicts_kept: AtomicU64::new(0),
            conflict_refused: Mutex::new(None),
            foreign_writes: AtomicU64::new(0),
            foreign_watch: Mutex::new("-".into()),
            unverified: Mutex::new(None),
            last_ack: Mutex::new(None),
            flush_overdue_since: Mutex::new(None),
            rename_sources_missing: AtomicU64::new(0),
            disk_full: AtomicBool::new(false),
            caught_up: AtomicBool::new(false),
            replica_fill: std::sync::atomic::AtomicU8::new(0),
            synchronous: AtomicBool::new(false),
            commits_replicated: AtomicU64::new(0),
            commits_degraded: AtomicU64::new(0),
            tracker: Mutex::new(TrackerStats::default()),
            last_error: Mutex::new(None),
            gate: Default::default(),
            alarms: Mutex::new(std::collections::VecDeque::new()),
            disk_full_why: Mutex::new(None),
        }
    }
}

/// Stage histograms (µs) that split the change → durable lag:
/// sender `queued` (change seen → its batch written to the socket) and
/// `sent_to_ack` (batch written → its ack handled by the sender) and, on
/// the secondary, `barrier_to_ack` (a batch's barrier read → its ack sent),
/// made of `data_flush` (a commit's first flush, until the loop saw it
/// finish) and `dir_flush` (the second, after the renames); `handle` is the
/// loop's time per message (its max shows the longest stall).
#[derive(Debug)]
pub struct Stages {
    pub queued: Histogram<u64>,
    pub sent_to_ack: Histogram<u64>,
    pub barrier_to_ack: Histogram<u64>,
    pub data_flush: Histogram<u64>,
    pub dir_flush: Histogram<u64>,
    pub handle: Histogram<u64>,
}

impl Stages {
    fn new() -> Stages {
        let h =
            || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds");
        Stages {
            queued: h(),
            sent_to_ack: h(),
            barrier_to_ack: h(),
            data_flush: h(),
            dir_flush: h(),
            handle: h(),
        }
    }

    pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) {
        let _ = h.record(d.as_micros().max(1) as u64);
    }
}

/// p50 / p99 / max of one stage, in ms.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct StageStatus {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: u64,
}

fn stage(h: &Histogram<u64>) -> Option<StageStatus> {
    (!h.is_empty()).then(|| StageStatus {
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        max: h.max() as f64 / 1000.0,
        samples: h.len(),
    })
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// The snapshot `hasync status` shows.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Default)]
pub struct ReplStatus {
    pub mode: String,
    pub connected: bool,
    pub phase: String,
    pub progress: Option<ProgressStatus>,
    pub files_sent: u64,
    pub content_bytes_sent: u64,
    pub files_spliced: u64,
    pub bytes_spliced: u64,
    pub renames_sent: u64,
    pub links_sent: u64,
    pub deletes_sent: u64,
    pub dirs_sent: u64,
    pub ops_acked: u64,
    pub ops_inflight: u64,
    pub ops_pending: u64,
    pub verify_runs: u64,
    pub repaired: u64,
    pub needs_received: u64,
    pub refused_by_peer: u64,
    pub peer_disk_full: bool,
    /// Primary: how long the change tracker has not read past a held
    /// delete's look (its thread stuck, or its reads always full), once
    /// that is past 10 s; those deletes wait meanwhile, and so do
    /// `CaughtUp` and a switchover's drain. Absent otherwise.
    #[serde(default)]
    pub tracker_stalled_s: Option<u64>,
    pub lag_ms_p50: Option<f64>,
    pub lag_ms_p99: Option<f64>,
    pub lag_ms_p999: Option<f64>,
    pub lag_ms_max: Option<f64>,
    pub lag_samples: u64,
    /// The change → durable lag as a histogram (for metrics).
    #[serde(default)]
    pub lag: Option<crate::daemon::metrics::HistSnapshot>,
    /// Stage breakdown of the lag (ms); absent until a stage has samples.
    #[serde(default)]
    pub stages_ms: std::collections::BTreeMap<String, StageStatus>,
    pub files_landed: u64,
    pub bytes_landed: u64,
    pub renames_applied: u64,
    pub deletes_applied: u64,
    #[serde(default)]
    pub deletes_held_for_room: u64,
    #[serde(default)]
    pub deletes_held_for_move: u64,
    pub links_applied: u64,
    pub hash_mismatches: u64,
    pub refused_paths: u64,
    pub conflicts_kept: u64,
    /// Secondary: why the primary refused the last version handed over
    /// (its disk full or failing, most often), until it acknowledges one or
    /// a session or a tenure as primary begins.
    #[serde(default)]
    pub conflict_refused: Option<String>,
    /// Paths of the replica changed by another process while secondary.
    #[serde(default)]
    pub foreign_writes: u64,
    /// "on" while a secondary watches its replica for foreign writes, "off:
    /// `<why>`" when it cannot, "-" otherwise.
    #[serde(default)]
    pub foreign_watch: String,
    /// Secondary: why the replica is latched unverified (a flush or write
    /// failed; it is re-read from disk at the next session and nothing is
    /// acknowledged until then); absent when it is not.
    #[serde(default)]
    pub replica_unverified: Option<String>,
    /// Secondary: how long the flush in flight has run, once that is longer
    /// than `[replication] flush_alarm_ms` (a hung disk; nothing is
    /// acknowledged until it returns); absent otherwise.
    #[serde(default)]
    pub flush_overdue_ms: Option<u64>,
    /// Primary: how long ago the secondary last acknowledged a batch as
    /// durable.
    #[serde(default)]
    pub last_ack_age_ms: Option<u64>,
    pub rename_sources_missing: u64,
    pub disk_full: bool,
    /// Why the disk counts as full (free bytes, inodes, what was refused).
    #[serde(default)]
    pub disk_full_why: Option<String>,
    pub caught_up: bool,
    /// This node's replica is incomplete (a first fill that has not
    /// finished): it does not take over on its own.
    #[serde(default)]
    pub replica_incomplete: bool,
    /// Zero-loss commit: "synchronous" while the peer confirms commits,
    /// "degraded" (local-only) after one timed out, "-" before any.
    pub commit_mode: String,
    pub commits_replicated: u64,
    pub commits_degraded: u64,
    pub watches: u64,
    pub inotify_overflows: u64,
    pub rescans: u64,
    pub watch_failures: u64,
    /// Primary: folders whose watch failed and that are not watched yet
    /// (tried again after 30 s, the wait doubling up to 5 min; the stores are
    /// compared with the replica at each retry).
    #[serde(default)]
    pub unwatched_folders: u64,
    pub last_error: Option<String>,
    /// Admission on the sync port.
    #[serde(default)]
    pub sync_port: crate::link::gate::GateStatus,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ProgressStatus {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_per_s: f64,
    pub mb_per_s: f64,
    pub eta_s: Option<f64>,
}

impl Progress {
    pub fn snapshot(&self) -> Option<ProgressStatus> {
        let started = self.started?;
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let fps = self.done_files as f64 / secs;
        let left = self.total_files.saturating_sub(self.done_files);
        Some(ProgressStatus {
            files_done: self.done_files,
            files_total: self.total_files,
            bytes_done: self.done_bytes,
            bytes_total: self.total_bytes,
            files_per_s: fps,
            mb_per_s: self.done_bytes as f64 / secs / 1e6,
            eta_s: (fps > 0.0).then(|| left as f64 / fps),
        })
    }
}

impl ReplStats {
    pub fn snapshot(&self) -> ReplStatus {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let lag = self.lag_us.lock().expect("lag histogram lock");
        let q = |x: f64| (!lag.is_empty()).then(|| lag.value_at_quantile(x) as f64 / 1000.0);
        let progress = self.progress.lock().expect("progress lock").clone();
        let tracker = self.tracker.lock().expect("tracker stats lock").clone();
        ReplStatus {
            mode: self.mode.lock().expect("mode lock").to_string(),
            connected: self.connected.load(Relaxed),
            phase: progress.phase.as_str().to_string(),
            progress: if progress.phase.is_catching_up() {
                progress.snapshot()
            } else {
                None
            },
            files_sent: g(&self.files_sent),
            content_bytes_sent: g(&self.content_bytes_sent),
            files_spliced: g(&self.files_spliced),
            bytes_spliced: g(&self.bytes_spliced),
            renames_sent: g(&self.renames_sent),
            links_sent: g(&self.links_sent),
            deletes_sent: g(&self.deletes_sent),
            dirs_sent: g(&self.dirs_sent),
            ops_acked: g(&self.ops_acked),
            ops_inflight: g(&self.ops_inflight),
            ops_pending: g(&self.ops_pending),
            verify_runs: g(&self.verify_runs),
            repaired: g(&self.repaired),
            needs_received: g(&self.needs_received),
            refused_by_peer: g(&self.refused_by_peer),
            peer_disk_full: self.peer_disk_full.load(Relaxed),
            tracker_stalled_s: self
                .tracker_stalled_since
                .lock()
                .expect("tracker stall lock")
                .map(|t| t.elapsed().as_secs()),
            lag_ms_p50: q(0.5),
            lag_ms_p99: q(0.99),
            lag_ms_p999: q(0.999),
            lag_ms_max: (!lag.is_empty()).then(|| lag.max() as f64 / 1000.0),
            lag_samples: lag.len(),
            lag: Some(crate::daemon::metrics::HistSnapshot::from_micros(&lag)),
            stages_ms: {
                let st = self.stages.lock().expect("stages lock");
                [
                    ("queued", &st.queued),
                    ("sent_to_ack", &st.sent_to_ack),
                    ("barrier_to_ack", &st.barrier_to_ack),
                    ("data_flush", &st.data_flush),
                    ("dir_flush", &st.dir_flush),
                    ("handle", &st.handle),
                ]
                .into_iter()
                .filter_map(|(k, h)| stage(h).map(|s| (k.to_string(), s)))
                .collect()
            },
            files_landed: g(&self.files_landed),
            bytes_landed: g(&self.bytes_landed),
            renames_applied: g(&self.renames_applied),
            deletes_applied: g(&self.deletes_applied),
            deletes_held_for_room: g(&self.deletes_held_for_room),
            deletes_held_for_move: g(&self.deletes_held_for_move),
            links_applied: g(&self.links_applied),
            hash_mismatches: g(&self.hash_mismatches),
            refused_paths: g(&self.refused_paths),
            conflicts_kept: g(&self.conflicts_kept),
            conflict_refused: self
                .conflict_refused
                .lock()
                .expect("conflict refused lock")
                .clone(),
            foreign_writes: g(&self.foreign_writes),
            foreign_watch: self
                .foreign_watch
                .lock()
                .expect("foreign watch lock")
                .clone(),
            replica_unverified: self.unverified.lock().expect("unverified lock").clone(),
            flush_overdue_ms: self
                .flush_overdue_since
                .lock()
                .expect("flush lock")
                .map(|t| t.elapsed().as_millis() as u64),
            last_ack_age_ms: self
                .last_ack
                .lock()
                .expect("last ack lock")
                .map(|t| t.elapsed().as_millis() as u64),
            rename_sources_missing: g(&self.rename_sources_missing),
            disk_full: self.disk_full.load(Relaxed),
            disk_full_why: self.disk_full_why.lock().expect("disk full lock").clone(),
            caught_up: self.caught_up.load(Relaxed),
            replica_incomplete: self.replica_fill() == crate::failover::ReplicaFill::Filling,
            commit_mode: match (
                self.synchronous.load(Relaxed),
                g(&self.commits_replicated) + g(&self.commits_degraded),
            ) {
                (_, 0) => "-".into(),
                (true, _) => "synchronous".into(),
                (false, _) => "degraded".into(),
            },
            commits_replicated: g(&self.commits_replicated),
            commits_degraded: g(&self.commits_degraded),
            watches: tracker.watches,
            inotify_overflows: tracker.overflows,
            rescans: tracker.rescans,
            watch_failures: tracker.watch_failures,
            unwatched_folders: tracker.unwatched,
            last_error: self.last_error.lock().expect("error lock").clone(),
            sync_port: self.gate.snapshot(),
        }
    }
}
