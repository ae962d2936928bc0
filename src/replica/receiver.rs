//! The secondary's side of a sync connection: lands every file atomically
//! (staged under `.hasync/staging`, content checked against its xxh3,
//! fsynced, renamed into place, parent directory fsynced) and acknowledges
//! each batch once all of it is durable. Fsyncs are grouped per run of files
//! and submitted to io_uring together, so durability costs a few journal
//! commits per batch, not one per file.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::oneshot::error::TryRecvError;

use tracing::{error, info, warn};

use super::apply::{land_first, path_op, Answer, Applier, Gone, Parsed, Reply, StagedAt};
use super::commit::{Gate, Output as CommitOutput, Phase as CommitPhase, Pipeline};
use super::fsops::{FsError, Root};
use super::handover::HandOver;
use super::index::{self, Index, Kind, Rehash};
use super::latch::{Latch, Latched, Lifted};
use super::manifest::ManifestOut;
use super::reception::{admit_path, Received, Reception};
use super::stager::{StagedFile, Stager};
use super::stats::{add, ReplStats, Stages};
use super::{Durability, Excludes};
use crate::link::{FrameReader, FrameWriter, LinkError};
use crate::logging::printable;
use crate::wire::sync::{NeedReason, SyncMsg, MANIFEST_ENTRIES_MAX};
use crate::wire::{Frame, WireError};

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("peer {peer} sent a malformed sync frame: {source}")]
    Malformed { peer: String, source: WireError },
    #[error("peer {peer} replicates stores {theirs:?}, this node has {ours:?}: the two configurations must name the same mailstores in the same order")]
    StoresDiffer {
        peer: String,
        ours: Vec<String>,
        theirs: Vec<String>,
    },
    #[error("peer {peer} broke the protocol: {what}")]
    Protocol { peer: String, what: String },
    #[error("cannot make {path} durable: {source}; nothing since the last acknowledgement counts as replicated")]
    Durability {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scanning {path}: {source}")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session from peer {peer} at epoch {epoch} refused: {why}")]
    Fenced {
        peer: String,
        epoch: u64,
        why: super::fence::Admission,
    },
}

/// The replica's scans taken before a session (see `engine`), used for its
/// first manifest if still fresh and nothing landed meanwhile.
pub struct Prescan {
    pub at: Instant,
    pub scans: Vec<Option<index::Scan>>,
}

/// How long a [`Prescan`] may answer a manifest request.
pub(crate) const PRESCAN_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// The marker in the state directory of a replica latched unverified (it
/// holds the reason).
pub const UNVERIFIED_FILE: &str = "replica-unverified";

/// Why the replica under `state_dir` is latched unverified, if it is.
pub fn unverified(state_dir: &Path) -> Option<String> {
    match std::fs::read(state_dir.join(UNVERIFIED_FILE)) {
        Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // Unreadable: trust nothing.
        Err(e) => Some(format!("the marker cannot be read: {e}")),
    }
}

/// Records that the replica is unverified for `reason`: in the status,
/// durably in the state directory's marker (a restart keeps it), and with
/// an alarm if this is news.
fn record_unverified(state_dir: Option<&Path>, stats: &ReplStats, reason: &str) {
    let news = stats
        .unverified
        .lock()
        .expect("unverified lock")
        .replace(reason.to_string())
        .is_none();
    write_marker(state_dir, reason);
    if news {
        let msg = format!(
            "ALARM: the replica is unverified ({reason}); nothing is acknowledged until every file is re-read from disk at the next session"
        );
        error!(alarm = true, "{msg}");
        stats.raise_alarm(msg);
    }
}

/// Writes the unverified marker (durably) with `reason`.
fn write_marker(state_dir: Option<&Path>, reason: &str) {
    let Some(dir) = state_dir else {
        return;
    };
    if let Err(e) = crate::io::write_atomic_blocking(&dir.join(UNVERIFIED_FILE), reason.as_bytes())
    {
        error!(
            "cannot record that the replica is unverified ({e}): a restart before the re-verification would trust it"
        );
    }
}

/// Removes the unverified marker (durably).
fn remove_marker(state_dir: Option<&Path>) {
    let Some(dir) = state_dir else {
        return;
    };
    let marker = dir.join(UNVERIFIED_FILE);
    if let Err(e) =
        std::fs::remove_file(&marker).and_then(|()| std::fs::File::open(dir)?.sync_all())
    {
        if e.kind() != std::io::ErrorKind::NotFound {
            // Still latched on disk: the next start re-verifies again.
            warn!("cannot remove {}: {e}", marker.display());
        }
    }
}

/// What the node's durable-commit thread does with a flush failure nobody
/// waited for (a session that ended or was dropped left the flush behind):
/// the replica is unverified from then on, durably and with an alarm, so
/// that the next session re-reads it even after a restart.
pub fn orphan_hook(state_dir: PathBuf, stats: Arc<ReplStats>) -> crate::io::OrphanHook {
    Arc::new(move |why| {
        let reason = format!("a flush failed after its session ended: {why}");
        record_unverified(Some(&state_dir), &stats, &reason);
    })
}

/// What the marker says while a flush in flight as its session ended has
/// not reported: a process that dies meanwhile (a crash, a shutdown that
/// did not wait) cannot know its outcome, so it restarts latched.
const FLUSH_PENDING: &str =
    "a flush was in flight as its session ended and its outcome is not known";

/// One store on the receiving side.
pub struct RecvStore {
    pub name: String,
    pub root: Root,
    pub index: Index,
    /// A mailstore replicated in place (not the queue's replica): a former
    /// primary's genuine conflicts in it are kept aside and handed over.
    pub conflicts: bool,
}

/// The file whose data frames are arriving: its decisions, and the staged
/// file its content is written to (`None` once refused or set aside: the
/// data frames are read and dropped).
struct Incoming {
    rx: Reception,
    fd: Option<Arc<StagedFile>>,
}

/// A file whose content and metadata are written (descriptor closed) and
/// that waits for the grouped flush and its rename into place.
struct Staged {
    seq: u64,
    store: usize,
    rel: PathBuf,
    hash: u128,
    size: u64,
    /// It lands in an inode of its own (see `SyncMsg::File`).
    apart: bool,
    /// The staged file as written (from its descriptor), for the index
    /// entry once landed: a rename keeps everything but the ctime.
    st: Option<index::Stat>,
    /// Per-file durability: the file's fsync, submitted to io_uring when
    /// its last byte arrived (see [`Durability`]).
    fsync: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl StagedAt for Staged {
    fn store(&self) -> usize {
        self.store
    }
    fn rel(&self) -> &Path {
        &self.rel
    }
    fn hash(&self) -> u128 {
        self.hash
    }
    fn size(&self) -> u64 {
        self.size
    }
}

pub struct Receiver {
    pub stores: Vec<RecvStore>,
    /// Admits sessions by epoch (`None`: every session, for tools).
    pub fence: Option<Arc<super::fence::Fence>>,
    /// The epoch the session in progress started with, once admitted.
    pub session_epoch: std::rc::Rc<std::cell::Cell<Option<u64>>>,
    pub excludes: Excludes,
    pub stats: Arc<ReplStats>,
    /// The group commit (sans-IO): staged files, barriers, the commit in
    /// flight; this driver performs its outputs.
    commits: Pipeline<Staged, (u64, Instant)>,
    /// The flush the commit in flight waits for, and when it was asked.
    flush_done: Option<tokio::sync::oneshot::Receiver<crate::io::FlushResult>>,
    flush_started: Instant,
    /// A flush that has not returned this long raises an alarm (a hung
    /// disk; `[replication] flush_alarm_ms`).
    pub flush_alarm: Duration,
    /// The flush in flight raised that alarm.
    flush_overdue: bool,
    /// The decisions for ops on paths, and what they remember.
    ops: Applier,
    current: Option<Incoming>,
    replies: Vec<u8>,
    /// When the frame being handled was read from the socket.
    frame_read_at: Instant,
    durability: Durability,
    /// Runs the syncfs calls; the engine gives one that lives as long as
    /// the node (its descriptors see every writeback error since).
    pub flusher: Option<crate::io::DurableWorker>,
    /// Syncfs durability: the writer thread for staged content (in front
    /// of `flusher`), and the outcomes it reported, by seq.
    stager: Option<Stager>,
    done_files: std::collections::HashMap<u64, Result<Option<index::Stat>, FsError>>,
    /// Disk-space condition per store.
    space: Vec<super::space::Space>,
    /// The state directory (the former-primary mark), when the node has one.
    pub state_dir: Option<PathBuf>,
    /// The epoch of the last primary tenure this node began, 0 if none in
    /// this process (the engine's; see `PeerState`).
    pub served: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the replica is latched unverified (a flush failed): it is
    /// re-hashed from disk at the next manifest, and no batch is
    /// acknowledged until then.
    latch: Latch,
    /// Scans taken before the session, for its first manifest.
    pub prescanned: Option<Prescan>,
    /// Versions kept aside, by store, and their hand-over to the primary.
    handover: HandOver<(usize, super::conflicts::Conflict)>,
    /// A manifest being sent (see [`Receiver::stream_manifest`]).
    manifest_out: Option<ManifestOut>,
    /// The `Applier::held_changes` count the state directory's copy of the
    /// sources held for renames (`held`) is of; `None` when unknown (not
    /// yet written by this receiver, or the write failed).
    held_saved: Option<u64>,
    /// Writing them failed, and no write has succeeded since: the next try
    /// waits until then.
    held_save_failing: Option<Instant>,
    /// Names held for renames that were gone from the tree as the
    /// directory flush in flight started (a folder rename moved them): let
    /// go of once it completes, the rename then durable.
    held_gone: Vec<((usize, PathBuf), u64)>,
    /// The folder renames applied as that flush started (durable once it
    /// completes).
    renames_at_flush: u64,
}

/// Files staged while a commit is in flight, before reading stops until it
/// finishes (bounds open descriptors in `fsync` mode and unflushed data).
const STAGED_FILES_MAX: usize = 2048;
/// Frames read ahead of the loop at most, and their payload bytes at most
/// (beyond one frame).
const READ_AHEAD_FRAMES: usize = 4096;
const READ_AHEAD_BYTES: usize = 4 << 20;

/// A frame read ahead, holding its share of the read-ahead byte budget
/// while it waits in the channel (released when the loop takes it).
type ReadAhead = Result<(Frame, Instant, tokio::sync::OwnedSemaphorePermit), LinkError>;

/// A group commit in flight: every barrier seen when it started, and the
/// files staged before them. It runs in two flushes, each off the event
/// loop (the durable-commit thread, or io_uring fsyncs), while the loop keeps staging
/// what arrives next: first the files' data, then (after the renames into
/// place) the directories.
///
/// With syncfs, one flush serves two commits: the directory flush of this
/// one is also the data flush of the files staged meanwhile (`next`), which
/// land as soon as it completes and form the following commit. Under a
/// steady stream that is one syncfs per commit instead of two.
impl Receiver {
    pub fn new(
        stores: Vec<RecvStore>,
        excludes: Excludes,
        stats: Arc<ReplStats>,
        durability: Durability,
    ) -> Receiver {
        let n_stores = stores.len();
        Receiver {
            stores,
            excludes,
            stats: stats.clone(),
            commits: Pipeline::for_durability(durability),
            flush_done: None,
            flush_started: Instant::now(),
            flush_alarm: crate::config::DEFAULT_FLUSH_ALARM,
            flush_overdue: false,
            ops: Applier::new(stats),
            current: None,
            replies: Vec::new(),
            frame_read_at: Instant::now(),
            durability,
            flusher: None,
            stager: None,
            done_files: Default::default(),
            space: vec![Default::default(); n_stores],
            state_dir: None,
            latch: Latch::default(),
            prescanned: None,
            fence: None,
            session_epoch: Default::default(),
            handover: HandOver::new(
                crate::failpoint::wait_or("ACK_WAIT", super::handover::ACK_WAIT)
                    .max(Duration::from_millis(100)),
            ),
            manifest_out: None,
            served: Default::default(),
            held_saved: None,
            held_save_failing: None,
            held_gone: Vec::new(),
            renames_at_flush: 0,
        }
    }

    /// The sources held for renames onto protected paths (`Applier`), to
    /// pass on to the next connection's receiver.
    pub fn take_held_for_rename(&mut self) -> super::apply::HeldForRename {
        self.ops.take_held_for_rename()
    }

    /// What waits for room (`Applier`), to pass on to the next
    /// connection's receiver.
    pub fn take_waiting_for_room(&mut self) -> super::waiting::WaitingForRoom {
        self.ops.take_waiting()
    }

    /// Takes on what an earlier receiver left waiting for room. What fits
    /// now goes at once: room may have come while no session ran, and a
    /// delete held for it would count the store as full (an alarm) until
    /// the first recheck.
    pub fn wait_for_room(&mut self, waiting: super::waiting::WaitingForRoom) {
        let any = !waiting.is_empty();
        self.ops.wait_for_room(waiting);
        if !any {
            return;
        }
        for i in 0..self.stores.len() {
            if let Ok(room) = self.stores[i].root.room() {
                self.ops.room(i, super::space::usable(&room));
            }
        }
    }

    /// Takes on the sources an earlier receiver held (or the state
    /// directory kept across a restart).
    /// Names not in the tree now (the other names of a folder rename not
    /// known durable) are kept on disk only, until a directory flush.
    pub fn hold_for_rename(&mut self, held: super::apply::HeldForRename) {
        let gone: Vec<(usize, PathBuf)> = held
            .keys()
            .filter(|(s, h)| {
                self.stores
                    .get(*s)
                    .is_some_and(|st| matches!(st.root.tree().lstat(h), Ok(None)))
            })
            .cloned()
            .collect();
        self.ops.hold_for_rename(held, gone);
        self.held_saved = None;
    }

    /// Keeps the sources held for renames in the state directory when they
    /// changed, before the ops that changed them are answered: a restarted
    /// replica must still hold them (the primary and the next comparison
    /// delete them). A failed write raises an alarm; the holds stand in
    /// memory and the write is tried again at the next answer.
    fn save_held(&mut self) {
        let Some(dir) = self.state_dir.as_deref() else {
            return;
        };
        let changes = self.ops.held_changes();
        if self.held_saved == Some(changes)
            || self.held_save_failing.is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let held = self.ops.held_to_save();
        let names: Vec<String> = self.stores.iter().map(|s| s.name.clone()).collect();
        match super::held::save(dir, &names, &held) {
            Ok(()) => {
                if !held.is_empty() {
                    info!(
                        held = held.len(),
                        "sources held for renames onto conflicts that cannot be kept aside saved"
                    );
                }
                self.held_saved = Some(changes);
                self.held_save_failing = None;
            }
            Err(e) => {
                // Tried again a second later at the earliest, and alarmed
                // once until a write succeeds.
                let first = self.held_save_failing.is_none();
                self.held_save_failing = Some(Instant::now() + Duration::from_secs(1));
                if first {
                    error!(alarm = true, held = held.len(), "ALARM: cannot save the sources held for renames in {}: {e}; a restart before they are released would forget them", dir.display());
                    self.stats.raise_alarm(format!(
                        "cannot save the sources held for renames in {}: {e}",
                        dir.display()
                    ));
                }
                self.held_saved = None;
            }
        }
    }

    pub fn save_indexes(&mut self) {
        for s in self.stores.iter_mut() {
            if let Err(e) = s.index.save() {
                warn!(store = %s.name, "cannot save index: {e}");
            }
        }
    }

    /// Discards everything staged and not landed, after [`Receiver::serve`]
    /// was cut short (the node changed role mid-session, so its own cleanup
    /// never ran), and sweeps the staging directories.
    pub fn abandon(&mut self) {
        self.discard_unlanded();
        if let Some(inc) = self.current.take() {
            drop(inc.fd);
            self.stores[inc.rx.store()]
                .root
                .discard_staged(inc.rx.seq());
        }
        self.done_files.clear();
        for s in &self.stores {
            if let Err(e) = s.root.clean_staging() {
                warn!(store = %s.name, "cannot clean staging: {e}");
            }
        }
    }

    /// Serves one sync connection until it ends. Staged files that were not
    /// landed are discarded; nothing half-written is ever under a final name.
    pub async fn serve(&mut self, mut r: FrameReader, w: FrameWriter) -> Result<(), RecvError> {
        let peer = r.peer().to_string();
        // Latched by the marker, or in memory by an earlier session whose
        // marker could not be written; lifted only by a re-read.
        let in_memory = self
            .stats
            .unverified
            .lock()
            .expect("unverified lock")
            .clone();
        self.latch = Latch::resume(self.state_dir.as_deref().and_then(unverified).or(in_memory));
        *self.stats.unverified.lock().expect("unverified lock") =
            self.latch.reason().map(str::to_owned);
        if self.durability == Durability::Syncfs && self.stager.is_none() {
            // The engine's flusher (one for the node's life) if it gave one.
            let started = match self.flusher.clone() {
                Some(f) => Ok(f),
                None => crate::io::DurableWorker::start("hasync-durable"),
            }
            .and_then(|f| Ok((Stager::start(f.clone())?, f)));
            match started {
                Ok((stager, f)) => {
                    self.flusher = Some(f);
                    self.stager = Some(stager);
                }
                Err(e) => {
                    return Err(RecvError::Durability {
                        path: PathBuf::from("<syncfs and staging threads>"),
                        source: e,
                    })
                }
            }
        }
        // Frames are read by a task of their own, so that the loop can wait
        // for a flush and for the next frame at once.
        let peer_addr = r.peer();
        let (tx, mut frames) = mpsc::channel(READ_AHEAD_FRAMES);
        let budget = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES));
        let reader = tokio_uring::spawn(async move {
            loop {
                let f = match r.recv_frame().await {
                    Ok(f) => {
                        let cost = f.payload.len().clamp(1, READ_AHEAD_BYTES) as u32;
                        match budget.clone().acquire_many_owned(cost).await {
                            Ok(permit) => Ok((f, Instant::now(), permit)),
                            Err(_) => return,
                        }
                    }
                    Err(e) => Err(e),
                };
                let end = f.is_err();
                if tx.send(f).await.is_err() || end {
                    return;
                }
            }
        });
        let result = self.serve_inner(&mut frames, &w, &peer, peer_addr).await;
        reader.abort();
        // Nothing is handed over again before the next session's `Start`
        // is admitted (its fence, its stores).
        self.handover.end_session();
        self.settle_flush().await;
        // Unacknowledged work is redone by the sender after reconnecting.
        self.discard_unlanded();
        if let Some(inc) = self.current.take() {
            drop(inc.fd);
            self.stores[inc.rx.store()]
                .root
                .discard_staged(inc.rx.seq());
        }
        // Outcomes of this session's files must not meet the next session's
        // sequence numbers.
        if let Some(st) = &self.stager {
            st.drained().await;
            st.take_done().for_each(drop);
        }
        self.done_files.clear();
        // A manifest cut short is asked for again by the next session.
        self.manifest_out = None;
        self.save_indexes();
        result
    }

    async fn serve_inner(
        &mut self,
        frames: &mut mpsc::Receiver<ReadAhead>,
        w: &FrameWriter,
        peer: &str,
        peer_addr: std::net::SocketAddr,
    ) -> Result<(), RecvError> {
        enum Next {
            Flushed(crate::io::FlushResult),
            Frame(Option<ReadAhead>),
            /// The flush in flight has taken longer than `flush_alarm`.
            Overdue,
            /// A version handed over waited too long for its
            /// acknowledgement ([`super::handover::ACK_WAIT`]).
            Resend,
        }
        let abandoned = || Err("flush abandoned".into());
        loop {
            if self.commits.phase().is_none() {
                // At a barrier; or with the bound reached and none yet (a
                // peer that sends no barrier must not grow the staged
                // files, their descriptors and outcomes, without bound).
                let full = self.commits.staged().len() >= STAGED_FILES_MAX;
                self.commits.start(full);
                self.perform(peer, None)?;
            }
            // After the start, which took what was staged: reading goes on
            // during its flush.
            let staged_full = self.commits.staged().len() >= STAGED_FILES_MAX;
            let (alarm_at, overdue) = (self.flush_alarm_at(), self.flush_overdue);
            let resend_at = self
                .handover
                .resend_at()
                .map(tokio::time::Instant::from_std);
            let next = match self.flush_done.as_mut() {
                None => match resend_at {
                    None => Next::Frame(frames.recv().await),
                    Some(at) => tokio::select! {
                        biased;
                        f = frames.recv() => Next::Frame(f),
                        _ = tokio::time::sleep_until(at) => Next::Resend,
                    },
                },
                // Staged enough: nothing more is read until the flush
                // reports.
                Some(_) if staged_full => {
                    Next::Flushed(self.flush_outcome().await.unwrap_or_else(abandoned))
                }
                // Advance a commit whose flush finished; meanwhile keep
                // staging what arrives (up to a bound), so that it rides
                // along with the next flush.
                Some(done) => match done.try_recv() {
                    Ok(res) => Next::Flushed(res),
                    Err(TryRecvError::Closed) => Next::Flushed(abandoned()),
                    Err(TryRecvError::Empty) => tokio::select! {
                        biased;
                        res = done => Next::Flushed(res.unwrap_or_else(|_| abandoned())),
                        // Before the frames: a steady stream must not
                        // hold the alarm back.
                        _ = tokio::time::sleep_until(alarm_at), if !overdue => Next::Overdue,
                        f = frames.recv() => Next::Frame(f),
                        _ = tokio::time::sleep_until(resend_at.unwrap_or(alarm_at)), if resend_at.is_some() => Next::Resend,
                    },
                },
            };
            let frame = match next {
                Next::Overdue => {
                    self.flush_is_overdue();
                    continue;
                }
                Next::Resend => {
                    if self.requeue_unacked_handovers() {
                        self.upload_conflicts(w).await?;
                    }
                    continue;
                }
                Next::Flushed(res) => {
                    self.advance(res, peer)?;
                    self.send_replies(w).await?;
                    // A landing may have kept a version aside (a conflict
                    // whose keep-aside is tried again).
                    if self.handover.has_queued() {
                        self.upload_conflicts(w).await?;
                    }
                    continue;
                }
                Next::Frame(None) => return Err(LinkError::Closed { peer: peer_addr }.into()),
                Next::Frame(Some(f)) => {
                    let (f, at, _) = f?;
                    self.frame_read_at = at;
                    f
                }
            };
            let handled = Instant::now();
            self.recheck_space();
            if frame.kind == crate::wire::Kind::Bulk {
                // Raw content of the file being received (spliced by the sender).
                let Some(seq) = self.current.as_ref().map(|i| i.rx.seq()) else {
                    return Err(self.protocol(peer, "bulk data without a file"));
                };
                let len = frame.payload.len();
                self.on_data(seq, frame.payload, 0..len, peer).await?;
                self.send_replies(w).await?;
                continue;
            }
            if let Some(data) = SyncMsg::data_view(&frame) {
                let (seq, range) = data.map_err(|source| RecvError::Malformed {
                    peer: peer.to_string(),
                    source,
                })?;
                self.on_data(seq, frame.payload, range, peer).await?;
                self.send_replies(w).await?;
                continue;
            }
            let msg = SyncMsg::decode(&frame).map_err(|source| RecvError::Malformed {
                peer: peer.to_string(),
                source,
            })?;
            if let Err(e) = self.handle(msg, peer).await {
                if matches!(e, RecvError::Fenced { .. }) {
                    // The peer learns why (`Fenced`) before the close.
                    let _ = self.send_replies(w).await;
                }
                return Err(e);
            }
            Stages::record(
                &mut self.stats.stages.lock().expect("stages lock").handle,
                handled.elapsed(),
            );
            self.send_replies(w).await?;
            self.stream_manifest(w).await?;
            // Also here: a steady stream of frames must not hold the
            // hand-over's timer back.
            self.requeue_unacked_handovers();
            if self.handover.has_queued() {
                self.upload_conflicts(w).await?;
            }
        }
    }

    /// Versions handed over and not acknowledged within the wait go again
    /// (the primary could not keep them, or is very slow); whether any.
    fn requeue_unacked_handovers(&mut self) -> bool {
        let now = Instant::now();
        if self.handover.resend_at().is_none_or(|at| at > now) {
            return false;
        }
        let waited = self.handover.ack_wait();
        let n = self.handover.requeue_unacked(now);
        warn!(versions = n, "the primary acknowledged no kept-aside version handed over within {waited:?}: it could not keep them (its log says why: a full or failing disk) or is slow; handing them over again, next wait {:?}", self.handover.ack_wait());
        n > 0
    }

    async fn send_replies(&mut self, w: &FrameWriter) -> Result<(), RecvError> {
        if !self.replies.is_empty() {
            let out = std::mem::take(&mut self.replies);
            let (res, mut buf) = w.send_buf(out).await;
            res?;
            buf.clear();
            self.replies = buf;
        }
        Ok(())
    }

    /// The session ends (or was dropped): a flush in flight may cover files
    /// it landed, so its outcome is heard here, however long it takes (the
    /// next session waits: its own flushes would queue behind it on the
    /// durable-commit thread anyway), and a failure latches the replica.
    /// Left behind, a failure would reach a later session only at its next
    /// flush, after that session's manifest had vouched for what the disk
    /// lost. Meanwhile the marker says the outcome is unknown ([`FLUSH_PENDING`]):
    /// a process that dies before it is heard restarts latched.
    pub async fn settle_flush(&mut self) {
        if self.flush_done.is_none() {
            return;
        }
        let pending = self.verified();
        if pending {
            write_marker(self.state_dir.as_deref(), FLUSH_PENDING);
        }
        let res = self.flush_outcome().await.unwrap_or(Ok(()));
        self.flush_done = None;
        self.flush_returned();
        match res {
            Err(why) => self.latch(&why),
            // Not a marker that says more (a failure recorded meanwhile).
            Ok(()) if pending && self.verified() => remove_marker(self.state_dir.as_deref()),
            Ok(()) => {}
        }
    }

    /// Waits for the flush in flight (`None` without one), raising the
    /// overdue alarm once it has run longer than `flush_alarm`.
    async fn flush_outcome(&mut self) -> Option<crate::io::FlushResult> {
        loop {
            let (alarm_at, overdue) = (self.flush_alarm_at(), self.flush_overdue);
            let done = self.flush_done.as_mut()?;
            let heard = tokio::select! {
                res = done => Some(res.unwrap_or_else(|_| Err("flush abandoned".into()))),
                _ = tokio::time::sleep_until(alarm_at), if !overdue => None,
            };
            match heard {
                Some(res) => return Some(res),
                None => self.flush_is_overdue(),
            }
        }
    }

    fn flush_alarm_at(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.flush_started + self.flush_alarm)
    }

    /// The flush in flight has not returned within `flush_alarm`: the disk
    /// may hang. Nothing is acknowledged meanwhile, and the status says so
    /// until it returns.
    fn flush_is_overdue(&mut self) {
        self.flush_overdue = true;
        *self.stats.flush_overdue_since.lock().expect("flush lock") = Some(self.flush_started);
        let secs = self.flush_started.elapsed().as_secs_f64();
        let msg = format!(
            "ALARM: the replica's flush has not returned for {secs:.0} s (a hung disk?); nothing is acknowledged until it does"
        );
        error!(alarm = true, "{msg}");
        self.stats.raise_alarm(msg);
    }

    /// The flush in flight returned (or was given up with its session).
    fn flush_returned(&mut self) {
        if std::mem::take(&mut self.flush_overdue) {
            *self.stats.flush_overdue_since.lock().expect("flush lock") = None;
            let secs = self.flush_started.elapsed().as_secs_f64();
            info!("the replica's overdue flush returned after {secs:.1} s");
        }
    }

    /// Neither this session's latch nor the node's status (a failure the
    /// durable-commit thread recorded) says the replica is unverified.
    fn verified(&self) -> bool {
        self.latch.reason().is_none()
            && self
                .stats
                .unverified
                .lock()
                .expect("unverified lock")
                .is_none()
    }

    /// Discards every staged file not landed (the session ends).
    fn discard_unlanded(&mut self) {
        self.flush_done = None;
        for f in self.commits.take_unlanded() {
            self.stores[f.store].root.discard_staged(f.seq);
        }
    }

    /// Performs the group commit's outputs, in order (`failure`: why the
    /// flush just reported failed).
    fn perform(&mut self, peer: &str, failure: Option<&str>) -> Result<(), RecvError> {
        while let Some(out) = self.commits.poll_output() {
            match out {
                CommitOutput::FlushData => {
                    self.flush_started = Instant::now();
                    let done = match self.durability {
                        Durability::Syncfs => {
                            let stores: Vec<usize> = self
                                .commits
                                .flushing_mut()
                                .iter()
                                .map(|f| f.store)
                                .collect();
                            let roots = self.roots_of(stores.into_iter());
                            self.flush_roots(roots)
                        }
                        Durability::Fsync => crate::io::join_fsyncs(
                            self.commits
                                .flushing_mut()
                                .iter_mut()
                                .filter_map(|f| f.fsync.take())
                                .collect(),
                            self.flusher.as_ref().map(|f| f.orphans()),
                        ),
                    };
                    self.flush_done = Some(done);
                }
                CommitOutput::Land(files) => self.land_flushed(files, peer),
                CommitOutput::FlushDirs => {
                    self.held_gone = self.held_names_gone();
                    self.renames_at_flush = self.ops.folder_renames();
                    self.apply_dir_times();
                    self.flush_started = Instant::now();
                    let extra: Vec<usize> = self.commits.folded().iter().map(|f| f.store).collect();
                    self.flush_done = Some(self.flush_dirs(&extra)?);
                }
                CommitOutput::Ack(barriers) => {
                    // Gone before the flush that just completed, and still
                    // gone: their renames are durable.
                    let gone: Vec<((usize, PathBuf), u64)> = std::mem::take(&mut self.held_gone)
                        .into_iter()
                        .filter(|((s, h), _)| {
                            matches!(self.stores[*s].root.tree().lstat(h), Ok(None))
                        })
                        .collect();
                    self.ops.let_go_held(gone);
                    self.ops.folder_renames_durable(self.renames_at_flush);
                    let now = Instant::now();
                    let mut st = self.stats.stages.lock().expect("stages lock");
                    for (_, at) in &barriers {
                        Stages::record(&mut st.barrier_to_ack, now.duration_since(*at));
                    }
                    drop(st);
                    for seq in barriers
                        .into_iter()
                        .filter_map(|(seq, _)| self.latch.ack(seq))
                    {
                        SyncMsg::Ack { seq }.encode(&mut self.replies);
                    }
                }
                CommitOutput::Failed(files) => {
                    let why = failure.unwrap_or("flush failed").to_string();
                    for f in files {
                        // Never call a file durable after a failed flush:
                        // drop it and ask again.
                        self.stores[f.store].root.discard_staged(f.seq);
                        self.done_files.remove(&f.seq);
                        let err = FsError::Io {
                            op: "flush",
                            path: f.rel.display().to_string(),
                            source: std::io::Error::other(why.clone()),
                        };
                        self.local_failure(f.seq, f.store, &f.rel, &err, peer);
                    }
                    // The session ends; the next one starts from what the
                    // disk really holds.
                    return Err(self.latch_unverified(why));
                }
            }
        }
        Ok(())
    }

    /// The names held for renames that are not in the tree now.
    fn held_names_gone(&self) -> Vec<((usize, PathBuf), u64)> {
        self.ops
            .held_old_names()
            .into_iter()
            .filter(|((s, h), _)| matches!(self.stores[*s].root.tree().lstat(h), Ok(None)))
            .collect()
    }

    fn roots_of(&self, stores: impl Iterator<Item = usize>) -> Vec<PathBuf> {
        let set: BTreeSet<usize> = stores.collect();
        set.into_iter()
            .map(|s| self.stores[s].root.path().to_path_buf())
            .collect()
    }

    fn flush_roots(
        &self,
        roots: Vec<PathBuf>,
    ) -> tokio::sync::oneshot::Receiver<crate::io::FlushResult> {
        match (&self.stager, &self.flusher) {
            // After every write queued before it.
            (Some(st), _) => st.flush(roots),
            (None, Some(f)) => f.flush(roots),
            // `serve` starts the thread before any commit in syncfs mode.
            (None, None) => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let _ = reply.send(Err("no durable-commit thread".into()));
                rx
            }
        }
    }

    /// The flush in flight finished with `res`: the commit goes on.
    fn advance(&mut self, res: crate::io::FlushResult, peer: &str) -> Result<(), RecvError> {
        self.flush_done = None;
        self.flush_returned();
        // An earlier flush failed with nobody waiting: treat this one as
        // failed too (the session ends and the next re-reads from disk).
        let res = Latch::flush_outcome(res, self.orphaned_flush_failure());
        let took = self.flush_started.elapsed();
        {
            let mut st = self.stats.stages.lock().expect("stages lock");
            match self.commits.phase() {
                Some(CommitPhase::Data) => Stages::record(&mut st.data_flush, took),
                Some(CommitPhase::Dirs) => Stages::record(&mut st.dir_flush, took),
                None => {}
            }
        }
        self.commits.flushed(res.is_ok());
        self.perform(peer, res.err().as_deref())
    }

    /// A flush failed: latch the replica unverified (durably, so that a
    /// restart does not forget it), alarm, and return the error that ends
    /// the session. Until the next manifest has re-hashed every file from
    /// disk, no batch is acknowledged.
    fn latch_unverified(&mut self, why: String) -> RecvError {
        self.latch(&why);
        RecvError::Durability {
            path: self
                .stores
                .first()
                .map(|s| s.root.path().to_path_buf())
                .unwrap_or_default(),
            source: std::io::Error::other(why),
        }
    }

    /// A flush that no session waited for any more (its session ended
    /// first) failed: what it covered may be landed and not durable.
    fn orphaned_flush_failure(&self) -> Option<String> {
        self.flusher.as_ref()?.take_orphaned_failure()
    }

    /// Latches the replica unverified (see [`Receiver::latch_unverified`]).
    fn latch(&mut self, why: &str) {
        let latched = self.latch.set(why);
        self.record_latch(latched);
    }

    /// Records durably (and with an alarm, once) that the replica is
    /// latched.
    fn record_latch(&mut self, Latched { reason, .. }: Latched) {
        record_unverified(self.state_dir.as_deref(), &self.stats, &reason);
    }

    /// A manifest listed with `rehash` was sent whole: if it re-read every
    /// file from disk, the latch lifts and the acknowledgements held
    /// meanwhile go out.
    fn manifest_sent(&mut self, rehash: Rehash) {
        let Some(Lifted { reason, acks }) = self.latch.manifest_sent(rehash) else {
            return;
        };
        remove_marker(self.state_dir.as_deref());
        info!("the replica was re-read from disk after \"{reason}\": verified again");
        *self.stats.unverified.lock().expect("unverified lock") = None;
        for seq in acks {
            SyncMsg::Ack { seq }.encode(&mut self.replies);
        }
    }

    /// Renames files whose data flush finished into place.
    fn land_flushed(&mut self, files: Vec<Staged>, peer: &str) {
        // The staging thread's outcomes for these files arrived before the
        // flush that covered them reported.
        if let Some(stager) = &self.stager {
            self.done_files
                .extend(stager.take_done().map(|d| (d.seq, d.res)));
        }
        for f in files {
            let st = if self.stager.is_some() {
                self.done_files.remove(&f.seq).unwrap_or_else(|| {
                    error!(path = %f.rel.display(), "no outcome from the staging thread; re-requested");
                    Err(FsError::Io {
                        op: "stage",
                        path: f.rel.display().to_string(),
                        source: std::io::Error::other("no outcome from the staging thread"),
                    })
                })
            } else {
                Ok(f.st)
            };
            let store = &mut self.stores[f.store];
            self.ops.land(
                &mut store.root,
                &mut store.index,
                f.store,
                f.seq,
                f.rel,
                f.hash,
                f.size,
                f.apart,
                st,
            );
        }
        self.answer_ops(peer);
    }

    /// Entries landed (or were removed) in these folders since the last
    /// commit: their mtime is the primary's again, before the flush that
    /// makes the directories durable.
    fn apply_dir_times(&mut self) {
        for (s, dir, meta) in self.ops.dir_times_due() {
            let st = &mut self.stores[s];
            if let Err(e) = self
                .ops
                .retime(&mut st.root, &mut st.index, s, dir.clone(), &meta)
            {
                warn!(store = %st.name, dir = %dir.display(), "cannot set a folder's mtime: {e}")
            }
        }
    }

    /// Starts making every rename, delete and new directory so far durable
    /// (and, with syncfs, the data of files in `also_stores`).
    fn flush_dirs(
        &mut self,
        also_stores: &[usize],
    ) -> Result<tokio::sync::oneshot::Receiver<crate::io::FlushResult>, RecvError> {
        let dirs = self.ops.take_dirs();
        match self.durability {
            // One syncfs per filesystem covers every parent directory.
            Durability::Syncfs => Ok(self.flush_roots(
                self.roots_of(dirs.iter().map(|d| d.0).chain(also_stores.iter().copied())),
            )),
            Durability::Fsync => {
                let mut fds = Vec::with_capacity(dirs.len());
                for (s, dir) in &dirs {
                    let root = &self.stores[*s].root;
                    match root.open_dir(dir) {
                        Ok(Some(fd)) => fds.push(fd),
                        Ok(None) => {}
                        Err(e) => {
                            return Err(RecvError::Durability {
                                path: root.path().join(dir),
                                source: std::io::Error::other(e.to_string()),
                            })
                        }
                    }
                }
                Ok(crate::io::fsync_all(
                    fds,
                    self.flusher.as_ref().map(|f| f.orphans()),
                ))
            }
        }
    }

    /// Waits for the flush in flight and advances the commit.
    async fn await_flush(&mut self, peer: &str) -> Result<(), RecvError> {
        let res = self
            .flush_outcome()
            .await
            .unwrap_or_else(|| Err("no flush in flight for the commit".into()));
        self.advance(res, peer)
    }

    fn protocol(&self, peer: &str, what: impl Into<String>) -> RecvError {
        RecvError::Protocol {
            peer: peer.to_string(),
            what: what.into(),
        }
    }

    fn store_index(&self, store: u16, peer: &str) -> Result<usize, RecvError> {
        let s = store as usize;
        if s >= self.stores.len() {
            return Err(self.protocol(peer, format!("unknown store number {s}")));
        }
        Ok(s)
    }

    /// Validates a peer path; a refusal is counted, logged and answered.
    fn check(&mut self, seq: u64, store: usize, raw: &[u8], peer: &str) -> Option<PathBuf> {
        match admit_path(raw, &self.excludes) {
            Ok(rel) => Some(rel),
            Err(why) => {
                self.refuse(seq, store, raw, &why, peer);
                None
            }
        }
    }

    fn refuse(&mut self, seq: u64, store: usize, raw: &[u8], why: &str, peer: &str) {
        add(&self.stats.refused_paths, 1);
        warn!(peer, store, path = %String::from_utf8_lossy(raw), "refused op from peer: {why}");
        SyncMsg::Refused {
            seq,
            store: store as u16,
            path: raw[..raw.len().min(super::super::wire::sync::PATH_BYTES_MAX)].to_vec(),
            why: why.to_string(),
        }
        .encode(&mut self.replies);
    }

    fn need(&mut self, seq: u64, store: usize, rel: &Path, reason: NeedReason) {
        SyncMsg::Need {
            seq,
            store: store as u16,
            path: rel.as_os_str().as_bytes().to_vec(),
            reason,
        }
        .encode(&mut self.replies);
    }

    fn local_failure(&mut self, seq: u64, store: usize, rel: &Path, e: &FsError, peer: &str) {
        match super::apply::answer(e) {
            Answer::Refuse => {
                let raw = rel.as_os_str().as_bytes().to_vec();
                self.refuse(seq, store, &raw, &e.to_string(), peer);
            }
            Answer::Need(NeedReason::NoSpace) => {
                self.refused_for_room(store, 0, e.to_string());
                self.need(seq, store, rel, NeedReason::NoSpace);
            }
            Answer::Need(reason) => {
                warn!(store, path = %rel.display(), "cannot apply op: {e}; asked for again");
                *self.stats.last_error.lock().expect("error lock") = Some(e.to_string());
                self.need(seq, store, rel, reason);
            }
        }
    }

    /// A file (`content`: its hash and size) could not be staged: answered
    /// as [`Receiver::local_failure`] answers; for want of room, a delete
    /// of its content elsewhere waits for it ([`Applier::no_room`]).
    fn file_failed(
        &mut self,
        seq: u64,
        store: usize,
        rel: &Path,
        (hash, size): (u128, u64),
        e: &FsError,
        peer: &str,
    ) {
        if e.is_no_space() {
            self.ops.no_room(store, seq, rel, hash, size);
        }
        self.local_failure(seq, store, rel, e, peer);
    }

    /// For an op that deletes or replaces a name while files are staged
    /// ([`super::apply::name_removed`]): what it removes, a folder (a
    /// delete's) or the content of a file a staged file has the size of
    /// (see [`land_first`]).
    fn content_deleted(&self, msg: &SyncMsg) -> Gone {
        let Some((store, path)) = super::apply::name_removed(msg) else {
            return Gone::Nothing;
        };
        let s = store as usize;
        let staged = self.commits.staged();
        if staged.is_empty() || s >= self.stores.len() {
            return Gone::Nothing;
        }
        // Checked again (and answered) as the op applies.
        let Ok(rel) = admit_path(path, &self.excludes) else {
            return Gone::Nothing;
        };
        let st = &self.stores[s];
        if matches!(super::apply::ReplicaTree::lstat(&st.root, &rel), Ok(Some(found)) if found.kind == Kind::Dir)
        {
            return if super::apply::removes_a_folder(msg) {
                Gone::Folder
            } else {
                Gone::Nothing
            };
        }
        super::apply::content_at(&st.root, &st.index, &rel, |found| {
            staged
                .iter()
                .any(|f| f.store == s && f.size == found.version.size)
        })
        .map_or(Gone::Nothing, |(hash, _)| Gone::Content(hash))
    }

    /// Something was refused for want of room in `store`: it counts as
    /// full (alarmed once per episode) until a recheck finds room.
    fn refused_for_room(&mut self, store: usize, need_bytes: u64, why: String) {
        if self.space[store]
            .refused(Instant::now(), need_bytes, why.clone())
            .is_some()
        {
            self.disk_full(store, &why);
        }
    }

    /// Raises the disk-full condition of `store` (once per episode).
    fn disk_full(&mut self, store: usize, why: &str) {
        let line = format!(
            "disk full on the replica: store {} ({}): {why}; what does not fit waits until space returns",
            self.stores[store].name,
            self.stores[store].root.path().display()
        );
        error!(alarm = true, "ALARM: {line}");
        self.stats.raise_alarm(line.clone());
        *self.stats.disk_full_why.lock().expect("disk full lock") = Some(line);
        self.stats.disk_full.store(true, Relaxed);
    }

    /// While a store's disk counts as full, looks again (at most every
    /// `space::RECHECK`) whether what was refused fits now.
    fn recheck_space(&mut self) {
        let now = Instant::now();
        for i in 0..self.stores.len() {
            if !self.space[i].due(now) {
                continue;
            }
            let Ok(room) = self.stores[i].root.room() else {
                continue;
            };
            // What waits for room and fits now goes, whether or not the
            // store stops counting as full (a bigger file may still not
            // fit; inodes may be short).
            self.ops.room(i, super::space::usable(&room));
            if self.space[i].recheck(now, room) == Some(super::space::Change::Cleared) {
                info!(
                    store = %self.stores[i].name,
                    free_mib = room.bytes >> 20,
                    free_inodes = room.inodes,
                    "disk space is back on the replica: replication resumes"
                );
            }
        }
        if !self.space.iter().any(|s| s.is_full()) && self.stats.disk_full.swap(false, Relaxed) {
            *self.stats.disk_full_why.lock().expect("disk full lock") = None;
        }
    }

    /// Whether the store's filesystem can take a file of `size` bytes (and
    /// an inode); if not, the file is answered "no space" before anything
    /// is staged.
    fn room_for(&mut self, store: usize, size: u64) -> Result<(), String> {
        let room = match self.stores[store].root.room() {
            Ok(r) => r,
            // Cannot tell: let the write itself find out.
            Err(_) => return Ok(()),
        };
        match self.space[store].admit(Instant::now(), room, size) {
            Ok(()) => Ok(()),
            Err(no) => {
                if no.became_full {
                    self.disk_full(store, &no.why);
                }
                Err(no.why)
            }
        }
    }

    async fn handle(&mut self, msg: SyncMsg, peer: &str) -> Result<(), RecvError> {
        if !matches!(
            msg,
            SyncMsg::Start { .. }
                | SyncMsg::ManifestRequest { .. }
                | SyncMsg::ConflictAck { .. }
                | SyncMsg::ConflictRefused { .. }
        ) {
            // Anything else may change the tree: scans taken before it are stale.
            self.prescanned = None;
        }
        // Data frames belong to the file being received; anything else ends it.
        if let SyncMsg::Data { seq, bytes } = msg {
            let len = bytes.len();
            return self.on_data(seq, bytes, 0..len, peer).await;
        }
        if self.current.is_some() {
            return Err(self.protocol(peer, "file ended before all its data arrived"));
        }
        // Ops on paths apply in order: the files they touch land first.
        {
            let gone = self.content_deleted(&msg);
            let before = land_first::<Staged>(&msg, gone);
            loop {
                match self.commits.gate(&before) {
                    Gate::Open => break,
                    Gate::AwaitFlush => {
                        self.perform(peer, None)?;
                        self.await_flush(peer).await?;
                    }
                    Gate::Failed => {
                        return Err(self.latch_unverified("an earlier flush failed".into()))
                    }
                }
            }
        }
        // Ops on paths: parsed (their paths checked; a refusal is
        // answered) and applied by the receiver's decisions.
        let msg = match path_op(msg, |seq, store, raw| -> Result<_, RecvError> {
            let s = self.store_index(store, peer)?;
            Ok(self.check(seq, s, raw, peer))
        })? {
            Parsed::Op { seq, store, op } => {
                let s = store as usize;
                let st = &mut self.stores[s];
                self.ops.apply(&mut st.root, &mut st.index, s, seq, op);
                self.answer_ops(peer);
                return Ok(());
            }
            Parsed::Refused => return Ok(()),
            Parsed::Other(msg) => msg,
        };
        match msg {
            SyncMsg::Start { stores, epoch } => {
                if let Some(fence) = &self.fence {
                    if let Err(why) = fence.admit(epoch) {
                        if let super::fence::Admission::Stale { seen } = why {
                            SyncMsg::Fenced { seen }.encode(&mut self.replies);
                        }
                        return Err(RecvError::Fenced {
                            peer: peer.to_string(),
                            epoch,
                            why,
                        });
                    }
                }
                self.session_epoch.set(Some(epoch));
                let ours: Vec<String> = self.stores.iter().map(|s| s.name.clone()).collect();
                if stores != ours {
                    return Err(RecvError::StoresDiffer {
                        peer: peer.to_string(),
                        ours,
                        theirs: stores,
                    });
                }
                self.stats.caught_up.store(false, Relaxed);
                info!(peer, "sync session started");
                let own = self.own_tenure();
                if own.former_primary() {
                    info!(peer, served_epoch = own.served_epoch(), "this node served as primary: the primary decides which of its changes are genuine conflicts");
                }
                own.peer_state().encode(&mut self.replies);
                // A replica now: a takeover record of an earlier tenure of
                // this node is settled (the next promotion starts its own).
                if let Some(dir) = self.state_dir.as_deref() {
                    for st in &self.stores {
                        if let Err(e) = super::takeover::settle(dir, &st.name) {
                            warn!(store = %st.name, "cannot settle this node's earlier takeover record: {e}");
                        }
                    }
                    // A replica never complete is marked as filling before
                    // anything of this session lands (it must not take
                    // over on its own meanwhile, even after a restart).
                    use crate::failover::ReplicaFill;
                    let had_replica = self
                        .stores
                        .iter()
                        .all(|s| super::index::Index::exists(dir, &format!("{}-replica", s.name)));
                    match super::fill::session_starts(dir, own.former_primary(), had_replica) {
                        Ok(true) => {
                            if self.stats.replica_fill() != ReplicaFill::Filling {
                                info!(peer, "first sync of this replica: it counts as incomplete (no takeover on its own) until the primary says it has caught up");
                            }
                            self.stats.set_replica_fill(ReplicaFill::Filling);
                        }
                        Ok(false) => self.stats.set_replica_fill(ReplicaFill::Complete),
                        Err(source) => {
                            // Nothing lands without the mark: after a
                            // crash this node would count as fresh.
                            self.stats.set_replica_fill(ReplicaFill::Filling);
                            return Err(RecvError::Durability {
                                path: super::fill::path(dir),
                                source,
                            });
                        }
                    }
                }
                self.ops.begin_session();
                // Versions kept aside and not yet acknowledged by a primary
                // (an earlier session ended first) are handed over again.
                let mut listed = Vec::new();
                for (i, st) in self.stores.iter().enumerate() {
                    match super::conflicts::list(&st.name, st.root.internal_path()) {
                        Ok(list) => listed.extend(list.into_iter().map(|c| (i, c))),
                        Err(e) => warn!(store = %st.name, "cannot list kept-aside versions: {e}"),
                    }
                }
                self.handover.begin_session(listed);
                // A refusal is this session's to say again.
                *self
                    .stats
                    .conflict_refused
                    .lock()
                    .expect("conflict refused lock") = None;
            }
            SyncMsg::ConflictAck { id } => {
                if let Some((s, c)) = self.handover.acked(id) {
                    *self
                        .stats
                        .conflict_refused
                        .lock()
                        .expect("conflict refused lock") = None;
                    if let Err(e) =
                        super::conflicts::remove(self.stores[s].root.internal_path(), &c.file)
                    {
                        warn!(file = %c.file.display(), "cannot remove a version the primary now holds: {e}");
                    }
                }
            }
            SyncMsg::ConflictRefused { id, why } => {
                // Stays on its way: handed over again when the wait is
                // over, as one that got no answer.
                if let Some((s, c)) = self.handover.refused(id) {
                    let wait = self.handover.ack_wait();
                    let line = format!(
                        "the primary could not keep a version kept aside here ({} in {}): {}; it stays here and is handed over again within {wait:?}",
                        c.path, self.stores[*s].name, printable(&why)
                    );
                    // Logged with the lock released: the daemon's loop
                    // (which carries the heartbeats) takes it for status.
                    let first = self
                        .stats
                        .conflict_refused
                        .lock()
                        .expect("conflict refused lock")
                        .replace(line.clone())
                        .is_none();
                    if first {
                        error!(alarm = true, "ALARM: {line}");
                        self.stats.raise_alarm(line);
                    } else {
                        warn!("{line}");
                    }
                }
            }
            SyncMsg::ManifestRequest { id, full_verify } => self.send_manifest(id, full_verify)?,
            SyncMsg::File {
                seq,
                store,
                path,
                meta,
                size,
                hash,
                apart,
            } => {
                let s = self.store_index(store, peer)?;
                let rel = self.check(seq, s, &path, peer);
                let mut inc = Incoming {
                    rx: Reception::start(seq, s, rel, meta, size, hash, apart),
                    fd: None,
                };
                // A refused path was answered by `check`; its data frames
                // are read and dropped, as are those of a file that does
                // not fit or whose staged file cannot be made.
                if inc.rx.rel().is_some() {
                    if let Err(why) = self.room_for(s, size) {
                        let rel = inc.rx.set_aside().unwrap_or_default();
                        warn!(store = %self.stores[s].name, path = %rel.display(), "no room for {size} bytes: {why}; asked again later");
                        self.ops.no_room(s, seq, &rel, hash, size);
                        self.need(seq, s, &rel, NeedReason::NoSpace);
                    } else {
                        match self.stores[s].root.create_staged(seq) {
                            Ok(fd) => inc.fd = Some(StagedFile::new(fd)),
                            Err(e) => {
                                let rel = inc.rx.set_aside().unwrap_or_default();
                                self.file_failed(seq, s, &rel, (hash, size), &e, peer);
                            }
                        }
                    }
                }
                let whole = inc.rx.is_whole();
                self.current = Some(inc);
                if whole {
                    self.complete_file(peer).await;
                }
            }
            SyncMsg::CaughtUp => {
                if !self.stats.caught_up.swap(true, Relaxed) {
                    info!(peer, "replica caught up with the primary");
                }
                // Everything sent is durable here: a first fill is done.
                if let (Some(dir), crate::failover::ReplicaFill::Filling) =
                    (self.state_dir.as_deref(), self.stats.replica_fill())
                {
                    match super::fill::complete(dir) {
                        Ok(()) => {
                            self.stats
                                .set_replica_fill(crate::failover::ReplicaFill::Complete);
                            info!(peer, "this replica is complete: its first sync has finished");
                        }
                        Err(e) => warn!("cannot mark this replica complete: {e} (it stays incomplete until the next catch-up)"),
                    }
                }
                // Reconciled completely (its genuine conflicts kept aside):
                // from now on a plain secondary.
                let reconciled = self.own_tenure().reconciled(self.handover.handing_over());
                if let (Some(dir), true) = (self.state_dir.as_deref(), reconciled) {
                    match super::takeover::clear_former_primary(dir) {
                        Ok(()) => {
                            // A plain secondary until it serves again.
                            self.served.store(0, Relaxed);
                            info!(peer, "reconciled with the primary after serving as primary")
                        }
                        Err(e) => warn!("cannot clear the former-primary mark: {e}"),
                    }
                }
            }
            SyncMsg::Barrier { seq } => {
                // Acknowledged when the group commit that takes it is durable.
                self.commits.barrier((seq, self.frame_read_at));
            }
            other => {
                return Err(self.protocol(
                    peer,
                    format!(
                        "a primary must not send {:?}",
                        std::mem::discriminant(&other)
                    ),
                ))
            }
        }
        self.answer_ops(peer);
        Ok(())
    }

    /// This node's own past as a primary: its mark (durable), and a
    /// tenure begun in this process, whose mark may not have been written
    /// (a full or failing state directory, the node serving on with an
    /// alarm).
    fn own_tenure(&self) -> super::tenure::OwnTenure {
        let dir = self.state_dir.as_deref();
        super::tenure::OwnTenure {
            marked: dir.is_some_and(super::takeover::is_former_primary),
            marked_epoch: dir.and_then(super::takeover::served_epoch),
            served_here: self.served.load(Relaxed),
        }
    }

    /// Starts answering a manifest request: [`Receiver::stream_manifest`]
    /// sends it.
    fn send_manifest(&mut self, id: u64, full_verify: bool) -> Result<(), RecvError> {
        let (rehash, latched) = self
            .latch
            .manifest(full_verify, self.orphaned_flush_failure());
        if let Some(latched) = latched {
            self.record_latch(latched);
        }
        let pre = self
            .prescanned
            .take()
            .filter(|p| rehash == Rehash::Changed && p.at.elapsed() < PRESCAN_FRESH)
            .map(|p| p.scans)
            .unwrap_or_default();
        self.manifest_out = Some(ManifestOut::new(id, rehash, pre, MANIFEST_ENTRIES_MAX));
        Ok(())
    }

    /// Sends the manifest asked for, a chunk at a time, each written before
    /// the next is encoded: a million-file manifest is never held whole.
    async fn stream_manifest(&mut self, w: &FrameWriter) -> Result<(), RecvError> {
        while self.next_manifest_chunk()? {
            self.send_replies(w).await?;
        }
        Ok(())
    }

    /// Encodes the next chunk of the manifest being sent into the replies
    /// (a store is scanned as its turn comes); false once all is sent.
    fn next_manifest_chunk(&mut self) -> Result<bool, RecvError> {
        let Some(out) = self.manifest_out.as_mut() else {
            return Ok(false);
        };
        let Some(s) = out.store_due(self.stores.len()) else {
            let rehash = out.rehash();
            self.manifest_sent(rehash);
            self.manifest_out = None;
            return Ok(false);
        };
        let store = &mut self.stores[s];
        let (entries, last) = out
            .chunk(s, store.root.tree(), &mut store.index, &self.excludes)
            .map_err(|source| RecvError::Scan {
                path: store.root.path().to_path_buf(),
                source,
            })?;
        SyncMsg::Manifest {
            id: out.id(),
            store: s as u16,
            entries,
            last,
        }
        .encode(&mut self.replies);
        Ok(true)
    }

    async fn on_data(
        &mut self,
        seq: u64,
        buf: Vec<u8>,
        range: std::ops::Range<usize>,
        peer: &str,
    ) -> Result<(), RecvError> {
        let bytes = &buf[range.clone()];
        let Some(inc) = self.current.as_mut() else {
            return Err(self.protocol(peer, format!("data for seq {seq} without a file")));
        };
        let offset = match inc.rx.data(seq, bytes) {
            Ok(offset) => offset,
            Err(e) => return Err(self.protocol(peer, e.to_string())),
        };
        if let (Some(file), Some(stager)) = (&inc.fd, &self.stager) {
            // Written on the staging thread; a failure shows in its outcome.
            let file = file.clone();
            stager.write(&file, offset, buf, range).await;
        } else if let Some(file) = &inc.fd {
            // A failure is kept with the file and reported when it is complete.
            file.write(bytes, offset);
        }
        if self.current.as_ref().is_some_and(|i| i.rx.is_whole()) {
            self.complete_file(peer).await;
        }
        Ok(())
    }

    async fn complete_file(&mut self, peer: &str) {
        let Some(Incoming { rx, fd }) = self.current.take() else {
            return;
        };
        let (seq, store, rel, hash, size, meta, apart) = match rx.finish() {
            // Refused or set aside earlier; already answered.
            Received::Dropped => return,
            Received::Mismatch {
                seq,
                store,
                rel,
                got,
                announced,
            } => {
                drop(fd);
                self.stores[store].root.discard_staged(seq);
                add(&self.stats.hash_mismatches, 1);
                warn!(peer, path = %rel.display(), "content does not match its hash ({got:032x} != {announced:032x}); re-requested");
                self.need(seq, store, &rel, NeedReason::HashMismatch);
                return;
            }
            Received::Whole {
                seq,
                store,
                rel,
                hash,
                size,
                meta,
                apart,
            } => (seq, store, rel, hash, size, meta, apart),
        };
        let s = store;
        let Some(fd) = fd else {
            // A file not set aside has its staged file; were it missing,
            // the file is asked for again rather than taken as landed.
            self.need(seq, s, &rel, NeedReason::LocalError);
            return;
        };
        let (st, fsync) = if let Some(stager) = &self.stager {
            // Metadata is applied (and the file's state read) on the
            // staging thread after its writes; the outcome arrives before
            // any flush that covers the file reports.
            let root = &self.stores[s].root;
            if let Err(e) = root.check_staged_meta(&meta) {
                drop(fd);
                self.stores[s].root.discard_staged(seq);
                self.file_failed(seq, s, &rel, (hash, size), &e, peer);
                return;
            }
            stager.finish(seq, fd, meta, root.owners());
            (None, None)
        } else {
            let written = match fd.take_failure() {
                Some(e) => Err(e),
                None => fd.into_fd().ok_or_else(|| FsError::Io {
                    op: "finish",
                    path: "<staged file>".into(),
                    source: std::io::Error::other("staged file still shared"),
                }),
            };
            // Metadata after the last write (a write would move the mtime).
            let finished = written.and_then(|fd| {
                self.stores[s].root.finish_staged(&fd, &meta)?;
                Ok(fd)
            });
            match finished {
                Ok(fd) => {
                    let st = index::fstat(fd.as_fd()).ok().flatten();
                    let fsync = match self.durability {
                        Durability::Fsync => Some(crate::io::fsync_owned(fd)),
                        // The grouped flush needs no descriptor.
                        Durability::Syncfs => None,
                    };
                    (st, fsync)
                }
                Err(e) => {
                    self.stores[s].root.discard_staged(seq);
                    self.file_failed(seq, s, &rel, (hash, size), &e, peer);
                    return;
                }
            }
        };
        self.commits.stage(Staged {
            seq,
            store: s,
            rel,
            hash,
            size,
            apart,
            st,
            fsync,
        });
    }

    /// Answers what the ops could not do (in order) and queues what they
    /// kept aside for handing over.
    fn answer_ops(&mut self, peer: &str) {
        self.save_held();
        let replies: Vec<Reply> = self.ops.take_replies().collect();
        for r in replies {
            match r {
                Reply::Need {
                    seq,
                    store,
                    rel,
                    reason,
                } => self.need(seq, store, &rel, reason),
                Reply::HeldForRoom {
                    seq,
                    store,
                    rel,
                    size,
                } => {
                    // The store counts as full until it has room for the
                    // content the delete (or replacement) waits for.
                    let why = format!(
                        "{} is not deleted or replaced until its content ({size} bytes) lands under another name",
                        rel.display()
                    );
                    self.refused_for_room(store, size, why);
                    self.need(seq, store, &rel, NeedReason::NoSpace)
                }
                Reply::HeldForResend { seq, store, rel } => {
                    tracing::debug!(
                        "{} is not deleted or replaced until its content, refused for room under another name and fitting now, is sent again",
                        rel.display()
                    );
                    self.need(seq, store, &rel, NeedReason::LocalError)
                }
                Reply::HeldForRename { seq, store, rel } => {
                    tracing::debug!(
                        "the delete of {} waits for a rename that failed here to land its content under the new name",
                        rel.display()
                    );
                    self.need(seq, store, &rel, NeedReason::LocalError)
                }
                Reply::Failed {
                    seq,
                    store,
                    rel,
                    error,
                } => self.local_failure(seq, store, &rel, &error, peer),
                Reply::KeptAside { store, rel, kept } => self.kept_aside(store, rel, kept),
                Reply::KeepAsideFailed {
                    seq,
                    store,
                    rel,
                    error,
                } => {
                    let name = &self.stores[store].name;
                    error!(alarm = true, store = %name, path = %rel.display(), "ALARM: cannot keep a genuine conflict aside: {error}; the path is left alone");
                    self.stats.raise_alarm(format!(
                        "cannot keep a genuine conflict aside in store {name}: {}: {error}",
                        rel.display()
                    ));
                    self.local_failure(seq, store, &rel, &error, peer);
                }
            }
        }
    }

    /// A genuine conflict was moved aside to `kept`: it is handed to the
    /// primary.
    fn kept_aside(&mut self, s: usize, rel: PathBuf, kept: PathBuf) {
        warn!(store = %self.stores[s].name, path = %rel.display(), kept = %kept.display(), "genuine conflict: a version the primary never had is kept aside and handed to it");
        let size = std::fs::symlink_metadata(&kept)
            .map(|m| m.len())
            .unwrap_or(0);
        // The slot's time, as every later session's listing says it: the
        // primary keeps the version once however often it is handed over.
        let kept_at =
            super::conflicts::kept_at_of(self.stores[s].root.internal_path(), &kept).unwrap_or(0);
        self.handover.kept((
            s,
            super::conflicts::Conflict {
                id: String::new(),
                store: self.stores[s].name.clone(),
                path: String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned(),
                size,
                kept_at,
                file: kept,
            },
        ));
    }

    /// Hands every queued kept-aside version to the primary (`ConflictFile`
    /// and its content in 64 KiB `Data` frames); the primary acknowledges
    /// each once durable, and only then is the copy here removed.
    async fn upload_conflicts(&mut self, w: &FrameWriter) -> Result<(), RecvError> {
        use std::io::Read;
        const CHUNK: usize = 64 * 1024;
        while let Some((id, (s, c))) = self.handover.next_to_send() {
            if !self.stores[s].conflicts {
                continue;
            }
            // One that cannot be read now is left where it is: listed and
            // handed over again in the next session.
            let read = || -> Result<_, String> {
                let rel = super::fsops::check_rel(c.path.as_bytes())
                    .map_err(|e| format!("its path is not one to replicate: {e}"))?;
                let f = std::fs::File::open(&c.file).map_err(|e| format!("cannot open: {e}"))?;
                let st = index::fstat(f.as_fd())
                    .map_err(|e| format!("cannot stat: {e}"))?
                    .filter(|st| st.kind == Kind::File)
                    .ok_or("not a regular file")?;
                let hash = f
                    .try_clone()
                    .and_then(super::tree::hash_file)
                    .map_err(|e| format!("cannot read: {e}"))?;
                Ok((rel, f, st, hash))
            };
            let (rel, mut f, st, hash) = match read() {
                Ok(r) => r,
                Err(why) => {
                    warn!(store = %self.stores[s].name, file = %c.file.display(), "a version kept aside here is not handed over in this session: {why}");
                    continue;
                }
            };
            SyncMsg::ConflictFile {
                id,
                store: s as u16,
                path: rel.as_os_str().as_bytes().to_vec(),
                meta: st.meta,
                size: st.version.size,
                hash,
                kept_at: c.kept_at,
            }
            .encode(&mut self.replies);
            let mut left = st.version.size;
            let mut buf = vec![0u8; CHUNK];
            use std::io::Seek;
            let _ = f.seek(std::io::SeekFrom::Start(0));
            while left > 0 {
                let want = (left as usize).min(CHUNK);
                let n = match f.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => {
                        // Shrunk under us (nobody should touch it): pad,
                        // the primary's hash check refuses it.
                        buf[..want].fill(0);
                        want
                    }
                    Ok(n) => n,
                };
                SyncMsg::Data {
                    seq: id,
                    bytes: buf[..n].to_vec(),
                }
                .encode(&mut self.replies);
                left -= n as u64;
                self.send_replies(w).await?;
            }
            self.send_replies(w).await?;
            self.handover.sent(id, (s, c), Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::waiting::{Waiting, WaitingForRoom};

    fn receiver_on(dir: &Path) -> Receiver {
        let root = dir.join("store");
        std::fs::create_dir_all(&root).unwrap();
        let store = RecvStore {
            name: "inbox".into(),
            root: Root::open(&root, &dir.join("internal")).unwrap(),
            index: Index::in_memory(),
            conflicts: true,
        };
        Receiver::new(
            vec![store],
            Excludes::new(&[]).unwrap(),
            Arc::new(ReplStats::default()),
            Durability::Syncfs,
        )
    }

    /// Carried from a session whose disk was full into one where there is
    /// room (the filesystem's own `statvfs`): what fits goes at once, so no
    /// delete is held and no disk-full alarm raised for it; what cannot
    /// fit still waits.
    #[test]
    fn what_waited_and_fits_now_goes_as_a_session_takes_it_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = receiver_on(dir.path());
        let mut waiting = WaitingForRoom::default();
        let of = |hash, size| Waiting::for_room(hash, size, 0);
        waiting.insert(0, Path::new("cur/small:2,S"), of(1, 4096));
        waiting.insert(0, Path::new("cur/huge:2,S"), of(2, u64::MAX / 2));
        r.wait_for_room(waiting.for_next_session());
        let left = r.take_waiting_for_room();
        assert_eq!(left.len(), 1, "only what cannot fit still waits for room");
        assert_eq!(left.awaited(), 1, "what fits is awaited under its name");
        assert!(left.waits_elsewhere(0, Path::new("new/huge"), 2));
        assert!(!left.waits_elsewhere(0, Path::new("new/small"), 1));
    }
}
