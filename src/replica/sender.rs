//! The primary's side of a sync connection: reconcile manifests, then stream
//! the tracker's coalesced changes, reading files with io_uring.
//!
//! Files are read concurrently: every small file of a batch gets its own
//! open+read task before any is awaited, so one tick of the runtime submits
//! all of them to the ring together. Frames are then emitted in op order with
//! a `Barrier` per batch; up to [`UNACKED_BATCHES_MAX`] full batches' worth of
//! ops (in at most [`INFLIGHT_BATCHES_MAX`](super::window::INFLIGHT_BATCHES_MAX) batches) are in flight, so reading
//! batch N+1 overlaps the secondary's flush of batch N, and a trickle of small
//! batches never waits behind a window counted in batches.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_uring::buf::BoundedBuf;
use tracing::{error, info, warn};

use super::index::{self, Entry, Index, Kind, Stat};
use super::links::{InodeKey, LinkNames};
use super::stats::{add, ReplStats, Stages, SyncPhase};
use super::tree::{LocalTree, Tree};
use super::window::{AckWindow, BATCH_OPS_MAX, UNACKED_BATCHES_MAX};
use super::{moved_path, Excludes};
use crate::link::{FrameWriter, LinkError};
use crate::tracker::{Coalescer, Op};
use crate::wire::sync::{NeedReason, SyncMsg, DATA_BYTES_MAX};

mod backlog;
mod behind;
#[cfg(test)]
pub(crate) use behind::LOOK_BEHIND_MESSAGE_DELAY;
mod compare;
mod vanished;

/// Files up to this size are read whole and concurrently; larger ones are
/// streamed in `DATA_BYTES_MAX` chunks, one at a time, so memory stays bounded.
const SMALL_FILE_BYTES_MAX: u64 = 256 * 1024;
/// Encoded bytes of a batch sent at a time.
const SEND_CHUNK_BYTES: usize = 256 * 1024;
/// Housekeeping tick when idle (retries, periodic releases, verification,
/// index saves); changes and commit requests wake the sender at once.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// Retry of paths the peer could not store for lack of space.
const NO_SPACE_RETRY_MIN: Duration = Duration::from_millis(500);
const NO_SPACE_RETRY_MAX: Duration = Duration::from_secs(5);
/// An op the peer failed to apply for another local reason is sent again
/// after this long, so a lasting failure there does not spin both nodes.
/// A switchover's request: answer once nothing is pending, in flight or
/// held, and the tracker has been quiet for [`DRAIN_QUIET`].
#[derive(Debug)]
pub struct DrainRequest {
    pub reply: tokio::sync::oneshot::Sender<()>,
}

/// How long the tracker must stay quiet before a drain counts as done (a
/// change made just before is still on its way from inotify).
pub const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Refused paths remembered per session (bounded: a peer refusing
/// everything must not grow this without end).
const REFUSED_REMEMBERED_MAX: usize = 100_000;
/// Files sent from folder listings followed by inode (past it, a
/// comparison runs instead and the record starts again).
const LISTED_FOLLOWED_MAX: usize = 65_536;
const LOCAL_ERROR_RETRY: Duration = Duration::from_millis(250);

/// A look at a held name that has waited this long for the tracker is
/// warned of (once per stall).
const TRACKER_STALL_WARN: Duration = Duration::from_secs(10);

/// When an op put aside is queued again.
#[derive(Clone, Copy, Debug)]
enum Due {
    /// At this time (a local error on the replica, its disk full).
    At(Instant),
    /// Once the tracker has read every change made before this time (the
    /// delete of a name found gone that the replica held in case it moved:
    /// the rename that took it away, if one did, is then queued ahead of it).
    TrackerRead(Instant),
    /// The same, and not before the second time (a look that stayed
    /// unsure behind another name of its message: see [`behind`]).
    TrackerReadAfter(Instant, Instant),
}

/// Bound on what the names whose unsure delete the replica held take (a
/// path and about 64 bytes each): reached, they are all let go of (each
/// such name costs one more unsure round if the replica holds it again).
const DELETES_SURE_BYTES_MAX: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("peer {peer} has stores {theirs:?}, this node has {ours:?}: the two configurations must name the same mailstores")]
    StoresDiffer {
        peer: String,
        ours: Vec<String>,
        theirs: Vec<String>,
    },
    #[error("peer closed the sync connection")]
    PeerGone,
    #[error("reading {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer {peer} sent a message a secondary must not send: {what}")]
    Protocol { peer: String, what: String },
    #[error("stopped")]
    Stopped,
    #[error("the peer refused this node's epoch {ours}: it has seen epoch {seen} (a newer primary exists)")]
    Fenced { ours: u64, seen: u64 },
}

/// A version the peer is handing over.
enum Incoming {
    Receiving(Box<dyn super::conflicts::Shelving>),
    /// Could not be taken (logged): its content is read and dropped, and
    /// it is not acknowledged, so the peer keeps its copy.
    Skipping {
        id: u64,
        left: u64,
    },
}

pub use super::waiters::{CommitOutcome, CommitReq};

/// One store as the sender sees it.
pub struct Store<T = Tree> {
    pub name: String,
    pub root: PathBuf,
    /// The root, opened: every lookup below it goes through its descriptor.
    pub tree: T,
    pub index: Index,
    /// hasync's own directory for this store (conflicts handed over).
    pub internal: PathBuf,
    /// A mailstore replicated in place: a former primary's versions that
    /// this node never held are genuine conflicts (not for the queue).
    pub conflicts: bool,
    /// A Dovecot Maildir store: Dovecot's own files (uidlist, indexes)
    /// of a former primary are never conflicts.
    pub dovecot: bool,
}

/// What the index learns once the peer acknowledges an op.
enum OnAck {
    /// The op numbered `.0` set the path's entry.
    Set(u64, usize, PathBuf, Entry),
    /// A hard link to `existing`, of content hashing to `.5`.
    Link(u64, usize, PathBuf, PathBuf, Stat, u128),
    /// The op numbered `.0` deleted the path.
    Remove(u64, usize, PathBuf),
    /// The rename numbered `.0`.
    Rename(u64, usize, PathBuf, PathBuf),
}

impl OnAck {
    /// The number of the op this entry is the ack of.
    fn seq(&self) -> u64 {
        match self {
            OnAck::Set(n, ..)
            | OnAck::Link(n, ..)
            | OnAck::Remove(n, ..)
            | OnAck::Rename(n, ..) => *n,
        }
    }

    /// The path this op gives content or a link (a name the replica will hold).
    fn carries(&self) -> Option<(usize, &Path)> {
        match self {
            OnAck::Set(_, s, rel, _) | OnAck::Link(_, s, rel, ..) => Some((*s, rel.as_path())),
            OnAck::Remove(..) | OnAck::Rename(..) => None,
        }
    }
}

/// What a batch being planned gives content or a link so far.
fn carried<'a>(plans: &'a [Plan], batch: &'a Inflight) -> impl Iterator<Item = (usize, &'a Path)> {
    plans
        .iter()
        .filter_map(Plan::file)
        .chain(batch.acks.iter().filter_map(OnAck::carries))
}

pub(crate) struct Inflight {
    acks: Vec<OnAck>,
    /// Names of files this batch sent (see `Sender::recent`).
    recent_names: Vec<(InodeKey, usize, PathBuf)>,
    sinces: Vec<Instant>,
    files: u64,
    bytes: u64,
    /// When the batch's last bytes were written to the socket.
    sent_at: Option<Instant>,
}

/// One batch planned: what it sends, in order, and what its ack teaches.
pub(crate) struct Planned {
    pub(crate) plans: Vec<Plan>,
    pub(crate) batch: Inflight,
    /// Folders whose entries the batch changes: their mtime follows.
    pub(crate) touched: std::collections::BTreeSet<(usize, PathBuf)>,
    /// Paths the batch carries, for commits waiting on them.
    pub(crate) batch_paths: std::collections::HashSet<(usize, PathBuf)>,
}

/// How old a scan taken as the tenure began may be and still serve the
/// first comparison (changes since are in the tracker's queue).
const PRESCAN_FRESH: Duration = Duration::from_secs(10);

/// Long-lived sender state (survives reconnects while this node is primary).
pub struct Sender<T = Tree> {
    /// The epoch of the primary tenure sending (set before each session):
    /// the fencing token every session starts with.
    pub epoch: u64,
    /// Scans taken as the tenure began (the takeover record's), with the
    /// tracker already running: the first comparison uses them instead of
    /// walking the trees again, if they are recent.
    pub prescanned: Option<(Instant, Vec<Option<super::index::Scan>>)>,
    pub stores: Vec<Store<T>>,
    pub excludes: Excludes,
    pub coalescer: Coalescer,
    pub stats: Arc<ReplStats>,
    pub verify_interval: Duration,
    /// Where the takeover records are (see `takeover`).
    pub state_dir: PathBuf,
    /// The peer says it served as primary and was not reconciled since.
    peer_former_primary: bool,
    /// The epoch the peer says it last served at as primary.
    peer_served_epoch: Option<u64>,
    /// The served epoch `known` was decided for (a peer that says another
    /// one has it decided again).
    known_for: Option<Option<u64>>,
    /// Per mailstore, the takeover record `known` is decided from: this
    /// tenure's part (with what it sent since) and the carried part.
    records: Vec<Option<super::takeover::Record>>,
    /// This tenure's epoch and the highest epoch known before it (its
    /// takeover record's; 0: not known, as in a simulator).
    pub tenure: (u64, u64),
    /// This tenure's takeover record is complete, or its peer said it is
    /// not a former primary (see [`Sender::settle_takeover_record`]).
    pub takeover_settled: bool,
    /// A version the peer is handing over (`ConflictFile` + `Data`).
    incoming: Option<Incoming>,
    /// Conflicts received this session (one alarm per session).
    conflicts_received: u64,
    /// Per store, its conflicts directory's slot names, read at the first
    /// version handed over in a session.
    shelf_slots: Vec<Option<super::conflicts::SlotNames>>,
    /// Replies to the peer (conflict acknowledgements), written by the loop.
    replies_out: Vec<u8>,
    /// While reconciling a former primary: per mailstore, the versions
    /// this node held at takeover (its record) or has sent since. A
    /// version of the peer's outside it is a genuine conflict.
    known: Vec<Option<std::collections::HashSet<u128>>>,
    known_dirty: bool,
    /// Versions added to `known` and not yet in the sent log.
    known_unlogged: Vec<(usize, u128)>,
    /// Hard links: the names the peer holds of each linked inode.
    inodes: LinkNames,
    /// Every file sent but not yet acknowledged, by inode: a link made to a
    /// message right after it went out must still travel as a link.
    recent: LinkNames,
    /// Files sent from the listing of a folder the tracker may not watch
    /// yet, by inode, for the session: one moved away before the watch has
    /// no event under its old name (see [`Sender::follow_listed`]).
    listed: LinkNames,
    /// Names queued from such a listing, not yet planned.
    from_listing: std::collections::HashSet<(usize, PathBuf)>,
    /// Names a comparison found joined on the replica with names apart
    /// here: their next file goes `apart` (see [`Sender::file_apart`]);
    /// until the next comparison, or the name goes as a link.
    unjoin: std::collections::HashSet<(usize, PathBuf)>,
    manifest_id: u64,
    /// Batches in flight, numbering, flow control, ops asked for again.
    window: AckWindow<Inflight>,
    retry: Vec<(Due, Op)>,
    /// Retries put back in the queue and not planned yet: a rename planned
    /// before them carries what the replica holds there on, as it does for
    /// the retries still waiting (see [`Sender::follow_retries`]).
    requeued: std::collections::HashSet<(usize, PathBuf)>,
    /// Names found gone whose unsure delete the replica held
    /// ([`NeedReason::MayHaveMoved`]): sent again after the queue's turn,
    /// a delete of them is sure.
    /// (With the time of the `Need`: only a Sync queued since, the retry,
    /// sends the sure delete; one queued before it, a comparison's or a
    /// rename's, sends another unsure one.)
    deletes_sure: HashMap<(usize, PathBuf), Instant>,
    deletes_sure_bytes: usize,
    retry_delay: Duration,
    /// Renames on their way that may be a folder's (by seq): one the
    /// replica refuses leaves its trees to a comparison.
    folder_renames: std::collections::HashSet<u64>,
    /// Folder times on their way (`DirMeta`, by seq).
    times_only: std::collections::HashSet<u64>,
    /// Files up to this size are read with their batch; larger ones are
    /// hashed and streamed on their own (a simulator makes it small).
    small_file_bytes_max: u64,
    next_backoff: Instant,
    last_save: Instant,
    /// A rescan asked for a comparison with the replica.
    pending_verify: bool,
    /// A comparison was asked for and its request taken by the driver, not
    /// begun yet: the looks at names found gone wait for it (and then go
    /// behind its backlog).
    comparison_owed: bool,
    /// When the last comparison began (see [`Sender::delete_sure_due`]).
    compared_at: Option<Instant>,
    /// The syncs of the batch being planned, by message (see [`behind`]).
    batch_names: behind::BatchNames,
    /// Names whose sure delete stayed unsure behind another name of their
    /// message: their next look waits (see [`behind`]).
    looks_behind: std::collections::HashSet<(usize, PathBuf)>,
    /// Folders found gone under files being sent, not decided yet (see
    /// [`vanished`]): a comparison may be owed.
    vanished: Option<vanished::Vanished>,
    /// What the last finished comparison's walk found gone (`None` while
    /// one runs, and before the first).
    gone_at_walk: Option<vanished::GoneAtWalk>,
    /// A rename that may be a folder's was planned since the last
    /// comparison began.
    folder_moved: bool,
    /// A look has waited for the tracker past [`TRACKER_STALL_WARN`] (said).
    tracker_stall_warned: bool,
    last_progress_log: Instant,
    /// Paths a comparison found different, waiting to enter the coalescer
    /// a few batches at a time: a 100k-file initial sync holds one boxed
    /// path each here instead of a full pending op.
    backlog: backlog::Backlog,
    backlog_since: Instant,
    /// The send buffer, kept between batches.
    spare: Vec<u8>,
    /// Woken when a commit request is queued (the tracker has its own).
    pub commit_wake: Option<Arc<tokio::sync::Notify>>,
    /// Send large files by splice (`[replication] zero_copy`).
    pub zero_copy: bool,
    /// The splice pump of the current session's socket, made at its first
    /// large file and dropped with the session.
    pump: Option<crate::io::splice::SplicePump>,
    /// Directories whose children the last reconciliation already queued,
    /// with their inode and ctime when it listed them.
    /// (Ordered: a folder's subtree is one range.)
    listed_dirs: BTreeMap<(usize, PathBuf), (u64, i64, u32)>,
    /// A switchover waits for every local change to be durable on the
    /// peer (see [`DrainRequest`]).
    pub drain: Arc<Mutex<Option<DrainRequest>>>,
    /// When the tracker last delivered a change (for the drain's quiet time).
    last_change: Instant,
    /// Paths the peer refused this session (its metadata policy, say):
    /// known differences, not drift.
    refused: std::collections::HashSet<(usize, PathBuf)>,
    /// Paths too long to replicate, each reported once.
    out_of_reach: super::tree::OutOfReach,
    /// Lag is measured for changes after the initial sync, not for it.
    lag_from: Option<Instant>,
    /// Changes of periodic stores (a queue synced every so often), held
    /// until their store's next release.
    pub gate: super::gate::PeriodicGate,
    /// Zero-loss commits: arrive on `commits`, wait in `waiting` with the
    /// barrier of the batch that carries their path (once planned).
    pub commits: Option<crossbeam_channel::Receiver<CommitReq>>,
    waiting: super::waiters::CommitWaiters,
    /// `hasync resync` asked for a full verification.
    pub resync_requested: Arc<std::sync::atomic::AtomicBool>,
}

pub(crate) enum Read {
    Ready(Vec<u8>),
    Missing,
}

/// One op of a batch being sent, in order.
pub(crate) enum Plan {
    Frames(Vec<u8>),
    /// Read through io_uring with the rest of the batch.
    Small {
        seq: u64,
        store: usize,
        rel: PathBuf,
        st: Stat,
    },
    /// Hashed, then streamed (spliced) on its own.
    Large {
        seq: u64,
        store: usize,
        rel: PathBuf,
        st: Stat,
    },
}

impl Plan {
    /// The file content this plan sends, if any.
    fn file(&self) -> Option<(usize, &Path)> {
        match self {
            Plan::Small { store, rel, .. } | Plan::Large { store, rel, .. } => {
                Some((*store, rel.as_path()))
            }
            Plan::Frames(_) => None,
        }
    }
}

/// Opens `rel` for reading: through io_uring when its absolute path fits
/// one system call, else through the root's descriptor (a blocking
/// `openat`; only paths past `PATH_MAX` from `/` take it).
fn open_for_reading(
    tree: &super::tree::Tree,
    rel: &Path,
) -> impl std::future::Future<Output = std::io::Result<tokio_uring::fs::File>> + 'static {
    let direct = tree.io_path(rel);
    let through_root = direct
        .is_none()
        .then(|| tree.open_read(rel).map(tokio_uring::fs::File::from_std));
    async move {
        match (direct, through_root) {
            (Some(abs), _) => tokio_uring::fs::File::open(abs).await,
            (None, Some(opened)) => opened,
            (None, None) => unreachable!("one of the two is set"),
        }
    }
}

async fn read_small(
    open: impl std::future::Future<Output = std::io::Result<tokio_uring::fs::File>>,
    size: u64,
) -> std::io::Result<Read> {
    let f = match open.await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Read::Missing),
        Err(e) => return Err(e),
    };
    // Read one byte past the expected size so that growth since the stat
    // shows; the tracker will send the final version after the writer closes.
    let mut data = Vec::with_capacity(size as usize + 1);
    loop {
        let pos = data.len() as u64;
        let spare = Vec::with_capacity((size as usize + 1).saturating_sub(data.len()).max(4096));
        let (res, buf) = f.read_at(spare, pos).await;
        let n = res?;
        if n == 0 {
            break;
        }
        let asked = buf.capacity();
        data.extend_from_slice(&buf[..n]);
        // A short read of a regular file is its end: no second round trip.
        if n < asked {
            break;
        }
        if data.len() as u64 > SMALL_FILE_BYTES_MAX * 4 {
            break;
        }
    }
    f.close().await?;
    Ok(Read::Ready(data))
}

fn rel_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

fn rel_from(bytes: &[u8]) -> Option<PathBuf> {
    // The peer only names paths we sent it; validate anyway.
    super::fsops::check_rel(bytes).ok()
}

/// A sender that ends (the node no longer primary) no longer waits for
/// its tracker: the status shows no stall of it.
impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.tracker_stall_warned {
            *self
                .stats
                .tracker_stalled_since
                .lock()
                .expect("tracker stall lock") = None;
        }
    }
}

impl<T: LocalTree> Sender<T> {
    pub fn new(
        stores: Vec<Store<T>>,
        excludes: Excludes,
        coalescer: Coalescer,
        stats: Arc<ReplStats>,
        verify_interval: Duration,
    ) -> Self {
        Sender {
            epoch: 0,
            stores,
            excludes,
            coalescer,
            stats,
            verify_interval,
            inodes: LinkNames::default(),
            unjoin: Default::default(),
            recent: LinkNames::default(),
            listed: LinkNames::default(),
            from_listing: Default::default(),
            manifest_id: 0,
            window: AckWindow::default(),
            retry: Vec::new(),
            requeued: Default::default(),
            deletes_sure: Default::default(),
            deletes_sure_bytes: 0,
            retry_delay: NO_SPACE_RETRY_MIN,
            folder_renames: Default::default(),
            times_only: Default::default(),
            small_file_bytes_max: SMALL_FILE_BYTES_MAX,
            next_backoff: Instant::now(),
            last_save: Instant::now(),
            pending_verify: false,
            comparison_owed: false,
            compared_at: None,
            batch_names: Default::default(),
            looks_behind: Default::default(),
            vanished: None,
            gone_at_walk: None,
            folder_moved: false,
            tracker_stall_warned: false,
            gate: Default::default(),
            last_progress_log: Instant::now(),
            commits: None,
            waiting: Default::default(),
            backlog: backlog::Backlog::new(),
            backlog_since: Instant::now(),
            spare: Vec::new(),
            zero_copy: true,
            commit_wake: None,
            pump: None,
            listed_dirs: Default::default(),
            out_of_reach: Default::default(),
            refused: Default::default(),
            drain: Default::default(),
            last_change: Instant::now(),
            state_dir: PathBuf::new(),
            peer_former_primary: false,
            peer_served_epoch: None,
            known_for: None,
            records: Vec::new(),
            tenure: (0, 0),
            takeover_settled: true,
            incoming: None,
            conflicts_received: 0,
            shelf_slots: Vec::new(),
            replies_out: Vec::new(),
            known: Vec::new(),
            known_dirty: false,
            known_unlogged: Vec::new(),
            lag_from: None,
            resync_requested: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            prescanned: None,
        }
    }

    /// Files larger than `bytes` are streamed on their own (a simulator's
    /// small files take the large files' path so).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn set_small_file_bytes_max(&mut self, bytes: u64) {
        self.small_file_bytes_max = bytes;
    }

    /// What this node held when it took over, per mailstore, as a
    /// takeover record would give it (a simulator's failover; the daemon
    /// reads the record from the state directory).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn set_takeover_known(
        &mut self,
        known: Vec<Option<std::collections::HashSet<u128>>>,
    ) {
        self.records = known
            .iter()
            .map(|k| {
                k.as_ref().map(|h| super::takeover::Record {
                    hashes: h.clone(),
                    live: true,
                    ..Default::default()
                })
            })
            .collect();
        self.known = known;
        self.known_for = None;
        self.takeover_settled = true;
    }

    /// Saves every changed index now, on this thread (session end, stop).
    pub fn save_indexes(&mut self) {
        self.save_known();
        for s in self.stores.iter_mut() {
            if let Err(e) = s.index.save() {
                warn!(store = %s.name, "cannot save index: {e}");
            }
        }
        self.last_save = Instant::now();
    }

    /// Starts writing changed indexes, each on a thread of its own (the
    /// loop only hands over the changes since the last save): a save of a
    /// busy store's index, fsync included, took 50 ms on the reference
    /// machine, all of it lag for the changes waiting behind it.
    fn save_indexes_in_background(&mut self) {
        for s in self.stores.iter_mut() {
            s.index.save_in_background();
        }
        self.last_save = Instant::now();
    }

    fn set_phase(&self, phase: SyncPhase) {
        self.stats.progress.lock().expect("progress lock").phase = phase;
    }

    /// A long initial sync or verification says how far it is, every 5 s.
    fn log_progress(&mut self) {
        if self.last_progress_log.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_progress_log = Instant::now();
        let p = self.stats.progress.lock().expect("progress lock").clone();
        if !p.phase.is_catching_up() {
            return;
        }
        if let Some(s) = p.snapshot() {
            info!(
                "{}: {}/{} files, {:.1}/{:.1} MB, {:.0} files/s, ETA {}",
                p.phase,
                s.files_done,
                s.files_total,
                s.bytes_done as f64 / 1e6,
                s.bytes_total as f64 / 1e6,
                s.files_per_s,
                s.eta_s.map_or("-".to_string(), |e| format!("{e:.0}s"))
            );
        }
    }

    /// Moves backlog paths into the coalescer while it holds less than a
    /// few batches.
    pub(crate) fn feed_backlog(&mut self) {
        let room = (UNACKED_BATCHES_MAX * BATCH_OPS_MAX).saturating_sub(self.coalescer.pending());
        for _ in 0..room.min(self.backlog.len()) {
            let Some((store, rel)) = self.backlog.pop_front() else {
                break;
            };
            // A retry parked here for an unsure delete the replica held
            // keeps its time (the comparison's is older): its delete, if
            // the name is still gone, is sure.
            let since = match self.deletes_sure.get(&(store, rel.clone())) {
                Some(at) => self.backlog_since.max(*at),
                None => self.backlog_since,
            };
            self.coalescer.push(Op::Sync { store, rel, since });
        }
    }

    /// A comparison's catching up is over once nothing is queued, in
    /// flight or to be retried: the index is saved, and the `CaughtUp`
    /// returned tells the replica so (a former primary is reconciled).
    pub(crate) fn finish_initial_if_done(&mut self) -> Option<Vec<u8>> {
        // (Nor while a comparison may be owed: it may find more to send.)
        if !self.window.is_empty()
            || self.coalescer.pending() > 0
            || !self.backlog.is_empty()
            || !self.retry.is_empty()
            || self.verify_requested()
        {
            return None;
        }
        let mut p = self.stats.progress.lock().expect("progress lock");
        if p.phase.is_catching_up() {
            let secs = p.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            let (phase, files, bytes) = (p.phase, p.done_files, p.done_bytes);
            p.phase = SyncPhase::Streaming;
            // Logged with the lock released: the daemon's loop (which
            // carries the heartbeats) takes it for status.
            drop(p);
            info!(
                files,
                bytes,
                secs = format!("{secs:.2}"),
                "{phase} complete: {files} files, {:.1} MB in {secs:.2}s ({:.0} files/s)",
                bytes as f64 / 1e6,
                files as f64 / secs.max(1e-3)
            );
            self.listed_dirs.clear();
            if self.lag_from.is_none() {
                self.lag_from = Some(Instant::now());
            }
            self.save_indexes();
            let mut out = Vec::new();
            SyncMsg::CaughtUp.encode(&mut out);
            return Some(out);
        }
        None
    }

    async fn wait_all_acked(
        &mut self,
        rx: &mut mpsc::Receiver<Result<SyncMsg, LinkError>>,
    ) -> Result<(), SendError> {
        while !self.window.is_empty() {
            match rx.recv().await {
                Some(m) => self.on_peer_msg(m?)?,
                None => return Err(SendError::PeerGone),
            }
        }
        Ok(())
    }

    /// Compares the replica's manifest with the local tree and queues every
    /// difference. Returns how many paths differed.
    async fn reconcile(
        &mut self,
        w: &FrameWriter,
        rx: &mut mpsc::Receiver<Result<SyncMsg, LinkError>>,
        full_verify: bool,
        initial: bool,
    ) -> Result<u64, SendError> {
        let (on_way, out) = self.begin_comparison(full_verify, initial);
        let id = self.manifest_id;
        w.send_bytes(out).await?;

        // This side's tree is walked as the manifest's chunks arrive, each
        // folder listed when the comparison reaches it (while the replica
        // walks its own to build the next chunk).
        let locals = self.local_entries(full_verify);
        let mut cmp = self.start_compare(on_way, locals, initial);
        while !cmp.complete() {
            let msg = match rx.recv().await {
                Some(m) => m?,
                None => return Err(SendError::PeerGone),
            };
            match msg {
                SyncMsg::Manifest {
                    id: mid,
                    store,
                    entries,
                    last,
                } if mid == id => self
                    .compare_chunk(&mut cmp, store as usize, entries, last)
                    .map_err(|e| match e {
                        compare::CompareError::Manifest(e) => SendError::Protocol {
                            peer: w.peer().to_string(),
                            what: e.to_string(),
                        },
                        compare::CompareError::Local { path, source } => {
                            SendError::Local { path, source }
                        }
                    })?,
                other => self.on_peer_msg(other)?,
            }
        }
        let (differ, aside) = self.finish_compare(cmp);
        if !aside.is_empty() {
            w.send_bytes(aside).await?;
        }
        Ok(differ)
    }

    /// Answers a switchover's drain once every change is durable on the
    /// peer: held (periodic) changes are released at once.
    fn answer_drain(&mut self) {
        let mut d = self.drain.lock().expect("drain lock");
        let Some(req) = d.as_ref() else { return };
        if req.reply.is_closed() {
            *d = None;
            return;
        }
        drop(d);
        if !self.gate.is_empty() {
            for op in self.gate.release_all() {
                self.coalescer.push(op);
            }
            self.last_change = Instant::now();
        }
        let idle = self.coalescer.pending() == 0
            && self.window.is_empty()
            && self.backlog.is_empty()
            && self.retry.is_empty()
            && !self.verify_requested()
            && self.last_change.elapsed() >= DRAIN_QUIET;
        if idle {
            let req = self.drain.lock().expect("drain lock").take();
            if let Some(req) = req {
                info!("switchover: every change is durable on the peer");
                let _ = req.reply.send(());
            }
        }
    }

    fn requeue_retries(&mut self) {
        self.requeue_retries_at(Instant::now());
    }

    /// A rename carries what the replica holds at `from` (for an op that
    /// failed there and waits for its retry: an older version, a folder
    /// made with the wrong mode) to `to`: the retry is due under the new
    /// name too (the old name's stays; it may be made again).
    fn follow_retries(&mut self, store: usize, from: &Path, to: &Path) {
        // Put back in the queue behind this rename (seeds 56134, 177468: a
        // folder's `Mkdir` refused, the folder renamed, and the retry, queued
        // again before the rename was planned, went to the old name only:
        // the renamed folder kept the mode its children made it with, or
        // never got a subfolder).
        if !self.requeued.is_empty() {
            let mut moved: Vec<PathBuf> = self
                .requeued
                .iter()
                .filter(|(s, _)| *s == store)
                .filter_map(|(_, p)| moved_path(p, from, to))
                .collect();
            // In path order, not the set's (which differs from run to run).
            moved.sort_unstable();
            for rel in moved {
                self.coalescer.push(Op::Sync {
                    store,
                    rel,
                    since: Instant::now(),
                });
            }
        }
        if self.retry.is_empty() {
            return;
        }
        let moved: Vec<(Due, Op)> = self
            .retry
            .iter()
            .filter_map(|(at, op)| match op {
                Op::Sync {
                    store: s,
                    rel,
                    since,
                } if *s == store => moved_path(rel, from, to).map(|rel| {
                    (
                        *at,
                        Op::Sync {
                            store,
                            rel,
                            since: *since,
                        },
                    )
                }),
                _ => None,
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        // Renamed away and back: a name is due once (one set, not a scan
        // per name: a full disk can hold many retries).
        let mut due: std::collections::HashSet<(usize, PathBuf)> = self
            .retry
            .iter()
            .filter_map(|(_, op)| match op {
                Op::Sync { store, rel, .. } => Some((*store, rel.clone())),
                _ => None,
            })
            .collect();
        for (at, op) in moved {
            if let Op::Sync { store, rel, .. } = &op {
                if due.insert((*store, rel.clone())) {
                    self.retry.push((at, op));
                }
            }
        }
    }

    /// Puts the ops whose retry is due at `now` back in the queue.
    pub(crate) fn requeue_retries_at(&mut self, now: Instant) {
        self.requeue_retries_due(Some(now));
    }

    /// Puts back in the queue the ops whose retry waited for the tracker
    /// to read what was made before it, and has (a simulator's tracker
    /// model says so at any step; the time-bound ones wait for its lulls).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn requeue_tracker_read_retries(&mut self) {
        self.requeue_retries_due(None);
    }

    /// Puts back in the queue the ops whose retry is due: by `now` (if
    /// given), or by the tracker having read past their time.
    fn requeue_retries_due(&mut self, now: Option<Instant>) {
        if self.retry.is_empty() {
            if self.tracker_stall_warned {
                self.warn_if_tracker_stalls(None, now.unwrap_or_else(Instant::now));
            }
            return;
        }
        let read_upto = self.coalescer.read_upto();
        if self
            .retry
            .iter()
            .any(|(d, _)| matches!(d, Due::TrackerRead(_) | Due::TrackerReadAfter(..)))
        {
            // What the tracker read is queued first: the looks go behind it
            // (and a rescan it queued is seen below).
            let before = self.coalescer.pending();
            self.coalescer.drain();
            if self.coalescer.pending() != before {
                self.last_change = Instant::now();
            }
        }
        let comparison_first = self.comparison_ahead();
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.retry)
                .into_iter()
                .partition(|(due, _)| match *due {
                    Due::At(t) => now.is_some_and(|now| t <= now),
                    // Strictly after: a read that began in the same tick
                    // of the clock may have begun before the hold.
                    Due::TrackerRead(t) => !comparison_first && read_upto.is_some_and(|r| r > t),
                    Due::TrackerReadAfter(t, not_before) => {
                        !comparison_first
                            && now.is_some_and(|now| not_before <= now)
                            && read_upto.is_some_and(|r| r > t)
                    }
                });
        self.retry = later;
        // (A look that waits for a later time is not asked for before it.)
        let clock = Instant::now();
        let short = self
            .retry
            .iter()
            .filter_map(|(d, _)| match *d {
                Due::TrackerRead(t) => Some(t),
                Due::TrackerReadAfter(t, not_before) if not_before <= clock => Some(t),
                _ => None,
            })
            .filter(|t| read_upto.is_none_or(|r| r <= *t))
            .min();
        if !comparison_first && short.is_some() {
            // Still waiting for the tracker: ask again (its answer may have
            // come short of them, and used up the wake-up). Not while a
            // comparison is ahead: the two threads would wake each other.
            self.coalescer.ask_read_upto();
        }
        self.warn_if_tracker_stalls(short, clock);
        if due.is_empty() {
            return;
        }
        for (_, op) in due {
            if let Op::Sync { store, rel, .. } = &op {
                if self.requeued.len() >= LISTED_FOLLOWED_MAX {
                    // Too many to follow (ops the queue dropped for a
                    // rescan stay here): a comparison finds what moved.
                    self.requeued.clear();
                    self.pending_verify = true;
                }
                self.requeued.insert((*store, rel.clone()));
                if !self.backlog.is_empty()
                    && self.deletes_sure.contains_key(&(*store, rel.clone()))
                {
                    // Behind a comparison's backlog too: the name it
                    // moved to may be in it.
                    self.backlog.push(*store, rel);
                    continue;
                }
            }
            self.coalescer.push(op);
        }
    }

    pub(crate) fn on_peer_msg(&mut self, msg: SyncMsg) -> Result<(), SendError> {
        self.on_peer_msg_while(msg, None)
    }

    /// `building`: the batch being sent, not yet in flight (a Need for one
    /// of its ops can arrive while its large files stream).
    pub(crate) fn on_peer_msg_while(
        &mut self,
        msg: SyncMsg,
        building: Option<&Inflight>,
    ) -> Result<(), SendError> {
        match msg {
            SyncMsg::Ack { seq } => {
                crate::failpoint::hit("sender.acked");
                self.on_ack(seq, building)
            }
            SyncMsg::Need {
                seq,
                store,
                path,
                reason,
            } => {
                add(&self.stats.needs_received, 1);
                let Some(rel) = rel_from(&path) else {
                    return Ok(());
                };
                let s = store as usize;
                if let Some(st) = self.stores.get_mut(s) {
                    st.index.set_synced(&rel, false);
                }
                // Exactly this op failed: its ack must not mark the path as
                // held by the peer (another op on the same path may still
                // land, and be acknowledged, before or after it).
                self.window.need(seq);
                if s < self.stores.len() {
                    self.forget_names_under(s, &rel, None);
                    if reason == NeedReason::SourceMissing {
                        self.forget_link_source(seq, building);
                    }
                    // Renames sent after the failed op moved whatever the
                    // replica held at `rel` (an older version, say) on to
                    // other names, where it now stands for what the op
                    // should have put there: those names are sent again.
                    let moved = self.renamed_in_flight(s, rel.clone(), seq, building);
                    if moved != rel {
                        self.stores[s].index.set_synced(&moved, false);
                        self.coalescer.push(Op::Sync {
                            store: s,
                            rel: moved,
                            since: Instant::now(),
                        });
                    }
                }
                let now = Instant::now();
                // A look that stayed unsure behind another name of the
                // message comes again not before a while (see `behind`).
                let mut look = Due::TrackerRead(now);
                if reason == NeedReason::MayHaveMoved {
                    self.delete_sure_next_time(s, &rel, now);
                    if self.look_behind_message_taken(s, &rel) {
                        look = Due::TrackerReadAfter(now, now + behind::LOOK_BEHIND_MESSAGE_DELAY);
                    }
                }
                // Where the tracker cannot watch, no event says where it
                // went: the next comparison (the tracker's next retry of
                // the folder asks for one) finds the name still gone and
                // sends its delete, then sure.
                let unseen = reason == NeedReason::MayHaveMoved
                    && self.coalescer.unwatched_at_or_above(s, &rel);
                if unseen {
                    tracing::debug!(path = %rel.display(), "held in a folder that is not watched: its delete waits for the next comparison");
                }
                let op = Op::Sync {
                    store: store as usize,
                    rel,
                    since: now,
                };
                if reason == NeedReason::MayHaveMoved {
                    // Held in case the name moved: looked at again once the
                    // tracker has read every change made before now (the
                    // rename that took it away, if one did, is then queued
                    // ahead of it), its delete then sure.
                    if !unseen {
                        self.retry.push((look, op));
                        self.coalescer.ask_read_upto();
                    }
                } else if reason == NeedReason::LocalError {
                    // Whatever failed there may fail again: not in a loop.
                    self.retry
                        .push((Due::At(Instant::now() + LOCAL_ERROR_RETRY), op));
                } else if reason == NeedReason::NoSpace {
                    if !self.stats.peer_disk_full.swap(true, Relaxed) {
                        warn!("peer's disk is full: replication paused, retrying with backoff");
                    }
                    let now = Instant::now();
                    self.retry.push((Due::At(now + self.retry_delay), op));
                    // Back off once per round of refusals, not per path.
                    if now >= self.next_backoff {
                        self.next_backoff = now + self.retry_delay;
                        self.retry_delay = (self.retry_delay * 2).min(NO_SPACE_RETRY_MAX);
                    }
                } else {
                    self.coalescer.push(op);
                }
            }
            SyncMsg::Refused {
                seq,
                store,
                path,
                why,
            } => {
                add(&self.stats.refused_by_peer, 1);
                warn!(seq, store, path = %String::from_utf8_lossy(&path), "peer refused op: {why}");
                // A known difference (said and counted), not drift.
                if let Some(rel) = rel_from(&path) {
                    if self.refused.len() < REFUSED_REMEMBERED_MAX {
                        self.refused.insert((store as usize, rel));
                    }
                }
            }
            SyncMsg::PeerState {
                former_primary,
                served_epoch,
            } => {
                self.peer_former_primary = former_primary;
                self.peer_served_epoch = served_epoch;
                if !former_primary {
                    // This tenure's peer never needs the record.
                    self.takeover_settled = true;
                }
                if former_primary {
                    info!("the peer served as primary: its changes are checked against this node's takeover record");
                    self.load_known();
                } else {
                    // Reconciled (or never primary): this tenure's record
                    // is settled; a later promotion starts its own. (A
                    // simulator's sender has no state directory.)
                    let dir = Some(&self.state_dir).filter(|d| !d.as_os_str().is_empty());
                    for st in self.stores.iter().filter(|s| s.conflicts && dir.is_some()) {
                        if let Err(e) = super::takeover::settle(&self.state_dir, &st.name) {
                            warn!(store = %st.name, "cannot settle the takeover record: {e}");
                        }
                    }
                    self.known.clear();
                    self.records.clear();
                    self.known_for = None;
                    self.known_dirty = false;
                    self.known_unlogged.clear();
                }
            }
            SyncMsg::ConflictFile {
                id,
                store,
                path,
                meta,
                size,
                hash,
                kept_at,
            } => self.begin_conflict(id, store, &path, meta, size, hash, kept_at)?,
            SyncMsg::Data { seq, bytes } => self.conflict_data(seq, &bytes)?,
            SyncMsg::Fenced { seen } => {
                return Err(SendError::Fenced {
                    ours: self.epoch,
                    seen,
                })
            }
            other => {
                return Err(SendError::Protocol {
                    peer: "secondary".into(),
                    what: format!("{other:?}").chars().take(80).collect(),
                })
            }
        }
        Ok(())
    }

    /// Loads, per mailstore, what this node held at takeover and sent
    /// since (versions sent from now on are added as they go out): the
    /// record's own part, and what it carried over from earlier tenures if
    /// the peer has not served as primary since they began.
    fn load_known(&mut self) {
        let served = self.peer_served_epoch;
        if self.records.is_empty() {
            let tenure = self.tenure.0;
            let records = self.takeover_records();
            self.records = records
                .into_iter()
                .zip(&self.stores)
                .map(|(r, st)| {
                    let r = r?;
                    Some(if tenure != 0 && r.epoch != tenure {
                        // Not rewritten at this promotion (a failed write
                        // or scan): an earlier tenure's (or an earlier
                        // release's), never this one's own.
                        warn!(store = %st.name, record_epoch = r.epoch, tenure, "the takeover record is of an earlier tenure: it counts only as carried over");
                        r.into_carried()
                    } else {
                        r
                    })
                })
                .collect();
        } else if self.known_for == Some(served) {
            return; // kept across sessions with the same peer
        }
        // Decided again if the peer says another epoch (the record keeps
        // its parts apart, and what was sent since in its own).
        self.known_for = Some(served);
        self.known = self
            .records
            .iter()
            .zip(&self.stores)
            .map(|(r, st)| {
                let r = r.as_ref()?;
                let (held, carried) = r.held(served);
                match (&r.carried, carried) {
                    (Some(c), None) => warn!(
                        store = %st.name,
                        carried = c.hashes.len(),
                        since_epoch = c.epoch,
                        peer_served_epoch = served,
                        "the takeover record carried over from an earlier tenure does not count: the peer served as primary since it began (or does not say when it last did); its versions this node no longer holds are kept aside"
                    ),
                    (_, Some(c)) => info!(
                        store = %st.name,
                        carried = c.hashes.len(),
                        since_epoch = c.epoch,
                        peer_served_epoch = served,
                        "the takeover record carried over from an earlier tenure counts: the peer has not served as primary since"
                    ),
                    _ => {}
                }
                Some(held)
            })
            .collect();
    }

    /// The peer this tenure serves could be a former primary that has not
    /// said it is not (it was not reached yet): the takeover record is
    /// completed now, while what this node held at takeover is still on
    /// its disk. Once per tenure; nothing to do when the record is complete.
    pub fn settle_takeover_record(&mut self) {
        if !self.takeover_settled {
            drop(self.takeover_records());
        }
    }

    /// Per mailstore, the takeover record with the versions sent since,
    /// completed and written back first if it was taken without reading
    /// files (see `takeover`).
    fn takeover_records(&mut self) -> Vec<Option<super::takeover::Record>> {
        self.takeover_settled = true;
        let mut records = Vec::with_capacity(self.stores.len());
        for st in &mut self.stores {
            if !st.conflicts {
                records.push(None);
                continue;
            }
            let record = match super::takeover::load(&self.state_dir, &st.name) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    warn!(store = %st.name, "no takeover record: every version the former primary holds and this node never had is kept aside");
                    Default::default()
                }
                Err(e) => {
                    warn!(store = %st.name, "takeover record unreadable ({e}): every version the former primary holds and this node never had is kept aside");
                    Default::default()
                }
            };
            let mut record = record;
            let pending = std::mem::take(&mut record.pending);
            let hashes = &mut record.hashes;
            // Sent since the record was written (before a crash of this node).
            match super::takeover::load_sent(&self.state_dir, &st.name) {
                Ok(sent) => hashes.extend(sent),
                Err(e) => {
                    warn!(store = %st.name, "cannot read the versions sent since the takeover record ({e}): a former primary's copies of them are kept aside")
                }
            }
            if !pending.is_empty() {
                let started = Instant::now();
                let unread = pending.len();
                let done = super::takeover::complete(
                    pending,
                    hashes,
                    &st.tree,
                    &mut st.index,
                    &self.excludes,
                );
                match done {
                    Ok(changed) => {
                        info!(store = %st.name, unhashed = unread, changed, ms = started.elapsed().as_millis() as u64, "takeover record completed");
                        if changed > 0 {
                            warn!(store = %st.name, "{changed} files changed or went before their takeover version was read: a former primary's versions of them are kept aside");
                        }
                        // Its carried part and epoch as they were: the
                        // peer has not said yet what counts.
                        if let Err(e) = super::takeover::write(&self.state_dir, &st.name, &record) {
                            warn!(store = %st.name, "cannot write the completed takeover record: {e}");
                        }
                    }
                    Err(e) => {
                        warn!(store = %st.name, "cannot complete the takeover record ({e}): a former primary's versions of the files this node did not hash at takeover are kept aside");
                    }
                }
            }
            records.push(Some(record));
        }
        records
    }

    /// Persists what was added to the known versions (a later session
    /// with the same former primary, after a restart of this node, must
    /// still know what it sent).
    pub fn save_known(&mut self) {
        if !self.known_dirty {
            return;
        }
        for (st, record) in self.stores.iter().zip(&mut self.records) {
            if let Some(record) = record {
                // This tenure's own part (held at takeover and sent since)
                // and the carried part, still apart: what counts of it is
                // decided for each peer state.
                if self.tenure.0 != 0 {
                    (record.epoch, record.floor) = self.tenure;
                }
                record.pending.clear();
                if let Err(e) = super::takeover::write(&self.state_dir, &st.name, record) {
                    warn!(store = %st.name, "cannot update the takeover record: {e}");
                    return;
                }
            }
        }
        self.known_dirty = false;
        self.known_unlogged.clear();
    }

    /// A version of `store` goes out: known held from now on, and logged
    /// (see [`Sender::take_known_unlogged`]) before its bytes leave.
    pub(crate) fn note_sent(&mut self, store: usize, hash: u128) {
        if let Some(Some(t)) = self.known.get_mut(store) {
            if t.insert(hash) {
                self.known_dirty = true;
                self.known_unlogged.push((store, hash));
            }
            if let Some(Some(r)) = self.records.get_mut(store) {
                r.hashes.insert(hash);
            }
        }
    }

    /// The versions known since they were last logged, per store: what the
    /// driver appends to the takeover record's sent log before the frames
    /// that carry them leave (a simulator keeps them as its record).
    pub(crate) fn take_known_unlogged(&mut self) -> Vec<(usize, Vec<u128>)> {
        let mut out: Vec<(usize, Vec<u128>)> = Vec::new();
        for (s, h) in self.known_unlogged.drain(..) {
            match out.iter_mut().find(|(t, _)| *t == s) {
                Some((_, v)) => v.push(h),
                None => out.push((s, vec![h])),
            }
        }
        out
    }

    /// Appends the versions known since the last call to the sent logs
    /// (flushed with `durable`). A failure is logged: those versions go into
    /// the record at the end of the session, and a crash before it keeps
    /// them aside on the former primary (never deletes them).
    fn log_known(&mut self, durable: bool) {
        for (s, hashes) in self.take_known_unlogged() {
            let name = &self.stores[s].name;
            if let Err(e) = super::takeover::append_sent(&self.state_dir, name, &hashes, durable) {
                warn!(store = %name, "cannot log versions sent to the former primary: {e}");
            }
        }
    }

    /// Drops the entries of a walk taken before the session once they are
    /// too old for its first comparison (which would walk again anyway).
    pub fn drop_stale_prescan(&mut self) {
        if self
            .prescanned
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() >= PRESCAN_FRESH)
        {
            self.prescanned = None;
        }
    }

    /// Replies to the peer, for the loop to send next (acknowledgements of
    /// versions handed over).
    pub(crate) fn take_replies(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.replies_out)
    }

    /// A version the peer kept aside starts arriving.
    #[allow(clippy::too_many_arguments)]
    fn begin_conflict(
        &mut self,
        id: u64,
        store: u16,
        path: &[u8],
        meta: super::fsops::Meta,
        size: u64,
        hash: u128,
        kept_at: i64,
    ) -> Result<(), SendError> {
        let s = store as usize;
        let (Some(st), Some(rel)) = (self.stores.get(s), rel_from(path)) else {
            return Err(SendError::Protocol {
                peer: "secondary".into(),
                what: format!("conflict {id} names store {s} or an invalid path"),
            });
        };
        if self.incoming.is_some() {
            return Err(SendError::Protocol {
                peer: "secondary".into(),
                what: format!("conflict {id} begins before the previous one ended"),
            });
        }
        let version = super::conflicts::Handed {
            id,
            store: s,
            rel: rel.clone(),
            meta,
            size,
            hash,
            kept_at,
        };
        self.shelf_slots.resize_with(self.stores.len(), || None);
        let slots = match &mut self.shelf_slots[s] {
            Some(names) => Ok(names),
            slot @ None => st
                .tree
                .shelf_slots(&st.internal)
                .map(|names| slot.insert(names)),
        };
        let shelved = slots.and_then(|names| {
            st.tree.shelve(
                &st.internal,
                version,
                Box::new(names.holding(kept_at, &rel)),
            )
        });
        match shelved {
            Ok(None) => {
                // Held already (handed over before, the acknowledgement
                // lost): acknowledged again, and the content that follows
                // is read and dropped.
                SyncMsg::ConflictAck { id }.encode(&mut self.replies_out);
                self.incoming = (size > 0).then_some(Incoming::Skipping { id, left: size });
            }
            Ok(Some(inc)) => {
                self.incoming = Some(Incoming::Receiving(inc));
                if size == 0 {
                    self.conflict_data(id, &[])?;
                }
            }
            Err(e) => {
                error!(store = %st.name, path = %rel.display(), "cannot keep a conflict handed over by the peer: {e}; the peer keeps its copy");
                SyncMsg::ConflictRefused {
                    id,
                    why: format!("cannot keep {}: {e}", rel.display()),
                }
                .encode(&mut self.replies_out);
                self.incoming = (size > 0).then_some(Incoming::Skipping { id, left: size });
            }
        }
        Ok(())
    }

    /// Content of the version being handed over.
    fn conflict_data(&mut self, seq: u64, bytes: &[u8]) -> Result<(), SendError> {
        let protocol = |what: String| SendError::Protocol {
            peer: "secondary".into(),
            what,
        };
        match self.incoming.take() {
            Some(Incoming::Skipping { id, left }) if id == seq => {
                let left = left.saturating_sub(bytes.len() as u64);
                if left > 0 {
                    self.incoming = Some(Incoming::Skipping { id, left });
                }
            }
            Some(Incoming::Receiving(mut inc)) if inc.id() == seq => {
                let done = match inc.write(bytes) {
                    Ok(done) => done,
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        return Err(protocol(format!("conflict {seq}: {e}")));
                    }
                    Err(e) => {
                        // This node's disk: the rest is read and dropped,
                        // nothing is acknowledged, and the peer keeps its
                        // copy and hands it over again.
                        let left = inc.left().saturating_sub(bytes.len() as u64);
                        let s = inc.store();
                        drop(inc);
                        error!(store = %self.stores[s].name, "conflict {seq} not kept: {e}; the peer keeps its copy");
                        SyncMsg::ConflictRefused {
                            id: seq,
                            why: format!("cannot write it: {e}"),
                        }
                        .encode(&mut self.replies_out);
                        self.incoming = (left > 0).then_some(Incoming::Skipping { id: seq, left });
                        return Ok(());
                    }
                };
                if !done {
                    self.incoming = Some(Incoming::Receiving(inc));
                    return Ok(());
                }
                let s = inc.store();
                match inc.finish() {
                    Ok(kept) => {
                        self.conflicts_received += 1;
                        if self.conflicts_received == 1 {
                            let line = format!(
                                "genuine conflicts: the former primary held versions this node never had (its replication lag window); kept aside in {} — see `hasync conflicts list`",
                                self.stores[s].internal.display()
                            );
                            error!(alarm = true, "ALARM: {line}");
                            self.stats.raise_alarm(line);
                        }
                        info!(store = %self.stores[s].name, kept = %kept.display(), "conflict handed over by the peer and kept aside");
                        let held = super::conflicts::slot_and_rel(&self.stores[s].internal, &kept);
                        if let (Some(Some(names)), Some((slot, rel))) =
                            (self.shelf_slots.get_mut(s), held)
                        {
                            names.add(slot, rel);
                        }
                        SyncMsg::ConflictAck { id: seq }.encode(&mut self.replies_out);
                    }
                    Err(e) => {
                        // It may have landed (a failed directory flush):
                        // the slots are read again for the next one.
                        if let Some(names) = self.shelf_slots.get_mut(s) {
                            *names = None;
                        }
                        error!(store = %self.stores[s].name, "conflict {seq} not kept: {e}; the peer keeps its copy");
                        SyncMsg::ConflictRefused {
                            id: seq,
                            why: format!("cannot keep it: {e}"),
                        }
                        .encode(&mut self.replies_out);
                    }
                }
            }
            other => {
                self.incoming = other;
                return Err(protocol(format!("data for seq {seq} outside a conflict")));
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, seq: u64, building: Option<&Inflight>) {
        let now = Instant::now();
        let done = self.window.acked(seq);
        // A rename the replica refused: the renames after it in the batches
        // this ack covers carried what it still holds at `from` on too.
        let refused_rename = done
            .iter()
            .flat_map(|b| &b.body.acks)
            .any(|a| matches!(a, OnAck::Rename(n, ..) if self.window.is_needed(*n)));
        let acked_renames: Vec<(u64, usize, PathBuf, PathBuf)> = if refused_rename {
            done.iter()
                .flat_map(|b| &b.body.acks)
                .filter_map(|a| match a {
                    OnAck::Rename(n, s, from, to) => Some((*n, *s, from.clone(), to.clone())),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        for sent in done {
            let (n, b) = (sent.ops, sent.body);
            if let (Some(sent), Some(from)) = (b.sent_at, self.lag_from) {
                if sent >= from {
                    let mut st = self.stats.stages.lock().expect("stages lock");
                    Stages::record(&mut st.sent_to_ack, now.duration_since(sent));
                }
            }
            {
                let mut lag = self.stats.lag_us.lock().expect("lag lock");
                for since in &b.sinces {
                    if self.lag_from.is_some_and(|from| *since >= from) {
                        let _ = lag.record(now.duration_since(*since).as_micros().max(1) as u64);
                    }
                }
            }
            for (k, s, p) in &b.recent_names {
                self.recent.forget_name(*k, *s, p);
            }
            for a in b.acks {
                match a {
                    OnAck::Set(seq, s, rel, mut entry) => {
                        if self.window.was_needed(seq) {
                            entry.synced = false;
                        }
                        // A folder's times said do not make it held as it
                        // is here: a `Mkdir` refused before them (its
                        // children made it with another mode) stays owed.
                        if !self.times_only.is_empty() && self.times_only.remove(&seq) {
                            if let Some(held) = self.stores[s].index.get(&rel) {
                                entry.synced &= held.synced;
                            }
                        }
                        self.stores[s].index.set(rel, entry)
                    }
                    OnAck::Link(seq, ..) if self.window.was_needed(seq) => {}
                    // The replica linked only to the content said.
                    OnAck::Link(_, s, rel, _, st, hash) => {
                        self.stores[s].index.set(rel, Entry::new(&st, hash, true))
                    }
                    OnAck::Remove(_, s, rel) => self.stores[s].index.remove_tree(&rel),
                    OnAck::Rename(seq, s, from, to) => {
                        if self.window.was_needed(seq) {
                            // The replica could not rename: it still holds
                            // `from` (deleted next) and `to` as it was. What
                            // it held at `to` stays known (a link to one of
                            // those files stays a link); the folders there
                            // are listed again, so what moved in from `from`
                            // travels.
                            self.stores[s].index.remove_tree(&from);
                            self.stores[s].index.unsync_folders(&to);
                            // What the replica holds at `to` is not what the
                            // rename was to put there (its entry came with an
                            // earlier op of this batch, after the need was
                            // heard): a rename of it planned from now on
                            // sends its new name (seed 400872: a message
                            // renamed over another whose source the replica
                            // lacked, then flagged; the flag rename carried
                            // the overwritten message's content on).
                            self.stores[s].index.set_synced(&to, false);
                            // A comparison's listing of them is stale too.
                            self.forget_listings_under(s, &from, &to);
                            // A folder that did not move leaves both trees
                            // to be found again: ops since may have re-made
                            // parts of either there (a folder made again
                            // under `from` is only merged into what the
                            // replica still holds there). A comparison does
                            // it exactly (refused folder renames are rare).
                            let tree = &self.stores[s].tree;
                            let folder = |p: &Path| {
                                tree.lstat(p)
                                    .ok()
                                    .flatten()
                                    .is_some_and(|st| st.kind == Kind::Dir)
                            };
                            // (Or gone from both names since: renamed on,
                            // and what the replica keeps where is unknown.)
                            if self.folder_renames.remove(&seq) || folder(&to) || folder(&from) {
                                self.pending_verify = true;
                            }
                            // Renames sent (or planned) after this one
                            // carry what the replica still holds at `from`
                            // and at `to` on (its folder renamed, a flag
                            // changed): those names are the ones to correct
                            // (seeds 49456, 400872).
                            let (moved_from, moved_to) = {
                                let mut renames: Vec<(u64, &Path, &Path)> = acked_renames
                                    .iter()
                                    .filter(|r| r.1 == s)
                                    .map(|(n, _, f, t)| (*n, f.as_path(), t.as_path()))
                                    .collect();
                                renames.extend(self.renames_on_the_way(s, building));
                                (
                                    through_renames(&renames, &from, seq).into_owned(),
                                    through_renames(&renames, &to, seq).into_owned(),
                                )
                            };
                            for (name, moved) in [(&from, moved_from), (&to, moved_to)] {
                                if moved != *name {
                                    self.coalescer.push(Op::Sync {
                                        store: s,
                                        rel: moved,
                                        since: now,
                                    });
                                }
                            }
                            self.coalescer.push(Op::Sync {
                                store: s,
                                rel: from,
                                since: now,
                            });
                        } else {
                            self.folder_renames.remove(&seq);
                            self.stores[s].index.rename_tree(&from, &to);
                        }
                    }
                }
            }
            add(&self.stats.ops_acked, n);
            *self.stats.last_ack.lock().expect("last ack lock") = Some(Instant::now());
            self.stats.ops_inflight.fetch_sub(n, Relaxed);
            let mut p = self.stats.progress.lock().expect("progress lock");
            p.done_files += b.files;
            p.done_bytes += b.bytes;
        }
        // Every ack that could carry an op asked for again up to `seq` has
        // arrived (a need of the batch still being sent stays).
        self.window.forget_needs_through(seq);
        for req in self.waiting.acked(seq) {
            self.stats.commits_replicated.fetch_add(1, Relaxed);
            self.stats.synchronous.store(true, Relaxed);
            let _ = req.reply.send(CommitOutcome::Replicated {
                waited: now.duration_since(req.at),
            });
        }
        if self.retry.is_empty() && self.stats.peer_disk_full.swap(false, Relaxed) {
            info!("peer accepts data again: replication resumed");
            self.retry_delay = NO_SPACE_RETRY_MIN;
        }
    }

    fn release_periodic(&mut self) {
        for op in self.gate.due(Instant::now()) {
            self.coalescer.push(op);
        }
    }

    fn take_commits(&mut self) {
        let Some(rx) = &self.commits else { return };
        while let Ok(req) = rx.try_recv() {
            // Make sure the path travels even if inotify has not seen it yet.
            self.coalescer.push(Op::Sync {
                store: req.store,
                rel: req.rel.clone(),
                since: req.at,
            });
            self.waiting.add(req);
        }
    }

    fn satisfy_now(&mut self, store: usize, rel: &Path) {
        for req in self.waiting.held_already(store, rel) {
            // Confirmed as much as one that waited for its ack (the status
            // said "degraded" after commits all replicated this way).
            self.stats.commits_replicated.fetch_add(1, Relaxed);
            self.stats.synchronous.store(true, Relaxed);
            let _ = req.reply.send(CommitOutcome::Replicated {
                waited: req.at.elapsed(),
            });
        }
    }

    /// Commits past their deadline return as local-only; the pair is then
    /// reported as degraded until a commit is confirmed again.
    pub fn expire_commits(&mut self) {
        self.take_commits();
        let now = Instant::now();
        for req in self.waiting.expired(now) {
            if self.stats.synchronous.swap(false, Relaxed) {
                warn!("zero-loss commit degraded to local-only: the peer did not confirm in time");
            }
            self.stats.commits_degraded.fetch_add(1, Relaxed);
            let _ = req.reply.send(CommitOutcome::LocalOnly {
                reason: format!(
                    "the peer did not confirm within {:?}; durable on this node only",
                    req.deadline.duration_since(req.at)
                ),
            });
        }
    }

    /// A lost connection loses the batches in flight: their commits wait for
    /// the re-send after reconnecting.
    pub fn forget_inflight_commits(&mut self) {
        self.waiting.connection_lost();
    }

    fn next_seq(&mut self) -> u64 {
        self.window.next_seq()
    }

    /// Decides what one batch of ops sends: every lookup goes through the
    /// store's [`LocalTree`], no file is read and nothing is sent (the
    /// driver reads the files planned and emits the frames in order).
    pub(crate) fn plan_batch(&mut self, ops: Vec<Op>) -> Result<Planned, SendError> {
        let ops: Vec<Op> = ops.into_iter().filter(|op| !self.gate.hold(op)).collect();
        // A held name's sure delete looks for its message's other names
        // among these (see `behind`).
        // (Only when some delete may be sure: not on every batch's path.)
        self.batch_names = if self.deletes_sure.is_empty() {
            behind::BatchNames::new()
        } else {
            behind::batch_names(&ops)
        };
        // Before any delete of the batch asks whether a folder found gone
        // may have been carried off by one.
        for op in &ops {
            if let Op::Rename { store, to, .. } = op {
                self.note_rename_planned(*store, to);
            }
        }
        let mut plans = Vec::with_capacity(ops.len());
        // Directories new to the replica, listed once the batch is planned.
        let mut expand = Vec::new();
        // Paths this batch carries, for commits waiting on them.
        let mut batch_paths: std::collections::HashSet<(usize, PathBuf)> = Default::default();
        if !self.waiting.is_empty() {
            for op in &ops {
                match op {
                    Op::Sync { store, rel, .. } => {
                        batch_paths.insert((*store, rel.clone()));
                    }
                    Op::Rename { store, to, .. } => {
                        batch_paths.insert((*store, to.clone()));
                    }
                    Op::Rescan { .. } => {}
                }
            }
        }
        let mut batch = Inflight {
            acks: Vec::new(),
            recent_names: Vec::new(),
            sinces: Vec::new(),
            sent_at: None,
            files: 0,
            bytes: 0,
        };
        // Folders whose entries this batch changes: their mtime follows.
        let mut touched: std::collections::BTreeSet<(usize, PathBuf)> = Default::default();
        // Folders of the files planned, checked against the replica's once.
        let mut parents_checked: std::collections::HashSet<(usize, PathBuf)> = Default::default();
        let mut ops: VecDeque<Op> = ops.into();
        while let Some(op) = ops.pop_front() {
            match &op {
                Op::Sync { store, rel, .. } => {
                    touched.insert((*store, parent_dir(rel)));
                }
                Op::Rename {
                    store, from, to, ..
                } => {
                    touched.insert((*store, parent_dir(from)));
                    touched.insert((*store, parent_dir(to)));
                }
                Op::Rescan { .. } => {}
            }
            match op {
                Op::Rescan { store, reason, .. } => {
                    warn!(store = %self.stores.get(store).map_or("?", |s| s.name.as_str()), "rescan: {reason}");
                    // A comparison with the replica re-finds whatever the
                    // tracker missed; it runs at the next loop turn.
                    self.pending_verify = true;
                }
                Op::Rename {
                    store,
                    from,
                    to,
                    since,
                } => {
                    self.forget_listings_under(store, &from, &to);
                    // Something is renamed onto `to`: a retry of a delete
                    // there (or below) is no look at the name found gone
                    // then, and must not send a sure delete.
                    if !self.deletes_sure.is_empty() {
                        self.delete_sure_forget_below(store, &to);
                    }
                    if !self.replica_has(store, &from, &plans, &batch) {
                        // The replica never got `from` (a comparison found
                        // `to` first, say): a rename there would be refused.
                        // Send what each name holds now instead: the new
                        // name first. Where the replica does hold `from`
                        // after all (the ack of its op lost in a cut), it
                        // keeps the message until the new name has it (it
                        // holds the delete back while the copy waits for
                        // room).
                        tracing::debug!(from = %from.display(), to = %to.display(), "rename of a path the replica lacks: syncing both");
                        // The name was renamed away, not expunged: its
                        // delete is no second look at a name found gone,
                        // and must not be sure (simulator seed 12576: the
                        // replica held `from` as its only copy, the
                        // tracker had not read the rename of `to` on, and
                        // the sure delete left the message on no name).
                        if !self.deletes_sure.is_empty() {
                            self.delete_sure_forget(store, &from);
                        }
                        ops.push_front(Op::Sync {
                            store,
                            rel: from,
                            since,
                        });
                        ops.push_front(Op::Sync {
                            store,
                            rel: to,
                            since,
                        });
                        continue;
                    }
                    // The folder this rename moves is not the one the
                    // replica holds under `from` (that name was given up and
                    // made again before the replica got the first folder):
                    // the rename would move the wrong folder to `to`, and
                    // what the renamed one holds has no event. Only a
                    // comparison after it finds that for sure. (A file the
                    // index knows, the commonest rename, costs no lstat
                    // here.)
                    let known_file = self.stores[store]
                        .index
                        .get(&from)
                        .is_some_and(|e| e.kind != Kind::Dir);
                    if !self.pending_verify && !known_file {
                        if let Ok(Some(st)) = self.stores[store].tree.lstat(&to) {
                            if st.kind == Kind::Dir
                                && self.replica_folder_differs(store, &from, st.version.ino, &batch)
                            {
                                tracing::debug!(from = %from.display(), to = %to.display(), "a folder renamed is not the replica's under its name: comparing with the replica");
                                self.pending_verify = true;
                            }
                        }
                    }
                    let seq = self.next_seq();
                    tracing::debug!(from = %from.display(), to = %to.display(), "plan rename");
                    let mut f = Vec::new();
                    SyncMsg::Rename {
                        seq,
                        store: store as u16,
                        from: rel_bytes(&from),
                        to: rel_bytes(&to),
                    }
                    .encode(&mut f);
                    add(&self.stats.renames_sent, 1);
                    for names in self.link_names() {
                        names.renamed(store, &from, &to);
                    }
                    self.follow_retries(store, &from, &to);
                    if self.follow_folder_rename(
                        store,
                        (&from, &to),
                        since,
                        &batch,
                        &mut expand,
                        &mut touched,
                    ) {
                        self.folder_renames.insert(seq);
                    }
                    // What the replica holds under `from` is not what the
                    // index last saw go there (an op on the name failed,
                    // and its retry follows the name it had then; a
                    // folder its children made with the wrong mode): the
                    // rename carries that to `to`, which is sent after it.
                    let stale = {
                        let index = &self.stores[store].index;
                        let unsynced = |p: &Path| index.get(p).map(|e| !e.synced);
                        // Only a name new to the index looks through the
                        // renames on their way (a flag change costs none).
                        unsynced(&from).unwrap_or_else(|| {
                            let known = self.index_name(store, &from, &batch);
                            known != from && unsynced(&known).unwrap_or(false)
                        })
                    } || {
                        // What the replica holds under `from` is a file
                        // sent after this rename was made (another file
                        // moved onto the name since, and sent first): the
                        // rename carries that file to `to`.
                        let e = self.stores[store].index.get(&from);
                        e.is_some_and(|e| {
                            e.kind != Kind::Dir
                                && matches!(self.stores[store].tree.lstat(&to),
                                    Ok(Some(st)) if st.kind != Kind::Dir && st.version.ino != e.version.ino)
                        })
                    };
                    // Unless `to` is gone here already (moved on by a rename
                    // not yet planned, which carries the stale state on and is
                    // checked the same way): a sync now would delete, on the
                    // replica, what that rename is to move (seed 177051: a
                    // folder's content deleted on the replica, and a message
                    // renamed into it made the folder again there, so the
                    // next rename took the folder for held).
                    if stale && matches!(self.stores[store].tree.lstat(&to), Ok(Some(_))) {
                        tracing::debug!(from = %from.display(), to = %to.display(), "a rename carries what the replica failed to update: the new name is sent");
                        ops.push_front(Op::Sync {
                            store,
                            rel: to.clone(),
                            since,
                        });
                    }
                    batch.acks.push(OnAck::Rename(seq, store, from, to));
                    batch.sinces.push(since);
                    plans.push(Plan::Frames(f));
                }
                Op::Sync { store, rel, since } => {
                    tracing::debug!(path = %rel.display(), "plan sync");
                    if !self.requeued.is_empty() {
                        self.requeued.remove(&(store, rel.clone()));
                    }
                    // Queued from a folder's listing: followed if a file.
                    let listed_here = !self.from_listing.is_empty()
                        && self.from_listing.remove(&(store, rel.clone()));
                    batch.sinces.push(since);
                    if !super::tree::fits(&rel) {
                        batch.sinces.pop();
                        let name = self.stores[store].name.clone();
                        self.out_of_reach.report(&self.stats, &name, &rel);
                        continue;
                    }
                    let seq = self.next_seq();
                    let tree = &self.stores[store].tree;
                    let st = tree.lstat(&rel).map_err(|source| SendError::Local {
                        path: tree.abs(&rel),
                        source,
                    })?;
                    let Some(st) = st else {
                        plans.push(Plan::Frames(self.delete_frame(
                            seq,
                            store,
                            rel,
                            Some(since),
                            &mut batch,
                        )));
                        continue;
                    };
                    if !self.deletes_sure.is_empty() {
                        self.delete_sure_forget(store, &rel);
                    }
                    match st.kind {
                        Kind::Dir => {
                            // Another folder under the name than the one the
                            // replica holds (that one deleted or renamed away
                            // and the name made again before the tracker
                            // watched it): what the replica holds below it
                            // may be the old folder's entries, gone without an
                            // event. Only a comparison finds them for sure.
                            if !self.pending_verify
                                && !self.renamed_away(store, &rel, &batch)
                                && self.replica_folder_differs(store, &rel, st.version.ino, &batch)
                            {
                                tracing::debug!(folder = %rel.display(), "another folder under a name the replica holds: comparing with the replica");
                                self.pending_verify = true;
                            }
                            let mut f = Vec::new();
                            SyncMsg::Mkdir {
                                seq,
                                store: store as u16,
                                path: rel_bytes(&rel),
                                meta: st.meta,
                            }
                            .encode(&mut f);
                            add(&self.stats.dirs_sent, 1);
                            expand.push((store, rel.clone(), since));
                            batch
                                .acks
                                .push(OnAck::Set(seq, store, rel, Entry::new(&st, 0, true)));
                            plans.push(Plan::Frames(f));
                        }
                        Kind::Symlink => {
                            let target = match self.stores[store].tree.read_link(&rel) {
                                Ok(t) => t,
                                Err(_) => {
                                    plans.push(Plan::Frames(self.delete_frame(
                                        seq,
                                        store,
                                        rel,
                                        Some(since),
                                        &mut batch,
                                    )));
                                    continue;
                                }
                            };
                            let mut f = Vec::new();
                            let hash = index::hash_bytes(&target);
                            SyncMsg::Symlink {
                                seq,
                                store: store as u16,
                                path: rel_bytes(&rel),
                                target,
                                meta: st.meta,
                            }
                            .encode(&mut f);
                            add(&self.stats.symlinks_sent, 1);
                            batch.acks.push(OnAck::Set(
                                seq,
                                store,
                                rel,
                                Entry::new(&st, hash, true),
                            ));
                            plans.push(Plan::Frames(f));
                        }
                        Kind::File => {
                            self.follow_listed(store, &rel, &st, since, listed_here);
                            self.check_parent_folder(store, &rel, &batch, &mut parents_checked);
                            // Only ctime moved (a link was added or removed,
                            // an attribute event): the replica already holds
                            // exactly this; re-sending would break its links.
                            // Unless a rename of it (or of a folder above
                            // it) is on its way: the replica holds it under
                            // another name once that applies; or a rename
                            // onto it: the replica holds what that moves
                            // there (the index learns it at the ack).
                            let e = self.stores[store].index.get(&rel);
                            if e.is_some_and(|e| {
                                e.synced
                                    && e.kind == Kind::File
                                    && e.version.size == st.version.size
                                    && e.version.mtime_s == st.version.mtime_s
                                    && e.version.mtime_ns == st.version.mtime_ns
                                    && e.version.ino == st.version.ino
                                    && e.meta().mode == st.meta.mode
                                    && e.uid == st.meta.uid
                                    && e.gid == st.meta.gid
                            }) && !self.renamed_away(store, &rel, &batch)
                                && !self.renamed_onto(store, &rel, &batch)
                            {
                                batch.sinces.pop();
                                self.window.give_back(seq);
                                // The replica acknowledged exactly this version.
                                self.satisfy_now(store, &rel);
                                continue;
                            }
                            if st.nlink > 1 {
                                if let Some(f) = self.link_frame(seq, store, &rel, &st, &mut batch)
                                {
                                    plans.push(Plan::Frames(f));
                                    continue;
                                }
                            }
                            // Known before its bytes go out, so that a link
                            // to it later in this same batch is sent as a link.
                            let key = (st.dev, st.version.ino);
                            self.recent.record(key, store, &rel, st.version);
                            batch.recent_names.push((key, store, rel.clone()));
                            if st.version.size <= self.small_file_bytes_max {
                                plans.push(Plan::Small {
                                    seq,
                                    store,
                                    rel,
                                    st,
                                });
                            } else {
                                plans.push(Plan::Large {
                                    seq,
                                    store,
                                    rel,
                                    st,
                                });
                            }
                        }
                    }
                }
            }
        }

        if !expand.is_empty() {
            // Children this batch already carries are not queued again.
            let carried: std::collections::HashSet<(usize, &Path)> =
                carried(&plans, &batch).collect();
            let away = self.renames_on_their_way(&batch);
            for (store, rel, since) in &expand {
                self.expand_dir(*store, rel, *since, &carried, &away);
            }
        }
        Ok(Planned {
            plans,
            batch,
            touched,
            batch_paths,
        })
    }

    /// A small file of the batch was read (`None`: it vanished): its frames,
    /// or a delete.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn small_read(
        &mut self,
        seq: u64,
        store: usize,
        rel: PathBuf,
        st: &Stat,
        read: Read,
        batch: &mut Inflight,
        out: &mut Vec<u8>,
    ) {
        match read {
            Read::Missing => {
                // Found at its Sync, gone at its read: unsure.
                let f = self.delete_frame(seq, store, rel, None, batch);
                out.extend_from_slice(&f);
            }
            Read::Ready(data) => {
                let hash = index::hash_bytes(&data);
                let apart = self.file_apart(store, &rel);
                self.file_frames(seq, store, &rel, st, (&data, hash, apart), out);
                self.account_file(seq, store, rel, st, hash, data.len() as u64, batch);
            }
        }
    }

    /// A large file of the batch was streamed (`None`: it vanished, and a
    /// delete goes to `out`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn large_streamed(
        &mut self,
        seq: u64,
        store: usize,
        rel: PathBuf,
        st: &Stat,
        sent: Option<(u128, u64)>,
        batch: &mut Inflight,
        out: &mut Vec<u8>,
    ) {
        match sent {
            Some((hash, len)) => self.account_file(seq, store, rel, st, hash, len, batch),
            None => {
                let f = self.delete_frame(seq, store, rel, None, batch);
                out.extend_from_slice(&f);
            }
        }
    }

    /// Closes a batch after its entries: the touched folders' mtimes and
    /// the barrier go to `out`; the batch is in flight from here on.
    pub(crate) fn close_batch(
        &mut self,
        touched: std::collections::BTreeSet<(usize, PathBuf)>,
        batch_paths: std::collections::HashSet<(usize, PathBuf)>,
        mut batch: Inflight,
        out: &mut Vec<u8>,
    ) {
        // After the entries: each touched folder's mtime as it is now (the
        // replica applies it once the entries have landed; the store's own
        // root is the operator's, not replicated).
        for (store, dir) in touched {
            if dir.as_os_str().is_empty() {
                continue;
            }
            if let Ok(Some(st)) = self.stores[store].tree.lstat(&dir) {
                if st.kind == Kind::Dir {
                    let seq = self.next_seq();
                    SyncMsg::DirMeta {
                        seq,
                        store: store as u16,
                        path: rel_bytes(&dir),
                        meta: st.meta,
                    }
                    .encode(out);
                    self.times_only.insert(seq);
                    batch
                        .acks
                        .push(OnAck::Set(seq, store, dir, Entry::new(&st, 0, true)));
                }
            }
        }
        // A file's entry joins the batch when the file is read, after the
        // ops planned behind it (a rename of it, say): the index learns
        // them in the order the replica applies them.
        batch.acks.sort_by_key(OnAck::seq);
        let barrier = self.window.last_seq();
        SyncMsg::Barrier { seq: barrier }.encode(out);
        if !batch_paths.is_empty() {
            self.waiting.ride(barrier, |s, rel| {
                batch_paths.contains(&(s, rel.to_path_buf()))
            });
        }
        let n = batch.sinces.len() as u64;
        self.stats.ops_inflight.fetch_add(n, Relaxed);
        self.window.sent(n, batch);
    }

    /// Whether a file sent now must land in a file of its own on the
    /// replica (`SyncMsg::File`'s `apart`): a comparison found its name
    /// joined there with names apart here (said once: the names linked to
    /// it here follow as links; if it does not land, the next comparison
    /// finds it joined again). Only then: landing a copy over a name whose
    /// content is durable there replaces that content with one a failed
    /// flush may lose, so the replica otherwise keeps the file it has.
    pub(crate) fn file_apart(&mut self, store: usize, rel: &Path) -> bool {
        !self.unjoin.is_empty() && self.unjoin.remove(&(store, rel.to_path_buf()))
    }

    fn file_frames(
        &self,
        seq: u64,
        store: usize,
        rel: &Path,
        st: &Stat,
        (data, hash, apart): (&[u8], u128, bool),
        out: &mut Vec<u8>,
    ) {
        SyncMsg::File {
            seq,
            store: store as u16,
            path: rel_bytes(rel),
            meta: st.meta,
            size: data.len() as u64,
            hash,
            apart,
        }
        .encode(out);
        for chunk in data.chunks(DATA_BYTES_MAX) {
            SyncMsg::Data {
                seq,
                bytes: chunk.to_vec(),
            }
            .encode(out);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn account_file(
        &mut self,
        seq: u64,
        store: usize,
        rel: PathBuf,
        st: &Stat,
        hash: u128,
        len: u64,
        batch: &mut Inflight,
    ) {
        add(&self.stats.files_sent, 1);
        add(&self.stats.content_bytes_sent, len);
        batch.files += 1;
        batch.bytes += len;
        let key = (st.dev, st.version.ino);
        // A name that held another inode (recreated, or renamed over, in
        // one merged change) now holds this one: no other inode may claim it.
        let reused = self.stores[store]
            .index
            .get(&rel)
            .is_some_and(|e| e.version.ino != st.version.ino);
        if reused {
            self.forget_names_under(store, &rel, Some(key));
        }
        if st.nlink > 1 {
            self.inodes.record(key, store, &rel, st.version);
        }

        // A former primary that holds this version holds it because this
        // node sent it: never a conflict of that peer's. Known from the
        // moment it goes out (it may land there and its ack be lost to a
        // cut, and this node's users delete it before the next session).
        self.note_sent(store, hash);
        let mut v = *st;
        v.version.size = len;
        batch
            .acks
            .push(OnAck::Set(seq, store, rel, Entry::new(&v, hash, true)));
    }

    fn delete_frame(
        &mut self,
        seq: u64,
        store: usize,
        rel: PathBuf,
        since: Option<Instant>,
        batch: &mut Inflight,
    ) -> Vec<u8> {
        // Found gone: deleted, or renamed to a name not sent yet (a tracker
        // event not read, a name queued behind). The first delete is
        // unsure: the replica holds its only copy of the content until it
        // lands elsewhere or this name, its turn of the queue over, is
        // found gone again (by a Sync queued since the replica held it)
        // and deleted for sure.
        // (Not while a comparison or rescan is ahead, asked for in this
        // batch even: the mark stays, the replica holds the name again, and
        // the next look goes behind it.)
        // Nor while another name of the same message is on its way: it may
        // not land before this (see `behind`).
        let sure_due = !self.comparison_ahead()
            && since.is_some_and(|since| self.delete_sure_due(store, &rel, since));
        let behind = sure_due && self.same_message_on_its_way(store, &rel, batch);
        let unsure = !sure_due || behind;
        if behind {
            self.note_look_behind_message(store, &rel);
        } else if sure_due {
            self.delete_sure_forget(store, &rel);
        }
        let mut f = Vec::new();
        SyncMsg::Delete {
            seq,
            store: store as u16,
            path: rel_bytes(&rel),
            unsure,
        }
        .encode(&mut f);
        add(&self.stats.deletes_sent, 1);
        self.verify_if_folder_vanished(store, &rel, batch);
        // A later name of the same inode must not be sent as a link to this one.
        self.forget_names_under(store, &rel, None);
        self.stores[store].index.set_synced(&rel, false);
        batch.acks.push(OnAck::Remove(seq, store, rel));
        f
    }

    /// The tracker has not said it read past a look waiting since
    /// `oldest` for [`TRACKER_STALL_WARN`]: the replica keeps the names
    /// held meanwhile, and `CaughtUp` and a switchover's drain wait. Said
    /// once per stall (true while it lasts).
    fn warn_if_tracker_stalls(&mut self, oldest: Option<Instant>, now: Instant) -> bool {
        let stalled =
            oldest.is_some_and(|t| now.saturating_duration_since(t) >= TRACKER_STALL_WARN);
        if stalled && !self.tracker_stall_warned {
            let line = format!(
                "the change tracker has not read past a held delete's look for {} s (its thread \
                 stuck, or its reads always full): those deletes, CaughtUp and a switchover's \
                 drain wait; changes still replicate",
                TRACKER_STALL_WARN.as_secs()
            );
            error!(alarm = true, "ALARM: {line}");
            self.stats.raise_alarm(line);
        } else if !stalled && self.tracker_stall_warned {
            info!("the change tracker reads on: the held deletes' looks go on");
        }
        *self
            .stats
            .tracker_stalled_since
            .lock()
            .expect("tracker stall lock") = oldest.filter(|_| stalled);
        self.tracker_stall_warned = stalled;
        stalled
    }

    /// A comparison is asked for, or a rescan queued, and has not begun:
    /// it lists names a move may have taken a name found gone to (a refused
    /// folder rename leaves its trees to one; a tracker overflow or a
    /// dropped change, to a rescan). A look at such a name waits for it,
    /// then goes behind its backlog, and no delete is sure meanwhile (seed
    /// 9343: a folder's sure delete overtook the comparison that would send
    /// its new name's messages).
    fn comparison_ahead(&self) -> bool {
        self.pending_verify
            || self.comparison_owed
            || self.vanished.is_some()
            || self.coalescer.rescan_pending()
    }

    /// The replica held an unsure delete of `rel`: the next delete of it
    /// is sure.
    fn delete_sure_next_time(&mut self, store: usize, rel: &Path, at: Instant) {
        let cost = rel.as_os_str().len() + 64;
        if self.deletes_sure_bytes + cost > DELETES_SURE_BYTES_MAX {
            tracing::debug!(
                names = self.deletes_sure.len(),
                "too many names whose delete is to be sure next time: letting go of them"
            );
            self.deletes_sure.clear();
            self.deletes_sure_bytes = 0;
        }
        // The first hold's time stays: a second retry of the name, queued
        // behind the first, must not push the time past the first one's
        // (the two would each find the other's later time, and the
        // delete would stay unsure for ever: a lock file renamed away again
        // and again).
        if let std::collections::hash_map::Entry::Vacant(e) =
            self.deletes_sure.entry((store, rel.to_path_buf()))
        {
            e.insert(at);
            self.deletes_sure_bytes += cost;
        }
    }

    /// [`Sender::delete_sure_due`], the mark taken if so (once).
    #[cfg(test)]
    fn delete_sure_taken(&mut self, store: usize, rel: &Path, since: Instant) -> bool {
        let due = self.delete_sure_due(store, rel, since);
        if due {
            self.delete_sure_forget(store, rel);
        }
        due
    }

    /// Whether the delete of `rel`, by a Sync queued at `since`, may be
    /// sure: queued since the replica held it (the caller forgets the mark
    /// once the delete goes sure).
    ///
    /// In or under a folder the tracker cannot watch, where a rename has no
    /// event, also a comparison begun since the replica held the name
    /// (which lists where it may have gone): the tracker compares the store
    /// at each retry of such folders.
    fn delete_sure_due(&self, store: usize, rel: &Path, since: Instant) -> bool {
        self.deletes_sure
            .get(&(store, rel.to_path_buf()))
            .is_some_and(|at| {
                since >= *at
                    && (self.compared_at.is_some_and(|c| c > *at)
                        || !self.coalescer.unwatched_at_or_above(store, rel))
            })
    }

    /// Names at or below `rel` (renamed onto): their next delete is unsure.
    fn delete_sure_forget_below(&mut self, store: usize, rel: &Path) {
        let below: Vec<PathBuf> = self
            .deletes_sure
            .keys()
            .filter(|(s, p)| *s == store && p.starts_with(rel))
            .map(|(_, p)| p.clone())
            .collect();
        for p in below {
            self.delete_sure_forget(store, &p);
        }
    }

    /// `rel` is there again (or its retry is gone): its next delete is
    /// unsure.
    fn delete_sure_forget(&mut self, store: usize, rel: &Path) {
        if self
            .deletes_sure
            .remove(&(store, rel.to_path_buf()))
            .is_some()
        {
            self.deletes_sure_bytes -= rel.as_os_str().len() + 64;
        }
    }

    /// The peer could not apply op `seq` because a source was missing: if
    /// it was a link, the peer does not hold the link's source name. It
    /// may not stand for the inode again, or the next send of the name
    /// would be the same link, refused the same way, forever.
    fn forget_link_source(&mut self, seq: u64, building: Option<&Inflight>) {
        let failed_link = self.acks_on_their_way(building).find_map(|a| match a {
            OnAck::Link(s, link_store, _, existing, st, _) if *s == seq => {
                Some(((st.dev, st.version.ino), *link_store, existing.clone()))
            }
            _ => None,
        });
        if let Some((key, link_store, existing)) = failed_link {
            for names in self.link_names() {
                names.forget_name(key, link_store, &existing);
            }
            self.stores[link_store].index.set_synced(&existing, false);
            // The source is missing there: if it still exists here, send it.
            self.coalescer.push(Op::Sync {
                store: link_store,
                rel: existing,
                since: Instant::now(),
            });
        }
    }

    /// The sources of the renames on their way (sent and not acknowledged,
    /// or planned in this batch).
    fn renames_on_their_way(&self, batch: &Inflight) -> Vec<(usize, PathBuf)> {
        self.acks_on_their_way(Some(batch))
            .filter_map(|a| match a {
                OnAck::Rename(_, s, from, _) => Some((*s, from.clone())),
                _ => None,
            })
            .collect()
    }

    /// Whether a rename of `rel` or of a folder above it is on its way: the
    /// index's entry for `rel` is then the replica's under another name.
    fn renamed_away(&self, store: usize, rel: &Path, batch: &Inflight) -> bool {
        self.acks_on_their_way(Some(batch)).any(
            |a| matches!(a, OnAck::Rename(_, s, from, _) if *s == store && rel.starts_with(from)),
        )
    }

    /// Whether a rename onto `rel` or onto a folder above it is on its
    /// way: the index's entry for `rel` is then what the replica holds
    /// there only until that applies.
    fn renamed_onto(&self, store: usize, rel: &Path, batch: &Inflight) -> bool {
        self.acks_on_their_way(Some(batch))
            .any(|a| matches!(a, OnAck::Rename(_, s, _, to) if *s == store && rel.starts_with(to)))
    }

    /// Does the replica hold `rel` (or will it, once the ops already sent
    /// or planned in this batch apply)?
    fn replica_has(&self, store: usize, rel: &Path, plans: &[Plan], batch: &Inflight) -> bool {
        // Under a folder renamed in flight, the index still has the old
        // names: trust the rename.
        let renamed_into = |a: &OnAck| matches!(a, OnAck::Rename(_, s, _, to) if *s == store && rel.starts_with(to));
        self.stores[store].index.get(rel).is_some_and(|e| e.synced)
            && !self.renamed_away(store, rel, batch)
            || carried(plans, batch).any(|c| c == (store, rel))
            || self
                .window
                .iter()
                .flat_map(|b| &b.body.acks)
                .any(|a| a.carries() == Some((store, rel)))
            || self.acks_on_their_way(Some(batch)).any(renamed_into)
            || self.made_by_a_rename_into_it(store, rel, batch)
    }

    /// Whether a rename on its way puts something below `rel`, and no op
    /// after it removes `rel` or moves it away: the replica makes a
    /// rename's missing parents, so it will hold `rel` as a folder. (A
    /// folder sent, found vanished and deleted, then a message moved into
    /// it and the folder renamed: without this the folder's rename went as
    /// a delete of the old name, with the message in it, before the new
    /// name's content was sent.)
    fn made_by_a_rename_into_it(&self, store: usize, rel: &Path, batch: &Inflight) -> bool {
        self.acks_on_their_way(Some(batch))
            .fold(false, |made, a| match a {
                OnAck::Rename(_, s, _, to) if *s == store && to != rel && to.starts_with(rel) => {
                    true
                }
                OnAck::Rename(_, s, from, _) | OnAck::Remove(_, s, from)
                    if *s == store && rel.starts_with(from) =>
                {
                    false
                }
                _ => made,
            })
    }

    /// The name under which the index knows what the replica holds at
    /// `p`: the index learns renames when they are acknowledged, so the
    /// renames on their way are undone (a folder renamed into this name).
    fn index_name(&self, store: usize, p: &Path, batch: &Inflight) -> PathBuf {
        let mut known = p.to_path_buf();
        let renames: Vec<(&Path, &Path)> = self
            .acks_on_their_way(Some(batch))
            .filter_map(|a| match a {
                OnAck::Rename(_, s, from, to) if *s == store => {
                    Some((from.as_path(), to.as_path()))
                }
                _ => None,
            })
            .collect();
        for (from, to) in renames.into_iter().rev() {
            if let Some(m) = moved_path(&known, to, from) {
                known = m;
            }
        }
        known
    }

    /// Whether the folder the replica holds at `p` may be another than
    /// the one of inode `ino` here: the index says another inode under the
    /// name the renames on their way undo, or an op on its way that puts a
    /// folder there (made or said; the index learns those at their ack)
    /// does.
    fn replica_folder_differs(&self, store: usize, p: &Path, ino: u64, batch: &Inflight) -> bool {
        let known = self.index_name(store, p, batch);
        if self.stores[store]
            .index
            .get(&known)
            .is_some_and(|e| e.kind == Kind::Dir && e.version.ino != ino)
        {
            return true;
        }
        // Gathered once: an initial sync has thousands of folder ops on
        // their way (and no rename).
        let renames = self.renames_on_the_way(store, Some(batch));
        self.acks_on_their_way(Some(batch)).any(|a| match a {
            OnAck::Set(n, s, q, e)
                if *s == store && e.kind == Kind::Dir && e.version.ino != ino =>
            {
                through_renames(&renames, q, *n) == p
            }
            _ => false,
        })
    }

    /// A path found missing whose folder is missing too: the folder was
    /// deleted, or renamed while its files were being read, and a file
    /// made in it before its watch existed lives on under a name no event
    /// reports (renamed away and back, say). Only a comparison with the
    /// replica finds it for sure; it runs at the next loop turn.
    fn verify_if_folder_vanished(&mut self, store: usize, rel: &Path, batch: &Inflight) {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return;
        };
        if self.pending_verify {
            return;
        }
        let gone = match self.stores[store].tree.lstat(parent) {
            // Decided once the tracker has read the rest of what happened
            // (a whole mailbox removed is one comparison, or none).
            Ok(None) => {
                self.note_vanished_folder(store, parent, Instant::now());
                false
            }
            // Another folder under the name now (the one the replica holds
            // was renamed away and the name made again): the file may live
            // on in the renamed folder, under a name no event reports.
            Ok(Some(st)) => self.replica_folder_differs(store, parent, st.version.ino, batch),
            Err(_) => false,
        };
        if gone {
            tracing::debug!(folder = %parent.display(), "a folder vanished under a file being sent: comparing with the replica");
            self.pending_verify = true;
        }
    }

    /// A file is planned into a folder that is not the one the replica
    /// holds under that name (by the index's inode): the replica's was
    /// renamed away and the name made again, and the rename, not yet
    /// heard, will carry what this batch writes there to the new name.
    /// Only a comparison after it finds that for sure. Once per folder and
    /// batch; only the index is asked (folder ops on their way are not
    /// looked through: a file's hot path).
    fn check_parent_folder(
        &mut self,
        store: usize,
        rel: &Path,
        batch: &Inflight,
        checked: &mut std::collections::HashSet<(usize, PathBuf)>,
    ) {
        let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) else {
            return;
        };
        if self.pending_verify || !checked.insert((store, parent.to_path_buf())) {
            return;
        }
        let Some(replica_ino) = self.stores[store]
            .index
            .get(parent)
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.version.ino)
        else {
            return;
        };
        let Ok(Some(here)) = self.stores[store].tree.lstat(parent) else {
            return;
        };
        // The index's inode first: the same folder, the common case, costs
        // no look through the ops on their way.
        if here.kind == Kind::Dir
            && here.version.ino != replica_ino
            && self.replica_folder_differs(store, parent, here.version.ino, batch)
        {
            tracing::debug!(folder = %parent.display(), "a file sent into another folder than the replica's under its name: comparing with the replica");
            self.pending_verify = true;
        }
    }

    /// Every record of names on the replica by inode: hard links
    /// acknowledged and in flight, files sent from listings.
    fn link_names(&mut self) -> [&mut LinkNames; 3] {
        [&mut self.inodes, &mut self.recent, &mut self.listed]
    }

    /// A file is planned: if it was sent from a folder's listing under
    /// another name that no longer holds it, it moved before the tracker
    /// watched that folder (no event reports the old name): that name is
    /// synced too (deleted on the replica). A file sent from a listing is
    /// followed for the session (bounded by [`LISTED_FOLLOWED_MAX`]).
    fn follow_listed(
        &mut self,
        store: usize,
        rel: &Path,
        st: &Stat,
        since: Instant,
        listed_here: bool,
    ) {
        let key = (st.dev, st.version.ino);
        let mut follow = listed_here;
        if self.listed.is_empty() && !follow {
            return;
        }
        let others: Vec<PathBuf> = self
            .listed
            .names(key, store)
            .filter(|p| *p != rel)
            .map(Path::to_path_buf)
            .collect();
        for old in others {
            let held = self.stores[store]
                .tree
                .lstat(&old)
                .ok()
                .flatten()
                .is_some_and(|st| (st.dev, st.version.ino) == key);
            if !held {
                tracing::debug!(from = %old.display(), to = %rel.display(), "a file sent from a listing moved before its folder was watched: its old name is synced");
                self.listed.forget_name(key, store, &old);
                self.coalescer.push(Op::Sync {
                    store,
                    rel: old,
                    since,
                });
                follow = true;
            }
        }
        if follow {
            if self.listed.len() >= LISTED_FOLLOWED_MAX {
                // Too many to follow: a comparison finds what moved.
                tracing::debug!(
                    "more files sent from listings than followed: comparing with the replica"
                );
                self.listed.clear();
                self.pending_verify = true;
            }
            self.listed.record(key, store, rel, st.version);
        }
    }

    /// Drops every recorded name at or under `rel`, except those of `keep`.
    fn forget_names_under(&mut self, store: usize, rel: &Path, keep: Option<InodeKey>) {
        for names in self.link_names() {
            names.forget_under(store, rel, keep);
        }
    }

    /// A second name of an inode the peer already holds: send a link, not bytes.
    fn link_frame(
        &mut self,
        seq: u64,
        store: usize,
        rel: &Path,
        st: &Stat,
        batch: &mut Inflight,
    ) -> Option<Vec<u8>> {
        let key = (st.dev, st.version.ino);
        let known = self
            .inodes
            .other_name(key, store, rel)
            .or_else(|| self.recent.other_name(key, store, rel))
            .map(|n| (n.path.clone(), n.version));
        let (existing, version) = match known {
            Some(k) => k,
            None => {
                // The first name was acknowledged while it had no other
                // link: find it in the index, under the name the replica
                // will have once the renames already sent are applied.
                // The first in path order: the same choice every time.
                let (p, v) = self.stores[store]
                    .index
                    .select(|e| e.synced && e.kind == Kind::File && e.version.ino == st.version.ino)
                    .into_iter()
                    .find(|(p, _)| *p != *rel)
                    .map(|(p, e)| (p, e.version))?;
                let p = self.renamed_in_flight(store, p, 0, Some(batch));
                self.inodes.record(key, store, &p, v);
                (p, v)
            }
        };
        // The replica holds (or, ops applying in order, will hold) `existing`
        // as it was sent; it is this content if the inode's size and mtime
        // have not moved since. Otherwise the bytes travel.
        if version.ino != st.version.ino
            || version.size != st.version.size
            || version.mtime_s != st.version.mtime_s
            || version.mtime_ns != st.version.mtime_ns
        {
            self.inodes.forget_inode(key);
            return None;
        }
        // The content the replica must find at `existing` to link: an op
        // that gave it that content may have failed there (a link of a
        // link refused for a missing source, a file refused for space),
        // leaving what the name held before. Read here (the page cache
        // holds it); a file that cannot be read travels as bytes.
        let hash = self.stores[store].tree.hash(rel, Kind::File).ok()?;
        let mut f = Vec::new();
        SyncMsg::Link {
            seq,
            store: store as u16,
            existing: rel_bytes(&existing),
            path: rel_bytes(rel),
            hash,
            meta: st.meta,
        }
        .encode(&mut f);
        add(&self.stats.links_sent, 1);
        tracing::debug!(existing = %existing.display(), path = %rel.display(), "plan link");
        // A link gives the name the file of its group there.
        if !self.unjoin.is_empty() {
            self.unjoin.remove(&(store, rel.to_path_buf()));
        }
        // Another name to link to (ops apply in order there), should
        // `existing` be deleted next.
        self.inodes.record(key, store, rel, st.version);
        batch.acks.push(OnAck::Link(
            seq,
            store,
            rel.to_path_buf(),
            existing,
            *st,
            hash,
        ));
        Some(f)
    }

    /// A folder renamed while some of its entries were still on their way
    /// (a folder new to the replica whose children were queued after its
    /// mkdir, or a comparison's backlog): those would be looked up under
    /// the old name, find nothing and be sent as deletes, and the entries
    /// under the new name would never travel. They follow the rename.
    /// Whether the rename may be a folder's.
    fn follow_folder_rename(
        &mut self,
        store: usize,
        (from, to): (&Path, &Path),
        since: Instant,
        batch: &Inflight,
        expand: &mut [(usize, PathBuf, Instant)],
        touched: &mut std::collections::BTreeSet<(usize, PathBuf)>,
    ) -> bool {
        // The replica's folders below it (their names once the renames in
        // flight apply), whose times this batch says again under their new
        // names: each one's entries may have changed under a name the
        // primary gave up before the batch closed (a folder renamed away
        // and back), which left its times unsaid.
        let index = &self.stores[store].index;
        // A folder if the index says so, or (not in the index under this
        // name) if it got the name from a folder rename on its way; a file
        // the index knows costs no scan (flag renames are the commonest op).
        let folder = match index.get(from) {
            Some(e) => e.kind == Kind::Dir,
            None => self.acks_on_their_way(Some(batch)).any(|a| match a {
                OnAck::Rename(_, s, _, t) => *s == store && t == from,
                // A folder made by an op on its way.
                OnAck::Set(_, s, p, e) => *s == store && p == from && e.kind == Kind::Dir,
                _ => false,
            }),
        };
        let held: Vec<PathBuf> = if folder {
            // Acknowledged, or made (or said) by an op on its way: the
            // index learns those only at their ack.
            let acked = index
                .select(|e| e.kind == Kind::Dir && e.synced)
                .into_iter()
                .map(|(p, _)| (0, p));
            let on_way = self.acks_on_their_way(Some(batch)).filter_map(|a| match a {
                OnAck::Set(n, s, p, e) if *s == store && e.kind == Kind::Dir => {
                    Some((*n, p.clone()))
                }
                _ => None,
            });
            let renames = self.renames_on_the_way(store, Some(batch));
            let mut held: Vec<PathBuf> = acked
                .chain(on_way)
                .filter_map(|(after, p)| {
                    let now = through_renames(&renames, &p, after);
                    (*now != *from)
                        .then(|| moved_path(&now, from, to))
                        .flatten()
                })
                .collect();
            held.sort();
            held.dedup();
            held
        } else {
            Vec::new()
        };
        let is_dir = !held.is_empty()
            || self.stores[store]
                .tree
                .lstat(to)
                .ok()
                .flatten()
                .is_some_and(|st| st.kind == Kind::Dir);
        if !is_dir {
            return folder;
        }
        touched.extend(held.into_iter().map(|p| (store, p)));
        // Folders this batch touched below it are below its new name, and
        // its own mtime follows too (a move to another parent can change it).
        let below: Vec<PathBuf> = touched
            .iter()
            .filter(|(s, p)| *s == store && p.starts_with(from))
            .map(|(_, p)| p.clone())
            .collect();
        for p in below {
            touched.remove(&(store, p.clone()));
            touched.extend(moved_path(&p, from, to).map(|m| (store, m)));
        }
        touched.insert((store, to.to_path_buf()));
        // Folders this batch lists once planned: list them where they are.
        for (s, dir, _) in expand.iter_mut() {
            if *s == store {
                if let Some(m) = moved_path(dir, from, to) {
                    *dir = m;
                }
            }
        }
        let under = |s: usize, p: &Path| s == store && p != from && p.starts_with(from);
        let mut follow: Vec<PathBuf> = self
            .coalescer
            .pending_ops()
            .filter_map(|op| match op {
                Op::Sync { store: s, rel, .. } if under(*s, rel) => moved_path(rel, from, to),
                _ => None,
            })
            .collect();
        follow.extend(
            self.backlog
                .iter()
                .filter(|(s, p)| under(*s, p))
                .filter_map(|(_, p)| moved_path(&p, from, to)),
        );
        if !follow.is_empty() {
            tracing::debug!(from = %from.display(), to = %to.display(), entries = follow.len(), "folder renamed with entries on their way: they follow it");
        }
        for rel in follow {
            self.coalescer.push(Op::Sync { store, rel, since });
        }
        true
    }

    /// Every op on its way, in order: sent and not yet acknowledged, then
    /// those of the batch being built.
    fn acks_on_their_way<'a>(
        &'a self,
        building: Option<&'a Inflight>,
    ) -> impl Iterator<Item = &'a OnAck> + 'a {
        self.window
            .iter()
            .map(|b| &b.body)
            .chain(building)
            .flat_map(|b| &b.acks)
    }

    /// Where path `p` goes through the renames on their way numbered
    /// after op `after` (0: all of them), in order.
    fn renamed_in_flight(
        &self,
        store: usize,
        p: PathBuf,
        after: u64,
        building: Option<&Inflight>,
    ) -> PathBuf {
        through_renames(&self.renames_on_the_way(store, building), &p, after).into_owned()
    }

    /// The renames of `store` on their way (sent, or planned in `building`),
    /// in op order: gathered once where many names are mapped through them.
    fn renames_on_the_way<'a>(
        &'a self,
        store: usize,
        building: Option<&'a Inflight>,
    ) -> Vec<(u64, &'a Path, &'a Path)> {
        self.acks_on_their_way(building)
            .filter_map(|a| match a {
                OnAck::Rename(n, s, from, to) if *s == store => {
                    Some((*n, from.as_path(), to.as_path()))
                }
                _ => None,
            })
            .collect()
    }

    /// A folder renamed from `from` to `to`: what a comparison queued from
    /// its listings there was (or will be) planned under other names than
    /// the folders hold now, so those listings no longer stand for them (a
    /// folder's ctime does not move when a folder above it is renamed away
    /// and back: seed 158447, where a message queued by a comparison went
    /// as a delete while its folder was away, and the folder, back under its
    /// name and made again on the replica, was not listed).
    fn forget_listings_under(&mut self, store: usize, from: &Path, to: &Path) {
        if self.listed_dirs.is_empty() {
            return;
        }
        for top in [from, to] {
            // A folder's own listing may be gone (taken by `expand_dir`)
            // while its subfolders' stay: the whole subtree's range goes.
            let under: Vec<(usize, PathBuf)> = self
                .listed_dirs
                .range((store, top.to_path_buf())..)
                .map(|(k, _)| k)
                .take_while(|(s, p)| *s == store && p.starts_with(top))
                .cloned()
                .collect();
            for k in under {
                self.listed_dirs.remove(&k);
            }
        }
    }

    /// A directory new to the replica: queue its children that the replica
    /// does not already hold.
    fn expand_dir(
        &mut self,
        store: usize,
        rel: &Path,
        since: Instant,
        carried: &std::collections::HashSet<(usize, &Path)>,
        away: &[(usize, PathBuf)],
    ) {
        let s = &self.stores[store];
        let moving = away.iter().any(|(a, f)| *a == store && rel.starts_with(f));
        if let Some(listed) = self
            .listed_dirs
            .remove(&(store, rel.to_path_buf()))
            .filter(|_| !moving)
        {
            // Listed by the comparison and unchanged since: its children
            // are queued already. An entry added or removed since (also
            // while the folder was renamed away and back, which no event
            // under this name reports) moves its ctime.
            if s.tree.lstat(rel).ok().flatten().is_some_and(|st| {
                (st.version.ino, st.version.ctime_s, st.version.ctime_ns) == listed
            }) {
                return;
            }
        }
        let Ok(names) = s.tree.list(rel) else {
            return;
        };
        // A file sent from an earlier listing and deleted before its folder
        // was watched: no event reports it, and this listing lacks it. Its
        // name is synced (deleted on the replica).
        if !self.listed.is_empty() {
            let here: std::collections::HashSet<&std::ffi::OsStr> =
                names.iter().map(|n| n.as_os_str()).collect();
            for (key, old) in self.listed.in_folder(store, rel) {
                if old.file_name().is_some_and(|n| !here.contains(n)) {
                    tracing::debug!(path = %old.display(), "a file sent from a listing went before its folder was watched: its name is synced");
                    self.listed.forget_name(key, store, &old);
                    self.coalescer.push(Op::Sync {
                        store,
                        rel: old,
                        since,
                    });
                }
            }
        }
        let s = &self.stores[store];
        let mut children = Vec::new();
        for name in names {
            let child = rel.join(name);
            if self.excludes.is_excluded(&child) {
                continue;
            }
            let known = s.index.get(&child).is_some_and(|e| e.synced)
                && !away
                    .iter()
                    .any(|(a, f)| *a == store && child.starts_with(f))
                || carried.contains(&(store, child.as_path()));
            if !known {
                children.push(child);
            }
        }
        for child in children {
            if self.from_listing.len() >= LISTED_FOLLOWED_MAX {
                // Too many to follow (names renamed before they were
                // planned stay here): a comparison finds what moved, and
                // the record starts again.
                tracing::debug!(
                    "more names from listings than followed: comparing with the replica"
                );
                self.from_listing.clear();
                self.pending_verify = true;
            }
            self.from_listing.insert((store, child.clone()));
            self.coalescer.push(Op::Sync {
                store,
                rel: child,
                since,
            });
        }
    }

    /// A session starts: what was in flight in the last one is forgotten
    /// (the first comparison shows what actually landed); returns its
    /// `Start`.
    pub(crate) fn begin_session(&mut self) -> Vec<u8> {
        self.window.reset();
        self.folder_renames.clear();
        self.times_only.clear();
        self.recent.clear();
        // The session's first comparison scans after this.
        self.listed.clear();
        self.from_listing.clear();
        self.peer_former_primary = false;
        self.peer_served_epoch = None;
        self.incoming = None;
        self.conflicts_received = 0;
        // Read again: an operator may have restored some meanwhile.
        self.shelf_slots.clear();
        self.replies_out.clear();
        self.refused.clear();
        // The replica's receiver for this session holds none of them: each
        // is deleted unsure again first.
        self.deletes_sure.clear();
        self.deletes_sure_bytes = 0;
        self.looks_behind.clear();
        // The session's first comparison finds everything.
        self.vanished = None;
        self.gone_at_walk = None;
        self.stats.ops_inflight.store(0, Relaxed);
        let stores: Vec<String> = self.stores.iter().map(|s| s.name.clone()).collect();
        let mut out = Vec::new();
        SyncMsg::Start {
            stores,
            epoch: self.epoch,
        }
        .encode(&mut out);
        out
    }

    /// The session's splice pump, made on first use; `None` when zero-copy
    /// is off or unavailable (said once in the log and in status).
    fn splice_pump(&mut self, w: &FrameWriter) -> Option<&crate::io::splice::SplicePump> {
        if !self.zero_copy {
            return None;
        }
        if self.pump.is_none() {
            match crate::io::splice::SplicePump::new(w, crate::link::bulk_framing()) {
                Ok(p) => self.pump = Some(p),
                Err(e) => {
                    warn!("zero-copy sending unavailable, large files are read instead: {e}");
                    *self.stats.last_error.lock().expect("error lock") =
                        Some(format!("zero-copy sending unavailable: {e}"));
                    self.zero_copy = false;
                    return None;
                }
            }
        }
        self.pump.as_ref()
    }
}

impl<T: LocalTree> Sender<T> {
    /// A comparison with the replica was asked for (a rescan, a folder
    /// that vanished under a file being sent); forgets the request, which
    /// stays owed until the comparison begins.
    pub(crate) fn take_verify_request(&mut self) -> bool {
        self.decide_vanished(Instant::now());
        let asked = std::mem::take(&mut self.pending_verify);
        self.comparison_owed |= asked;
        asked
    }

    /// A comparison with the replica was asked for (not forgotten), or
    /// folders found gone wait to say whether one is.
    pub(crate) fn verify_requested(&self) -> bool {
        self.pending_verify || self.vanished.is_some()
    }
}

/// What a simulator asks of the sender between its steps (the daemon's
/// driver keeps its own loop).
#[cfg(any(test, feature = "tools"))]
impl<T: LocalTree> Sender<T> {
    /// Nothing queued, held back for a retry, waiting in a comparison's
    /// backlog or in flight.
    pub(crate) fn idle(&self) -> bool {
        self.coalescer.pending() == 0
            && self.window.is_empty()
            && self.backlog.is_empty()
            && self.retry.is_empty()
            && self.gate.is_empty()
    }

    /// Replies wait to be sent ([`Sender::take_replies`]).
    pub(crate) fn has_replies(&self) -> bool {
        !self.replies_out.is_empty()
    }

    /// Nothing sent is waiting for its acknowledgement.
    pub(crate) fn window_is_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Room in the window for another batch.
    pub(crate) fn window_open(&self) -> bool {
        self.window.is_open()
    }
}

/// The driver on the real tree: sessions on a socket, files read and
/// streamed through io_uring.
impl Sender<Tree> {
    /// Runs one sync session on an authenticated connection until it fails
    /// or `stop` fires. Pending changes stay in the coalescer for the next.
    pub async fn run(
        &mut self,
        w: &FrameWriter,
        rx: &mut mpsc::Receiver<Result<SyncMsg, LinkError>>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SendError> {
        self.pump = None;
        let res = self.session(w, rx, stop).await;
        self.pump = None;
        self.save_known();
        res
    }

    async fn session(
        &mut self,
        w: &FrameWriter,
        rx: &mut mpsc::Receiver<Result<SyncMsg, LinkError>>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), SendError> {
        let out = self.begin_session();
        w.send_bytes(out).await?;

        let full = self.resync_requested.swap(false, Relaxed);
        self.reconcile(w, rx, full, true).await?;
        let mut next_verify = Instant::now() + self.verify_interval;
        let tracker_wake = self.coalescer.waker();

        loop {
            if *stop.borrow() {
                return Err(SendError::Stopped);
            }
            // Acks, needs and refusals.
            while let Ok(msg) = rx.try_recv() {
                self.on_peer_msg(msg?)?;
            }
            let replies = self.take_replies();
            if !replies.is_empty() {
                w.send_bytes(replies).await?;
            }
            self.requeue_retries();
            self.release_periodic();
            self.take_commits();
            self.expire_commits();
            let before = self.coalescer.pending();
            self.coalescer.drain();
            if self.coalescer.pending() != before {
                self.last_change = Instant::now();
            }
            self.answer_drain();
            self.feed_backlog();
            self.stats.ops_pending.store(
                (self.coalescer.pending() + self.backlog.len()) as u64,
                Relaxed,
            );

            let resync = self.resync_requested.swap(false, Relaxed);
            // (Taken as the simulator takes it: owed until it begins.)
            let asked = self.take_verify_request();
            if resync || asked || Instant::now() >= next_verify {
                self.wait_all_acked(rx).await?;
                self.reconcile(w, rx, resync, false).await?;
                next_verify = Instant::now() + self.verify_interval;
                continue;
            }

            if self.window.is_open() && self.coalescer.pending() > 0 {
                let ops = self.coalescer.take_batch(BATCH_OPS_MAX);
                self.send_batch(w, ops, rx).await?;
                continue;
            }
            self.log_progress();
            if let Some(out) = self.finish_initial_if_done() {
                w.send_bytes(out).await?;
            }
            for s in self.stores.iter_mut() {
                s.index.poll_save();
            }
            if self.last_save.elapsed() > Duration::from_secs(10)
                && !self.stores.iter().any(|s| s.index.is_saving())
                && self.stores.iter().any(|s| s.index.is_dirty())
                && self.window.is_empty()
            {
                self.save_indexes_in_background();
            }
            // Idle or window full: wait for a peer message, a change, a
            // commit request, or the housekeeping tick.
            let commit_wake = self.commit_wake.clone();
            let commit_queued = async move {
                match commit_wake {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.on_peer_msg(m?)?,
                    None => return Err(SendError::PeerGone),
                },
                _ = tracker_wake.notified() => {}
                _ = commit_queued => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.changed() => return Err(SendError::Stopped),
            }
        }
    }

    /// Turns one batch of ops into frames and sends them with a barrier.
    async fn send_batch(
        &mut self,
        w: &FrameWriter,
        ops: Vec<Op>,
        rx: &mut mpsc::Receiver<Result<SyncMsg, LinkError>>,
    ) -> Result<(), SendError> {
        let Planned {
            plans,
            mut batch,
            touched,
            batch_paths,
        } = self.plan_batch(ops)?;
        // Every small read of the batch in flight together: one tick of the
        // runtime submits them all to the ring.
        let mut reads: VecDeque<_> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Small { store, rel, st, .. } => Some(tokio_uring::spawn(read_small(
                    open_for_reading(&self.stores[*store].tree, rel),
                    st.version.size,
                ))),
                _ => None,
            })
            .collect();
        // Emit in order. What is encoded goes out every SEND_CHUNK_BYTES
        // (the receiver starts on a batch while the rest is still being
        // read), through one reused buffer instead of a fresh multi-megabyte
        // one per batch.
        let mut out = std::mem::take(&mut self.spare);
        out.clear();
        out.reserve(2 * SEND_CHUNK_BYTES);
        for plan in plans {
            match plan {
                Plan::Frames(f) => out.extend_from_slice(&f),
                Plan::Small {
                    seq,
                    store,
                    rel,
                    st,
                } => {
                    let task = reads.pop_front().expect("one read per small file");
                    let read = task
                        .await
                        .map_err(|e| SendError::Local {
                            path: rel.clone(),
                            source: std::io::Error::other(format!("read task failed: {e}")),
                        })?
                        .map_err(|source| SendError::Local {
                            path: self.stores[store].tree.abs(&rel),
                            source,
                        })?;
                    self.small_read(seq, store, rel, &st, read, &mut batch, &mut out);
                    if out.len() >= SEND_CHUNK_BYTES {
                        self.log_known(false);
                        let (res, mut buf) = w.send_buf(std::mem::take(&mut out)).await;
                        res?;
                        buf.clear();
                        out = buf;
                    }
                }
                Plan::Large {
                    seq,
                    store,
                    rel,
                    st,
                } => {
                    // Flush what we have, then stream the big file.
                    if !out.is_empty() {
                        self.log_known(false);
                        let (res, mut buf) = w.send_buf(std::mem::take(&mut out)).await;
                        res?;
                        buf.clear();
                        out = buf;
                    }
                    let sent = self.stream_large(w, seq, store, &rel, &st).await?;
                    self.large_streamed(seq, store, rel, &st, sent, &mut batch, &mut out);
                    // Keep acks flowing while big files go out.
                    while let Ok(m) = rx.try_recv() {
                        self.on_peer_msg_while(m?, Some(&batch))?;
                    }
                }
            }
        }
        self.close_batch(touched, batch_paths, batch, &mut out);
        // Once a batch: the versions it sent are on disk (a crash of the
        // process keeps what was written for each chunk before).
        self.log_known(true);
        let (res, buf) = w.send_buf(out).await;
        res?;
        self.spare = buf;
        let now = Instant::now();
        if let Some(b) = self.window.last_mut() {
            b.body.sent_at = Some(now);
            if let Some(from) = self.lag_from {
                let mut st = self.stats.stages.lock().expect("stages lock");
                for since in b.body.sinces.iter().filter(|s| **s >= from) {
                    Stages::record(&mut st.queued, now.duration_since(*since));
                }
            }
        }
        Ok(())
    }

    /// Streams a large file in chunks; `None` if it vanished.
    async fn stream_large(
        &mut self,
        w: &FrameWriter,
        seq: u64,
        store: usize,
        rel: &Path,
        st: &Stat,
    ) -> Result<Option<(u128, u64)>, SendError> {
        let abs = self.stores[store].tree.abs(rel);
        let local = |source| SendError::Local {
            path: abs.clone(),
            source,
        };
        // The header carries size and hash, so hash first (one extra read,
        // served from the page cache), then send exactly what was hashed.
        let file = match open_for_reading(&self.stores[store].tree, rel).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(local(e)),
        };
        let size = st.version.size;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut pos = 0u64;
        let mut buf = Vec::with_capacity(DATA_BYTES_MAX);
        while pos < size {
            buf.clear();
            let want = ((size - pos) as usize).min(DATA_BYTES_MAX);
            let (res, b) = file.read_at(buf.slice(0..want), pos).await;
            buf = b.into_inner();
            let n = res.map_err(local)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
        let len = pos;
        let hash = h.digest128();
        self.note_sent(store, hash);
        self.log_known(false);
        let mut out = Vec::new();
        SyncMsg::File {
            seq,
            store: store as u16,
            path: rel_bytes(rel),
            meta: st.meta,
            size: len,
            hash,
            apart: self.file_apart(store, rel),
        }
        .encode(&mut out);
        w.send_bytes(out).await?;
        if let Some(pump) = self.splice_pump(w) {
            let fd = crate::io::dup_fd(&file).map_err(local)?;
            match pump.send(fd, len).await {
                Ok(sent) => {
                    if sent.padded > 0 {
                        tracing::debug!(path = %abs.display(), padded = sent.padded, "file shrank while spliced; the peer will ask again");
                    }
                    add(&self.stats.files_spliced, 1);
                    add(&self.stats.bytes_spliced, len);
                    let _ = file.close().await;
                    return Ok(Some((hash, len)));
                }
                // Nothing went out: read this file (and the next) instead.
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    warn!(path = %abs.display(), "zero-copy sending unsupported here, large files are read instead: {e}");
                    *self.stats.last_error.lock().expect("error lock") =
                        Some(format!("zero-copy sending unsupported: {e}"));
                    // The pump stays (idle): dropping it would end the session.
                    self.zero_copy = false;
                }
                Err(source) => {
                    return Err(LinkError::Io {
                        peer: w.peer(),
                        op: "splice",
                        source,
                    }
                    .into())
                }
            }
        }
        let mut pos = 0u64;
        while pos < len {
            buf.clear();
            let want = ((len - pos) as usize).min(DATA_BYTES_MAX);
            let (res, b) = file.read_at(buf.slice(0..want), pos).await;
            buf = b.into_inner();
            let n = res.map_err(local)?;
            if n == 0 {
                // Shrunk while we sent it: pad so the frame count stays
                // right; the hash mismatch makes the peer ask again.
                buf.resize(want, 0);
            }
            let n = n.max(if n == 0 { want } else { 0 });
            let mut f = Vec::with_capacity(n + 64);
            SyncMsg::Data {
                seq,
                bytes: buf[..n].to_vec(),
            }
            .encode(&mut f);
            w.send_bytes(f).await?;
            pos += n as u64;
        }
        let _ = file.close().await;
        Ok(Some((hash, len)))
    }
}

/// The folder holding `rel` ("" for the store's root).
fn parent_dir(rel: &Path) -> PathBuf {
    rel.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `p` once the renames after op `after` (of those gathered by
/// `Sender::renames_on_the_way`) apply.
fn through_renames<'p>(
    renames: &[(u64, &Path, &Path)],
    p: &'p Path,
    after: u64,
) -> std::borrow::Cow<'p, Path> {
    let mut now = std::borrow::Cow::Borrowed(p);
    for (_, from, to) in renames.iter().filter(|(n, _, _)| *n > after) {
        if let Some(m) = moved_path(&now, from, to) {
            now = std::borrow::Cow::Owned(m);
        }
    }
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender_over(dir: &Path) -> Sender<Tree> {
        let store = Store {
            name: "inbox".into(),
            root: dir.join("root"),
            tree: Tree::open(&dir.join("root")).unwrap(),
            index: Index::in_memory(),
            internal: dir.join("internal"),
            conflicts: true,
            dovecot: false,
        };
        Sender::new(
            vec![store],
            Excludes::new(&[]).unwrap(),
            Coalescer::detached(1),
            Arc::new(ReplStats::default()),
            Duration::from_secs(600),
        )
    }

    fn conflict(id: u64, body: &[u8]) -> [SyncMsg; 2] {
        [
            SyncMsg::ConflictFile {
                id,
                store: 0,
                path: b"cur/m".to_vec(),
                meta: super::super::fsops::Meta {
                    mode: 0o600,
                    uid: 0,
                    gid: 0,
                    mtime_sec: 1_700_000_000,
                    mtime_nsec: 0,
                },
                size: body.len() as u64,
                hash: crate::replica::index::hash_bytes(body),
                kept_at: 1_700_000_100,
            },
            SyncMsg::Data {
                seq: id,
                bytes: body.to_vec(),
            },
        ]
    }

    fn acks(sender: &mut Sender<Tree>) -> Vec<u64> {
        let out = sender.take_replies();
        let (mut at, mut ids) = (0, Vec::new());
        while let Some((frame, used)) = crate::wire::decode_frame(&out[at..]).unwrap() {
            at += used;
            if let SyncMsg::ConflictAck { id } = SyncMsg::decode(&frame).unwrap() {
                ids.push(id);
            }
        }
        ids
    }

    /// A name whose unsure delete the replica held is deleted sure by a
    /// Sync queued since the first hold, not by one queued before it; a
    /// second hold (a second retry of the name on its way) does not move
    /// the time on (two retries would each find the other's later time and
    /// the delete stay unsure for ever: a Dovecot lock file did); a retry
    /// parked behind a comparison's backlog stays sure; a rename onto the
    /// name forgets it; a new session starts unsure; the list is bounded.
    #[test]
    fn a_delete_is_sure_from_the_first_hold_on_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let mut sender = sender_over(dir.path());
        let lock = Path::new("alice/Maildir/dovecot-uidlist.lock");
        let before = Instant::now();
        let first = before + Duration::from_millis(1);
        let second = first + Duration::from_millis(70);
        sender.delete_sure_next_time(0, lock, first);
        sender.delete_sure_next_time(0, lock, second);
        assert!(!sender.delete_sure_taken(0, lock, before), "queued before");
        assert!(sender.delete_sure_taken(0, lock, first), "the first retry");
        assert!(!sender.delete_sure_taken(0, lock, second), "once");
        sender.delete_sure_next_time(0, lock, first);
        sender.begin_session();
        assert!(!sender.delete_sure_taken(0, lock, second), "a new session");
        assert_eq!(sender.deletes_sure_bytes, 0);
        // A retry parked behind a comparison's backlog keeps its time (the
        // comparison's is older): fed from the backlog, it is sure.
        sender.backlog_since = before;
        sender.delete_sure_next_time(0, lock, first);
        sender.backlog.push(0, lock);
        sender.feed_backlog();
        let since = sender
            .coalescer
            .pending_ops()
            .find_map(|op| match op {
                Op::Sync { rel, since, .. } if rel == lock => Some(*since),
                _ => None,
            })
            .expect("fed");
        assert!(
            sender.delete_sure_taken(0, lock, since),
            "sure from the backlog"
        );
        // Something renamed onto the name (or its folder): its retry is no
        // look at the name found gone, and sends no sure delete.
        sender.delete_sure_next_time(0, lock, first);
        sender.delete_sure_forget_below(0, Path::new("alice/Maildir"));
        assert!(!sender.delete_sure_taken(0, lock, second));
        assert_eq!(sender.deletes_sure_bytes, 0);
        let long = "x".repeat(4_000);
        for i in 0..5_000 {
            sender.delete_sure_next_time(0, &PathBuf::from(format!("{long}/{i}")), first);
            assert!(sender.deletes_sure_bytes <= DELETES_SURE_BYTES_MAX);
        }
        assert!(sender.deletes_sure.len() < 5_000, "let go of once full");
    }

    /// A rename of a name whose unsure delete the replica holds, read after
    /// the hold and sent as a sync of both names (the sender does not
    /// count the source as held there), deletes the source unsure: the
    /// name was renamed away, and its message may have moved on again by a
    /// rename the tracker has not read (simulator seed 12576).
    #[test]
    fn a_rename_sent_as_two_syncs_deletes_its_source_unsure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/new")).unwrap();
        std::fs::create_dir_all(dir.path().join("root/cur")).unwrap();
        let mut sender = sender_over(dir.path());
        let (from, to) = (Path::new("new/1.M1"), Path::new("cur/1.M1:2,S"));
        let held_at = Instant::now();
        sender.delete_sure_next_time(0, from, held_at);
        // Renamed to `to`, and on again: neither name is here.
        let planned = sender
            .plan_batch(vec![Op::Rename {
                store: 0,
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                since: held_at + Duration::from_millis(1),
            }])
            .unwrap();
        let mut deletes = Vec::new();
        for plan in &planned.plans {
            let Plan::Frames(bytes) = plan else { continue };
            let mut at = 0;
            while let Some((frame, used)) = crate::wire::decode_frame(&bytes[at..]).unwrap() {
                at += used;
                if let SyncMsg::Delete { path, unsure, .. } = SyncMsg::decode(&frame).unwrap() {
                    deletes.push((String::from_utf8(path).unwrap(), unsure));
                }
            }
        }
        assert!(
            deletes.contains(&("new/1.M1".to_string(), true)),
            "{deletes:?}"
        );
        assert!(deletes.iter().all(|(_, unsure)| *unsure), "{deletes:?}");
    }

    /// The look at a name found gone (its unsure delete held) goes back in
    /// the queue once the tracker has read every change made before the
    /// hold (strictly past its instant), not before; not while a comparison
    /// asked for, or a rescan queued, has not begun; and behind what the
    /// tracker queued (a rename drained from the channel comes first).
    #[test]
    fn a_held_delete_is_looked_at_again_once_the_tracker_has_read_past_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let mut sender = sender_over(dir.path());
        let gone = Path::new("alice/Maildir/new/1.host");
        // The replica held the delete of `gone` now: its look waits.
        let held = |sender: &mut Sender<_>| {
            let at = Instant::now();
            let rel = gone.to_path_buf();
            let op = Op::Sync {
                store: 0,
                rel,
                since: at,
            };
            sender.retry.push((Due::TrackerRead(at), op));
            at
        };
        let held_at = held(&mut sender);
        let queued = |s: &Sender<_>| s.coalescer.pending();
        sender.requeue_retries_at(held_at + Duration::from_secs(3600));
        assert_eq!(queued(&sender), 0, "the tracker has said nothing yet");
        sender
            .coalescer
            .set_read_upto(held_at - Duration::from_millis(1));
        sender.requeue_retries_at(held_at + Duration::from_secs(3600));
        assert_eq!(queued(&sender), 0, "read up to before the hold");
        sender.coalescer.set_read_upto(held_at);
        sender.requeue_retries_at(held_at + Duration::from_secs(3600));
        assert_eq!(queued(&sender), 0, "read up to the hold's own instant");
        sender
            .coalescer
            .set_read_upto(held_at + Duration::from_micros(1));
        sender.pending_verify = true;
        assert!(sender.take_verify_request());
        sender.requeue_retries_at(held_at + Duration::from_secs(3600));
        assert_eq!(queued(&sender), 0, "a comparison asked for comes first");
        let _ = sender.begin_comparison(false, false);
        // The tracker's rename, still in the channel, goes ahead.
        sender
            .coalescer
            .sender()
            .send(Op::Rename {
                store: 0,
                from: gone.to_path_buf(),
                to: PathBuf::from("alice/Maildir/cur/1.host:2,S"),
                since: held_at,
            })
            .unwrap();
        sender.requeue_retries_at(held_at);
        let ops = sender.coalescer.take_batch(10);
        assert!(
            matches!(&ops[..], [Op::Rename { .. }, Op::Sync { rel, .. }] if rel == gone),
            "{ops:?}"
        );
        assert!(sender.retry.is_empty());
        // A rescan the tracker queued (an overflow lost the rename): the
        // look waits for the comparison it brings, and no delete is sure
        // until that begins.
        let _ = sender.coalescer.take_batch(100);
        let held_at = held(&mut sender);
        sender
            .coalescer
            .sender()
            .send(Op::Rescan {
                store: 0,
                reason: "inotify queue overflow".into(),
                since: held_at,
            })
            .unwrap();
        sender
            .coalescer
            .set_read_upto(held_at + Duration::from_micros(1));
        sender.requeue_retries_at(held_at);
        assert!(sender.comparison_ahead(), "the rescan is queued");
        assert_eq!(sender.retry.len(), 1, "the look waits behind the rescan");
        // A tracker that never reads past a look is alarmed of (once) and
        // shown in status, once a look has waited 10 s, and no longer
        // once none waits.
        let t = Instant::now();
        sender.stats.take_alarms();
        assert!(!sender.warn_if_tracker_stalls(Some(t), t + Duration::from_secs(9)));
        assert_eq!(sender.stats.snapshot().tracker_stalled_s, None);
        assert!(sender.warn_if_tracker_stalls(Some(t), t + TRACKER_STALL_WARN));
        assert!(sender.warn_if_tracker_stalls(Some(t), t + TRACKER_STALL_WARN * 2));
        let alarms = sender.stats.take_alarms();
        assert_eq!(alarms.len(), 1, "{alarms:?}");
        assert!(alarms[0].contains("change tracker"), "{alarms:?}");
        assert!(sender.stats.snapshot().tracker_stalled_s.is_some());
        assert!(!sender.warn_if_tracker_stalls(None, t + TRACKER_STALL_WARN));
        assert_eq!(sender.stats.snapshot().tracker_stalled_s, None);
        // A sender that ends stalled (the node no longer primary) does not
        // leave the stall in the status.
        assert!(sender.warn_if_tracker_stalls(Some(t), t + TRACKER_STALL_WARN));
        let stats = sender.stats.clone();
        drop(sender);
        assert_eq!(stats.snapshot().tracker_stalled_s, None);
    }

    /// A version the primary cannot keep (here: a file where its conflicts
    /// folder belongs) is refused with the reason, its content read and
    /// dropped; once it can, the same version handed over again is kept.
    #[test]
    fn a_conflict_that_cannot_be_kept_is_refused_with_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        std::fs::write(dir.path().join("internal"), b"not a folder").unwrap();
        let mut sender = sender_over(dir.path());
        for msg in conflict(3, b"a version") {
            sender.on_peer_msg(msg).expect("no protocol error");
        }
        let out = sender.take_replies();
        let (frame, used) = crate::wire::decode_frame(&out).unwrap().unwrap();
        assert_eq!(used, out.len(), "one reply");
        match SyncMsg::decode(&frame).unwrap() {
            SyncMsg::ConflictRefused { id: 3, why } => {
                assert!(why.contains("cur/m"), "names the version: {why}")
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(dir.path().join("internal")).unwrap();
        sender.begin_session();
        for msg in conflict(4, b"a version") {
            sender.on_peer_msg(msg).unwrap();
        }
        assert_eq!(acks(&mut sender), [4]);
    }

    /// A walk's entries held for a first comparison that does not come
    /// while they are fresh (the peer away) are given back.
    #[test]
    fn a_stale_prescan_is_dropped_and_a_fresh_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let mut sender = sender_over(dir.path());
        sender.prescanned = Some((Instant::now(), vec![None]));
        sender.drop_stale_prescan();
        assert!(sender.prescanned.is_some(), "fresh");
        let Some(old) = Instant::now().checked_sub(PRESCAN_FRESH) else {
            return; // a clock that started less than 10 s ago
        };
        sender.prescanned = Some((old, vec![None]));
        sender.drop_stale_prescan();
        assert!(sender.prescanned.is_none(), "stale");
    }

    /// A version handed over again (the first acknowledgement lost with its
    /// session) is acknowledged again, and its content, which the peer
    /// sends right behind it, is read and dropped: no protocol error that
    /// would end every session from then on.
    #[test]
    fn a_conflict_handed_over_again_is_acknowledged_and_its_content_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let mut sender = sender_over(dir.path());
        for msg in conflict(1, b"lost ack") {
            sender.on_peer_msg(msg).unwrap();
        }
        assert_eq!(acks(&mut sender), [1]);
        // The next session hands the same version over again.
        sender.begin_session();
        for msg in conflict(7, b"lost ack") {
            sender.on_peer_msg(msg).expect("its content is dropped");
        }
        assert_eq!(acks(&mut sender), [7]);
        // And the next conflict is taken as usual.
        for msg in conflict(8, b"another version") {
            sender.on_peer_msg(msg).unwrap();
        }
        assert_eq!(acks(&mut sender), [8]);
        // Handed over again in the same session: kept once.
        for msg in conflict(9, b"another version") {
            sender.on_peer_msg(msg).unwrap();
        }
        assert_eq!(acks(&mut sender), [9]);
        let kept = crate::replica::conflicts::list("inbox", &dir.path().join("internal")).unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
    }
}
