//! The control socket: one JSON request line in, one JSON response line out,
//! over a unix socket in the state directory. `hasync status`, `failover`
//! and `join` are clients of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::failover::Role;

pub const SOCKET_NAME: &str = "hasync.sock";
/// Longest request line accepted.
pub const REQUEST_BYTES_MAX: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Manual switchover. Refused while it would leave changes behind (the
    /// replica not caught up, the sync session down, a large backlog)
    /// unless `force`.
    Failover {
        #[serde(default)]
        force: bool,
    },
    Join,
    /// Accept this node's incomplete replica (a first sync that did not
    /// finish) as complete, so that it may take over with the mail it has.
    /// Refused while the primary is heard (the fill goes on), and on a
    /// fresh node, unless `force`.
    AcceptReplica {
        #[serde(default)]
        force: bool,
    },
    Resync,
    PushQueue,
    /// Zero-loss commit of one file (for MTAs that cannot embed the library).
    Commit {
        path: std::path::PathBuf,
    },
    /// The versions kept aside as genuine conflicts on this node.
    Conflicts,
    /// An embedder's own change to `path` (the primary sends it at once,
    /// as if the tracker had seen it).
    Notify {
        path: std::path::PathBuf,
    },
    /// Puts kept versions back into the live tree as new files: one by id,
    /// or all of them (`id` absent). Only on the primary.
    RestoreConflicts {
        id: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Vec<crate::replica::conflicts::Conflict>>,
}

impl Response {
    pub fn error(e: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(e.into()),
            message: None,
            status: None,
            conflicts: None,
        }
    }
    pub fn message(m: impl Into<String>) -> Response {
        Response {
            ok: true,
            error: None,
            message: Some(m.into()),
            status: None,
            conflicts: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub node: String,
    pub pid: u32,
    pub version: String,
    pub mode: Role,
    pub epoch: u64,
    pub since_unix_ms: u64,
    pub in_mode_ms: u64,
    pub reason: String,
    pub peer: PeerStatus,
    pub link: LinkStatus,
    pub queue_push: QueuePushStatus,
    pub restore_pending: bool,
    /// Versions kept aside as genuine conflicts on this node.
    #[serde(default)]
    pub conflicts: ConflictsStatus,
    pub replication: crate::replica::stats::ReplStatus,
    /// Role hooks: which are configured, each one's last run, and whether a
    /// switchover is being prepared.
    #[serde(default)]
    pub hooks: HooksStatus,
    /// The third vote (ping targets reached).
    #[serde(default)]
    pub quorum: crate::quorum::QuorumStatus,
    /// Etcd mode: the primary lease as this node sees it.
    #[cfg(feature = "etcd")]
    #[serde(default)]
    pub lease: Option<crate::lease::LeaseStatus>,
    /// The service addresses (`[[vip]]`).
    #[serde(default)]
    pub vip: crate::vip::VipStatus,
    pub alarms: Vec<Logged>,
    pub transitions: Vec<Logged>,
    /// Is it safe to fail over now? `None`: yes; otherwise what would be
    /// left behind (what `hasync failover` refuses without `--force`).
    #[serde(default)]
    pub switchover_blocker: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HooksStatus {
    pub configured: Vec<String>,
    pub last: Vec<crate::daemon::roles::HookRun>,
    pub switchover_preparing: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    pub seen: bool,
    pub alive: bool,
    pub role: Option<Role>,
    pub epoch: Option<u64>,
    pub last_heartbeat_age_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkStatus {
    pub outbound_connected: bool,
    pub inbound_connections: usize,
    pub auth_failures: u64,
    pub frame_errors: u64,
    pub heartbeats_sent: u64,
    pub heartbeats_received: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_gap_ms_p50: Option<f64>,
    pub heartbeat_gap_ms_p99: Option<f64>,
    pub heartbeat_gap_ms_max: Option<f64>,
    /// Admission on the heartbeat port (strangers, authentication failures).
    #[serde(default)]
    pub heartbeat_port: crate::link::gate::GateStatus,
    /// Every heartbeat path, the main one (`link.listen` → `link.peer`)
    /// first: the peer is lost only when all are silent.
    #[serde(default)]
    pub paths: Vec<PathStatus>,
    /// Heartbeat gaps as a histogram (for metrics).
    #[serde(default)]
    pub heartbeat_gap: Option<crate::daemon::metrics::HistSnapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PathStatus {
    pub listen: String,
    pub peer: String,
    /// A heartbeat arrived on it within the failure-detection window.
    pub up: bool,
    pub outbound_connected: bool,
    pub heartbeats_received: u64,
    pub last_heartbeat_age_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueuePushStatus {
    /// How many times the core raised the push action since start.
    pub requested: u64,
    pub pending: bool,
    pub last_requested_unix_ms: Option<u64>,
    pub last_target_epoch: Option<u64>,
    pub running: bool,
    /// The latest push from this node (counts as it goes).
    pub last: crate::queue::push::PushReport,
    pub last_error: Option<String>,
    /// Pushes this node received as primary.
    pub ingest: crate::queue::push::IngestStats,
}

/// Genuine conflicts held on this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConflictsStatus {
    pub count: u64,
    /// Age of the oldest, in seconds.
    pub oldest_age_s: Option<u64>,
}

/// A timestamped line kept for status (alarms, role changes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Logged {
    pub at_unix_ms: u64,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to the daemon's control socket {path}: {source} (is `hasync run` running with this config?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: malformed response: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Blocking client call, for the CLI, the demo and tests.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("request serialises");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(s);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(io)?;
    serde_json::from_str(&resp).map_err(|source| ControlError::Malformed {
        path: socket.to_owned(),
        source,
    })
}
