//! The lock-free change tracker: what changed in the mailstores, in order, coalesced per path.
//!
//! Three parts, joined by one unbounded crossbeam channel of [`Op`]s:
//! - an inotify reader thread ([`Tracker`]) that watches every directory under the store roots and
//!   decodes events into ops (`decode.rs`);
//! - [`Notifier`]s, for embedders that know what they wrote and call in directly;
//! - one [`Coalescer`], owned by the sending engine's thread, that drains the channel into an
//!   ordered pending list and merges redundant ops (`coalesce.rs`).
//!
//! Producers only `send`; every map and list lives with the single consumer, so nothing on the
//! event path takes a lock.

mod coalesce;
mod decode;

#[cfg(test)]
mod tests;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

pub use coalesce::Coalescer;

/// Path relative to a mailstore root; never absolute, never contains `..`.
pub type RelPath = PathBuf;

/// One unit of work for the sending engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Send the path's *current* state (content+metadata, or a delete if it no longer exists,
    /// or the whole subtree if it is a directory that appeared). The sender reads the file at send time.
    Sync {
        store: usize,
        rel: RelPath,
        since: Instant,
    },
    /// A rename seen as a moved_from/moved_to pair (same cookie), file or directory.
    Rename {
        store: usize,
        from: RelPath,
        to: RelPath,
        since: Instant,
    },
    /// Events may have been lost for this store (IN_Q_OVERFLOW, a watch that could not be added):
    /// the engine must rescan/compare the whole store.
    Rescan {
        store: usize,
        reason: String,
        since: Instant,
    },
}

impl Op {
    /// The store this op belongs to.
    pub fn store(&self) -> usize {
        match self {
            Op::Sync { store, .. } | Op::Rename { store, .. } | Op::Rescan { store, .. } => *store,
        }
    }

    /// When the oldest change this op stands for was seen.
    pub fn since(&self) -> Instant {
        match self {
            Op::Sync { since, .. } | Op::Rename { since, .. } | Op::Rescan { since, .. } => *since,
        }
    }

    /// What the op holds in memory, counted against the channel's and the
    /// pending list's byte bounds: the op and its paths (a local user's
    /// names can be 4 KiB each).
    pub(crate) fn held_bytes(&self) -> usize {
        std::mem::size_of::<Op>()
            + match self {
                Op::Sync { rel, .. } => rel.as_os_str().len(),
                Op::Rename { from, to, .. } => from.as_os_str().len() + to.as_os_str().len(),
                Op::Rescan { reason, .. } => reason.len(),
            }
    }
}

/// What to watch.
pub struct TrackerConfig {
    /// Store roots; the index is the store number.
    pub roots: Vec<PathBuf>,
    /// Glob patterns matched against the [`RelPath`] (`literal_separator`), e.g. `"**/tmp/*"`.
    pub exclude: Vec<String>,
}

/// Counters, as a cheap snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrackerStats {
    /// inotify watches currently held.
    pub watches: u64,
    /// Raw inotify events read plus [`Notifier`] calls.
    pub events: u64,
    /// `IN_Q_OVERFLOW`s seen, plus times the change channel hit its bound and dropped ops.
    pub overflows: u64,
    /// [`Op::Rescan`]s produced by the tracker (overflow, watch failure, bound collapse).
    pub rescans: u64,
    /// Directories that could not be watched (or listed).
    pub watch_failures: u64,
    /// Folders whose watch failed and that are not watched yet (tried
    /// again after 30 s, the wait doubling up to 5 min; the stores compared
    /// with the replica at each retry).
    pub unwatched: u64,
    /// Ops waiting in the coalescer, as last seen.
    pub pending: u64,
}

/// Tracker failures; each says whose fault it is and names the path and errno.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("bad configuration: store root {} is not a usable directory: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad configuration: store roots {} and {} are the same directory", first.display(), second.display())]
    DuplicateRoot { first: PathBuf, second: PathBuf },
    #[error("bad configuration: exclude pattern {pattern:?} is invalid: {source}")]
    Exclude {
        pattern: String,
        source: globset::Error,
    },
    #[error("local I/O: cannot create an inotify instance: {errno}")]
    Init { errno: rustix::io::Errno },
    #[error("local I/O: cannot create the tracker's wake-up eventfd: {errno}")]
    Poke { errno: rustix::io::Errno },
    #[error("local I/O: cannot watch store root {}: {errno}", path.display())]
    WatchRoot {
        path: PathBuf,
        errno: rustix::io::Errno,
    },
    #[error("local I/O: cannot start the tracker thread: {source}")]
    Spawn { source: std::io::Error },
    #[error("caller error: {} is outside every store root", path.display())]
    OutsideRoots { path: PathBuf },
    #[error("caller error: {} is not an absolute path free of `..`", path.display())]
    BadPath { path: PathBuf },
    #[error("caller error: {} is a store root itself, not a path inside one", path.display())]
    StoreRoot { path: PathBuf },
    #[error("the change consumer (Coalescer) is gone; change to {} not recorded", path.display())]
    Closed { path: PathBuf },
}

/// Past this many ops queued in the channel, producers drop ops and mark the store for a rescan.
/// The coalescer turns the mark into one [`Op::Rescan`] when it next drains.
pub(crate) const CHANNEL_OPS_MAX: usize = 1_000_000;

/// The same past this many bytes of ops in the channel ([`Op::held_bytes`]): long names reach
/// it before the count does.
pub(crate) const CHANNEL_BYTES_MAX: usize = 64 << 20;

/// State shared by producers and the consumer: atomics, and the folders
/// not watched (locked as that set changes and when the sender asks).
pub(crate) struct Shared {
    watches: AtomicU64,
    events: AtomicU64,
    overflows: AtomicU64,
    rescans: AtomicU64,
    watch_failures: AtomicU64,
    unwatched: AtomicU64,
    /// The folders whose watch failed and that are tried again (at most
    /// `decode::UNWATCHED_MAX`): no event comes from in or under them.
    unwatched_dirs: std::sync::Mutex<std::collections::BTreeSet<(usize, RelPath)>>,
    pending: AtomicU64,
    /// Per store: ops were dropped at the channel bound since the last drain.
    lost: Box<[AtomicBool]>,
    any_lost: AtomicBool,
    channel_ops_max: usize,
    /// Bytes of the ops in the channel: added as a producer sends one,
    /// taken off as the coalescer receives it.
    channel_bytes: std::sync::atomic::AtomicUsize,
    channel_bytes_max: usize,
    /// Woken after every send, so the consumer can sleep until there is work.
    wake: Arc<tokio::sync::Notify>,
    /// Every change made before this instant has been read, and its ops
    /// sent (nanoseconds after `base`, plus one; 0: none yet): see
    /// [`Shared::read_upto`].
    read_upto_ns: AtomicU64,
    base: Instant,
    /// A consumer asked for a fresh `read_upto`: woken when it advances.
    pub(crate) read_upto_waited: AtomicBool,
    /// Written to ask the reader thread for a fresh `read_upto` at once
    /// (instead of at its next poll timeout); none for a detached
    /// coalescer.
    poke: Option<rustix::fd::OwnedFd>,
}

impl Shared {
    fn new(stores: usize, channel_ops_max: usize) -> Shared {
        Shared {
            watches: AtomicU64::new(0),
            events: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            rescans: AtomicU64::new(0),
            watch_failures: AtomicU64::new(0),
            unwatched: AtomicU64::new(0),
            unwatched_dirs: Default::default(),
            pending: AtomicU64::new(0),
            lost: (0..stores).map(|_| AtomicBool::new(false)).collect(),
            any_lost: AtomicBool::new(false),
            channel_ops_max,
            channel_bytes: std::sync::atomic::AtomicUsize::new(0),
            channel_bytes_max: CHANNEL_BYTES_MAX,
            wake: Arc::new(tokio::sync::Notify::new()),
            read_upto_ns: AtomicU64::new(0),
            base: Instant::now(),
            read_upto_waited: AtomicBool::new(false),
            poke: None,
        }
    }

    /// Folder `rel` of `store` is not watched (`true`) or is again.
    pub(crate) fn note_unwatched(&self, store: usize, rel: &Path, unwatched: bool) {
        let mut set = self.unwatched_dirs.lock().expect("unwatched lock");
        if unwatched {
            set.insert((store, rel.to_path_buf()));
        } else {
            set.remove(&(store, rel.to_path_buf()));
        }
        self.unwatched.store(set.len() as u64, Ordering::Relaxed);
    }

    /// Every folder is watched again (a tracker model's).
    #[cfg(any(test, feature = "tools"))]
    pub(crate) fn clear_unwatched(&self) {
        self.unwatched_dirs.lock().expect("unwatched lock").clear();
        self.unwatched.store(0, Ordering::Relaxed);
    }

    /// Whether `rel` of `store`, or a folder above it, is not watched: a
    /// change there (a rename, say) has no event.
    pub(crate) fn unwatched_at_or_above(&self, store: usize, rel: &Path) -> bool {
        if self.unwatched.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let set = self.unwatched_dirs.lock().expect("unwatched lock");
        rel.ancestors()
            .any(|a| set.contains(&(store, a.to_path_buf())))
    }

    /// With the descriptor that wakes the reader thread for a fresh
    /// [`Shared::read_upto`].
    fn with_poke(mut self) -> Result<Shared, TrackerError> {
        use rustix::event::{eventfd, EventfdFlags};
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|errno| TrackerError::Poke { errno })?;
        self.poke = Some(fd);
        Ok(self)
    }

    /// Every change to the watched trees made before the instant returned
    /// has been read from inotify and its ops sent to the channel (none
    /// waits for its pair: a MOVED_FROM read is resolved). A name found
    /// gone before it, then, had any rename that took it away already
    /// queued (or lost to an overflow, for which a rescan is queued).
    pub(crate) fn read_upto(&self) -> Option<Instant> {
        match self.read_upto_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.base + Duration::from_nanos(ns - 1)),
        }
    }

    /// Advances [`Shared::read_upto`] (never back).
    pub(crate) fn set_read_upto(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.base).as_nanos() as u64 + 1;
        self.read_upto_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Asks the reader thread for a fresh [`Shared::read_upto`] now.
    pub(crate) fn ask_read_upto(&self) {
        self.read_upto_waited.store(true, Ordering::Release);
        if let Some(fd) = &self.poke {
            // A full counter (never, at one per ask) or a closed reader
            // only delays the answer to the thread's next poll timeout.
            let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
        }
    }

    #[cfg(test)]
    fn with_channel_bytes_max(mut self, bytes: usize) -> Shared {
        self.channel_bytes_max = bytes;
        self
    }

    /// The coalescer took `op` out of the channel.
    fn received(&self, op: &Op) {
        let n = op.held_bytes();
        // Saturating: an op injected through the raw sender was never added.
        let _ = self
            .channel_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> TrackerStats {
        TrackerStats {
            watches: self.watches.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            overflows: self.overflows.load(Ordering::Relaxed),
            rescans: self.rescans.load(Ordering::Relaxed),
            watch_failures: self.watch_failures.load(Ordering::Relaxed),
            unwatched: self.unwatched.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
        }
    }
}

/// The producer side: a send that never blocks and never grows the channel past its bound.
#[derive(Clone)]
pub(crate) struct Producer {
    tx: Sender<Op>,
    shared: Arc<Shared>,
}

/// The consumer is gone.
#[derive(Debug)]
pub(crate) struct Closed;

impl Producer {
    fn send(&self, op: Op) -> Result<(), Closed> {
        let bytes = op.held_bytes();
        let full = self.tx.len() >= self.shared.channel_ops_max
            || self.shared.channel_bytes.load(Ordering::Relaxed) + bytes
                > self.shared.channel_bytes_max;
        if full {
            // The consumer is not keeping up: dropping is safe only because the store is marked and
            // the consumer will rescan it, which covers everything dropped here.
            let store = op.store();
            // Not a tracked store (an injected op): nothing to mark, so it is queued anyway.
            if let Some(flag) = self.shared.lost.get(store) {
                if !flag.swap(true, Ordering::SeqCst) {
                    Shared::add(&self.shared.overflows, 1);
                    tracing::warn!(
                        store,
                        ops_max = self.shared.channel_ops_max,
                        bytes_max = self.shared.channel_bytes_max,
                        "change channel full; dropping changes and scheduling a rescan"
                    );
                }
                self.shared.any_lost.store(true, Ordering::SeqCst);
                self.shared.wake.notify_one();
                return Ok(());
            }
        }
        self.shared
            .channel_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        self.tx.send(op).map_err(|_| Closed)?;
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// Which relative paths produce no ops.
pub(crate) struct Filter {
    set: GlobSet,
}

impl Filter {
    pub(crate) fn new(patterns: &[String]) -> Result<Filter, TrackerError> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|source| TrackerError::Exclude {
                    pattern: pattern.clone(),
                    source,
                })?;
            builder.add(glob);
        }
        let set = builder.build().map_err(|source| TrackerError::Exclude {
            pattern: patterns.join(","),
            source,
        })?;
        Ok(Filter { set })
    }

    pub(crate) fn excluded(&self, rel: &Path) -> bool {
        self.set.is_match(rel)
    }
}

/// Store roots, for mapping absolute paths to `(store, rel)`.
pub(crate) struct Roots {
    /// As configured, lexically normalized: what embedders will pass to [`Notifier`].
    given: Vec<PathBuf>,
    /// Resolved: what the inotify side walks.
    canonical: Vec<PathBuf>,
}

impl Roots {
    fn new(roots: &[PathBuf]) -> Result<Roots, TrackerError> {
        let mut given = Vec::with_capacity(roots.len());
        let mut canonical = Vec::with_capacity(roots.len());
        for root in roots {
            let real = std::fs::canonicalize(root).map_err(|source| TrackerError::Root {
                path: root.clone(),
                source,
            })?;
            let meta = std::fs::metadata(&real).map_err(|source| TrackerError::Root {
                path: root.clone(),
                source,
            })?;
            if !meta.is_dir() {
                return Err(TrackerError::Root {
                    path: root.clone(),
                    source: std::io::Error::from(rustix::io::Errno::NOTDIR),
                });
            }
            if let Some(first) = canonical.iter().position(|c| *c == real) {
                return Err(TrackerError::DuplicateRoot {
                    first: roots[first].clone(),
                    second: root.clone(),
                });
            }
            given.push(normalize(root).unwrap_or_else(|| real.clone()));
            canonical.push(real);
        }
        Ok(Roots { given, canonical })
    }

    /// Longest root prefix wins, so a store nested inside another owns its own subtree.
    fn locate(&self, abs: &Path) -> Result<(usize, RelPath), TrackerError> {
        let norm = normalize(abs).ok_or_else(|| TrackerError::BadPath {
            path: abs.to_path_buf(),
        })?;
        let mut best: Option<(usize, &Path, usize)> = None;
        for list in [&self.given, &self.canonical] {
            for (store, root) in list.iter().enumerate() {
                if norm.starts_with(root) {
                    let depth = root.components().count();
                    if best.is_none_or(|(_, _, d)| depth > d) {
                        best = Some((store, root, depth));
                    }
                }
            }
        }
        let (store, root, _) = best.ok_or_else(|| TrackerError::OutsideRoots {
            path: abs.to_path_buf(),
        })?;
        let rel = norm
            .strip_prefix(root)
            .map(Path::to_path_buf)
            .map_err(|_| TrackerError::OutsideRoots {
                path: abs.to_path_buf(),
            })?;
        if rel.as_os_str().is_empty() {
            return Err(TrackerError::StoreRoot {
                path: abs.to_path_buf(),
            });
        }
        Ok((store, rel))
    }
}

/// Absolute and free of `..`, with `.` and doubled separators removed; `None` otherwise.
fn normalize(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    Some(path.components().collect())
}

/// The op for a rename inside one store, given which ends are excluded.
/// Excluded → included is a new file appearing (Maildir `tmp/` → `new/`); the reverse is a delete.
pub(crate) fn rename_op(
    filter: &Filter,
    store: usize,
    from: RelPath,
    to: RelPath,
    since: Instant,
) -> Option<Op> {
    match (filter.excluded(&from), filter.excluded(&to)) {
        (false, false) => Some(Op::Rename {
            store,
            from,
            to,
            since,
        }),
        (true, false) => Some(Op::Sync {
            store,
            rel: to,
            since,
        }),
        (false, true) => Some(Op::Sync {
            store,
            rel: from,
            since,
        }),
        (true, true) => None,
    }
}

/// How far the first watch of a tracker's stores has come (see
/// [`Tracker::start_watching`]).
pub struct Watching {
    /// `WatchedSoFar::done`, read without the lock: once set, a walk's
    /// every folder passes at the cost of a load.
    ended: AtomicBool,
    state: std::sync::Mutex<WatchedSoFar>,
    changed: std::sync::Condvar,
}

struct WatchedSoFar {
    /// Every folder the first watch has gone past (watched, or not
    /// watchable), or the thread ended.
    done: bool,
    /// Per store, the folders watched so far (forgotten when done).
    folders: Vec<std::collections::HashSet<RelPath>>,
}

/// Ends the first watch when dropped: also when its thread unwinds, so
/// that nothing waits on it for ever.
struct FinishOnDrop<'a>(&'a Watching);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

impl Watching {
    fn new(stores: usize) -> Watching {
        Watching {
            ended: AtomicBool::new(false),
            state: std::sync::Mutex::new(WatchedSoFar {
                done: false,
                folders: vec![Default::default(); stores],
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchedSoFar> {
        // Nothing below panics while holding it; a poisoned state is whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once folder `rel` of store `store` is watched, or once the
    /// first watch has ended: a folder it skipped (a nested store's, one
    /// gone meanwhile) or could not watch, and one made after its parent
    /// was listed, are the events' and the rescans' to report.
    pub fn wait_for(&self, store: usize, rel: &Path) {
        if self.is_done() {
            return;
        }
        let mut s = self.lock();
        while !s.done && !s.folders.get(store).is_some_and(|f| f.contains(rel)) {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Returns once every folder was watched (or the thread ended).
    pub fn wait_done(&self) {
        let mut s = self.lock();
        while !s.done {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether the first watch has ended.
    pub fn is_done(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn watched(&self, store: usize, rel: &Path) {
        let mut s = self.lock();
        if let Some(f) = s.folders.get_mut(store) {
            f.insert(rel.to_path_buf());
        }
        drop(s);
        self.changed.notify_all();
    }

    fn finish(&self) {
        let mut s = self.lock();
        s.done = true;
        s.folders = Vec::new();
        self.ended.store(true, Ordering::Release);
        drop(s);
        self.changed.notify_all();
    }
}

/// Owns the inotify reader thread.
pub struct Tracker {
    producer: Producer,
    roots: Arc<Roots>,
    filter: Arc<Filter>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Adds watches recursively on every root (directories created later are watched as they appear),
    /// starts the reader thread, returns the tracker and the consumer end.
    pub fn start(cfg: TrackerConfig) -> Result<(Tracker, Coalescer), TrackerError> {
        let (tracker, coalescer, watching) = Tracker::start_watching(cfg)?;
        watching.wait_done();
        Ok((tracker, coalescer))
    }

    /// As [`Tracker::start`], but returns once the roots themselves are
    /// watched: the reader thread watches the folders below them first
    /// (a store of 50,000 folders takes tens of seconds from a cold
    /// cache), then reads events. A walk that must not read a folder
    /// before it is watched waits on the returned [`Watching`], folder by
    /// folder, so it can run beside the watching instead of after it.
    pub fn start_watching(
        cfg: TrackerConfig,
    ) -> Result<(Tracker, Coalescer, Arc<Watching>), TrackerError> {
        let filter = Arc::new(Filter::new(&cfg.exclude)?);
        let roots = Arc::new(Roots::new(&cfg.roots)?);
        let shared = Arc::new(Shared::new(cfg.roots.len(), CHANNEL_OPS_MAX).with_poke()?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let producer = Producer {
            tx: tx.clone(),
            shared: shared.clone(),
        };
        let coalescer = Coalescer::new(rx, tx, shared.clone(), coalesce::PENDING_OPS_MAX);

        let mut decoder = decode::Decoder::new(roots.canonical.clone(), filter.clone(), shared)?;
        // Only a root that cannot be watched is fatal, and it is said here.
        for store in 0..roots.canonical.len() {
            decoder.watch_root(store)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let watching = Arc::new(Watching::new(roots.canonical.len()));
        let thread = {
            let stop = stop.clone();
            let producer = producer.clone();
            let watching = watching.clone();
            std::thread::Builder::new()
                .name("hasync-tracker".into())
                .spawn(move || {
                    // Failures below the roots become Rescan ops, queued
                    // before anything the thread reads. The first watch ends
                    // once they are queued (so whoever waits for the end
                    // finds them), or if this thread unwinds.
                    let finish = FinishOnDrop(&watching);
                    let started = Instant::now();
                    let ops = decoder.watch_below_roots(&watching, &stop);
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        watches = producer.shared.snapshot().watches,
                        "tracker: every folder of the stores watched"
                    );
                    for op in ops {
                        // The consumer is alive: the tracker holds it.
                        let _ = producer.send(op);
                    }
                    drop(finish);
                    decode::run(decoder, producer, stop)
                })
                .map_err(|source| TrackerError::Spawn { source })?
        };
        let tracker = Tracker {
            producer,
            roots,
            filter,
            stop,
            thread: Some(thread),
        };
        Ok((tracker, coalescer, watching))
    }

    /// A handle for embedders that report their own writes.
    pub fn notifier(&self) -> Notifier {
        Notifier {
            producer: self.producer.clone(),
            roots: self.roots.clone(),
            filter: self.filter.clone(),
        }
    }

    /// A cheap snapshot of the counters.
    pub fn stats(&self) -> TrackerStats {
        self.producer.shared.snapshot()
    }

    /// Stops and joins the reader thread (within one poll interval).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("tracker thread panicked");
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Clonable, Send + Sync: the embedding API for appliances that know what they wrote.
#[derive(Clone)]
pub struct Notifier {
    producer: Producer,
    roots: Arc<Roots>,
    filter: Arc<Filter>,
}

impl Notifier {
    /// Queues a Sync for `abs_path`, mapped to `(store, rel)` by the longest root prefix.
    /// Excluded paths are accepted and dropped; a path outside every root is an error.
    pub fn notify(&self, abs_path: &Path) -> Result<(), TrackerError> {
        Shared::add(&self.producer.shared.events, 1);
        let (store, rel) = self.roots.locate(abs_path)?;
        if self.filter.excluded(&rel) {
            return Ok(());
        }
        let op = Op::Sync {
            store,
            rel,
            since: Instant::now(),
        };
        self.producer
            .send(op)
            .map_err(|Closed| TrackerError::Closed {
                path: abs_path.to_path_buf(),
            })
    }

    /// Queues a rename. Across stores it becomes a delete in one and a new path in the other.
    pub fn notify_rename(&self, abs_from: &Path, abs_to: &Path) -> Result<(), TrackerError> {
        Shared::add(&self.producer.shared.events, 1);
        let (from_store, from) = self.roots.locate(abs_from)?;
        let (to_store, to) = self.roots.locate(abs_to)?;
        let since = Instant::now();
        let mut ops = Vec::with_capacity(2);
        if from_store == to_store {
            ops.extend(rename_op(&self.filter, from_store, from, to, since));
        } else {
            for (store, rel) in [(from_store, from), (to_store, to)] {
                if !self.filter.excluded(&rel) {
                    ops.push(Op::Sync { store, rel, since });
                }
            }
        }
        for op in ops {
            self.producer
                .send(op)
                .map_err(|Closed| TrackerError::Closed {
                    path: abs_to.to_path_buf(),
                })?;
        }
        Ok(())
    }
}
