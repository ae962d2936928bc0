//! Queue push after a failover: the former primary hands its queued mail to
//! the new primary, which ingests each message exactly once.
//!
//! Pusher: scan the queue, send each message (parts + identity), and delete
//! the local copy only after the new primary acknowledged it as durable (or
//! as a duplicate). Ingester: verify, dedup through the [`Ledger`], stage,
//! record the intent, rename into the queue layout, fsync, acknowledge.
//! A crash anywhere loses nothing and queues nothing twice (see `ledger`).

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};
use xxhash_rust::xxh3::xxh3_128;

use super::commit::{Failed, Intent, QueueDisk, Settled};
use super::layout::{self, Layout, QueuedMessage};
use super::ledger::{Ledger, LedgerError, Moves};
use super::session::{
    Admit, IngestPhase, IngestSession, IngestStep, PushPhase, PushSession, PushStep, Violation,
    INGEST_BATCH, UNACKED_MESSAGES_MAX,
};
use crate::failpoint;
use crate::link::{FrameReader, FrameWriter, LinkError};
use crate::wire::sync::{Meta, QueueOutcome, QueuePart, SyncMsg, DATA_BYTES_MAX};

/// Staging area inside the queue directory (same filesystem as the queue).
/// Where older releases staged pushed messages (inside the queue).
const LEGACY_STAGING: &str = ".hasync/staging";

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("scanning queue {path}: {source}")]
    Scan {
        path: PathBuf,
        source: layout::QueueError,
    },
    #[error("peer {peer} broke the queue protocol: {what}")]
    Protocol { peer: String, what: String },
    #[error("{op} {path}: {source}")]
    Local {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the peer uses queue layout {theirs}, this node {ours}: configure the same queue.layout on both")]
    LayoutDiffers { ours: String, theirs: String },
    #[error("the push is addressed to the primary of epoch {addressed}, but the receiving node serves epoch {serving}: refused")]
    Fenced { addressed: u64, serving: u64 },
}

fn layout_code(l: Layout) -> u8 {
    match l {
        Layout::Flat => 1,
        Layout::Postfix => 2,
        Layout::Exim => 3,
    }
}

/// Outcome of one push, for status and the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PushReport {
    pub messages: u64,
    pub pushed: u64,
    pub ingested: u64,
    pub duplicates_dropped: u64,
    pub failed: u64,
    pub garbage: Vec<String>,
    pub incomplete: u64,
    pub hook_ok: Option<bool>,
    pub seconds: f64,
}

/// Counters of the ingesting side.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestStats {
    pub ingested: u64,
    pub duplicates_dropped: u64,
    pub refused: u64,
    pub renamed_ids: u64,
    pub rolled_forward: u64,
    pub hook_runs: u64,
    pub hook_failures: u64,
    pub ledger_entries: u64,
    pub last_hook_output: Option<String>,
}

fn read_parts(msg: &QueuedMessage) -> std::io::Result<Vec<Vec<u8>>> {
    msg.parts.iter().map(|p| std::fs::read(&p.path)).collect()
}

/// Suffix of a side file's part on the wire: `@` and its kind (a message
/// part's suffix never starts with `@`).
const SIDE_PREFIX: char = '@';

/// A message's side files, read (one that vanished meanwhile is skipped:
/// the MTA removed it).
fn read_side(msg: &QueuedMessage) -> Vec<(&layout::Part, Vec<u8>)> {
    msg.side
        .iter()
        .filter_map(|p| std::fs::read(&p.path).ok().map(|b| (p, b)))
        .collect()
}

/// A queued message as sent: its description, then its parts' and side
/// files' bytes as `Data` frames.
fn encode_message(id: u64, msg: &QueuedMessage, parts: &[Vec<u8>]) -> Vec<u8> {
    let views: Vec<(&str, &[u8])> = msg
        .parts
        .iter()
        .zip(parts)
        .map(|(p, b)| (p.suffix.as_str(), b.as_slice()))
        .collect();
    let key = layout::identity_of(&msg.queue_id, &views);
    // The message's own logs travel with it (not in its identity).
    let side = read_side(msg);
    let mut out = Vec::new();
    SyncMsg::QueueMsg {
        id,
        sub_queue: msg.sub_queue.clone(),
        queue_id: msg.queue_id.clone(),
        key,
        parts: msg
            .parts
            .iter()
            .zip(parts)
            .map(|(p, b)| QueuePart {
                suffix: p.suffix.clone(),
                meta: p.meta,
                size: b.len() as u64,
                hash: xxh3_128(b),
            })
            .chain(side.iter().map(|(p, b)| QueuePart {
                suffix: format!("{SIDE_PREFIX}{}", p.suffix),
                meta: p.meta,
                size: b.len() as u64,
                hash: xxh3_128(b),
            }))
            .collect(),
    }
    .encode(&mut out);
    for b in parts.iter().chain(side.iter().map(|(_, b)| b)) {
        for chunk in b.chunks(DATA_BYTES_MAX) {
            SyncMsg::Data {
                seq: id,
                bytes: chunk.to_vec(),
            }
            .encode(&mut out);
        }
    }
    out
}

/// Silence a queue connection is allowed before it is dropped, at least
/// (the engine uses the link's I/O timeout if longer): the pusher waiting
/// for an acknowledgement, the new primary for the next frame while no
/// commit of its own runs, either side for a write the other does not
/// read. A batch's commit takes milliseconds to seconds (two `syncfs` of
/// the queue's filesystem); a peer silent this long is gone or hung, and
/// a pusher that gives up tries again (nothing it has not seen
/// acknowledged is deleted, and the ledger drops what landed).
pub const QUEUE_IDLE_MIN: Duration = Duration::from_secs(30);

/// Before the first frame from the other side, longer: the pusher lists
/// its queue before it starts, and the new primary, once started, reads
/// its own queue (every message's identity) before it reads on.
pub const QUEUE_START_WAIT: Duration = Duration::from_secs(120);

/// Writes `out`, or fails once `idle` passes (a peer that does not read).
async fn send_within(w: &FrameWriter, out: Vec<u8>, idle: Duration) -> Result<(), LinkError> {
    tokio::time::timeout(idle, w.send_bytes(out))
        .await
        .map_err(|_| LinkError::Timeout {
            peer: w.peer(),
            what: "a queue push write",
            after: idle,
        })?
}

/// How long a pusher whose write failed looks for the new primary's
/// last word (a refusal sent before it closed) among what it read.
const LAST_WORD_WAIT: Duration = Duration::from_secs(1);

/// A write of the push failed with `e`: if the new primary said why before
/// it closed (it serves a later epoch than the one the push is addressed
/// to), that is the push's error, not the write's (its retry would hear
/// the refusal again, and the operator reads the write's error first).
async fn why_write_failed(
    rx: &mut tokio::sync::mpsc::Receiver<Result<crate::wire::Frame, LinkError>>,
    e: LinkError,
    epoch: u64,
) -> PushError {
    let until = tokio::time::Instant::now() + LAST_WORD_WAIT;
    while let Ok(Some(Ok(f))) = tokio::time::timeout_at(until, rx.recv()).await {
        if let Ok(SyncMsg::Fenced { seen }) = SyncMsg::decode(&f) {
            return PushError::Fenced {
                addressed: epoch,
                serving: seen,
            };
        }
    }
    PushError::Link(e)
}

/// Pushes the whole queue over an authenticated `Channel::Queue` connection.
pub async fn push(
    layout_kind: Layout,
    queue_dir: &Path,
    r: FrameReader,
    w: FrameWriter,
    progress: &Mutex<PushReport>,
    epoch: u64,
    idle: Duration,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let peer = w.peer().to_string();
    let scan = layout::scan(layout_kind, queue_dir).map_err(|source| PushError::Scan {
        path: queue_dir.to_owned(),
        source,
    })?;
    let mut report = PushReport {
        messages: scan.messages.len() as u64,
        incomplete: scan.incomplete.len() as u64,
        garbage: scan
            .garbage
            .iter()
            .map(|g| format!("{}: {}", g.path.display(), g.reason))
            .collect(),
        ..PushReport::default()
    };
    for g in &scan.garbage {
        warn!(path = %g.path.display(), "queue push: left in place, not a pushable message: {}", g.reason);
    }
    for p in &scan.incomplete {
        warn!(path = %p.display(), "queue push: incomplete message (still being written when the node stopped) left in place");
    }
    info!(
        messages = report.messages,
        "queue push: pushing {} messages to the new primary {peer}", report.messages
    );
    *progress.lock().expect("push progress lock") = report.clone();

    let mut out = Vec::new();
    SyncMsg::QueueStart {
        layout: layout_code(layout_kind),
        epoch,
    }
    .encode(&mut out);
    send_within(&w, out, idle).await?;

    let mut session = PushSession::new(scan.messages);
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let peer_addr = r.peer();
    // Until the new primary's first answer, its start's work is waited for.
    let mut limit = idle.max(QUEUE_START_WAIT);
    // Acknowledgements come through a reader task and are taken between
    // sends: the new primary's acknowledgements never wait on this node's
    // socket while it writes a window (both sides would block on full
    // buffers). At most one per message in flight, and the end's answer.
    let (reader, mut rx) = read_frames(r, UNACKED_MESSAGES_MAX + 16, |f| f);
    loop {
        match session.poll() {
            Some(PushStep::Send(id)) => {
                // What the new primary answered meanwhile, first.
                while let Ok(f) = rx.try_recv() {
                    on_push_frame(f?, &mut session, &mut report, (&peer, peer_addr), epoch)?;
                    *progress.lock().expect("push progress lock") = report.clone();
                    limit = idle;
                }
                let msg = session.message(id).expect("a message to send is in flight");
                let parts = match read_parts(msg) {
                    Ok(p) => p,
                    Err(e) => {
                        report.failed += 1;
                        report
                            .garbage
                            .push(format!("{}: unreadable: {e}", msg.parts[0].path.display()));
                        warn!(queue_id = %msg.queue_id, "queue push: cannot read message, left in place: {e}");
                        session.unreadable(id);
                        continue;
                    }
                };
                let out = encode_message(id, msg, &parts);
                if let Err(e) = send_within(&w, out, limit).await {
                    return Err(why_write_failed(&mut rx, e, epoch).await);
                }
                session.sent(id);
                report.pushed += 1;
            }
            Some(PushStep::Barrier(seq)) => {
                // The new primary commits what it has staged as one batch.
                let mut out = Vec::new();
                SyncMsg::Barrier { seq }.encode(&mut out);
                if let Err(e) = send_within(&w, out, limit).await {
                    return Err(why_write_failed(&mut rx, e, epoch).await);
                }
            }
            Some(PushStep::Delete(msg)) => {
                failpoint::hit("push.after_ack_before_delete");
                // The new primary holds it durably: only now is ours
                // removed, with its logs.
                for p in msg.parts.iter().chain(&msg.side) {
                    match std::fs::remove_file(&p.path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(PushError::Local {
                                op: "remove pushed message",
                                path: p.path.clone(),
                                source: e,
                            })
                        }
                    }
                    if let Some(d) = p.path.parent() {
                        dirs.insert(d.to_owned());
                    }
                }
            }
            Some(PushStep::End) => {
                // Removals are durable once their directories are.
                for d in std::mem::take(&mut dirs) {
                    if let Err(e) = crate::io::sync_dir(&d).await {
                        warn!(dir = %d.display(), "fsync after queue push: {e}");
                    }
                }
                let mut out = Vec::new();
                SyncMsg::QueueEnd.encode(&mut out);
                if let Err(e) = send_within(&w, out, limit).await {
                    return Err(why_write_failed(&mut rx, e, epoch).await);
                }
            }
            None if session.phase() == PushPhase::Ended => break,
            None => {
                // The end is answered after the new primary's hook ran.
                let wait = if session.phase() == PushPhase::Ending {
                    limit + HOOK_TIMEOUT
                } else {
                    limit
                };
                let frame = match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(f)) => f?,
                    Ok(None) => {
                        return Err(protocol_error(&peer, "the connection's reader stopped"))
                    }
                    Err(_) => {
                        return Err(PushError::Link(LinkError::Timeout {
                            peer: w.peer(),
                            what: "a queue acknowledgement",
                            after: wait,
                        }))
                    }
                };
                on_push_frame(frame, &mut session, &mut report, (&peer, peer_addr), epoch)?;
                *progress.lock().expect("push progress lock") = report.clone();
                limit = idle;
            }
        }
    }
    drop(reader);
    report.seconds = started.elapsed().as_secs_f64();
    info!(
        messages = report.messages,
        ingested = report.ingested,
        duplicates = report.duplicates_dropped,
        failed = report.failed,
        garbage = report.garbage.len(),
        "queue push finished in {:.2}s",
        report.seconds
    );
    *progress.lock().expect("push progress lock") = report.clone();
    Ok(report)
}

fn protocol_error(peer: &str, what: &str) -> PushError {
    PushError::Protocol {
        peer: peer.to_string(),
        what: what.to_string(),
    }
}

/// One frame from the new primary during a push: an acknowledgement (or
/// the end's), or why the push stops.
fn on_push_frame(
    frame: crate::wire::Frame,
    session: &mut PushSession<QueuedMessage>,
    report: &mut PushReport,
    (peer, peer_addr): (&str, std::net::SocketAddr),
    epoch: u64,
) -> Result<(), PushError> {
    let m = SyncMsg::decode(&frame).map_err(|source| LinkError::Wire {
        peer: peer_addr,
        source,
    })?;
    let protocol = |v: &dyn std::fmt::Display| protocol_error(peer, &v.to_string());
    match m {
        SyncMsg::Fenced { seen } => {
            return Err(PushError::Fenced {
                addressed: epoch,
                serving: seen,
            })
        }
        SyncMsg::QueueAck {
            id,
            outcome,
            detail,
        } => {
            if let Some(msg) = session.on_ack(id, outcome).map_err(|v| protocol(&v))? {
                warn!(queue_id = %msg.queue_id, "queue push: new primary refused message, left in place: {detail}");
            }
        }
        SyncMsg::QueueEndAck { hook_ok } => {
            session.on_end_ack().map_err(|v| protocol(&v))?;
            report.hook_ok = Some(hook_ok);
        }
        _ if session.phase() == PushPhase::Ending => {
            return Err(protocol(&"expected the end acknowledgement"))
        }
        _ => return Err(protocol(&"expected a queue acknowledgement")),
    }
    report.ingested = session.counts.ingested;
    report.duplicates_dropped = session.counts.duplicates;
    report.failed = session.counts.refused + session.counts.unreadable;
    Ok(())
}

/// A message written to staging, waiting for its batch's commit.
#[derive(Clone)]
struct Staged {
    key: u128,
    id: String,
    moves: Moves,
    /// Failed flushes counted before it was staged.
    since: u64,
}

impl Staged {
    fn intent(&self) -> Intent {
        (self.key, self.id.clone(), self.moves.clone())
    }
}

/// Outcome of looking at one pushed message.
enum Verdict {
    Staged(Staged),
    Done(QueueOutcome, String),
}

/// Largest queued message (all parts) a push may hand over: it is held in
/// memory until staged. Mail queues hold messages of megabytes.
pub const INGEST_MESSAGE_BYTES_MAX: u64 = 256 << 20;

/// The new primary's side.
pub struct Ingester {
    layout: Layout,
    queue_dir: PathBuf,
    /// The queue directory, open for the ingester's life: its flushes see
    /// every writeback error since it opened (see `io::syncfs_file`).
    queue_fs: Arc<std::fs::File>,
    /// Failed flushes of the queue's filesystem so far (see
    /// `QueueDisk::flush_failures`), shared with the commit job.
    flush_failures: Arc<std::sync::atomic::AtomicU64>,
    staging: PathBuf,
    /// Shared with the commit job, which holds it only to append.
    ledger: Arc<Mutex<Ledger>>,
    /// The node's durable-commit service, which runs the batch commits
    /// off the event loop (beside the receiver's flushes).
    durable: crate::io::DurableWorker,
    /// The batch being committed there, if any (a push that ended while it
    /// ran leaves it here: the next one waits for it first). Its outcome
    /// comes back this way only if the push was gone.
    committing: Option<crossbeam_channel::Receiver<Option<Result<(), PushError>>>>,
    hook: Option<Vec<String>>,
    pub stats: IngestStats,
    counter: u64,
    /// Identities of the messages in the local queue when the push began.
    held: std::collections::HashSet<u128>,
    /// Queue IDs and directory geometry of the local queue (per push).
    view: Option<layout::QueueView>,
}

fn set_meta(f: &std::fs::File, meta: &Meta) -> std::io::Result<()> {
    use rustix::fs::{fchmod, fchown, futimens, Gid, Mode, Timespec, Timestamps, Uid};
    if rustix::process::geteuid().is_root() {
        fchown(
            f.as_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )?;
    }
    // After chown: chown clears setuid/setgid bits.
    fchmod(f.as_fd(), Mode::from_raw_mode(meta.mode & 0o7777))?;
    let t = Timespec {
        tv_sec: meta.mtime_sec,
        tv_nsec: meta.mtime_nsec.into(),
    };
    futimens(
        f.as_fd(),
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )?;
    Ok(())
}

impl Ingester {
    /// Takes the opened ledger, rolls forward any ingest a crash
    /// interrupted, and commits its batches on `durable` (the node's
    /// durable-commit service).
    pub fn open(
        layout: Layout,
        queue_dir: &Path,
        ledger: Ledger,
        hook: Option<Vec<String>>,
        staging: &Path,
        durable: crate::io::DurableWorker,
    ) -> Result<Ingester, PushError> {
        let staging = staging.to_path_buf();
        std::fs::create_dir_all(&staging).map_err(|source| PushError::Local {
            op: "create",
            path: staging.clone(),
            source,
        })?;
        let queue_fs = std::fs::File::open(queue_dir).map_err(|source| PushError::Local {
            op: "open",
            path: queue_dir.to_owned(),
            source,
        })?;
        let mut ing = Ingester {
            layout,
            queue_fs: Arc::new(queue_fs),
            flush_failures: Arc::default(),
            queue_dir: queue_dir.to_owned(),
            staging,
            ledger: Arc::new(Mutex::new(ledger)),
            durable,
            committing: None,
            hook,
            stats: IngestStats::default(),
            counter: 0,
            held: Default::default(),
            view: None,
        };
        ing.recover()?;
        // An older release staged inside the queue directory, where Postfix
        // does not expect an entry of ours: intents were rolled forward
        // above, what is left there is garbage.
        let legacy = queue_dir.join(LEGACY_STAGING);
        if legacy.is_dir() {
            let _ = std::fs::remove_dir_all(&legacy);
            let _ = std::fs::remove_dir(queue_dir.join(".hasync"));
            info!(path = %legacy.display(), "removed an older release's staging from the queue directory");
        }
        Ok(ing)
    }

    /// Reads the local queue's IDs and geometry for this push.
    fn load_view(&mut self) -> Result<(), PushError> {
        self.view = Some(
            layout::QueueView::load(self.layout, &self.queue_dir).map_err(|source| {
                PushError::Local {
                    op: "read",
                    path: self.queue_dir.clone(),
                    source,
                }
            })?,
        );
        Ok(())
    }

    fn recover(&mut self) -> Result<(), PushError> {
        let disk = RealDisk::of(self);
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let done = super::commit::recover(&disk, &mut ledger).map_err(PushError::from)?;
        self.stats.ledger_entries = ledger.len() as u64;
        drop(ledger);
        self.note_rolled(&done);
        Ok(())
    }

    /// Completes every ingest whose intent is in the ledger without its
    /// done record (of `only`'s keys, if given): a crash, or a commit that
    /// failed after its intents were written. Returns how many.
    fn roll_forward(
        &mut self,
        only: Option<&std::collections::HashSet<u128>>,
    ) -> Result<usize, PushError> {
        let disk = RealDisk::of(self);
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let done =
            super::commit::roll_forward(&disk, &mut ledger, only).map_err(PushError::from)?;
        self.stats.ledger_entries = ledger.len() as u64;
        drop(ledger);
        self.note_rolled(&done);
        Ok(done.len())
    }

    /// Lands what the ledger counts and the queue does not hold yet (a
    /// commit whose completion failed): a message the ledger counts is
    /// acknowledged as a duplicate from here on, so it must be in the
    /// queue, not left in staging until the next start. If it cannot be
    /// landed, nothing is ingested (the pusher keeps every copy).
    fn land_counted(&mut self) -> Result<(), PushError> {
        let n = self.roll_forward(None)?;
        if n > 0 {
            warn!(
                messages = n,
                "queue ingest: landed {n} messages the ledger counted but an earlier commit left in staging"
            );
        }
        Ok(())
    }

    /// After a failed commit of `batch`: see `commit::settle_failed` (what
    /// it completes is logged).
    fn settle(&mut self, batch: &[Staged]) -> Settled {
        let items: Vec<Intent> = batch.iter().map(Staged::intent).collect();
        let disk = RealDisk::of(self);
        let settled = {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            super::commit::settle_failed(&disk, &mut ledger, &items)
        };
        if let Settled::Landed(done) = &settled {
            self.note_rolled(done);
        }
        settled
    }

    fn note_rolled(&mut self, done: &[(u128, String)]) {
        for (_, queue_id) in done {
            info!(
                queue_id,
                "queue ingest: rolled forward a message whose ingest was interrupted"
            );
        }
        self.stats.rolled_forward += done.len() as u64;
    }

    /// Serves one push connection, addressed to the primary tenure `epoch`
    /// (this node's): a push addressed to any other is refused.
    pub async fn serve(
        &mut self,
        mut r: FrameReader,
        w: FrameWriter,
        epoch: u64,
        idle: Duration,
    ) -> Result<(), PushError> {
        let peer = r.peer().to_string();
        let start_wait = idle.max(QUEUE_START_WAIT);
        let first = tokio::time::timeout(start_wait, r.recv_frame())
            .await
            .map_err(|_| LinkError::Timeout {
                peer: r.peer(),
                what: "the queue push's start",
                after: start_wait,
            })??;
        let first = SyncMsg::decode(&first).map_err(|source| LinkError::Wire {
            peer: r.peer(),
            source,
        })?;
        match first {
            SyncMsg::QueueStart {
                epoch: addressed, ..
            } if addressed != epoch => {
                let mut out = Vec::new();
                SyncMsg::Fenced { seen: epoch }.encode(&mut out);
                let _ = send_within(&w, out, idle).await;
                return Err(PushError::Fenced {
                    addressed,
                    serving: epoch,
                });
            }
            SyncMsg::QueueStart { layout, .. } if layout == layout_code(self.layout) => {}
            SyncMsg::QueueStart { layout, .. } => {
                return Err(PushError::LayoutDiffers {
                    ours: format!("{:?}", self.layout),
                    theirs: format!("code {layout}"),
                })
            }
            _ => {
                return Err(PushError::Protocol {
                    peer,
                    what: "expected QueueStart".into(),
                })
            }
        }
        // A batch an earlier push left committing has its intents in the
        // ledger before this push looks at a message.
        self.wait_committed();
        self.land_counted()?;
        // A message this node already holds (it came over through queue
        // replication, or a push interrupted before its acknowledgement and
        // then sent back after roles changed) is a duplicate too.
        self.held = match layout::scan(self.layout, &self.queue_dir) {
            Ok(scan) => scan
                .messages
                .iter()
                .filter_map(|m| layout::identity(m).ok())
                .collect(),
            Err(e) => {
                return Err(PushError::Scan {
                    path: self.queue_dir.clone(),
                    source: e,
                })
            }
        };
        self.load_view()?;
        info!(
            peer,
            held = self.held.len(),
            "queue push from the former primary started"
        );
        let ingested_before = self.stats.ingested;
        // Frames come through a reader task, so that a batch's commit
        // finishing on its thread is heard while the next one is staged.
        let peer_addr = r.peer();
        let (reader, rx) = read_frames(r, PUSH_EVENTS_QUEUED, Event::Frame);
        let mut pipe = Pipe {
            rx,
            idle,
            committed: None,
            w: &w,
            peer: peer.clone(),
            session: IngestSession::new(),
            staged: HashMap::new(),
            committing: Vec::new(),
            ready: None,
        };
        pipe.session.started();
        let violation = |peer: &str, v: Violation| PushError::Protocol {
            peer: peer.to_string(),
            what: v.to_string(),
        };
        loop {
            let frame = self.next_frame(&mut pipe).await?;
            if pipe.session.phase() != IngestPhase::Streaming {
                return Err(violation(&peer, Violation::AfterEnd));
            }
            let msg = SyncMsg::decode(&frame).map_err(|source| LinkError::Wire {
                peer: peer_addr,
                source,
            })?;
            match msg {
                SyncMsg::QueueMsg {
                    id,
                    sub_queue,
                    queue_id,
                    key,
                    parts,
                } => {
                    // Before a byte is buffered: is it a size this node
                    // takes, and does the queue's filesystem have room?
                    if let Err(why) = self.room_for(&parts) {
                        self.drain_parts(&mut pipe, id, &parts).await?;
                        // One this node holds already is a duplicate whatever
                        // its size: kept by the pusher too, it could be
                        // delivered twice.
                        let admitted = match pipe.session.on_message(id, key, self.holds(key)) {
                            Ok(Admit::Duplicate) => Ok(()),
                            Ok(Admit::Stage) => {
                                warn!(peer, queue_id, "queued message refused: {why}");
                                pipe.session.refused(id, why)
                            }
                            Err(v) => Err(v),
                        };
                        admitted.map_err(|v| violation(&peer, v))?;
                        self.perform(&mut pipe).await?;
                        continue;
                    }
                    // The parts' bytes follow, in order.
                    let mut bodies = Vec::with_capacity(parts.len());
                    for p in &parts {
                        let mut b = Vec::with_capacity(p.size.min(64 << 20) as usize);
                        while (b.len() as u64) < p.size {
                            let f = self.next_frame(&mut pipe).await?;
                            match SyncMsg::decode(&f) {
                                Ok(SyncMsg::Data { seq, bytes })
                                    if seq == id
                                        && b.len() as u64 + bytes.len() as u64 <= p.size =>
                                {
                                    b.extend_from_slice(&bytes)
                                }
                                _ => {
                                    return Err(PushError::Protocol {
                                        peer,
                                        what: format!("bad data for queued message {id}"),
                                    })
                                }
                            }
                        }
                        bodies.push(b);
                    }
                    let checked = self.check(&queue_id, key, &parts, &bodies);
                    let admitted = match checked {
                        Err(why) => {
                            warn!(queue_id, "queue ingest refused: {why}");
                            pipe.session.refused(id, why)
                        }
                        Ok(()) => match pipe.session.on_message(id, key, self.holds(key)) {
                            Ok(Admit::Duplicate) => {
                                info!(
                                    queue_id,
                                    "queue ingest: duplicate dropped (already ingested)"
                                );
                                Ok(())
                            }
                            Ok(Admit::Stage) => {
                                match self
                                    .place_and_stage(&sub_queue, &queue_id, key, &parts, &bodies)
                                {
                                    Ok(st) => {
                                        pipe.staged.insert(id, st);
                                        pipe.session.staged(id, key)
                                    }
                                    Err(why) => {
                                        warn!(queue_id, "queue ingest refused: {why}");
                                        pipe.session.refused(id, why)
                                    }
                                }
                            }
                            Err(v) => Err(v),
                        },
                    };
                    admitted.map_err(|v| violation(&peer, v))?;
                }
                SyncMsg::Barrier { .. } => {
                    pipe.session.on_barrier().map_err(|v| violation(&peer, v))?
                }
                SyncMsg::QueueEnd => pipe.session.on_end().map_err(|v| violation(&peer, v))?,
                _ => {
                    return Err(PushError::Protocol {
                        peer,
                        what: "unexpected message in a queue push".into(),
                    })
                }
            }
            // Everything staged is committed and acknowledged before the
            // end is answered: the session says when.
            if let Some(landed_any) = self.perform(&mut pipe).await? {
                drop(reader);
                let landed = self.stats.ingested - ingested_before;
                let hook_ok = if landed_any {
                    self.run_hook("push", landed).await
                } else {
                    true
                };
                {
                    let mut ledger = self.ledger.lock().expect("ledger lock");
                    let _ = ledger.compact_if_needed();
                    self.stats.ledger_entries = ledger.len() as u64;
                }
                let mut out = Vec::new();
                SyncMsg::QueueEndAck { hook_ok }.encode(&mut out);
                send_within(&w, out, idle).await?;
                info!(
                    peer,
                    ingested = self.stats.ingested,
                    duplicates = self.stats.duplicates_dropped,
                    "queue push from the former primary finished"
                );
                return Ok(());
            }
        }
    }

    /// Does what the session asks (acknowledgements, sent together; a
    /// batch's commit), until it waits for the peer or a commit; once
    /// everything is acknowledged after the end, `Some(landed_any)`.
    async fn perform(&mut self, pipe: &mut Pipe<'_>) -> Result<Option<bool>, PushError> {
        let mut out = Vec::new();
        let mut finished = None;
        loop {
            // The end is answered only once the last commit reported.
            if finished.is_none() && pipe.session.phase() == IngestPhase::Ending {
                if let Some(res) = pipe.ready.take() {
                    self.on_committed(res, pipe)?;
                    continue;
                }
            }
            let Some(step) = pipe.session.poll() else {
                if finished.is_none()
                    && pipe.session.phase() == IngestPhase::Ending
                    && pipe.session.committing()
                {
                    if !out.is_empty() {
                        send_within(pipe.w, std::mem::take(&mut out), pipe.idle).await?;
                    }
                    match pipe.next_event(&self.queue_dir).await {
                        Some(Event::Committed(res)) => {
                            self.on_committed(res, pipe)?;
                            continue;
                        }
                        Some(Event::Frame(Err(e))) => return Err(e.into()),
                        Some(Event::Frame(Ok(_))) | None => {
                            return Err(PushError::Protocol {
                                peer: pipe.peer.clone(),
                                what: Violation::AfterEnd.to_string(),
                            })
                        }
                    }
                }
                break;
            };
            match step {
                IngestStep::Ack {
                    id,
                    outcome,
                    mut detail,
                } => {
                    let staged = pipe.staged.remove(&id);
                    match outcome {
                        QueueOutcome::Ingested => {
                            self.stats.ingested += 1;
                            // The ID it landed under here.
                            if let Some(st) = staged {
                                detail = st.id;
                            }
                        }
                        QueueOutcome::Duplicate => self.stats.duplicates_dropped += 1,
                        QueueOutcome::Refused => self.stats.refused += 1,
                    }
                    SyncMsg::QueueAck {
                        id,
                        outcome,
                        detail,
                    }
                    .encode(&mut out);
                }
                IngestStep::Commit(ids) => self.start_commit(pipe, &ids)?,
                IngestStep::Finish { landed_any } => finished = Some(landed_any),
            }
        }
        if !out.is_empty() {
            send_within(pipe.w, out, pipe.idle).await?;
        }
        Ok(finished)
    }

    /// The next frame of the push; a commit finishing meanwhile is
    /// acknowledged (and the next batch started) on the way.
    async fn next_frame(&mut self, pipe: &mut Pipe<'_>) -> Result<crate::wire::Frame, PushError> {
        loop {
            if let Some(res) = pipe.ready.take() {
                self.on_committed(res, pipe)?;
                self.perform(pipe).await?;
                continue;
            }
            match pipe.next_event(&self.queue_dir).await {
                Some(Event::Frame(f)) => return Ok(f?),
                Some(Event::Committed(res)) => {
                    self.on_committed(res, pipe)?;
                    self.perform(pipe).await?;
                }
                None => {
                    return Err(PushError::Protocol {
                        peer: pipe.peer.clone(),
                        what: "the connection's reader stopped".into(),
                    })
                }
            }
        }
    }

    /// Reads and drops the data of a refused message.
    async fn drain_parts(
        &mut self,
        pipe: &mut Pipe<'_>,
        id: u64,
        parts: &[crate::wire::sync::QueuePart],
    ) -> Result<(), PushError> {
        let mut left: u64 = parts.iter().map(|p| p.size).sum();
        while left > 0 {
            let f = self.next_frame(pipe).await?;
            match SyncMsg::data_view(&f) {
                Some(Ok((seq, range))) if seq == id && (range.len() as u64) <= left => {
                    left -= range.len() as u64;
                }
                _ => {
                    return Err(PushError::Protocol {
                        peer: pipe.peer.clone(),
                        what: format!("bad data for queued message {id}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether a message of these parts may be ingested: within
    /// [`INGEST_MESSAGE_BYTES_MAX`] (it is held in memory until staged) and
    /// with room for it on the queue's filesystem (1 % kept free, at most
    /// 4 MiB, and some inodes).
    fn room_for(&self, parts: &[crate::wire::sync::QueuePart]) -> Result<(), String> {
        let total: u64 = parts.iter().map(|p| p.size).sum();
        if total > INGEST_MESSAGE_BYTES_MAX {
            return Err(format!(
                "message of {total} bytes exceeds the {INGEST_MESSAGE_BYTES_MAX}-byte limit of a pushed message; it stays in the former primary's queue"
            ));
        }
        let Ok(st) = rustix::fs::statvfs(&self.queue_dir) else {
            return Ok(()); // cannot tell: the writes will say
        };
        let unit = if st.f_frsize > 0 {
            st.f_frsize
        } else {
            st.f_bsize
        };
        let free = st.f_bavail.saturating_mul(unit);
        let margin = (st.f_blocks.saturating_mul(unit) / 100).min(4 << 20);
        if free < total.saturating_add(margin) || st.f_favail <= 16 {
            return Err(format!(
                "no room in {} for a message of {total} bytes ({free} bytes, {} inodes free); it stays in the former primary's queue",
                self.queue_dir.display(),
                st.f_favail
            ));
        }
        Ok(())
    }

    /// Moves the messages of a replicated queue (`replica`, same layout) into
    /// the live queue, exactly once: through the ledger, so that the former
    /// primary's later push of the same messages is dropped as duplicates.
    /// Returns (moved, duplicates).
    pub fn ingest_local(&mut self, replica: &Path) -> Result<(u64, u64), PushError> {
        // A batch a cut push left committing is in the ledger first.
        self.wait_committed();
        self.land_counted()?;
        let scan = layout::scan(self.layout, replica).map_err(|source| PushError::Scan {
            path: replica.to_owned(),
            source,
        })?;
        self.held = layout::scan(self.layout, &self.queue_dir)
            .map_err(|source| PushError::Scan {
                path: self.queue_dir.clone(),
                source,
            })?
            .messages
            .iter()
            .filter_map(|m| layout::identity(m).ok())
            .collect();
        self.load_view()?;
        let (mut moved, mut dups) = (0, 0);
        let mut batch: Vec<(QueuedMessage, Staged)> = Vec::new();
        for msg in scan.messages {
            let mut bodies = match read_parts(&msg) {
                Ok(b) => b,
                Err(source) => {
                    // What this batch staged never counted: it goes (a
                    // promotion tried again stages it anew).
                    for (_, st) in &batch {
                        for (staged, _) in &st.moves {
                            let _ = std::fs::remove_file(staged);
                        }
                    }
                    return Err(PushError::Local {
                        op: "read",
                        path: msg.parts[0].path.clone(),
                        source,
                    });
                }
            };
            let views: Vec<(&str, &[u8])> = msg
                .parts
                .iter()
                .zip(&bodies)
                .map(|(p, b)| (p.suffix.as_str(), b.as_slice()))
                .collect();
            let key = layout::identity_of(&msg.queue_id, &views);
            let side = read_side(&msg);
            let mut parts: Vec<QueuePart> = msg
                .parts
                .iter()
                .zip(&bodies)
                .map(|(p, b)| QueuePart {
                    suffix: p.suffix.clone(),
                    meta: p.meta,
                    size: b.len() as u64,
                    hash: xxh3_128(b),
                })
                .collect();
            for (p, b) in side {
                parts.push(QueuePart {
                    suffix: format!("{SIDE_PREFIX}{}", p.suffix),
                    meta: p.meta,
                    size: b.len() as u64,
                    hash: xxh3_128(&b),
                });
                bodies.push(b);
            }
            let pending_keys: std::collections::HashSet<u128> =
                batch.iter().map(|(_, st)| st.key).collect();
            match self.ingest(
                &msg.sub_queue,
                &msg.queue_id,
                key,
                &parts,
                &bodies,
                &pending_keys,
            ) {
                Verdict::Staged(st) => batch.push((msg, st)),
                Verdict::Done(QueueOutcome::Duplicate, _) => {
                    dups += 1;
                    // Already in the live queue: drop the replica copy.
                    for p in msg.parts.iter().chain(&msg.side) {
                        let _ = std::fs::remove_file(&p.path);
                    }
                }
                Verdict::Done(_, why) => {
                    warn!(queue_id = %msg.queue_id, "queue replica message not promoted, left in the replica: {why}");
                }
            }
            if batch.len() >= INGEST_BATCH {
                moved += self.commit_local(&mut batch)?;
            }
        }
        moved += self.commit_local(&mut batch)?;
        Ok((moved, dups))
    }

    /// Commits promoted replica messages, then drops their replica copies.
    fn commit_local(&mut self, batch: &mut Vec<(QueuedMessage, Staged)>) -> Result<u64, PushError> {
        self.wait_committed();
        let taken = std::mem::take(batch);
        let staged: Vec<Staged> = taken.iter().map(|(_, s)| s.clone()).collect();
        if let Err(e) = commit_batch(&RealDisk::of(self), &self.ledger, &staged) {
            warn!("queue replica promotion: a batch's commit failed: {e}");
            // As for a push: completed if the ledger counts it already
            // (else its staged files go, and the replica copies stay for
            // the next promotion).
            match self.settle(&staged) {
                Settled::Landed(_) => {}
                Settled::NotCounted => return Err(e),
                Settled::Stuck(f) => return Err(PushError::from(f)),
            }
        }
        self.stats.ingested += taken.len() as u64;
        for (msg, _) in &taken {
            for p in msg.parts.iter().chain(&msg.side) {
                let _ = std::fs::remove_file(&p.path);
            }
        }
        Ok(taken.len() as u64)
    }

    /// Waits for a batch an earlier push left committing. Its outcome was
    /// never heard (the push was cut): landed, or failed after its intents
    /// were written, in which case it is rolled forward now (nothing else
    /// is staged at this point).
    fn wait_committed(&mut self) {
        let Some(t) = self.committing.take() else {
            return;
        };
        match t.recv() {
            Ok(Some(Err(e))) => {
                error!("a queue ingest batch of a push that was cut failed: {e}; rolling forward what it recorded");
                if let Err(e) = self.roll_forward(None) {
                    error!(alarm = true, "ALARM: cannot roll forward an interrupted queue ingest: {e}; it is tried again at the next start");
                }
            }
            Ok(_) => {}
            Err(_) => error!("the queue commit job ended without an outcome; its batch was not acknowledged (the pusher keeps it)"),
        }
    }

    /// Starts committing the staged messages `ids` on the node's
    /// durable-commit thread (the loop goes on staging the next batch; the
    /// session starts one commit at a time).
    fn start_commit(&mut self, pipe: &mut Pipe<'_>, ids: &[u64]) -> Result<(), PushError> {
        let mut staged = Vec::with_capacity(ids.len());
        for id in ids {
            // The session commits only what was reported staged.
            let st = pipe.staged.get(id).ok_or_else(|| PushError::Protocol {
                peer: pipe.peer.clone(),
                what: format!("message {id} to commit is not staged"),
            })?;
            staged.push(st.clone());
        }
        pipe.committing = staged.clone();
        let (reply, committed) = tokio::sync::oneshot::channel();
        let (fs, dir, staging, failures, ledger) = (
            self.queue_fs.clone(),
            self.queue_dir.clone(),
            self.staging.clone(),
            self.flush_failures.clone(),
            self.ledger.clone(),
        );
        let queued = self.durable.run(move || {
            let t0 = Instant::now();
            let disk = RealDisk {
                queue_fs: &fs,
                queue_dir: &dir,
                staging: &staging,
                flush_failures: &failures,
            };
            // A panic mid-commit leaves the ledger's lock poisoned and its
            // memory maybe behind its file, and the loop waiting for an
            // outcome: the process stops, and its restart recovers from
            // disk (what is recorded is completed; the pusher re-sends
            // the rest).
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                commit_batch(&disk, &ledger, &staged)
            }))
            .unwrap_or_else(|_| {
                error!("the queue commit job panicked; stopping so that the restart recovers the ingest from disk");
                std::process::abort()
            });
            tracing::debug!(
                n = staged.len(),
                us = t0.elapsed().as_micros() as u64,
                "ingest batch committed"
            );
            // The push ended meanwhile: the outcome goes back through
            // the job's channel (see `wait_committed`).
            reply.send(result).err()
        });
        match queued {
            Ok(rx) => {
                self.committing = Some(rx);
                pipe.committed = Some(committed);
            }
            Err(e) => {
                // No thread: committed here, heard before the next frame.
                warn!("cannot hand the queue commit to the durable-commit thread ({e}); committing on the loop");
                pipe.ready = Some(commit_batch(
                    &RealDisk::of(self),
                    &self.ledger,
                    &pipe.committing,
                ));
            }
        }
        Ok(())
    }

    /// The running commit ended: the session acknowledges each message of
    /// its batch as ingested (durable), or refused (the pusher keeps it) if
    /// the commit failed before its intents counted. A batch counted but
    /// not landed ends the push with no acknowledgement for it: refused,
    /// its pusher would keep copies this node's ledger counts (both nodes
    /// would deliver them); the next push lands it first, or fails too.
    fn on_committed(
        &mut self,
        result: Result<(), PushError>,
        pipe: &mut Pipe<'_>,
    ) -> Result<(), PushError> {
        self.wait_committed();
        let batch = std::mem::take(&mut pipe.committing);
        let mut result = result;
        if let Err(e) = &result {
            error!("queue ingest batch failed: {e}");
            // Failed after its intents were written: the ledger already
            // counts these messages (a later push of them is a duplicate),
            // so they are completed here, or at the next start; never
            // dropped. Failed before: nothing counted, the pusher keeps
            // its copies.
            match self.settle(&batch) {
                Settled::Landed(_) => result = Ok(()),
                Settled::NotCounted => {}
                Settled::Stuck(f) => {
                    let e = PushError::from(f);
                    error!(alarm = true, "ALARM: cannot complete a queue ingest batch whose intents are recorded: {e}; the push ends, and the batch is completed before the next push, or at the next start");
                    return Err(e);
                }
            }
        }
        failpoint::hit("queue.before_ack");
        self.stats.ledger_entries = self.ledger.lock().expect("ledger lock").len() as u64;
        pipe.session.committed(result.map_err(|e| e.to_string()));
        Ok(())
    }

    /// Looks at one message of a replica being promoted: a duplicate or a
    /// refusal is decided at once; anything else is staged for its batch.
    fn ingest(
        &mut self,
        sub_queue: &str,
        queue_id: &str,
        key: u128,
        parts: &[QueuePart],
        bodies: &[Vec<u8>],
        pending: &std::collections::HashSet<u128>,
    ) -> Verdict {
        let refuse = |s: &mut IngestStats, why: String| {
            s.refused += 1;
            warn!(queue_id, "queue ingest refused: {why}");
            Verdict::Done(QueueOutcome::Refused, why)
        };
        if let Err(why) = self.check(queue_id, key, parts, bodies) {
            return refuse(&mut self.stats, why);
        }
        if pending.contains(&key) || self.holds(key) {
            self.stats.duplicates_dropped += 1;
            info!(
                queue_id,
                "queue ingest: duplicate dropped (already ingested)"
            );
            return Verdict::Done(QueueOutcome::Duplicate, "already ingested".into());
        }
        match self.place_and_stage(sub_queue, queue_id, key, parts, bodies) {
            Ok(st) => Verdict::Staged(st),
            Err(why) => refuse(&mut self.stats, why),
        }
    }

    /// Whether a pushed message is whole and fits this queue: each part
    /// against its hash, the parts against the layout, the whole against
    /// its identity. Never errors out of the connection for a bad
    /// message: it is refused (the pusher keeps it).
    fn check(
        &self,
        queue_id: &str,
        key: u128,
        parts: &[QueuePart],
        bodies: &[Vec<u8>],
    ) -> Result<(), String> {
        // Integrity first: each part against its hash, the whole against its key.
        for (p, b) in parts.iter().zip(bodies) {
            if xxh3_128(b) != p.hash {
                return Err("content does not match its hash".into());
            }
        }
        let main = parts
            .iter()
            .take_while(|p| !p.suffix.starts_with(SIDE_PREFIX))
            .count();
        let suffixes: Vec<&str> = parts[..main].iter().map(|p| p.suffix.as_str()).collect();
        if suffixes != layout::valid_suffixes(self.layout) {
            return Err(format!(
                "parts {suffixes:?} do not fit the {:?} layout",
                self.layout
            ));
        }
        let kinds = layout::side_kinds(self.layout);
        let mut seen = std::collections::HashSet::new();
        for p in &parts[main..] {
            let kind = p.suffix.trim_start_matches(SIDE_PREFIX);
            if !p.suffix.starts_with(SIDE_PREFIX) || !kinds.contains(&kind) || !seen.insert(kind) {
                return Err(format!(
                    "side file {:?} does not fit the {:?} layout",
                    p.suffix, self.layout
                ));
            }
        }
        let views: Vec<(&str, &[u8])> = parts[..main]
            .iter()
            .zip(bodies)
            .map(|(p, b)| (p.suffix.as_str(), b.as_slice()))
            .collect();
        if layout::identity_of(queue_id, &views) != key {
            return Err("identity does not match the content".into());
        }
        Ok(())
    }

    /// Whether this node holds identity `key` already: in its ledger, or
    /// in its queue when the push began.
    fn holds(&self, key: u128) -> bool {
        self.held.contains(&key) || self.ledger.lock().expect("ledger lock").contains(key)
    }

    /// Places a checked message in its sub-queue under its ID (or a fresh
    /// one, if that is invalid or taken here) and stages its parts.
    fn place_and_stage(
        &mut self,
        sub_queue: &str,
        queue_id: &str,
        key: u128,
        parts: &[QueuePart],
        bodies: &[Vec<u8>],
    ) -> Result<Staged, String> {
        if !layout::valid_sub_queue(self.layout, sub_queue) {
            return Err(format!(
                "sub-queue {sub_queue:?} is not valid for {:?}",
                self.layout
            ));
        }
        // Names from the peer are validated, or replaced; never used verbatim as paths.
        let mut id = queue_id.to_string();
        let view = match self.view.as_mut() {
            Some(v) => v,
            None => return Err("the local queue was not read before the push".into()),
        };
        if !view.is_free(sub_queue, &id) {
            let mut seed = key as u64;
            loop {
                seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let fresh = layout::fresh_queue_id(self.layout, seed);
                if view.is_free(sub_queue, &fresh) {
                    id = fresh;
                    break;
                }
            }
            self.stats.renamed_ids += 1;
            info!(from = queue_id, to = %id, "queue ingest: queue ID invalid or taken here; message gets a new ID");
        }
        self.stage(sub_queue, &id, key, parts, bodies).map_err(|e| {
            // Nothing counted: staged files without an intent are removed.
            error!(queue_id, "queue ingest failed: {e}");
            e.to_string()
        })
    }

    /// Writes a message's parts to staging with their metadata (not yet
    /// durable: [`Ingester::commit_batch`] makes a whole batch durable).
    fn stage(
        &mut self,
        sub_queue: &str,
        id: &str,
        key: u128,
        parts: &[QueuePart],
        bodies: &[Vec<u8>],
    ) -> Result<Staged, PushError> {
        use std::io::Write;
        // Before a byte is written (see `commit::commit`).
        let since = self
            .flush_failures
            .load(std::sync::atomic::Ordering::SeqCst);
        let local = |op: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| PushError::Local { op, path, source }
        };
        let dir = match self.view.as_mut() {
            Some(v) => {
                v.insert(id);
                v.target_dir(sub_queue, id)
            }
            None => layout::target_dir(self.layout, &self.queue_dir, sub_queue, id),
        };
        if !dir.is_dir() {
            make_queue_dirs(&self.queue_dir, &dir).map_err(local("create", &dir))?;
        }
        let mut moves: Moves = Vec::new();
        for (p, b) in parts.iter().zip(bodies) {
            if let Some(kind) = p.suffix.strip_prefix(SIDE_PREFIX) {
                // A log of the message, under its (possibly new) ID.
                let target = layout::side_target(self.layout, &self.queue_dir, kind, id);
                if let Some(d) = target.parent() {
                    make_queue_dirs(&self.queue_dir, d).map_err(local("create", d))?;
                }
                self.counter += 1;
                let staged = self.staging.join(format!("{key:032x}-{}", self.counter));
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&staged)
                    .map_err(local("create", &staged))?;
                f.write_all(b).map_err(local("write", &staged))?;
                set_meta(&f, &p.meta).map_err(local("set metadata of", &staged))?;
                moves.push((staged, target));
                continue;
            }
            self.counter += 1;
            let staged = self.staging.join(format!("{key:032x}-{}", self.counter));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staged)
                .map_err(local("create", &staged))?;
            let mut content = b.clone();
            // Exim's files name their message on the first line (and find
            // the body by that line's length): a new ID rewrites both.
            if self.layout == Layout::Exim && id != first_line_id(&content, &p.suffix) {
                let rewritten = if p.suffix == "-H" {
                    layout::rewrite_exim_header(&content, id)
                } else {
                    layout::rewrite_exim_data(&content, id)
                };
                content = rewritten.ok_or_else(|| PushError::Local {
                    op: "rewrite the ID line of",
                    path: staged.clone(),
                    source: std::io::Error::other("not an Exim spool file"),
                })?;
            }
            f.write_all(&content).map_err(local("write", &staged))?;
            set_meta(&f, &p.meta).map_err(local("set metadata of", &staged))?;
            moves.push((staged, dir.join(format!("{id}{}", p.suffix))));
        }
        Ok(Staged {
            key,
            id: id.to_string(),
            moves,
            since,
        })
    }

    /// Runs the post-ingest hook (e.g. `postsuper -c <config dir> -s`)
    /// after messages landed in the queue, with `HASYNC_QUEUE_DIR`,
    /// `HASYNC_EVENT` (`push` or `promotion`) and `HASYNC_MESSAGES` in its
    /// environment; killed after [`HOOK_TIMEOUT`]. Output is logged and
    /// kept for status, failure alarmed.
    pub async fn run_hook(&mut self, event: &str, landed: u64) -> bool {
        let Some(argv) = self.hook.clone() else {
            return true;
        };
        self.stats.hook_runs += 1;
        let env = vec![
            (
                "HASYNC_QUEUE_DIR".to_string(),
                self.queue_dir.display().to_string(),
            ),
            ("HASYNC_EVENT".to_string(), event.to_string()),
            ("HASYNC_MESSAGES".to_string(), landed.to_string()),
        ];
        let out = crate::hooks::run_async(argv, env, HOOK_TIMEOUT).await;
        self.stats.last_hook_output = Some(out.output.clone());
        if out.ok {
            info!("post-ingest hook: {}: {}", out.summary(), out.output);
            true
        } else {
            self.stats.hook_failures += 1;
            error!(
                alarm = true,
                "ALARM: post-ingest hook: {}: {}",
                out.summary(),
                out.output
            );
            false
        }
    }

    /// Entries in the dedup ledger.
    pub fn ledger_len(&self) -> usize {
        self.ledger.lock().expect("ledger lock").len()
    }
}

/// What the push loop hears: a frame from the reader task, or the end of
/// the running commit.
enum Event {
    Frame(Result<crate::wire::Frame, LinkError>),
    Committed(Result<(), PushError>),
}

impl Pipe<'_> {
    /// The next frame, or the running commit's outcome if it comes first.
    /// Waiting on the peer alone (no commit runs), silence past `idle`
    /// ends the push.
    async fn next_event(&mut self, queue_dir: &Path) -> Option<Event> {
        let Some(committed) = self.committed.as_mut() else {
            return match tokio::time::timeout(self.idle, self.rx.recv()).await {
                Ok(ev) => ev,
                Err(_) => Some(Event::Frame(Err(LinkError::Timeout {
                    peer: self.w.peer(),
                    what: "the queue push's next frame",
                    after: self.idle,
                }))),
            };
        };
        tokio::select! {
            biased;
            res = committed => {
                self.committed = None;
                Some(Event::Committed(res.unwrap_or_else(|_| {
                    Err(PushError::Local {
                        op: "commit",
                        path: queue_dir.to_path_buf(),
                        source: std::io::Error::other(
                            "the durable-commit thread dropped the batch without an outcome",
                        ),
                    })
                })))
            }
            ev = self.rx.recv() => ev,
        }
    }
}

/// Frames queued from the reader task at most.
const PUSH_EVENTS_QUEUED: usize = 64;

/// One push's state in the loop.
struct Pipe<'a> {
    /// Frames from the reader task.
    rx: tokio::sync::mpsc::Receiver<Event>,
    /// Silence allowed while no commit runs (see [`QUEUE_IDLE_MIN`]).
    idle: Duration,
    /// The outcome of the commit running on the durable-commit thread: a
    /// channel of its own, so that the job never waits for room among the
    /// frames (the thread also runs the receiver's flushes).
    committed: Option<tokio::sync::oneshot::Receiver<Result<(), PushError>>>,
    w: &'a FrameWriter,
    peer: String,
    /// What is decided (see `session`).
    session: IngestSession,
    /// Staged and not yet acknowledged, by push id.
    staged: HashMap<u64, Staged>,
    /// The batch whose commit runs.
    committing: Vec<Staged>,
    /// Its outcome, when it was committed on the loop (no thread).
    ready: Option<Result<(), PushError>>,
}

/// A task that reads the connection's frames into a channel of
/// `capacity` (each wrapped by `wrap`) until the first error, which it
/// passes on; it stops with the returned handle.
fn read_frames<T: 'static>(
    mut r: FrameReader,
    capacity: usize,
    wrap: fn(Result<crate::wire::Frame, LinkError>) -> T,
) -> (AbortOnDrop, tokio::sync::mpsc::Receiver<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    let task = tokio_uring::spawn(async move {
        loop {
            let f = r.recv_frame().await;
            let stop = f.is_err();
            if tx.send(wrap(f)).await.is_err() || stop {
                return;
            }
        }
    });
    (AbortOnDrop(task), rx)
}

/// The reader task stops with the push.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes a batch of staged messages part of the queue, durably and exactly
/// once (see `commit`). Runs on the durable-commit thread (or the caller's,
/// promoting a replica); the ledger is locked only to append, so the
/// loop's duplicate checks wait at most for that.
fn commit_batch(
    disk: &RealDisk<'_>,
    ledger: &Mutex<Ledger>,
    batch: &[Staged],
) -> Result<(), PushError> {
    let items: Vec<Intent> = batch.iter().map(Staged::intent).collect();
    let since = batch.iter().map(|s| s.since).min().unwrap_or(0);
    super::commit::commit(disk, disk.queue_dir, ledger, &items, since).map_err(PushError::from)
}

/// The queue's real filesystem, for the commit sequence.
struct RealDisk<'a> {
    queue_fs: &'a std::fs::File,
    queue_dir: &'a Path,
    staging: &'a Path,
    flush_failures: &'a std::sync::atomic::AtomicU64,
}

impl<'a> RealDisk<'a> {
    fn of(ing: &'a Ingester) -> RealDisk<'a> {
        RealDisk {
            queue_fs: &ing.queue_fs,
            queue_dir: &ing.queue_dir,
            staging: &ing.staging,
            flush_failures: &ing.flush_failures,
        }
    }
}

impl QueueDisk for RealDisk<'_> {
    fn flush_all(&self) -> std::io::Result<()> {
        let res = crate::io::syncfs_file(self.queue_fs);
        if res.is_err() {
            self.flush_failures
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        res
    }

    fn flush_failures(&self) -> u64 {
        self.flush_failures
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn make_dirs(&self, dir: &Path) -> std::io::Result<()> {
        make_queue_dirs(self.queue_dir, dir)
    }

    fn flush_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::File::open(dir).and_then(|f| f.sync_all())
    }

    fn clear_staging(&self) {
        if let Ok(rd) = std::fs::read_dir(self.staging) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn remove_staged(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }
}

impl From<Failed> for PushError {
    fn from(f: Failed) -> PushError {
        PushError::Local {
            op: f.op,
            path: f.path,
            source: f.source,
        }
    }
}

/// Creates the missing folders of `dir` inside `queue_dir` (a hash
/// subfolder such as Postfix's `deferred/E` or `defer/E`), each with its
/// parent's owner and mode: the MTA (Postfix's daemons and `postsuper`
/// run as its mail owner) must be able to rename and remove in them as in
/// the folders it made itself.
fn make_queue_dirs(queue_dir: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if dir.is_dir() {
        return Ok(());
    }
    let rel = dir.strip_prefix(queue_dir).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is outside the queue {}",
                dir.display(),
                queue_dir.display()
            ),
        )
    })?;
    let mut cur = queue_dir.to_path_buf();
    for c in rel.components() {
        let parent = std::fs::metadata(&cur)?;
        cur.push(c);
        if cur.is_dir() {
            continue;
        }
        let mode = parent.mode() & 0o7777;
        match std::fs::DirBuilder::new().mode(mode).create(&cur) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        // mkdir applies the umask: set the mode exactly, then the owner.
        std::fs::set_permissions(&cur, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        let made = std::fs::metadata(&cur)?;
        if (made.uid(), made.gid()) != (parent.uid(), parent.gid()) {
            std::os::unix::fs::chown(&cur, Some(parent.uid()), Some(parent.gid()))?;
        }
    }
    Ok(())
}

/// How long a post-ingest hook may run before it is killed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// The message ID an Exim spool file names on its first line.
/// Reads and drops the data frames of queued message `id` (a refused
/// message's bytes still arrive; the stream stays framed).
fn first_line_id<'a>(h: &'a [u8], suffix: &str) -> &'a str {
    let line = h.split(|b| *b == b'\n').next().unwrap_or_default();
    std::str::from_utf8(line)
        .unwrap_or_default()
        .trim_end_matches(suffix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::auth::{LinkKey, Side};
    use crate::link::{handshake, Conn, LinkCtx, LinkStats};
    use crate::wire::Channel;

    fn ctx(me: &str, peer: &str, addr: std::net::SocketAddr) -> LinkCtx {
        LinkCtx {
            node_name: me.into(),
            peer_name: peer.into(),
            peer_addr: addr,
            key: LinkKey::from_secret(b"queue push test secret 0123456789"),
            io_timeout: Duration::from_secs(5),
            stats: LinkStats::default(),
            redial: tokio::sync::Notify::new(),
        }
    }

    /// A queue connection after its handshake, as node `names[0]` talking
    /// to `names[1]`.
    async fn authenticated(
        stream: tokio_uring::net::TcpStream,
        peer: std::net::SocketAddr,
        names: [&str; 2],
        side: Side,
    ) -> (FrameReader, FrameWriter) {
        let mut conn = Conn::new(stream, peer);
        handshake(
            &mut conn,
            &ctx(names[0], names[1], peer),
            side,
            Channel::Queue,
        )
        .await
        .unwrap();
        conn.split()
    }

    /// Pushes queue `q` (at `epoch`, idle limit `idle`) over real sockets
    /// to a fake new primary that accepts the connection, authenticates
    /// and then does `serve`; returns the push's outcome and how long it
    /// took.
    fn push_to_fake<F, Fut>(
        q: &Path,
        epoch: u64,
        idle: Duration,
        serve: F,
    ) -> (Result<PushReport, PushError>, Duration)
    where
        F: FnOnce(FrameReader, FrameWriter) -> Fut + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        tokio_uring::start(async {
            let listener =
                tokio_uring::net::TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let fake = tokio_uring::spawn(async move {
                let (stream, peer) = listener.accept().await.unwrap();
                let (r, w) = authenticated(stream, peer, ["new", "old"], Side::Responder).await;
                serve(r, w).await;
            });
            let stream = tokio_uring::net::TcpStream::connect(addr).await.unwrap();
            let (r, w) = authenticated(stream, addr, ["old", "new"], Side::Initiator).await;
            let progress = Mutex::new(PushReport::default());
            let t0 = Instant::now();
            let res = push(Layout::Flat, q, r, w.clone(), &progress, epoch, idle).await;
            let waited = t0.elapsed();
            let _ = w.shutdown();
            let _ = fake.await;
            (res, waited)
        })
    }

    /// A new primary that refuses the push (it serves a later epoch) and
    /// closes while the pusher is in the middle of a write: the push ends
    /// with the refusal, not the write's error, and nothing is deleted.
    #[test]
    fn a_refusal_sent_before_the_close_is_the_pushs_error_not_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        std::fs::create_dir_all(&q).unwrap();
        // Far more than the sockets buffer: the pusher is in a write when
        // the connection closes.
        let body = "x".repeat(256 * 1024);
        for i in 1..=64 {
            std::fs::write(
                q.join(format!("msg-{i}.eml")),
                format!("message {i}\r\n{body}"),
            )
            .unwrap();
        }
        // The new primary: reads up to the first message, lets the pusher
        // fill the buffers, refuses and closes without reading the rest (a
        // reset).
        let (res, _) = push_to_fake(&q, 3, Duration::from_secs(5), |mut r, w| async move {
            while let Ok(f) = r.recv_frame().await {
                if matches!(SyncMsg::decode(&f), Ok(SyncMsg::QueueMsg { .. })) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut out = Vec::new();
            SyncMsg::Fenced { seen: 7 }.encode(&mut out);
            w.send_bytes(out).await.unwrap();
            let _ = w.shutdown();
        });
        assert!(
            matches!(
                res,
                Err(PushError::Fenced {
                    addressed: 3,
                    serving: 7
                })
            ),
            "{res:?}"
        );
        assert_eq!(
            std::fs::read_dir(&q).unwrap().count(),
            64,
            "nothing deleted"
        );
    }

    /// A new primary that answers the first message of a push and then
    /// stops answering (hung, or cut off without a reset): the pusher gives
    /// up once its idle limit passes, with a timeout, having deleted only
    /// the message that was acknowledged (its retry sends the rest).
    #[test]
    fn a_pusher_gives_up_on_a_new_primary_that_stops_answering() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("queue");
        std::fs::create_dir_all(&q).unwrap();
        for i in 1..=3 {
            std::fs::write(q.join(format!("msg-{i}.eml")), format!("message {i}\r\n")).unwrap();
        }
        let idle = Duration::from_millis(400);
        // The new primary: answers the first message, then only reads.
        let (res, waited) = push_to_fake(&q, 1, idle, |mut r, w| async move {
            let mut answered = false;
            while let Ok(f) = r.recv_frame().await {
                if let (false, Ok(SyncMsg::QueueMsg { id, .. })) = (answered, SyncMsg::decode(&f)) {
                    let mut out = Vec::new();
                    SyncMsg::QueueAck {
                        id,
                        outcome: QueueOutcome::Ingested,
                        detail: String::new(),
                    }
                    .encode(&mut out);
                    w.send_bytes(out).await.unwrap();
                    answered = true;
                }
            }
        });
        assert!(
            matches!(res, Err(PushError::Link(LinkError::Timeout { .. }))),
            "{res:?}"
        );
        assert!(
            waited >= idle && waited < idle + Duration::from_secs(3),
            "{waited:?}"
        );
        let left = std::fs::read_dir(&q).unwrap().count();
        assert_eq!(left, 2, "only the acknowledged message is deleted");
    }
}
